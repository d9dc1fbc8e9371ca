//! Configuration: TOML per DESIGN §4, every key overridable as
//! `WARDEN_SECTION__KEY`. Unknown keys are errors that name the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

/// A configuration problem, pointing at the file (and line, where known).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listener: ListenerConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub service: ServiceConfig,
    #[serde(default)]
    pub authn: AuthnConfig,
    #[serde(default)]
    pub authz: AuthzConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Gateway mode: requests are routed by host (and path prefix) to one of
    /// several upstreams, each its own `Http::Service`.
    #[serde(default)]
    pub route: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `api.example.com` or `*.example.com` (any subdomain); the port is ignored.
    pub host: String,
    /// Only paths under this prefix (segment-aware: `/api` matches `/api` and `/api/x`).
    pub path_prefix: Option<String>,
    pub upstream: UpstreamAddr,
    /// The `Http::Service` this route's paths belong to.
    pub service: String,
    pub service_arn: Option<String>,
}

impl RouteConfig {
    /// Whether `host` (without port, lowercase) and `path` select this route.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        let pattern = self.host.to_ascii_lowercase();
        let host_ok = match pattern.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => host == pattern,
        };
        let path_ok = self.path_prefix.as_deref().is_none_or(|prefix| {
            let prefix = prefix.trim_end_matches('/');
            prefix.is_empty()
                || path == prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        host_ok && path_ok
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default = "default_listener")]
    pub address: SocketAddr,
    pub tls: Option<TlsConfig>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            address: default_listener(),
            tls: None,
        }
    }
}

fn default_listener() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15001))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// SPIFFE trust domains a client certificate may assert (absent = any).
    pub trust_domains: Option<Vec<String>>,
    /// TLS versions offered: `["1.2", "1.3"]` by default.
    #[serde(default = "default_tls_versions")]
    pub versions: Vec<TlsVersion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

fn default_tls_versions() -> Vec<TlsVersion> {
    vec![TlsVersion::V1_2, TlsVersion::V1_3]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Required,
    Optional,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default = "default_upstream")]
    pub address: UpstreamAddr,
    #[serde(default = "secs::<1>", deserialize_with = "timeout")]
    pub connect_timeout: Duration,
    #[serde(default = "secs::<30>", deserialize_with = "timeout")]
    pub request_timeout: Duration,
    /// `http1`, or `h2` (prior knowledge) for gRPC services: trailers pass through.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            address: default_upstream(),
            connect_timeout: secs::<1>(),
            request_timeout: secs::<30>(),
            protocol: UpstreamProtocol::default(),
        }
    }
}

fn default_upstream() -> UpstreamAddr {
    UpstreamAddr::Tcp("127.0.0.1:8080".to_owned())
}

/// Where the local service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// `ip:port` or `host:port` (resolved when connecting).
    Tcp(String),
    Unix(PathBuf),
}

impl<'de> Deserialize<'de> for UpstreamAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(de::Error::custom("`unix:` needs a socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let valid = s.parse::<SocketAddr>().is_ok()
            || s.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains(['/', ' ', '[', ']'])
                    && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
        if valid {
            Ok(Self::Tcp(s))
        } else {
            Err(de::Error::custom(format!(
                "invalid upstream address `{s}`: expected `host:port`, `ip:port` or `unix:/path`"
            )))
        }
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin")]
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: default_admin(),
        }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15090))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default = "default_service")]
    pub name: String,
    pub arn: Option<String>,
    /// The Lattice service network this service belongs to
    /// (`vpc-lattice-svcs:ServiceNetworkArn`).
    pub network_arn: Option<String>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            name: default_service(),
            arn: None,
            network_arn: None,
        }
    }
}

