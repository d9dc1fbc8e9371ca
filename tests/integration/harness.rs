//! Builds warden in-process on `127.0.0.1:0` in front of an echo upstream,
//! with a throwaway CA, token issuer and access key, and the shipped policies.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::sync::mpsc::UnboundedReceiver;
use warden::app::App;
use warden::audit::DecisionLog;
use warden::config::Config;
use warden::devkit::{self, CertPair, DevCa, Reply, Seen, SigV4Key, TokenIssuer};

pub const ACCESS_KEY: &str = "AKIDTESTORDERS000001";
pub const SECRET: &str = "test-secret-key-for-orders-role-000000000";
pub const ISSUER: &str = "https://oidc.test.example/id/CLUSTER";
pub const REGION: &str = "us-east-1";
pub const SERVICE: &str = "vpc-lattice-svcs";

pub struct Options {
    pub tls: bool,
    pub client_auth: &'static str,
    pub upstream_down: bool,
    pub upstream_unix: bool,
    pub max_body: &'static str,
    /// Replaces the default `[[authn.jwt]]` block (a k8s issuer with a file JWKS).
    pub jwt_block: Option<String>,
    /// Use this policy directory instead of the shipped one.
    pub policies: Option<PathBuf>,
    /// `[listener.tls] trust_domains`, as TOML.
    pub trust_domains: Option<&'static str>,
    /// Forward to this upstream instead of the echo upstream.
    pub upstream: Option<std::net::SocketAddr>,
    /// Speak HTTP/2 (prior knowledge) to the upstream.
    pub upstream_h2: bool,
    /// Extra `[authz]` lines, like `mode = "audit"`.
    pub authz_extra: String,
    /// Extra top-level TOML (`[[route]]` blocks).
    pub extra_toml: String,
    /// Extra `[service]` lines, like `arn = "…"`.
    pub service_extra: String,
    /// Extra `[[credential]]` blocks for the SigV4 credentials file.
    pub credentials_extra: String,
    /// Extra `[authn.aws] accounts` entries, like `, "999999999999" = "o-…"`.
    pub accounts_extra: String,
    /// `[upstream] request_timeout`.
    pub request_timeout: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tls: true,
            client_auth: "optional",
            upstream_down: false,
            upstream_unix: false,
            max_body: "64KiB",
            jwt_block: None,
            policies: None,
            trust_domains: None,
            upstream: None,
            upstream_h2: false,
            authz_extra: String::new(),
            extra_toml: String::new(),
            service_extra: String::new(),
            credentials_extra: String::new(),
            accounts_extra: String::new(),
            request_timeout: "5s",
        }
    }
}

/// How to sign: extra signed headers, secret, time, and whether to send
/// `x-amz-content-sha256`.
pub struct Signing<'a> {
    pub access_key_id: &'a str,
    pub extra: &'a [(&'a str, &'a str)],
    pub secret: &'a str,
    pub time: SystemTime,
    pub content_sha256: bool,
}

impl Default for Signing<'_> {
    fn default() -> Self {
        Self {
            access_key_id: ACCESS_KEY,
            extra: &[],
            secret: SECRET,
            time: SystemTime::now(),
            content_sha256: false,
        }
    }
}

/// The orders role's access key, as the credentials file holds it.
pub fn orders_key() -> SigV4Key<'static> {
    SigV4Key {
        access_key_id: ACCESS_KEY,
        secret: SECRET,
        session_token: None,
        region: REGION,
        service: SERVICE,
    }
}

