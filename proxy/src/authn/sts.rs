//! STS-backed IAM identities: `k8s-aws-v1.<base64url presigned URL>` bearer
//! tokens, the format `aws eks get-token` and aws-iam-authenticator produce.
//!
//! Everything that can be checked locally is checked before any network call
//! (size, scheme, STS host, path, the allow-listed query parameters each once,
//! `Action=GetCallerIdentity`, the audience header among the signed headers,
//! a date within 15 minutes). The token is then replayed to the configured
//! STS endpoint with the configured audience in the audience header — STS
//! verifies the signature, so a token minted for another audience fails
//! there — and the answered ARN becomes the principal. Verdicts are cached
//! until the token's window ends; failures are never cached.
//!
//! STS is a remote service with its own rate limits, and any client can make
//! a token that passes the local checks. So requests carrying the same token
//! at once share one call, and at most `max_concurrent` calls are under way:
//! a token that would need one more is refused with 503 at once rather than
//! queued, so made-up tokens cost STS no more than that many calls at a time
//! and do not pile up waiting for one.
//!
//! Calls go out on kept-alive connections to the endpoint (a few, idle for
//! less than [`IDLE_FOR`]), so a call costs one round trip, not a TCP and
//! TLS handshake as well. A call that fails on a kept connection is made
//! again once on a new one: GetCallerIdentity changes nothing, so asking
//! twice is safe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use http::{StatusCode, Uri};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::jwks::{Connection, Fetcher};
use super::sigv4::parse_amz_date;
use super::AwsPrincipal;
use crate::config::{check_fetch_url, StsConfig};
use crate::metrics::ResultLabels;

pub const PREFIX: &str = "k8s-aws-v1.";
/// Largest token accepted (prefix included).
pub const MAX_TOKEN: usize = 4096;
/// How long a token is good for after its `X-Amz-Date`, as aws-iam-authenticator.
pub const TOKEN_WINDOW: Duration = Duration::from_secs(15 * 60);
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE: usize = 64 * 1024;
const CACHE_ENTRIES: usize = 10_000;
/// Idle connections to the endpoint kept for the next calls.
const MAX_IDLE: usize = 8;
/// A connection idle for longer is not used again: the endpoint may be
/// closing it (load balancers in front of AWS endpoints close after 60 s).
pub const IDLE_FOR: Duration = Duration::from_secs(20);

/// The `result` label of `warden_sts_calls_total`: STS answered 200, STS
/// answered another 4xx, STS could not be reached or was overloaded (5xx,
/// 429, time-out), or no call was made because `max_concurrent` were under way.
pub const STS_RESULTS: [&str; 4] = ["ok", "rejected", "unavailable", "busy"];

const ALLOWED_PARAMS: [&str; 9] = [
    "Action",
    "Version",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("malformed sts token: {0}")]
    Malformed(&'static str),
    #[error("sts token expired")]
    Expired,
    #[error("sts token not yet valid")]
    NotYetValid,
    #[error("sts rejected the token")]
    Rejected,
    #[error("sts answered with a principal warden cannot map")]
    Principal,
    /// STS could not be asked: 503, not 401.
    #[error("sts is unavailable")]
    Unavailable,
    /// `max_concurrent` calls are under way already: 503, not 401.
    #[error("too many sts calls in progress")]
    Busy,
}

impl StsError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Expired | Self::NotYetValid => "expired",
            Self::Rejected => "rejected",
            Self::Principal => "principal",
            Self::Unavailable => "unavailable",
            Self::Busy => "busy",
        }
    }
}

/// What STS said about a token.
#[derive(Debug, Clone)]
pub struct StsIdentity {
    pub principal: AwsPrincipal,
    pub access_key_id: String,
}

/// Verifies STS tokens by replaying them to one endpoint.
pub struct StsVerifier {
    endpoint: Uri,
    /// Hosts a token may name: the endpoint's and the partition's STS hosts.
    hosts: Vec<String>,
    audience_header: String,
    audience: String,
    cache_ttl: Duration,
    fetcher: Fetcher,
    cache: Mutex<HashMap<[u8; 32], (StsIdentity, SystemTime)>>,
    /// One permit per STS call under way.
    slots: tokio::sync::Semaphore,
    /// `warden_sts_calls_total`, by result.
    outcomes: Family<ResultLabels, Counter>,
    flights: Flights,
    /// Kept-alive connections to the endpoint, most recently used last.
    /// Held only to push or pop, never across an await.
    idle: Mutex<Vec<(Connection, Instant)>>,
}

