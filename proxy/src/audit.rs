//! The decision log: one flat JSON object per request on stdout.
//!
//! Lines are handed to a dedicated writer thread through a bounded channel so
//! the request path never blocks on stdout; if the writer falls behind, lines
//! are dropped and counted rather than queued without bound.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

const QUEUE: usize = 8192;

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
    dropped: Arc<AtomicU64>,
    /// Lines queued, and lines the stdout writer has written (None: no writer).
    sent: Arc<AtomicU64>,
    written: Option<Arc<AtomicU64>>,
}

impl DecisionLog {
    /// Writes to stdout from a background thread.
    pub fn stdout() -> Self {
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let count = written.clone();
        let spawned = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                // One write per batch: stdout is line-buffered, so lines
                // written one by one would cost a system call each.
                let mut batch = Vec::with_capacity(64 * 1024);
                while let Ok(line) = rx.recv() {
                    batch.clear();
                    let mut n = 0;
                    for line in std::iter::once(line).chain(rx.try_iter().take(QUEUE)) {
                        batch.extend_from_slice(line.as_bytes());
                        batch.push(b'\n');
                        n += 1;
                    }
                    let mut out = stdout.lock();
                    let _ = out.write_all(&batch);
                    let _ = out.flush();
                    drop(out);
                    count.fetch_add(n, Ordering::Release);
                    std::thread::sleep(BATCH);
                }
            });
        match spawned {
            Ok(_) => Self {
                tx: Some(tx),
                dropped: Arc::default(),
                sent: Arc::default(),
                written: Some(written),
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
                dropped: Arc::default(),
                sent: Arc::default(),
                written: None,
            },
            rx,
        )
    }

    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::default(),
            sent: Arc::default(),
            written: None,
        }
    }

    pub fn write(&self, line: String) {
        if let Some(tx) = &self.tx {
            match tx.try_send(line) {
                Ok(()) => {
                    self.sent.fetch_add(1, Ordering::Release);
                }
                Err(TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