pub struct Harness {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub seen: UnboundedReceiver<Seen>,
    pub log: std::sync::mpsc::Receiver<String>,
    pub ca: DevCa,
    pub client_cert: CertPair,
    pub issuer: TokenIssuer,
    tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The proxy's task: it ends once stopped and drained.
    running: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

pub fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// A policy directory holding `cedar` as `file` beside the shipped schema.
pub fn policy_dir_with(file: &str, cedar: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file), cedar).unwrap();
    std::fs::copy(
        policies_dir().join("schema.cedarschema"),
        dir.path().join("schema.cedarschema"),
    )
    .unwrap();
    dir
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(Options::default()).await
    }

    /// The default setup on a plaintext listener, for raw-socket tests.
    pub async fn plaintext() -> Self {
        Self::with(Options {
            tls: false,
            ..Options::default()
        })
        .await
    }

    pub async fn with(opts: Options) -> Self {
        warden::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = DevCa::new("test CA").unwrap();
        let server = ca.server().unwrap();
        let client_cert = ca
            .client(Some("spiffe://example.org/ns/shop/sa/web"))
            .unwrap();
        let issuer = TokenIssuer::generate("k1").unwrap();
        std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(d.join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(d.join("server.key"), &server.key_pem).unwrap();
        std::fs::write(d.join("jwks.json"), issuer.jwks()).unwrap();
        std::fs::write(
            d.join("credentials.toml"),
            format!(
                "[[credential]]\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET}\"\n\
                 principal = \"arn:aws:iam::123456789012:role/order-service-role\"\n{}",
                opts.credentials_extra
            ),
        )
        .unwrap();
        let (upstream, seen) = if opts.upstream_down {
            // A port nothing listens on: bind, learn it, close it.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            drop(l);
            (addr.to_string(), tokio::sync::mpsc::unbounded_channel().1)
        } else if let Some(addr) = opts.upstream {
            (addr.to_string(), tokio::sync::mpsc::unbounded_channel().1)
        } else if opts.upstream_unix {
            let sock = d.join("app.sock");
            let seen = devkit::spawn_upstream_unix(&sock).await.unwrap();
            (format!("unix:{}", sock.display()), seen)
        } else {
            let (addr, seen) = devkit::spawn_upstream().await.unwrap();
            (addr.to_string(), seen)
        };
        let tls = if opts.tls {
            format!(
                "[listener.tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\nclient_auth = \"{}\"\n{}",
                opts.client_auth,
                opts.trust_domains.map(|t| format!("trust_domains = {t}\n")).unwrap_or_default()
            )
        } else {
            String::new()
        };
        let toml = format!(
            r#"[listener]
address = "127.0.0.1:0"
{tls}
[upstream]
address = "{upstream}"
connect_timeout = "1s"
request_timeout = "{request_timeout}"
protocol = "{protocol}"

[admin]
address = "127.0.0.1:0"

[service]
name = "orders"
{service_extra}

[authn.sigv4]
region = "{REGION}"
service = "{SERVICE}"
credentials = "credentials.toml"
max_body = "{max_body}"

[authn.aws]
accounts = {{ "123456789012" = "o-exampleorgid"{accounts_extra} }}

{jwt_block}
{extra_toml}

[authz]
policies = "{policies}"
{authz_extra}
"#,
            extra_toml = opts.extra_toml,
            service_extra = opts.service_extra,
            accounts_extra = opts.accounts_extra,
            authz_extra = opts.authz_extra,
            max_body = opts.max_body,
            request_timeout = opts.request_timeout,
            protocol = if opts.upstream_h2 { "h2" } else { "http1" },
            jwt_block = opts.jwt_block.clone().unwrap_or_else(|| format!(
                "[[authn.jwt]]\nissuer = \"{ISSUER}\"\naudiences = [\"orders\"]\njwks_file = \"jwks.json\"\nprincipal = \"k8s\"\ncluster = \"test\"\n"
            )),
            policies = opts.policies.clone().unwrap_or_else(policies_dir).display(),
        );
        std::fs::write(d.join("warden.toml"), toml).unwrap();
        let cfg = Config::load(&d.join("warden.toml")).unwrap();
        let (log, log_rx) = DecisionLog::channel();
        let app = App::bind(cfg, log).await.unwrap();
        let addr = app.proxy_addr().unwrap();
        let admin = app.admin_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin,
            seen,
            log: log_rx,
            ca,
            client_cert,
            issuer,
            tls: opts.tls,
            stop: Some(stop),
            running: Some(running),
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://localhost:{}{path}", self.addr.port())
    }

    pub fn tls(&self, with_client_cert: bool, alpn: &[&[u8]]) -> Option<Arc<rustls::ClientConfig>> {
        if !self.tls {
            return None;
        }
        let cert = with_client_cert.then_some(&self.client_cert);
        Some(devkit::client_tls(&self.ca.pem(), cert, alpn).unwrap())
    }

    /// A request builder with `host` set.
    pub fn request(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.host())
    }

    /// Sends over HTTP/1.1 (TLS without a client certificate when TLS is on).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        devkit::send(self.addr, self.tls(false, &[b"http/1.1"]), false, req)
            .await
            .unwrap()
    }

    /// Sends with the SPIFFE client certificate over HTTP/2.
    pub async fn send_mtls_h2(&self, req: Request<Full<Bytes>>) -> Reply {
        devkit::send(self.addr, self.tls(true, &[b"h2"]), true, req)
            .await
            .unwrap()
    }

    /// Headers from AWS's signer for `method path` with `body`.
    pub fn sign(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        how: Signing<'_>,
    ) -> Vec<(String, String)> {
        let host = self.host();
        let mut headers = vec![("host", host.as_str())];
        headers.extend_from_slice(how.extra);
        let key = SigV4Key {
            access_key_id: how.access_key_id,
            secret: how.secret,
            session_token: None,
            region: REGION,
            service: SERVICE,
        };
        let url = self.url(path);
        devkit::sign_sigv4(
            &key,
            method,
            &url,
            &headers,
            body,
            how.time,
            how.content_sha256,
        )
        .unwrap()
    }

    /// A presigned path (with its query) for `method path`, valid for `expires`.
    pub fn presigned(&self, method: &str, path: &str, time: SystemTime, expires: u64) -> String {
        let host = self.host();
        let url = devkit::presign_sigv4(
            &orders_key(),
            method,
            &self.url(path),
            &[("host", host.as_str())],
            time,
            std::time::Duration::from_secs(expires),
        )
        .unwrap();
        let at = url.find(path).unwrap();
        url[at..].to_owned()
    }

    /// A signed request, ready to send.
    pub fn signed(&self, method: &str, path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
        let mut b = self.request(method, path);
        for (k, v) in self.sign(method, path, body, Signing::default()) {
            b = b.header(k, v);
        }
        b.body(Full::new(Bytes::from_static(body))).unwrap()
    }

    pub fn token(&self, claims: serde_json::Value) -> String {
        self.issuer.sign(&claims).unwrap()
    }

    /// A valid service-account token for `ns/name`.
    pub fn sa_token(&self, ns: &str, name: &str) -> String {
        self.token(serde_json::json!({
            "iss": ISSUER, "aud": "orders", "sub": format!("system:serviceaccount:{ns}:{name}"),
            "exp": devkit::now_secs() + 600,
        }))
    }

    /// The value of one series (`name{labels}` exactly as exported), if
    /// exported.
    pub async fn series(&self, series: &str) -> Option<u64> {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    pub async fn metrics(&self) -> String {
        let req = Request::get("/metrics")
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        devkit::send(self.admin, None, false, req)
            .await
            .unwrap()
            .text()
    }

    /// The next decision-log line, parsed.
    pub fn next_log(&self) -> serde_json::Value {
        let line = self
            .log
            .recv_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// GETs an admin path; returns status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let req = Request::get(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let rsp = devkit::send(self.admin, None, false, req).await.unwrap();
        (rsp.status.as_u16(), rsp.text())
    }

    /// Sends raw request bytes on a new connection, reads until the proxy
    /// closes it, and returns the first answer's status (0 for none).
    pub async fn raw(&self, request: Vec<u8>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        s.write_all(&request).await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf);
        text.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// Asserts nothing reached the upstream.
    pub fn assert_upstream_untouched(&mut self) {
        assert!(
            self.seen.try_recv().is_err(),
            "a request reached the upstream"
        );
    }

    /// The request the upstream received last.
    pub fn upstream_got(&mut self) -> Seen {
        self.seen.try_recv().expect("the upstream received nothing")
    }
}