type Verdict = Result<StsIdentity, StsError>;

/// The STS calls under way, by the digest of their token.
type Flights = Mutex<HashMap<[u8; 32], Arc<tokio::sync::OnceCell<Verdict>>>>;

/// A request's share of a call: the last one to leave, whether the call
/// ended or every request waiting on it went away, removes it.
struct Flight<'a> {
    flights: &'a Flights,
    key: [u8; 32],
    cell: Option<Arc<tokio::sync::OnceCell<Verdict>>>,
}

impl<'a> Flight<'a> {
    fn join(flights: &'a Flights, key: [u8; 32]) -> Self {
        let cell = flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone();
        Self {
            flights,
            key,
            cell: Some(cell),
        }
    }

    /// The call's verdict; made by `ask` if no request is making it.
    async fn verdict<F>(&self, ask: impl FnOnce() -> F) -> Verdict
    where
        F: std::future::Future<Output = Verdict>,
    {
        match &self.cell {
            Some(cell) => cell.get_or_init(ask).await.clone(),
            None => Err(StsError::Unavailable),
        }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cell) = self.cell.take() {
            // Shares are taken and given back only under the lock, so two
            // (the map's and this one) means no other request holds it.
            if Arc::strong_count(&cell) == 2
                && flights
                    .get(&self.key)
                    .is_some_and(|c| Arc::ptr_eq(c, &cell))
            {
                flights.remove(&self.key);
            }
            drop(cell);
        }
    }
}

