//! When something last moved: a connection's last request, a request body's
//! last frame, a spliced connection's last byte. One atomic, so any task may
//! mark it, and a timer asks how long it has been still.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub struct LastMoved {
    start: Instant,
    /// Milliseconds from `start` to the last move.
    last: AtomicU64,
}

impl Default for LastMoved {
    fn default() -> Self {
        Self::new()
    }
}

impl LastMoved {
    /// Moved just now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// When it will have been still for `quiet`.
    pub fn deadline(&self, quiet: Duration) -> Instant {
        // Configured durations are at most a year, so this cannot overflow;
        // checked all the same, as nothing on the request path may panic.
        let after = Duration::from_millis(self.last.load(Ordering::Relaxed)).saturating_add(quiet);
        self.start
            .checked_add(after)
            .unwrap_or_else(|| self.start + crate::config::MAX_DURATION)
    }

    /// Whether it has been still for `quiet` by now.
    pub fn still_for(&self, quiet: Duration) -> bool {
        self.deadline(quiet) <= Instant::now()
    }

    /// Resolves once it has been still for `quiet`.
    pub async fn until_still_for(&self, quiet: Duration) {
        loop {
            tokio::time::sleep_until(self.deadline(quiet)).await;
            if self.still_for(quiet) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stillness_counts_from_the_last_move() {
        let moved = LastMoved::new();
        let quiet = Duration::from_millis(200);
        tokio::time::sleep(Duration::from_millis(150)).await;
        moved.touch();
        let touched = Instant::now();
        assert!(!moved.still_for(quiet), "just moved");
        moved.until_still_for(quiet).await;
        assert!(touched.elapsed() >= quiet - Duration::from_millis(1));
        assert!(moved.still_for(quiet));
        // The largest duration is a far deadline, not an overflow.
        assert!(moved.deadline(Duration::MAX) > Instant::now());
    }
}