fn default_service() -> String {
    "local".to_owned()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthnConfig {
    pub sigv4: Option<SigV4Config>,
    pub sts: Option<StsConfig>,
    #[serde(default)]
    pub aws: AwsConfig,
    #[serde(default)]
    pub jwt: Vec<JwtIssuerConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigV4Config {
    #[serde(default = "default_region")]
    pub region: OneOrMany,
    #[serde(default = "default_sigv4_service")]
    pub service: String,
    pub credentials: PathBuf,
    #[serde(default = "secs::<300>", deserialize_with = "duration")]
    pub max_skew: Duration,
    #[serde(default = "default_max_body", deserialize_with = "size")]
    pub max_body: u64,
    /// Refuse a signature seen before within its window.
    #[serde(default)]
    pub replay_guard: bool,
    /// Signatures remembered by the replay guard at most.
    #[serde(default = "default_replay_capacity")]
    pub replay_capacity: usize,
    /// `double` (non-S3 services) or `single` (S3-style) canonical URI encoding.
    #[serde(default)]
    pub uri_encoding: crate::authn::sigv4::UriEncoding,
}

fn default_replay_capacity() -> usize {
    100_000
}

fn default_region() -> OneOrMany {
    OneOrMany(vec!["us-east-1".to_owned()])
}

fn default_sigv4_service() -> String {
    "vpc-lattice-svcs".to_owned()
}

fn default_max_body() -> u64 {
    1024 * 1024
}

/// A string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::One(s) => Self(vec![s]),
            Raw::Many(v) => Self(v),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StsConfig {
    pub endpoint: String,
    #[serde(default = "default_audience_header")]
    pub audience_header: String,
    pub audience: Option<String>,
    #[serde(default = "secs::<300>", deserialize_with = "duration")]
    pub cache_ttl: Duration,
    /// PEM CA bundle trusted for the endpoint (default: the Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// STS calls under way at once; a token that would need one more is 503.
    #[serde(default = "default_sts_concurrent")]
    pub max_concurrent: usize,
}

fn default_sts_concurrent() -> usize {
    64
}

fn default_audience_header() -> String {
    "x-k8s-aws-id".to_owned()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Account id -> organization id.
    #[serde(default)]
    pub accounts: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    pub jwks_file: Option<PathBuf>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    pub principal: PrincipalKind,
    /// Cluster name for `k8s` issuers (default: the issuer URL).
    pub cluster: Option<String>,
    /// Trust domains a `spiffe` issuer may assert (absent = any).
    pub trust_domains: Option<Vec<String>>,
    #[serde(default = "secs::<60>", deserialize_with = "duration")]
    pub leeway: Duration,
    /// Refuse tokens whose `exp - iat` (or `exp - now`) exceeds this.
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_lifetime: Option<Duration>,
    /// PEM CA bundle to trust for `jwks_uri` / discovery (default: the Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// Background refresh interval when the server sends no `cache-control: max-age`.
    #[serde(default = "secs::<300>", deserialize_with = "duration")]
    pub refresh_interval: Duration,
    /// At most one refetch triggered by unknown `kid`s per this period.
    #[serde(default = "secs::<30>", deserialize_with = "duration")]
    pub kid_cooldown: Duration,
    /// Claims exposed to policies as `context.jwt.claims` (scalars and string lists).
    #[serde(default)]
    pub claims: Vec<String>,
    /// A header that may carry this issuer's token instead of `Authorization: Bearer`.
    pub token_header: Option<String>,
}

impl JwtIssuerConfig {
    /// Where keys come from.
    pub fn key_source(&self) -> KeySourceKind<'_> {
        match (&self.jwks_file, &self.jwks_uri) {
            (Some(f), _) => KeySourceKind::File(f),
            (None, Some(u)) => KeySourceKind::Uri(u),
            (None, None) => KeySourceKind::Discovery,
        }
    }
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySourceKind<'a> {
    File(&'a Path),
    Uri(&'a str),
    /// `issuer` + `/.well-known/openid-configuration`.
    Discovery,
}

/// `https://…`, or `http://` to a loopback host only.
pub fn check_fetch_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(()),
        Some("http") => {
            let loopback = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "`{url}`: http:// is accepted only for loopback hosts; use https://"
                ))
            }
        }
        _ => Err(format!("`{url}`: expected an https:// URL")),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".to_owned(), "ES256".to_owned()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    K8s,
    Spiffe,
    Oidc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    #[serde(default = "default_policies")]
    pub policies: PathBuf,
    /// Default: `schema.cedarschema` inside the policy directory.
    pub schema: Option<PathBuf>,
    #[serde(default)]
    pub mode: AuthzMode,
    /// Local development: a denied response names why in `x-warden-deny-reason`.
    #[serde(default)]
    pub explain_header: bool,
    /// A second policy directory evaluated on every request, logged and
    /// counted, never enforced (its own schema.cedarschema, else `schema`).
    pub shadow_policies: Option<PathBuf>,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        Self {
            policies: default_policies(),
            schema: None,
            mode: AuthzMode::default(),
            explain_header: false,
            shadow_policies: None,
        }
    }
}