impl std::fmt::Debug for StsVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsVerifier")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// The STS hosts of the commercial, China and GovCloud partitions.
fn is_aws_sts_host(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if host == "sts.amazonaws.com" {
        return true;
    }
    let Some(rest) = host
        .strip_prefix("sts.")
        .or_else(|| host.strip_prefix("sts-fips."))
    else {
        return false;
    };
    let region_ok = |r: &str| {
        !r.is_empty()
            && r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    [".amazonaws.com", ".amazonaws.com.cn", ".api.aws"]
        .iter()
        .any(|suffix| rest.strip_suffix(suffix).is_some_and(region_ok))
}

impl StsVerifier {
    pub fn new(cfg: &StsConfig, default_audience: &str) -> Result<Self, String> {
        check_fetch_url(&cfg.endpoint).map_err(|e| format!("[authn.sts] endpoint: {e}"))?;
        let endpoint: Uri = cfg
            .endpoint
            .parse()
            .map_err(|_| format!("[authn.sts] endpoint `{}` is not a URL", cfg.endpoint))?;
        let authority = endpoint
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .ok_or_else(|| format!("[authn.sts] endpoint `{}` has no host", cfg.endpoint))?;
        Ok(Self {
            endpoint,
            hosts: vec![authority],
            audience_header: cfg.audience_header.to_ascii_lowercase(),
            audience: cfg
                .audience
                .clone()
                .unwrap_or_else(|| default_audience.to_owned()),
            cache_ttl: cfg.cache_ttl,
            fetcher: Fetcher::new(cfg.ca_file.as_deref())
                .map_err(|e| format!("[authn.sts]: {e}"))?,
            cache: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(cfg.max_concurrent),
            outcomes: Family::default(),
            flights: Mutex::new(HashMap::new()),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Checks everything that needs no network; returns the URL to replay,
    /// the host it names, the access key and when the token's window ends.
    pub fn precheck(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(Uri, String, String, SystemTime), StsError> {
        if token.len() > MAX_TOKEN {
            return Err(StsError::Malformed("token too large"));
        }
        let encoded = token
            .strip_prefix(PREFIX)
            .ok_or(StsError::Malformed("not a k8s-aws-v1 token"))?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .map_err(|_| StsError::Malformed("invalid base64"))?;
        let url = String::from_utf8(raw).map_err(|_| StsError::Malformed("invalid URL"))?;
        let uri: Uri = url
            .parse()
            .map_err(|_| StsError::Malformed("invalid URL"))?;
        check_fetch_url(&url).map_err(|_| StsError::Malformed("URL must be https"))?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        if host.contains('@') {
            return Err(StsError::Malformed("URL must not carry userinfo"));
        }
        let bare = uri.host().unwrap_or("");
        let allowed = self.hosts.contains(&host) || (is_aws_sts_host(bare) && uri.port().is_none());
        if !allowed {
            return Err(StsError::Malformed("not an STS host"));
        }
        if uri.path() != "/" {
            return Err(StsError::Malformed("path must be /"));
        }
        let mut seen: HashMap<&str, String> = HashMap::new();
        for pair in uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            let name = ALLOWED_PARAMS
                .iter()
                .find(|n| **n == k)
                .ok_or(StsError::Malformed("unexpected query parameter"))?;
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned();
            if seen.insert(name, v).is_some() {
                return Err(StsError::Malformed("repeated query parameter"));
            }
        }
        let get = |k: &str| seen.get(k).map(String::as_str);
        if get("Action") != Some("GetCallerIdentity") {
            return Err(StsError::Malformed("Action must be GetCallerIdentity"));
        }
        if get("Version").is_some_and(|v| v != "2011-06-15") {
            return Err(StsError::Malformed("unsupported Version"));
        }
        if get("X-Amz-Algorithm") != Some("AWS4-HMAC-SHA256") {
            return Err(StsError::Malformed(
                "X-Amz-Algorithm must be AWS4-HMAC-SHA256",
            ));
        }
        let signed =
            get("X-Amz-SignedHeaders").ok_or(StsError::Malformed("missing X-Amz-SignedHeaders"))?;
        if !signed.split(';').any(|h| h == self.audience_header) {
            return Err(StsError::Malformed("audience header is not signed"));
        }
        if !signed.split(';').any(|h| h == "host") {
            return Err(StsError::Malformed("host is not signed"));
        }
        if get("X-Amz-Signature").is_none() {
            return Err(StsError::Malformed("missing X-Amz-Signature"));
        }
        let access_key_id = get("X-Amz-Credential")
            .and_then(|c| c.split('/').next())
            .filter(|k| !k.is_empty())
            .ok_or(StsError::Malformed("missing X-Amz-Credential"))?
            .to_owned();
        let date = get("X-Amz-Date")
            .and_then(parse_amz_date)
            .ok_or(StsError::Malformed("missing or malformed X-Amz-Date"))?;
        let until = date + TOKEN_WINDOW;
        if now > until {
            return Err(StsError::Expired);
        }
        if date
            .duration_since(now)
            .is_ok_and(|ahead| ahead > CLOCK_SKEW)
        {
            return Err(StsError::NotYetValid);
        }
        // Replay to the configured endpoint, keeping the signed path and query.
        let mut parts = self.endpoint.clone().into_parts();
        parts.path_and_query = uri.path_and_query().cloned();
        let replay = Uri::from_parts(parts).map_err(|_| StsError::Malformed("invalid URL"))?;
        Ok((replay, host, access_key_id, until))
    }

    /// Verifies a token: cache, prechecks, then STS (one call for every
    /// request that carries this token meanwhile).
    pub async fn verify(&self, token: &str) -> Verdict {
        let now = SystemTime::now();
        if token.len() > MAX_TOKEN {
            return Err(StsError::Malformed("token too large"));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref(),
        );
        // A cached token passed the prechecks and STS, and its verdict
        // expires no later than the token's window: nothing to check again.
        if let Some((id, expires)) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            if now < expires {
                return Ok(id);
            }
        }
        let checked = self.precheck(token, now)?;
        Flight::join(&self.flights, key)
            .verdict(|| self.ask(checked, key, now))
            .await
    }

    /// Counts calls in `outcomes` (which starts at zero for each result).
    pub fn record_to(&mut self, outcomes: Family<ResultLabels, Counter>) {
        for result in STS_RESULTS {
            let _ = outcomes.get_or_create(&ResultLabels { result });
        }
        self.outcomes = outcomes;
    }

    fn count(&self, result: &'static str) {
        self.outcomes.get_or_create(&ResultLabels { result }).inc();
    }

    /// Replays a prechecked token to STS and caches what it says.
    async fn ask(
        &self,
        (replay, host, access_key_id, until): (Uri, String, String, SystemTime),
        key: [u8; 32],
        now: SystemTime,
    ) -> Verdict {
        let Ok(_slot) = self.slots.try_acquire() else {
            self.count("busy");
            return Err(StsError::Busy);
        };
        let headers = [
            (self.audience_header.as_str(), self.audience.as_str()),
            ("accept", "application/json"),
        ];
        let answer = tokio::time::timeout(TIMEOUT, self.call(&replay, &host, &headers)).await;
        let (status, _, body) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sts request failed");
                self.count("unavailable");
                return Err(StsError::Unavailable);
            }
            Err(_) => {
                tracing::warn!("sts request timed out");
                self.count("unavailable");
                return Err(StsError::Unavailable);
            }
        };
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            self.count("unavailable");
            return Err(StsError::Unavailable);
        }
        if status != StatusCode::OK {
            self.count("rejected");
            return Err(StsError::Rejected);
        }
        self.count("ok");
        let arn = caller_arn(&body).ok_or(StsError::Rejected)?;
        let principal = AwsPrincipal::from_arn(&arn).map_err(|_| StsError::Principal)?;
        let identity = StsIdentity {
            principal,
            access_key_id,
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, (_, t)| *t > now);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (identity.clone(), until.min(now + self.cache_ttl)));
        }
        Ok(identity)
    }

    /// One GET to STS: on a kept connection if there is one, else (or if
    /// that one fails) on a new one, which is kept afterwards.
    async fn call(
        &self,
        replay: &Uri,
        host: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, http::HeaderMap, bytes::Bytes), String> {
        if let Some(mut conn) = self.take_idle() {
            if let Ok(answer) = Fetcher::send(&mut conn, replay, host, headers, MAX_RESPONSE).await
            {
                self.keep(conn);
                return Ok(answer);
            }
        }
        let mut conn = self.fetcher.connect(replay).await?;
        let answer = Fetcher::send(&mut conn, replay, host, headers, MAX_RESPONSE).await?;
        self.keep(conn);
        Ok(answer)
    }

    /// The most recently used idle connection still open and idle for less
    /// than [`IDLE_FOR`]; older ones are closed.
    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        idle.retain(|(conn, since)| !conn.is_closed() && now.duration_since(*since) < IDLE_FOR);
        idle.pop().map(|(conn, _)| conn)
    }

    /// Keeps a connection whose answer was read whole, if there is room.
    fn keep(&self, conn: Connection) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }
}

