//! Building the proxy from a config: load and validate everything once, bind
//! the listeners, then serve until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::audit::DecisionLog;
use crate::authn::{jwks, jwt, sigv4, sts, Authenticator, SigV4State};
use crate::authz::PolicySnapshot;
use crate::config::Config;
use crate::listener::{self, ConnSettings};
use crate::metrics::{Metrics, ResultLabels};
use crate::pipeline::{self, Shared};

/// Everything parsed and validated from a config, before any socket is bound.
pub struct Loaded {
    pub authn: Authenticator,
    pub policies: PolicySnapshot,
    pub shadow: Option<PolicySnapshot>,
    pub tls: Option<crate::certs::Material>,
}

/// Loads credentials, key sets, policies and certificates; every error names
/// its file.
pub fn load(cfg: &Config) -> Result<Loaded, String> {
    cfg.validate().map_err(|e| e.to_string())?;
    let sigv4 = match &cfg.authn.sigv4 {
        Some(s) => Some(SigV4State {
            verifier: {
                let v = sigv4::Verifier::new(
                    s.region.0.clone(),
                    s.service.clone(),
                    s.max_skew,
                    sigv4::load_credentials(&s.credentials)?,
                )
                .with_encoding(s.uri_encoding);
                if s.replay_guard {
                    v.with_replay_guard(s.replay_capacity)
                } else {
                    v
                }
            },
            max_body: s.max_body,
            body_timeout: cfg.upstream.request_timeout,
            accounts: cfg.authn.aws.accounts.clone(),
        }),
        None => None,
    };
    let mut issuers = Vec::new();
    for j in &cfg.authn.jwt {
        let issuer = jwt::Issuer::new(j.clone())
            .map_err(|e| format!("[[authn.jwt]] issuer `{}`: {e}", j.issuer))?;
        if issuer.source.is_remote() {
            jwks::Fetcher::new(j.ca_file.as_deref())
                .map_err(|e| format!("[[authn.jwt]] issuer `{}`: {e}", j.issuer))?;
        }
        issuers.push(issuer);
    }
    let sts = cfg
        .authn
        .sts
        .as_ref()
        .map(|s| sts::StsVerifier::new(s, &cfg.service.name))
        .transpose()?;
    let authn = Authenticator {
        sigv4,
        jwt: jwt::JwtVerifier::new(issuers),
        sts,
        accounts: cfg.authn.aws.accounts.clone(),
        mtls_trust_domains: cfg
            .listener
            .tls
            .as_ref()
            .and_then(|t| t.trust_domains.clone()),
    };
    let policies = PolicySnapshot::load(
        &cfg.authz.policies,
        &cfg.authz.schema_path(),
        cfg.authz.mode,
        &cfg.service,
    )?;
    let tls = cfg
        .listener
        .tls
        .as_ref()
        .map(crate::certs::load)
        .transpose()?;
    let shadow = match (&cfg.authz.shadow_policies, cfg.authz.shadow_schema_path()) {
        (Some(dir), Some(schema)) => Some(
            PolicySnapshot::load(dir, &schema, cfg.authz.mode, &cfg.service)
                .map_err(|e| format!("shadow policies: {e}"))?,
        ),
        _ => None,
    };
    Ok(Loaded {
        authn,
        policies,
        shadow,
        tls,
    })
}

/// Draws from the system RNG once before serving. Its first use gathers
/// entropy for tens of milliseconds, which would otherwise land on the
/// first TLS handshake. An RNG that cannot be used stops start-up: TLS
/// handshakes need it, and a proxy that cannot make them should not report
/// itself started.
fn seed_rng() -> Result<(), String> {
    aws_lc_rs::rand::fill(&mut [0u8; 16])
        .map_err(|_| "the system random number generator is unavailable".to_owned())
}

/// Starts one background refresher per remote key set.
fn spawn_refreshers(authn: &Authenticator, metrics: &Arc<Metrics>) -> Result<(), String> {
    for issuer in authn.jwt.issuers() {
        if !issuer.source.is_remote() {
            continue;
        }
        let cfg = issuer.config().clone();
        metrics.zero_jwks_refresh(&cfg.issuer);
        let fetcher = jwks::Fetcher::new(cfg.ca_file.as_deref())
            .map_err(|e| format!("[[authn.jwt]] issuer `{}`: {e}", cfg.issuer))?;
        tokio::spawn(jwks::refresh(
            Arc::downgrade(&issuer.source),
            cfg,
            issuer.allowed_algorithms().to_vec(),
            fetcher,
            metrics.clone(),
        ));
    }
    Ok(())
}

/// A bound, ready-to-run proxy.
pub struct App {
    cfg: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    tls: Option<listener::TlsSource>,
    shared: Shared,
    admin: Admin,
}

