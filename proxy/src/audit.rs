//! The decision log: one flat JSON object per request on stdout.
//!
//! Lines are handed to a dedicated writer thread through a bounded channel so
//! the request path never blocks on stdout; if the writer falls behind, lines
//! are dropped and counted rather than queued without bound. The bound is in
//! lines and in bytes: a line holds the request's path, which the client
//! chose, so 8 192 lines could otherwise be 8 192 paths of 30 KB.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

const QUEUE: usize = 8192;
/// Bytes of lines queued at most: [`QUEUE`] lines of 512 bytes, where a
/// typical line is 300–400 bytes.
const QUEUE_BYTES: usize = QUEUE * 512;
/// The writer writes its buffer out whenever it holds this much, and keeps no
/// more than this between batches.
const BATCH_CAPACITY: usize = 64 * 1024;

/// How long the writer thread lets lines gather after writing a batch. While
/// it waits, senders find no parked receiver to wake, so under load the
/// request path pays no thread wake-up per line, and the writer itself wakes
/// at most 20 times a second (each wake-up of an idle core costs tens of
/// microseconds on a virtual machine). [`QUEUE`] holds 50 ms of lines up to
/// 160 000 requests a second.
const BATCH: std::time::Duration = std::time::Duration::from_millis(50);

/// Where decision-log lines go.
#[derive(Debug, Clone)]
pub struct DecisionLog {
    tx: Option<SyncSender<String>>,
    /// Lines dropped, as `warden_decision_log_dropped_total` shows them.
    dropped: Counter,
    /// Lines queued, and lines the stdout writer has written (None: no writer).
    sent: Arc<AtomicU64>,
    written: Option<Arc<AtomicU64>>,
    /// Bytes of the lines queued and not yet taken by the writer (None: the
    /// lines go to a test, bounded in number only).
    queued: Option<Arc<AtomicUsize>>,
}

impl DecisionLog {
    /// Writes to stdout from a background thread.
    pub fn stdout() -> Self {
        Self::to_writer(std::io::stdout())
    }

    /// Writes to `out` from a background thread, a batch at a time.
    fn to_writer(mut out: impl Write + Send + 'static) -> Self {
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let (count, taken) = (written.clone(), queued.clone());
        let spawned = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || {
                // One write per batch (or per 64 KiB of it): stdout is
                // line-buffered, so lines written one by one would cost a
                // system call each.
                let mut batch = Vec::with_capacity(BATCH_CAPACITY);
                while let Ok(line) = rx.recv() {
                    batch.clear();
                    let mut n = 0;
                    for line in std::iter::once(line).chain(rx.try_iter().take(QUEUE)) {
                        taken.fetch_sub(line.len(), Ordering::AcqRel);
                        batch.extend_from_slice(line.as_bytes());
                        batch.push(b'\n');
                        n += 1;
                        if batch.len() >= BATCH_CAPACITY {
                            let _ = out.write_all(&batch);
                            batch.clear();
                        }
                    }
                    let _ = out.write_all(&batch);
                    let _ = out.flush();
                    // A batch of long lines leaves no large buffer behind.
                    batch.shrink_to(BATCH_CAPACITY);
                    count.fetch_add(n, Ordering::Release);
                    std::thread::sleep(BATCH);
                }
            });
        match spawned {
            Ok(_) => Self {
                tx: Some(tx),
                dropped: Counter::default(),
                sent: Arc::default(),
                written: Some(written),
                queued: Some(queued),
            },
            Err(_) => Self::disabled(),
        }
    }

    /// Waits (up to a second) until every line queued so far is written:
    /// called once at exit so the last requests' lines are not lost.
    pub fn flush(&self) {
        let Some(written) = &self.written else {
            return;
        };
        let target = self.sent.load(Ordering::Acquire);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while written.load(Ordering::Acquire) < target && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// A log whose lines a test reads from the returned receiver.
    pub fn channel() -> (Self, Receiver<String>) {
        let (tx, rx) = sync_channel(QUEUE);
        (
            Self {
                tx: Some(tx),
                dropped: Counter::default(),
                sent: Arc::default(),
                written: None,
                queued: None,
            },
            rx,
        )
    }

    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Counter::default(),
            sent: Arc::default(),
            written: None,
            queued: None,
        }
    }

    pub fn write(&self, line: String) {
        let Some(tx) = &self.tx else {
            return;
        };
        let len = line.len();
        // Counted before it is sent, so the writer's count never dips below
        // zero.
        let over =
            |queued: &AtomicUsize| queued.fetch_add(len, Ordering::AcqRel) + len > QUEUE_BYTES;
        let sent = match &self.queued {
            Some(queued) if over(queued) => false,
            _ => tx.try_send(line).is_ok(),
        };
        if sent {
            self.sent.fetch_add(1, Ordering::Release);
        } else {
            if let Some(queued) = &self.queued {
                queued.fetch_sub(len, Ordering::AcqRel);
            }
            self.dropped.inc();
        }
    }

    /// The count of lines dropped, shared with whoever registers it.
    pub fn dropped(&self) -> Counter {
        self.dropped.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver as Gate};
    use std::sync::Mutex;

    /// A writer that writes nothing until the gate opens, as a stalled
    /// stdout would.
    struct Stalled {
        gate: Option<Gate<()>>,
        out: Arc<Mutex<Vec<u8>>>,
        /// The longest single write.
        longest: Arc<AtomicUsize>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            self.out.lock().expect("out").extend_from_slice(buf);
            self.longest.fetch_max(buf.len(), Ordering::AcqRel);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_holds_no_more_than_the_byte_bound() {
        let (open, gate) = channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let longest = Arc::new(AtomicUsize::new(0));
        let log = DecisionLog::to_writer(Stalled {
            gate: Some(gate),
            out: out.clone(),
            longest: longest.clone(),
        });
        // Lines of 30 KB, as a client's long paths make them: the line
        // bound alone would queue 8 192 of them, 240 MB.
        let line = "x".repeat(30 * 1024);
        let tries = 1_000;
        for _ in 0..tries {
            log.write(line.clone());
            let queued = log
                .queued
                .as_ref()
                .expect("counted")
                .load(Ordering::Acquire);
            assert!(queued <= QUEUE_BYTES, "{queued}");
        }
        let sent = log.sent.load(Ordering::Acquire);
        assert!(sent < tries, "{sent}");
        assert_eq!(sent + log.dropped().get(), tries);

        // Once the writer moves, every line taken is written whole.
        open.send(()).expect("open");
        log.flush();
        let out = out.lock().expect("out");
        let lines: Vec<&[u8]> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len() as u64, sent);
        assert!(lines.iter().all(|l| *l == line.as_bytes()));
        // Written a piece at a time, not as one buffer of the whole queue.
        let longest = longest.load(Ordering::Acquire);
        assert!(longest < BATCH_CAPACITY + line.len() + 1, "{longest}");
        assert_eq!(
            log.queued
                .as_ref()
                .expect("counted")
                .load(Ordering::Acquire),
            0
        );
    }
}
