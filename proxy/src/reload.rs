//! Policy hot reload: the policy directory is watched (and its parent, so a
//! Kubernetes ConfigMap's symlink swap is seen), and SIGHUP reloads too.
//!
//! A new set is parsed and strictly validated on a blocking thread, off the
//! request path, then swapped in atomically; requests already deciding keep
//! the set they loaded. A broken set is refused, logged with file and line,
//! counted, and the old set keeps deciding.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::authz::PolicySnapshot;
use crate::config::{AuthzMode, ServiceConfig};
use crate::metrics::{Metrics, ResultLabels};

/// Where policies come from, as configured.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub dir: PathBuf,
    pub schema: PathBuf,
    pub mode: AuthzMode,
    pub service: ServiceConfig,
}

impl PolicySource {
    pub fn load(&self) -> Result<PolicySnapshot, String> {
        PolicySnapshot::load(&self.dir, &self.schema, self.mode, &self.service)
    }
}

/// Loads the set again; swaps it in if it is valid and differs. Files that
/// read the same as the active set's, or as the set last refused
/// (`refused`), are not parsed again unless `forced` (SIGHUP): a broken set
/// is reported once, not on every unrelated change beside it.
pub async fn reload_once(
    source: &PolicySource,
    active: &ArcSwap<PolicySnapshot>,
    metrics: &Metrics,
    forced: bool,
    refused: &mut Option<[u8; 32]>,
) {
    let src = source.clone();
    let current = active.load().source;
    let known = *refused;
    let (digest, loaded) = tokio::task::spawn_blocking(move || {
        let digest = crate::authz::source_digest(&src.dir, &src.schema).ok();
        let seen = digest.is_some_and(|d| d == current || Some(d) == known);
        if seen && !forced {
            return (digest, Ok(None));
        }
        (digest, src.load().map(Some))
    })
    .await
    .unwrap_or_else(|e| (None, Err(format!("reload task failed: {e}"))));
    if loaded.is_err() {
        *refused = digest;
    }
    match loaded {
        Ok(None) => {}
        Ok(Some(set)) if set.source == active.load().source => {}
        Ok(Some(set)) => {
            tracing::info!(policy_set = %set.hash, "policies reloaded");
            metrics.set_policy_set(&set.hash, set.loaded_at);
            metrics
                .policy_reloads
                .get_or_create(&ResultLabels { result: "ok" })
                .inc();
            active.store(Arc::new(set));
        }
        Err(e) => {
            tracing::error!(error = %e, policy_set = %active.load().hash, "policy reload refused; the old set keeps deciding");
            metrics
                .policy_reloads
                .get_or_create(&ResultLabels { result: "error" })
                .inc();
        }
    }
}

/// Watches the policy directory and SIGHUP until the task is dropped.
pub async fn watch(
    source: PolicySource,
    active: Arc<ArcSwap<PolicySnapshot>>,
    metrics: Arc<Metrics>,
) {
    let mut dirs = vec![source.dir.clone()];
    dirs.extend(source.dir.parent().map(PathBuf::from));
    dirs.extend(source.schema.parent().map(PathBuf::from));
    let mut changes = Changes::new(&dirs, "policies");
    let mut refused = None;
    while changes.next().await {
        reload_once(
            &source,
            &active,
            &metrics,
            changes.by_signal(),
            &mut refused,
        )
        .await;
    }
}

/// When to reload: a change in watched directories (settled) or SIGHUP.
///
/// Each directory is watched non-recursively, so a Kubernetes ConfigMap or
/// Secret — files that are symlinks into a `..data` symlink swapped in one
/// rename — is seen by watching the directory holding the files.
pub struct Changes {
    rx: mpsc::Receiver<()>,
    /// Whether the last reason was SIGHUP rather than a file change.
    by_signal: bool,
    hup: Option<tokio::signal::unix::Signal>,
    what: &'static str,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Changes {
    /// Watches `paths`: directories, and the directories holding files.
    pub fn new(paths: &[PathBuf], what: &'static str) -> Self {
        let (tx, rx) = mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, what, "cannot watch files; reload with SIGHUP");
                None
            }
        };
        if let Some(w) = watcher.as_mut() {
            let mut dirs: Vec<PathBuf> = paths
                .iter()
                .filter_map(|p| {
                    if p.is_dir() {
                        Some(p.clone())
                    } else {
                        p.parent().map(PathBuf::from)
                    }
                })
                .map(|d| {
                    if d.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        d
                    }
                })
                .collect();
            dirs.sort();
            dirs.dedup();
            for d in dirs.iter().filter(|d| d.is_dir()) {
                if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                    tracing::warn!(path = %d.display(), error = %e, what, "cannot watch");
                }
            }
        }
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        Self {
            rx,
            by_signal: false,
            hup,
            what,
            _watcher: watcher,
        }
    }

    /// Whether the last reason [`next`](Self::next) returned was SIGHUP.
    pub fn by_signal(&self) -> bool {
        self.by_signal
    }

    /// Waits for the next reason to reload; `false` once watching has ended.
    pub async fn next(&mut self) -> bool {
        self.by_signal = false;
        tokio::select! {
            got = self.rx.recv() => {
                if got.is_none() {
                    return false;
                }
                // Editors and ConfigMap swaps write several files: let the
                // burst settle, then read once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while self.rx.try_recv().is_ok() {}
                true
            }
            Some(()) = async {
                match self.hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!(what = self.what, "SIGHUP: reloading");
                self.by_signal = true;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(metrics: &Metrics, result: &'static str) -> u64 {
        metrics
            .policy_reloads
            .get_or_create(&ResultLabels { result })
            .get()
    }

    #[tokio::test]
    async fn a_refused_set_is_reported_once_and_a_fixed_one_swapped_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = dir.path().join("schema.cedarschema");
        std::fs::write(&schema, crate::authz::testing::SHIPPED).expect("write");
        let policy = dir.path().join("p.cedar");
        std::fs::write(&policy, "permit (principal, action, resource);").expect("write");
        let source = PolicySource {
            dir: dir.path().to_path_buf(),
            schema,
            mode: AuthzMode::Enforce,
            service: ServiceConfig::default(),
        };
        let active = ArcSwap::from_pointee(source.load().expect("load"));
        let first = active.load().source;
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let mut refused = None;

        // Nothing changed: nothing parsed, nothing counted.
        reload_once(&source, &active, &metrics, false, &mut refused).await;
        assert_eq!((count(&metrics, "ok"), count(&metrics, "error")), (0, 0));

        // Broken: refused once; the same broken files are not reported again
        // on the next unrelated change, only on SIGHUP.
        std::fs::write(&policy, "permit (principal, action, resource").expect("write");
        reload_once(&source, &active, &metrics, false, &mut refused).await;
        reload_once(&source, &active, &metrics, false, &mut refused).await;
        assert_eq!((count(&metrics, "ok"), count(&metrics, "error")), (0, 1));
        reload_once(&source, &active, &metrics, true, &mut refused).await;
        assert_eq!(count(&metrics, "error"), 2);
        assert_eq!(active.load().source, first, "the old set keeps deciding");

        // Fixed (and different): swapped in.
        std::fs::write(&policy, "forbid (principal, action, resource);").expect("write");
        reload_once(&source, &active, &metrics, false, &mut refused).await;
        assert_eq!((count(&metrics, "ok"), count(&metrics, "error")), (1, 2));
        assert_ne!(active.load().source, first);
    }
}