/// The `Arn` of a GetCallerIdentity answer, in JSON or XML.
fn caller_arn(body: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        return v
            .pointer("/GetCallerIdentityResponse/GetCallerIdentityResult/Arn")
            .and_then(|a| a.as_str())
            .map(str::to_owned);
    }
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Arn>")? + "<Arn>".len();
    let end = start + text[start..].find("</Arn>")?;
    let arn = &text[start..end];
    (!arn.contains('<') && !arn.contains('&')).then(|| arn.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_hosts() {
        for ok in [
            "sts.amazonaws.com",
            "sts.us-east-1.amazonaws.com",
            "sts.cn-north-1.amazonaws.com.cn",
            "sts-fips.us-gov-west-1.amazonaws.com",
        ] {
            assert!(is_aws_sts_host(ok), "{ok}");
        }
        for bad in [
            "sts.amazonaws.com.evil.com",
            "evil.com",
            "sts..amazonaws.com",
            "xsts.amazonaws.com",
            "sts.us-east-1.amazonaws.co",
        ] {
            assert!(!is_aws_sts_host(bad), "{bad}");
        }
    }

    fn verifier() -> StsVerifier {
        let cfg = crate::config::Config::from_toml_str(
            "[authn.sts]\nendpoint = \"https://sts.us-east-1.amazonaws.com\"\n",
            std::path::Path::new("t"),
            std::iter::empty(),
        )
        .unwrap();
        StsVerifier::new(cfg.authn.sts.as_ref().unwrap(), "orders").unwrap()
    }

    /// `at` as `X-Amz-Date` writes it.
    fn amz_date(at: SystemTime) -> String {
        let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
        time::OffsetDateTime::from(at).format(&fmt).unwrap()
    }

    fn token(url: &str) -> String {
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url)
        )
    }

    #[test]
    fn prechecks_refuse_before_any_network_call() {
        let v = verifier();
        let now = SystemTime::now();
        let date = amz_date(now);
        let q = format!(
            "Action=GetCallerIdentity&Version=2011-06-15&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20260101%2Fus-east-1%2Fsts%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires=60&X-Amz-SignedHeaders=host%3Bx-k8s-aws-id&X-Amz-Signature=00"
        );
        let ok = format!("https://sts.us-east-1.amazonaws.com/?{q}");
        assert!(v.precheck(&token(&ok), now).is_ok());
        for (url, why) in [
            (
                format!("https://x@sts.us-east-1.amazonaws.com/?{q}"),
                "userinfo",
            ),
            (
                format!("https://sts.us-east-1.amazonaws.com:8443/?{q}"),
                "not an STS host",
            ),
            (format!("http://sts.us-east-1.amazonaws.com/?{q}"), "https"),
            (format!("https://sts.us-east-1.amazonaws.com/x?{q}"), "path"),
            (ok.replace("host%3Bx-k8s-aws-id", "host"), "audience header"),
            (format!("{ok}&Extra=1"), "unexpected"),
        ] {
            let err = v.precheck(&token(&url), now).unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    /// How the STS stand-in ends a connection.
    #[derive(Clone, Copy, PartialEq)]
    enum Ending {
        /// After one answer, which says `connection: close`.
        Announced,
        /// Never: it answers every request the connection brings.
        KeptAlive,
        /// After one answer that does not say so.
        Unannounced,
        /// On the connection's second request, which gets no answer.
        Unanswered,
    }

    /// An STS on loopback that counts the calls it gets and the
    /// connections they came on, and answers only once opened.
    struct GatedSts {
        url: String,
        arrived: tokio::sync::mpsc::UnboundedReceiver<()>,
        open: tokio::sync::watch::Sender<bool>,
        connections: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl GatedSts {
        async fn start() -> Self {
            Self::ending(Ending::Announced).await
        }

        /// A stand-in that answers at once, ending connections as told.
        async fn open(ending: Ending) -> Self {
            let sts = Self::ending(ending).await;
            sts.open.send_replace(true);
            sts
        }

        async fn ending(ending: Ending) -> Self {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let (arrive, arrived) = tokio::sync::mpsc::unbounded_channel();
            let (open, opened) = tokio::sync::watch::channel(false);
            let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let accepted = connections.clone();
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let arrive = arrive.clone();
                    let mut opened = opened.clone();
                    tokio::spawn(async move {
                        for served in 0.. {
                            let mut head = Vec::new();
                            let mut buf = [0u8; 1024];
                            while !head.ends_with(b"\r\n\r\n") {
                                match conn.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => head.extend_from_slice(&buf[..n]),
                                }
                            }
                            let _ = arrive.send(());
                            if ending == Ending::Unanswered && served > 0 {
                                return;
                            }
                            let _ = opened.wait_for(|o| *o).await;
                            let body = r#"{"GetCallerIdentityResponse":{"GetCallerIdentityResult":{"Arn":"arn:aws:iam::123456789012:user/alice"}}}"#;
                            let close = if ending == Ending::Announced {
                                "connection: close\r\n"
                            } else {
                                ""
                            };
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{close}\r\n{body}",
                                body.len()
                            );
                            let last = matches!(ending, Ending::Announced | Ending::Unannounced);
                            if conn.write_all(answer.as_bytes()).await.is_err() || last {
                                return;
                            }
                        }
                    });
                }
            });
            Self {
                url,
                arrived,
                open,
                connections,
            }
        }

        fn connections(&self) -> usize {
            self.connections.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn verifier(&self, max_concurrent: usize) -> Arc<StsVerifier> {
            let cfg = crate::config::Config::from_toml_str(
                &format!(
                    "[authn.sts]\nendpoint = \"{}\"\nmax_concurrent = {max_concurrent}\n",
                    self.url
                ),
                std::path::Path::new("t"),
                std::iter::empty(),
            )
            .unwrap();
            let mut v = StsVerifier::new(cfg.authn.sts.as_ref().unwrap(), "orders").unwrap();
            v.record_to(Family::default());
            Arc::new(v)
        }

        /// A token for this STS, told apart from others by its signature.
        fn token(&self, signature: &str) -> String {
            self.token_signed_at(signature, SystemTime::now())
        }

        fn token_signed_at(&self, signature: &str, at: SystemTime) -> String {
            let date = amz_date(at);
            token(&format!(
                "{}/?Action=GetCallerIdentity&Version=2011-06-15&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20260101%2Fus-east-1%2Fsts%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires=60&X-Amz-SignedHeaders=host%3Bx-k8s-aws-id&X-Amz-Signature={signature}",
                self.url
            ))
        }

        /// Waits until `n` more calls have reached STS.
        async fn calls(&mut self, n: usize) {
            for _ in 0..n {
                self.arrived.recv().await.unwrap();
            }
        }

        /// How many calls reached STS and were not yet counted.
        fn uncounted(&mut self) -> usize {
            std::iter::from_fn(|| self.arrived.try_recv().ok()).count()
        }
    }

    fn counted(v: &StsVerifier, result: &'static str) -> u64 {
        v.outcomes.get_or_create(&ResultLabels { result }).get()
    }

    fn sharing(v: &StsVerifier, token: &str) -> usize {
        let key = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let flights = v.flights.lock().unwrap();
        flights
            .iter()
            .find(|(k, _)| k.as_slice() == key.as_ref())
            .map_or(0, |(_, cell)| Arc::strong_count(cell) - 1)
    }

    #[tokio::test]
    async fn requests_carrying_one_token_at_once_share_one_call() {
        let mut sts = GatedSts::start().await;
        let v = sts.verifier(64);
        let token = sts.token("01");
        let all = tokio::spawn({
            let (v, token) = (v.clone(), token.clone());
            async move { futures_util::future::join_all((0..8).map(|_| v.verify(&token))).await }
        });
        sts.calls(1).await;
        assert_eq!(
            sharing(&v, &token),
            8,
            "every request waits on the one call"
        );
        sts.open.send_replace(true);
        for verdict in all.await.unwrap() {
            let id = verdict.unwrap();
            assert_eq!(id.principal.arn, "arn:aws:iam::123456789012:user/alice");
        }
        assert_eq!(sts.uncounted(), 0, "STS was asked once");
        assert_eq!(counted(&v, "ok"), 1);
        assert!(
            v.flights.lock().unwrap().is_empty(),
            "the call is forgotten"
        );
        // Answered, the token is cached: no call at all.
        v.verify(&token).await.unwrap();
        assert_eq!(sts.uncounted(), 0);
    }

    #[tokio::test]
    async fn past_max_concurrent_a_new_token_is_refused_at_once() {
        let mut sts = GatedSts::start().await;
        let v = sts.verifier(2);
        let under_way = ["01", "02"].map(|sig| {
            let (v, token) = (v.clone(), sts.token(sig));
            tokio::spawn(async move { v.verify(&token).await })
        });
        sts.calls(2).await;
        let third = sts.token("03");
        assert_eq!(v.verify(&third).await.unwrap_err(), StsError::Busy);
        assert_eq!(sts.uncounted(), 0, "the third token was not sent to STS");
        assert_eq!(counted(&v, "busy"), 1);
        sts.open.send_replace(true);
        for call in under_way {
            call.await.unwrap().unwrap();
        }
        // With the calls done, the same third token gets its call.
        v.verify(&third).await.unwrap();
        assert_eq!(sts.uncounted(), 1);
        assert_eq!((counted(&v, "ok"), counted(&v, "busy")), (3, 1));
    }

    #[tokio::test]
    async fn a_call_every_request_left_is_forgotten_and_frees_its_slot() {
        let mut sts = GatedSts::start().await;
        let v = sts.verifier(1);
        let token = sts.token("01");
        let left = tokio::spawn({
            let (v, token) = (v.clone(), token.clone());
            async move { v.verify(&token).await }
        });
        sts.calls(1).await;
        assert_eq!(sharing(&v, &token), 1);
        left.abort();
        assert!(left.await.unwrap_err().is_cancelled());
        assert!(
            v.flights.lock().unwrap().is_empty(),
            "no call is left behind"
        );
        sts.open.send_replace(true);
        // The one slot is free again, and the token gets a call of its own.
        v.verify(&token).await.unwrap();
        assert_eq!(sts.uncounted(), 1);
    }

    #[tokio::test]
    async fn a_cached_verdict_lasts_until_its_expiry_and_no_longer() {
        let mut sts = GatedSts::start().await;
        sts.open.send_replace(true);
        let v = sts.verifier(64);
        let token = sts.token("01");
        v.verify(&token).await.unwrap();
        v.verify(&token).await.unwrap();
        assert_eq!(sts.uncounted(), 1, "the second time, from the cache");
        // Past its expiry the verdict is not used: the token is asked about again.
        let past = SystemTime::now() - Duration::from_secs(1);
        for (_, expires) in v.cache.lock().unwrap().values_mut() {
            *expires = past;
        }
        v.verify(&token).await.unwrap();
        assert_eq!(sts.uncounted(), 1);
        // The cache is read before the prechecks, so a verdict must not
        // outlast its token's window, even when `cache_ttl` is longer.
        let signed = SystemTime::now() - TOKEN_WINDOW + Duration::from_secs(30);
        let late = sts.token_signed_at("02", signed);
        v.verify(&late).await.unwrap();
        let key = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, late.as_bytes());
        let cache = v.cache.lock().unwrap();
        let (_, expires) = cache.get(key.as_ref()).unwrap();
        assert!(*expires <= signed + TOKEN_WINDOW);
    }

    #[tokio::test]
    async fn calls_go_out_on_a_kept_alive_connection() {
        let mut sts = GatedSts::open(Ending::KeptAlive).await;
        let v = sts.verifier(64);
        for sig in ["01", "02", "03"] {
            v.verify(&sts.token(sig)).await.unwrap();
        }
        assert_eq!(sts.uncounted(), 3, "three tokens, three calls");
        assert_eq!(sts.connections(), 1, "all on one connection");
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_is_not_the_end_of_a_call() {
        for ending in [Ending::Announced, Ending::Unannounced] {
            let mut sts = GatedSts::open(ending).await;
            let v = sts.verifier(64);
            for sig in ["01", "02", "03"] {
                v.verify(&sts.token(sig)).await.unwrap();
            }
            assert_eq!(sts.uncounted(), 3);
            assert_eq!(sts.connections(), 3, "a connection is opened for each");
        }
        // A kept connection that fails under a call: the call is made again
        // on a new one. Each connection answers its first request only.
        let mut sts = GatedSts::open(Ending::Unanswered).await;
        let v = sts.verifier(64);
        for sig in ["01", "02", "03"] {
            v.verify(&sts.token(sig)).await.unwrap();
        }
        assert_eq!(
            sts.uncounted(),
            5,
            "the second and third calls went out twice"
        );
        assert_eq!(sts.connections(), 3);
        assert_eq!(counted(&v, "ok"), 3);
    }

    #[tokio::test]
    async fn a_connection_idle_too_long_is_not_used_again() {
        let mut sts = GatedSts::open(Ending::KeptAlive).await;
        let v = sts.verifier(64);
        v.verify(&sts.token("01")).await.unwrap();
        let stale = Instant::now().checked_sub(IDLE_FOR).unwrap();
        for (_, since) in v.idle.lock().unwrap().iter_mut() {
            *since = stale;
        }
        v.verify(&sts.token("02")).await.unwrap();
        assert_eq!(sts.uncounted(), 2);
        assert_eq!(sts.connections(), 2);
        assert_eq!(v.idle.lock().unwrap().len(), 1, "the stale one was closed");
    }

    #[test]
    fn arn_from_json_and_xml() {
        let json = br#"{"GetCallerIdentityResponse":{"GetCallerIdentityResult":{"Arn":"arn:aws:iam::1:user/a","Account":"1"}}}"#;
        assert_eq!(caller_arn(json).as_deref(), Some("arn:aws:iam::1:user/a"));
        let xml = b"<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:sts::1:assumed-role/r/s</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>";
        assert_eq!(
            caller_arn(xml).as_deref(),
            Some("arn:aws:sts::1:assumed-role/r/s")
        );
        assert_eq!(caller_arn(b"<Error/>"), None);
    }
}
