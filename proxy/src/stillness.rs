//! When something last moved: a connection's last request, a request body's
//! last frame, a spliced connection's last byte. One atomic, so any task may
//! mark it, and a timer asks how long it has been still. And a future that
//! is dropped once nothing but its own timer has woken it for a while.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

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
        let since = Duration::from_millis(self.last.load(Ordering::Relaxed)).saturating_add(quiet);
        later(self.start, since)
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

pin_project_lite::pin_project! {
    /// Runs `inner` until it completes, or until a whole `quiet` period has
    /// passed in which nothing but this timer woke it; then it is dropped
    /// and the result is `None`. It is cut between one and two periods
    /// after its last wake-up. The timer is moved once a period, not on
    /// every poll.
    pub struct CutWhenStill<F> {
        #[pin]
        inner: F,
        #[pin]
        check: Sleep,
        quiet: Duration,
        woken: bool,
    }
}

impl<F> CutWhenStill<F> {
    pub fn new(inner: F, quiet: Duration) -> Self {
        Self {
            inner,
            check: tokio::time::sleep_until(later(Instant::now(), quiet)),
            quiet,
            woken: false,
        }
    }
}

/// `by` after `at`. Configured durations are at most a year, so this cannot
/// overflow; checked all the same, as nothing on the request path may panic.
fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by)
        .unwrap_or_else(|| at + crate::config::MAX_DURATION)
}

impl<F: Future> Future for CutWhenStill<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if this.check.as_mut().poll(cx).is_ready() {
            // The timer is due; it may not be the only thing that woke us,
            // but a period without any other wake-up is what is cut.
            if !*this.woken {
                return Poll::Ready(None);
            }
            *this.woken = false;
            this.check
                .as_mut()
                .reset(later(Instant::now(), *this.quiet));
            // Registers the wake-up for the new deadline.
            let _ = this.check.as_mut().poll(cx);
        } else {
            *this.woken = true;
        }
        this.inner.poll(cx).map(Some)
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

    #[tokio::test]
    async fn a_future_woken_by_nothing_but_its_timer_is_cut() {
        let quiet = Duration::from_millis(200);
        let start = Instant::now();
        let still = CutWhenStill::new(std::future::pending::<()>(), quiet);
        let cut = tokio::time::timeout(Duration::from_secs(10), still).await;
        assert_eq!(cut, Ok(None), "never cut");
        assert!(start.elapsed() >= quiet, "cut after {:?}", start.elapsed());

        // Woken every 50 ms for 600 ms, three periods: it runs to the end.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for i in 0..12u32 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(i).await;
            }
        });
        let drained = async move {
            let mut last = None;
            while let Some(i) = rx.recv().await {
                last = Some(i);
            }
            last
        };
        assert_eq!(CutWhenStill::new(drained, quiet).await, Some(Some(11)));
    }
}
