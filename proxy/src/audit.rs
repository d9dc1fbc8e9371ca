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

/// Where decision-log lines go.
#[derive(Debug, Clone)]
pub struct DecisionLog {
    tx: Option<SyncSender<String>>,
    dropped: Arc<AtomicU64>,
}

impl DecisionLog {
    /// Writes to stdout from a background thread.
    pub fn stdout() -> Self {
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                while let Ok(line) = rx.recv() {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "{line}");
                    // Drain what is queued before flushing once.
                    while let Ok(line) = rx.try_recv() {
                        let _ = writeln!(out, "{line}");
                    }
                    let _ = out.flush();
                }
            });
        match spawned {
            Ok(_) => Self {
                tx: Some(tx),
                dropped: Arc::default(),
            },
            Err(_) => Self::disabled(),
        }
    }

    /// A log whose lines a test reads from the returned receiver.
    pub fn channel() -> (Self, Receiver<String>) {
        let (tx, rx) = sync_channel(QUEUE);
        (
            Self {
                tx: Some(tx),
                dropped: Arc::default(),
            },
            rx,
        )
    }

    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::default(),
        }
    }

    pub fn write(&self, line: String) {
        if let Some(tx) = &self.tx {
            if let Err(TrySendError::Full(_)) = tx.try_send(line) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