impl AuthzConfig {
    /// The shadow set's schema: its own if present, else the main one.
    pub fn shadow_schema_path(&self) -> Option<PathBuf> {
        self.shadow_policies.as_ref().map(|dir| {
            let own = dir.join("schema.cedarschema");
            if own.exists() {
                own
            } else {
                self.schema_path()
            }
        })
    }

    pub fn schema_path(&self) -> PathBuf {
        self.schema
            .clone()
            .unwrap_or_else(|| self.policies.join("schema.cedarschema"))
    }
}

fn default_policies() -> PathBuf {
    PathBuf::from("policies")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzMode {
    #[default]
    Enforce,
    Audit,
}

impl AuthzMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub headers: IdentityHeaders,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityHeaders {
    #[default]
    Lattice,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub workers: Option<usize>,
    #[serde(default = "secs::<15>", deserialize_with = "duration")]
    pub drain_timeout: Duration,
    #[serde(default = "secs::<10>", deserialize_with = "timeout")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers); beyond it 431.
    #[serde(default = "default_max_header_bytes", deserialize_with = "size")]
    pub max_header_bytes: u64,
    /// Open connections at most; beyond it new ones are closed on accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// Requests in flight at most; past it 503 `overloaded`.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// A connection with no request in flight for this long is closed.
    #[serde(default = "secs::<60>", deserialize_with = "timeout")]
    pub idle_timeout: Duration,
}

fn default_max_connections() -> usize {
    16_384
}

fn default_max_requests() -> usize {
    1024
}

fn default_max_streams() -> u32 {
    128
}

fn default_max_header_bytes() -> u64 {
    32 * 1024
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            workers: None,
            drain_timeout: secs::<15>(),
            header_read_timeout: secs::<10>(),
            max_header_bytes: default_max_header_bytes(),
            max_connections: default_max_connections(),
            max_concurrent_streams: default_max_streams(),
            max_requests: default_max_requests(),
            idle_timeout: secs::<60>(),
        }
    }
}

fn secs<const N: u64>() -> Duration {
    Duration::from_secs(N)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).ok_or_else(|| {
        de::Error::custom(format!(
            "invalid duration `{s}`: expected a number and a unit (ms, s, m, h), like `5s`, \
             of at most 365 days"
        ))
    })
}

/// A timeout: a duration of more than zero. A zero timeout would fail every
/// request, or close every connection before its first request.
fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let t = duration(d)?;
    if t.is_zero() {
        return Err(de::Error::custom(
            "a timeout of 0 would fail every request: give more than 0, like `5s`",
        ));
    }
    Ok(t)
}

/// The longest duration any setting takes: deadlines are computed by adding
/// one to the clock, which must never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `"500ms"`, `"5s"`, `"5m"`, `"1h"`, up to 365 days.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (d <= MAX_DURATION).then_some(d)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_size(&s).ok_or_else(|| {
            de::Error::custom(format!(
                "invalid size `{s}`: expected bytes or a unit (KiB, MiB, KB, MB), like `1MiB`"
            ))
        }),
    }
}