impl App {
    /// Loads `cfg` and binds the proxy and admin listeners.
    pub async fn bind(cfg: Config, log: DecisionLog) -> Result<Self, String> {
        let mut loaded = load(&cfg)?;
        seed_rng()?;
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        if let Some(sts) = loaded.authn.sts.as_mut() {
            sts.record_to(metrics.sts_calls.clone());
        }
        registry.register_collector(Box::new(crate::process::ProcessCollector::new()));
        registry.register(
            "warden_decision_log_dropped",
            "Decision-log lines dropped because stdout fell behind (the queue holds 8 192 lines or 4 MiB)",
            log.dropped(),
        );
        metrics.zero_decisions(cfg.authz.mode.as_str());
        metrics
            .policy_reloads
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
        let listener = listener::bind(cfg.listener.address).await?;
        let admin_listener = listener::bind(cfg.admin.address).await?;
        match &loaded.tls {
            None => tracing::warn!("listener is plaintext: for local development only"),
            Some(m) => crate::certs::record(m, &metrics),
        }
        let shared = Shared {
            authn: Arc::new(ArcSwap::from_pointee(loaded.authn)),
            policies: Arc::new(ArcSwap::from_pointee(loaded.policies)),
            shadow: loaded.shadow.map(|s| Arc::new(ArcSwap::from_pointee(s))),
            metrics,
            log,
            mode: cfg.authz.mode,
            explain: cfg.authz.explain_header,
            identity: cfg.identity.headers,
            upstream: cfg.upstream.clone(),
            routes: cfg.route.clone(),
            max_requests: cfg.runtime.max_requests,
            max_header_bytes: usize::try_from(cfg.runtime.max_header_bytes).unwrap_or(usize::MAX),
            idle_timeout: cfg.runtime.idle_timeout,
        };
        spawn_refreshers(&shared.authn.load(), &shared.metrics)?;
        {
            let set = shared.policies.load();
            shared.metrics.set_policy_set(&set.hash, set.loaded_at);
        }
        let admin = Admin {
            registry: Arc::new(registry),
            metrics: shared.metrics.clone(),
            ready: Arc::new(AtomicBool::new(true)),
            authn: shared.authn.clone(),
            policies: shared.policies.clone(),
        };
        Ok(Self {
            listener,
            admin_listener,
            tls: loaded.tls.map(|m| Arc::new(ArcSwap::new(m.config))),
            shared,
            admin,
            cfg,
        })
    }

    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener.local_addr().ok()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, reports not
    /// ready, and drains in-flight requests.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let settings = ConnSettings {
            header_read_timeout: self.cfg.runtime.header_read_timeout,
            drain_timeout: self.cfg.runtime.drain_timeout,
            max_header_bytes: usize::try_from(self.cfg.runtime.max_header_bytes)
                .unwrap_or(usize::MAX),
            max_connections: self.cfg.runtime.max_connections,
            max_concurrent_streams: self.cfg.runtime.max_concurrent_streams,
            idle_timeout: self.cfg.runtime.idle_timeout,
            // Longer than the waits that have their own bound (the
            // upstream's answer, a still request body), so those answer
            // first with their own status.
            stream_idle_timeout: self
                .cfg
                .runtime
                .idle_timeout
                .max(self.cfg.upstream.request_timeout),
        };
        let cert_watcher = match (&self.tls, &self.cfg.listener.tls) {
            (Some(active), Some(tls)) => Some(tokio::spawn(crate::certs::watch(
                tls.clone(),
                active.clone(),
                self.shared.metrics.clone(),
            ))),
            _ => None,
        };
        let ready = self.admin.ready.clone();
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = tokio::spawn(self.admin.serve(
            self.admin_listener,
            self.cfg.runtime.header_read_timeout,
            async {
                let _ = admin_stopped.await;
            },
        ));
        let policy_source = crate::reload::PolicySource {
            dir: self.cfg.authz.policies.clone(),
            schema: self.cfg.authz.schema_path(),
            mode: self.cfg.authz.mode,
            service: self.cfg.service.clone(),
        };
        let reloader = tokio::spawn(crate::reload::watch(
            policy_source,
            self.shared.policies.clone(),
            self.shared.metrics.clone(),
        ));
        let shadow_reloader = match (&self.shared.shadow, &self.cfg.authz.shadow_policies) {
            (Some(shadow), Some(dir)) => Some(tokio::spawn(crate::reload::watch(
                crate::reload::PolicySource {
                    dir: dir.clone(),
                    schema: self
                        .cfg
                        .authz
                        .shadow_schema_path()
                        .unwrap_or_else(|| self.cfg.authz.schema_path()),
                    mode: self.cfg.authz.mode,
                    service: self.cfg.service.clone(),
                },
                shadow.clone(),
                // The shadow set's reloads are not the enforced set's: keep its
                // counts and gauges out of the main metrics.
                Arc::new(Metrics::register(&mut Registry::default())),
            ))),
            _ => None,
        };
        let ticker = tokio::spawn(keep_a_timer_due(
            (settings.header_read_timeout)
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(100)),
        ));
        let service = pipeline::build(&self.shared);
        let shutdown = async move {
            shutdown.await;
            ready.store(false, Ordering::Release);
            tracing::info!("draining");
        };
        listener::serve(
            self.listener,
            self.tls,
            service,
            pipeline::observer(&self.shared),
            self.shared.metrics.clone(),
            settings,
            shutdown,
        )
        .await;
        reloader.abort();
        ticker.abort();
        for task in [shadow_reloader, cert_watcher].into_iter().flatten() {
            task.abort();
        }
        let _ = stop_admin.send(());
        let _ = admin.await;
    }
}

/// Keeps a timer due within `period`, so the runtime never sleeps longer.
///
/// After each response, hyper arms the connection's header-read timer (now +
/// `header_read_timeout`) while it waits for the next request. When that timer
/// is the earliest, tokio wakes its own driver to shorten the sleep it
/// planned: an eventfd write and an extra `epoll_wait`, two of a lone kept-alive
/// connection's eight system calls per request. With a tick always due sooner,
/// arming the header timer only inserts it. The cost is one wake-up per
/// `period` when idle; `period` is at most the header-read timeout, and at
/// least 100 ms.
async fn keep_a_timer_due(period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}