impl Harness {
    /// Tells the proxy to stop, as SIGTERM does; the handle resolves once
    /// it has drained.
    pub fn shut_down(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.running.take().expect("shut down once")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A Kubernetes-projected directory (ConfigMap, Secret): each file is a
/// symlink into `..data`, itself a symlink to a versioned directory; an update
/// writes a new version and renames a new `..data` over the old one.
pub struct Projected {
    root: std::path::PathBuf,
    version: usize,
}

impl Projected {
    pub fn new(root: &std::path::Path, files: &[(&str, String)]) -> Self {
        let mut p = Self {
            root: root.to_owned(),
            version: 0,
        };
        p.write_version(files);
        std::os::unix::fs::symlink("..v0", root.join("..data")).unwrap();
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).unwrap();
        }
        p
    }

    fn write_version(&mut self, files: &[(&str, String)]) -> std::path::PathBuf {
        let dir = self.root.join(format!("..v{}", self.version));
        std::fs::create_dir(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    /// Swaps in a new version atomically and removes the old one.
    pub fn swap(&mut self, files: &[(&str, String)]) {
        let old = self.root.join(format!("..v{}", self.version));
        self.version += 1;
        self.write_version(files);
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
        std::fs::remove_dir_all(old).unwrap();
    }
}

/// `warden run` as a child process; stderr lines are kept.
pub struct Proxy {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    pub fn start(config: &std::path::Path) -> Self {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_warden"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["fields"]["message"] == "warden listening" {
                    let _ = tx.send(v["fields"].clone());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let fields = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("warden did not start");
        Self {
            child,
            addr: fields["proxy"].as_str().unwrap().parse().unwrap(),
            admin: fields["admin"].as_str().unwrap().parse().unwrap(),
            stderr,
        }
    }

    /// The value of the metric line starting with `line_prefix` (0 if absent).
    pub async fn metric(&self, line_prefix: &str) -> u64 {
        let req = http::Request::get("/metrics")
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let text = devkit::send(self.admin, None, false, req)
            .await
            .unwrap()
            .text();
        text.lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .map_or(0, |v| v.trim().parse().unwrap_or(0))
    }

    /// Whether warden logged a line containing `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds or 10 s pass.
/// Whether a new connection to `addr` gets `GET path` answered at all,
/// whatever the status, rather than closed unanswered.
pub async fn answered(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    );
    let _ = read.await.expect("neither answered nor closed");
    answer.starts_with(b"HTTP/1.1 ")
}

pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