/// Parses `"1MiB"`, `"512KiB"`, `"1MB"`, `"1024"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl Config {
    /// The embedded default: plaintext dev listener, local upstream, `./policies`.
    pub fn embedded() -> Self {
        Self::from_toml_str("", Path::new("<embedded>"), std::iter::empty())
            .unwrap_or_else(|_| unreachable_default())
    }

    /// Loads a file, applies `WARDEN_*` environment overrides, resolves
    /// relative paths against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("{}: {e}", path.display())))?;
        let mut cfg = Self::from_toml_str(&text, path, std::env::vars())?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Parses TOML text with the given environment (only `WARDEN_*` names count).
    pub fn from_toml_str(
        text: &str,
        origin: &Path,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let overrides: Vec<(String, String)> = env
            .filter(|(k, _)| k.starts_with("WARDEN_") && k.contains("__"))
            .collect();
        if overrides.is_empty() {
            return toml::from_str(text)
                .map_err(|e| ConfigError::new(format!("{}: {e}", origin.display())));
        }
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError::new(format!("{}: {e}", origin.display())))?;
        for (key, value) in &overrides {
            apply_override(&mut table, key, value)?;
        }
        let names: Vec<&str> = overrides.iter().map(|(k, _)| k.as_str()).collect();
        toml::Value::Table(table).try_into().map_err(|e| {
            ConfigError::new(format!(
                "{} with environment overrides {}: {e}",
                origin.display(),
                names.join(", ")
            ))
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.listener.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
            if let Some(ca) = &mut tls.client_ca {
                fix(ca);
            }
        }
        if let Some(s) = self.authn.sigv4.as_mut().filter(|s| {
            !s.credentials
                .to_str()
                .is_some_and(|p| p.starts_with("env:"))
        }) {
            fix(&mut s.credentials);
        }
        if let Some(f) = self.authn.sts.as_mut().and_then(|s| s.ca_file.as_mut()) {
            fix(f);
        }
        for j in &mut self.authn.jwt {
            if let Some(f) = &mut j.jwks_file {
                fix(f);
            }
            if let Some(f) = &mut j.ca_file {
                fix(f);
            }
        }
        fix(&mut self.authz.policies);
        if let Some(d) = &mut self.authz.shadow_policies {
            fix(d);
        }
        if let Some(s) = &mut self.authz.schema {
            fix(s);
        }
        if let UpstreamAddr::Unix(p) = &mut self.upstream.address {
            fix(p);
        }
        for r in &mut self.route {
            if let UpstreamAddr::Unix(p) = &mut r.upstream {
                fix(p);
            }
        }
    }

    /// Refuses what parses but is not supported yet, and inconsistent settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self
            .listener
            .tls
            .as_ref()
            .is_some_and(|t| t.versions.is_empty())
        {
            return Err(ConfigError::new(
                "[listener.tls] `versions` must name at least one of \"1.2\" and \"1.3\"",
            ));
        }
        if self.runtime.max_connections == 0
            || self.runtime.max_concurrent_streams == 0
            || self.runtime.max_requests == 0
        {
            return Err(ConfigError::new(
                "[runtime] `max_connections`, `max_concurrent_streams` and `max_requests` must be at least 1",
            ));
        }
        if let Some(sts) = &self.authn.sts {
            check_fetch_url(&sts.endpoint)
                .map_err(|e| ConfigError::new(format!("[authn.sts] endpoint: {e}")))?;
            if http::HeaderName::from_bytes(sts.audience_header.as_bytes()).is_err() {
                return Err(ConfigError::new(format!(
                    "[authn.sts] `audience_header` `{}` is not a header name",
                    sts.audience_header
                )));
            }
            if sts.max_concurrent == 0 {
                return Err(ConfigError::new(
                    "[authn.sts] `max_concurrent` must be at least 1",
                ));
            }
        }
        let mut clusters = std::collections::BTreeSet::new();
        let mut issuers = std::collections::BTreeSet::new();
        for j in &self.authn.jwt {
            let bad = |msg: String| {
                ConfigError::new(format!("[[authn.jwt]] issuer `{}`: {msg}", j.issuer))
            };
            if !issuers.insert(j.issuer.clone()) {
                return Err(bad("configured twice".to_owned()));
            }
            if j.audiences.is_empty() {
                return Err(bad("`audiences` must name at least one audience".to_owned()));
            }
            if j.jwks_file.is_some() && j.jwks_uri.is_some() {
                return Err(bad("set one of `jwks_file` and `jwks_uri`".to_owned()));
            }
            match j.key_source() {
                KeySourceKind::File(_) => {}
                KeySourceKind::Uri(u) => check_fetch_url(u).map_err(bad)?,
                KeySourceKind::Discovery => check_fetch_url(&j.issuer).map_err(|e| {
                    bad(format!(
                        "{e} (no `jwks_file` or `jwks_uri`: keys are discovered from the issuer)"
                    ))
                })?,
            }
            if let Some(h) = &j.token_header {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err()
                    || h.eq_ignore_ascii_case("authorization")
                {
                    return Err(bad(format!(
                        "`token_header` `{h}` is not a usable header name"
                    )));
                }
            }
            if j.principal == PrincipalKind::K8s {
                let cluster = j.cluster.clone().unwrap_or_else(|| j.issuer.clone());
                if !clusters.insert(cluster.clone()) {
                    return Err(ConfigError::new(format!(
                        "[[authn.jwt]]: two k8s issuers name the cluster `{cluster}`"
                    )));
                }
            }
        }
        for (account, org) in &self.authn.aws.accounts {
            crate::authn::check_org_id(org)
                .map_err(|e| ConfigError::new(format!("[authn.aws] accounts `{account}`: {e}")))?;
        }
        if let Some(s) = &self.authn.sigv4 {
            if s.region.0.is_empty() {
                return Err(ConfigError::new("[authn.sigv4] `region` must not be empty"));
            }
        }
        for r in &self.route {
            if r.host.is_empty() || r.service.is_empty() {
                return Err(ConfigError::new(
                    "[[route]]: `host` and `service` must not be empty",
                ));
            }
            if r.path_prefix
                .as_deref()
                .is_some_and(|p| !p.starts_with('/'))
            {
                return Err(ConfigError::new(format!(
                    "[[route]] `{}`: `path_prefix` must start with `/`",
                    r.host
                )));
            }
        }
        if self.runtime.workers == Some(0) {
            return Err(ConfigError::new("[runtime] `workers` must be at least 1"));
        }
        Ok(())
    }
}

