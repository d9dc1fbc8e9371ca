//! Prometheus metrics, registered on an injected registry (never global).
//!
//! Label values come from fixed sets, never from client text.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub authn: &'static str,
    pub decision: &'static str,
    pub code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthnFailureLabels {
    pub method: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
    pub mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub decision: &'static str,
    pub agrees: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerOnly {
    pub issuer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub result: &'static str,
    pub version: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub trust_domain: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HashLabels {
    pub hash: String,
}

/// Every metric warden exports.
#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histogram,
    pub authn_failures: Family<AuthnFailureLabels, Counter>,
    pub authz_decisions: Family<DecisionLabels, Counter>,
    pub shadow_decisions: Family<ShadowLabels, Counter>,
    pub policy_reloads: Family<ResultLabels, Counter>,
    /// 1 for the active policy set's hash.
    pub policy_set: Family<HashLabels, Gauge>,
    pub policy_loaded: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub jwks_refresh: Family<IssuerLabels, Counter>,
    pub jwks_age: Family<IssuerOnly, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub sts_calls: Family<ResultLabels, Counter>,
    pub tls_handshake_errors: Counter,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub connections_active: Gauge,
    pub cert_reloads: Family<ResultLabels, Counter>,
    pub cert_expiry: Gauge,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub tls_peers: Family<PeerLabels, Counter>,
    /// Distinct trust domains labelled so far (bounded by `MAX_PEER_LABELS`).
    peer_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    pub connections_refused: Counter,
}

/// The `result` label of the reload and refresh counters.
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "error"];

/// The `kind` label of `warden_upstream_errors_total`.
pub const UPSTREAM_ERROR_KINDS: [&str; 4] = ["connect", "connect_timeout", "timeout", "protocol"];

/// At most this many distinct `trust_domain` labels; later ones are `other`.
const MAX_PEER_LABELS: usize = 64;

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ])
}

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            request_duration: duration_histogram(),
            authn_failures: Family::default(),
            authz_decisions: Family::default(),
            shadow_decisions: Family::default(),
            policy_reloads: Family::default(),
            policy_set: Family::default(),
            policy_loaded: Gauge::default(),
            jwks_refresh: Family::default(),
            jwks_age: Family::default(),
            sts_calls: Family::default(),
            tls_handshake_errors: Counter::default(),
            upstream_errors: Family::default(),
            connections_active: Gauge::default(),
            cert_reloads: Family::default(),
            cert_expiry: Gauge::default(),
            tls_handshakes: Family::default(),
            tls_peers: Family::default(),
            peer_labels: std::sync::Mutex::default(),
            connections_refused: Counter::default(),
        };
        registry.register(
            "warden_requests",
            "Requests answered, by authentication method, decision and status",
            m.requests.clone(),
        );
        registry.register(
            "warden_request_duration_seconds",
            "Time from request head to response head",
            m.request_duration.clone(),
        );
        registry.register(
            "warden_authn_failures",
            "Requests refused by authentication, by method and reason",
            m.authn_failures.clone(),
        );
        registry.register(
            "warden_authz_decisions",
            "Cedar decisions, by decision and mode",
            m.authz_decisions.clone(),
        );
        registry.register(
            "warden_authz_shadow_decisions",
            "Decisions of the shadow policy set, and whether they agree with the enforced one",
            m.shadow_decisions.clone(),
        );
        registry.register(
            "warden_policy_reloads",
            "Policy set reloads, by result",
            m.policy_reloads.clone(),
        );
        registry.register(
            "warden_policy_set_info",
            "The active policy set (its hash, as in the decision log)",
            m.policy_set.clone(),
        );
        registry.register(
            "warden_policy_set_loaded_timestamp_seconds",
            "When the active policy set was loaded",
            m.policy_loaded.clone(),
        );
        registry.register(
            "warden_jwks_refresh",
            "Key set fetches, by issuer and result",
            m.jwks_refresh.clone(),
        );
        registry.register(
            "warden_jwks_age_seconds",
            "Age of each issuer's current key set (absent until first loaded)",
            m.jwks_age.clone(),
        );
        registry.register(
            "warden_sts_calls",
            "Calls to STS for tokens not cached, by result (present when STS is configured)",
            m.sts_calls.clone(),
        );
        registry.register(
            "warden_tls_handshake_errors",
            "TLS handshakes that failed",
            m.tls_handshake_errors.clone(),
        );
        registry.register(
            "warden_upstream_errors",
            "Failed forwards to the upstream, by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "warden_connections_active",
            "Client connections open now",
            m.connections_active.clone(),
        );
        registry.register(
            "warden_cert_reloads",
            "Certificate reloads, by result",
            m.cert_reloads.clone(),
        );
        registry.register(
            "warden_tls_cert_expiry_timestamp_seconds",
            "When the serving certificate expires (Unix seconds)",
            m.cert_expiry.clone(),
        );
        registry.register(
            "warden_tls_handshakes",
            "TLS handshakes, by result (ok, error, timeout) and negotiated version",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "warden_tls_peers",
            "Handshakes by the client certificate's SPIFFE trust domain (none, not_spiffe; at most 64 domains, then other)",
            m.tls_peers.clone(),
        );
        registry.register(
            "warden_connections_refused",
            "Connections closed on accept because max_connections were open",
            m.connections_refused.clone(),
        );
        // Series whose labels come from a fixed set exist from the start at
        // zero, so a scrape shows every family before its first event and
        // `rate()` sees that first event.
        for result in RELOAD_RESULTS {
            let labels = ResultLabels { result };
            let _ = m.policy_reloads.get_or_create(&labels);
            let _ = m.cert_reloads.get_or_create(&labels);
        }
        for kind in UPSTREAM_ERROR_KINDS {
            let _ = m.upstream_errors.get_or_create(&KindLabels { kind });
        }
        m
    }

    /// Starts `warden_authz_decisions_total` at zero for the configured mode.
    pub fn zero_decisions(&self, mode: &'static str) {
        for decision in ["allow", "deny"] {
            let _ = self
                .authz_decisions
                .get_or_create(&DecisionLabels { decision, mode });
        }
    }

    /// Starts `warden_jwks_refresh_total` at zero for a refreshed issuer.
    pub fn zero_jwks_refresh(&self, issuer: &str) {
        for result in RELOAD_RESULTS {
            let _ = self.jwks_refresh.get_or_create(&IssuerLabels {
                issuer: issuer.to_owned(),
                result,
            });
        }
    }

    /// Counts a handshake's peer by trust domain, with a bounded label set.
    pub fn count_peer(&self, trust_domain: &str) {
        let label = {
            let mut seen = self
                .peer_labels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.contains(trust_domain) {
                trust_domain
            } else if seen.len() < MAX_PEER_LABELS {
                seen.insert(trust_domain.to_owned());
                trust_domain
            } else {
                "other"
            }
        };
        self.tls_peers
            .get_or_create(&PeerLabels {
                trust_domain: label.to_owned(),
            })
            .inc();
    }

    /// Records `hash` as the active policy set, loaded at `at`.
    pub fn set_policy_set(&self, hash: &str, at: std::time::SystemTime) {
        self.policy_set.clear();
        self.policy_set
            .get_or_create(&HashLabels {
                hash: hash.to_owned(),
            })
            .set(1);
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.policy_loaded.set(secs);
    }
}