fn unreachable_default() -> Config {
    // An empty document always deserializes: every section has a default.
    Config {
        route: Vec::new(),
        listener: ListenerConfig::default(),
        upstream: UpstreamConfig::default(),
        admin: AdminConfig::default(),
        service: ServiceConfig::default(),
        authn: AuthnConfig::default(),
        authz: AuthzConfig::default(),
        identity: IdentityConfig::default(),
        runtime: RuntimeConfig::default(),
    }
}

/// `WARDEN_LISTENER__TLS__CERT=/x` sets `listener.tls.cert`.
fn apply_override(table: &mut toml::Table, key: &str, value: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = key["WARDEN_".len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::new(format!(
            "environment variable `{key}`: empty section or key"
        )));
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let (last, sections) = match path.split_last() {
        Some(x) => x,
        None => return Ok(()),
    };
    let mut cur = table;
    for section in sections {
        let entry = cur
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::new(format!(
                    "environment variable `{key}`: `{section}` is not a section"
                )))
            }
        };
    }
    cur.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("t.toml"), std::iter::empty())
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[listener]\naddres = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.0.contains("addres"), "{err}");
        assert!(err.0.contains("line 2"), "{err}");
    }

    #[test]
    fn routes_match_host_and_path_prefix() {
        let cfg = parse(
            "[[route]]\nhost = \"*.svc.local\"\npath_prefix = \"/api\"\nupstream = \"127.0.0.1:1\"\nservice = \"a\"\n",
        )
        .unwrap();
        let r = &cfg.route[0];
        assert!(r.matches("pay.svc.local", "/api"));
        assert!(r.matches("pay.svc.local", "/api/x"));
        assert!(!r.matches("pay.svc.local", "/apix"));
        assert!(!r.matches("svc.local", "/api"));
        assert!(!r.matches("pay.svc.local.evil", "/api"));
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("8760h"), Some(MAX_DURATION));
        assert_eq!(parse_duration("8761h"), None);
        assert_eq!(parse_duration("18446744073709551615s"), None);
        let err = parse("[upstream]\nrequest_timeout = \"9999999999h\"\n").unwrap_err();
        assert!(err.0.contains("at most 365 days"), "{err}");
        for key in [
            "upstream]\nconnect_timeout",
            "upstream]\nrequest_timeout",
            "runtime]\nheader_read_timeout",
            "runtime]\nidle_timeout",
        ] {
            for zero in ["0s", "0ms", "0h"] {
                let err = parse(&format!("[{key} = \"{zero}\"\n")).unwrap_err();
                assert!(err.0.contains("a timeout of 0"), "{key} = {zero}: {err}");
            }
            assert!(parse(&format!("[{key} = \"1ms\"\n")).is_ok(), "{key}");
        }
        // Elsewhere zero means something: no drain grace, no clock skew.
        assert!(parse("[runtime]\ndrain_timeout = \"0s\"\n").is_ok());
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("10"), Some(10));
        assert_eq!(parse_size("1 furlong"), None);
    }

    #[test]
    fn env_overrides_nested_keys() {
        let env = vec![
            (
                "WARDEN_UPSTREAM__ADDRESS".to_owned(),
                "unix:/run/app.sock".to_owned(),
            ),
            ("WARDEN_RUNTIME__WORKERS".to_owned(), "3".to_owned()),
            ("WARDEN_AUTHZ__MODE".to_owned(), "audit".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        let cfg = Config::from_toml_str("", Path::new("t"), env.into_iter()).unwrap();
        assert_eq!(
            cfg.upstream.address,
            UpstreamAddr::Unix("/run/app.sock".into())
        );
        assert_eq!(cfg.runtime.workers, Some(3));
        assert_eq!(cfg.authz.mode, AuthzMode::Audit);
    }

    #[test]
    fn env_override_unknown_key_is_refused() {
        let env = vec![("WARDEN_LISTENER__NOPE".to_owned(), "1".to_owned())];
        let err = Config::from_toml_str("", Path::new("t"), env.into_iter()).unwrap_err();
        assert!(err.0.contains("nope"), "{err}");
    }

    #[test]
    fn full_design_example_parses() {
        let text = include_str!("../../tests/fixtures/design-example.toml");
        let cfg = parse(text).unwrap();
        assert!(cfg.listener.tls.is_some());
        assert_eq!(cfg.authn.jwt.len(), 1);
    }

    #[test]
    fn fetch_urls_must_be_https_unless_loopback() {
        assert!(check_fetch_url("https://oidc.example.com/keys").is_ok());
        assert!(check_fetch_url("http://127.0.0.1:8080/keys").is_ok());
        assert!(check_fetch_url("http://[::1]:8080/keys").is_ok());
        assert!(check_fetch_url("http://localhost/keys").is_ok());
        assert!(check_fetch_url("http://oidc.example.com/keys").is_err());
        assert!(check_fetch_url("http://10.0.0.1/keys").is_err());
        assert!(check_fetch_url("ftp://x/keys").is_err());
        let cfg = parse(
            "[[authn.jwt]]\nissuer = \"http://idp.example.com\"\naudiences = [\"a\"]\nprincipal = \"oidc\"\n",
        )
        .unwrap();
        assert!(cfg.validate().unwrap_err().0.contains("loopback"));
    }

    #[test]
    fn sts_endpoint_must_be_https() {
        let cfg = parse("[authn.sts]\nendpoint = \"https://sts.amazonaws.com\"\n").unwrap();
        assert!(cfg.validate().is_ok());
        let cfg = parse("[authn.sts]\nendpoint = \"http://sts.amazonaws.com\"\n").unwrap();
        assert!(cfg.validate().unwrap_err().0.contains("https"));
    }

    #[test]
    fn sts_calls_at_once_default_to_64_and_are_at_least_one() {
        let sts = "[authn.sts]\nendpoint = \"https://sts.amazonaws.com\"\n";
        let cfg = parse(sts).unwrap();
        assert_eq!(cfg.authn.sts.as_ref().unwrap().max_concurrent, 64);
        let cfg = parse(&format!("{sts}max_concurrent = 0\n")).unwrap();
        let err = cfg.validate().unwrap_err();
        assert!(
            err.0.contains("`max_concurrent` must be at least 1"),
            "{err}"
        );
        assert!(parse(&format!("{sts}max_concurrent = 1\n"))
            .unwrap()
            .validate()
            .is_ok());
    }
}
