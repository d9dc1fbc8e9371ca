//! Development helpers shared by `warden demo` and the tests: a throwaway CA,
//! an ES256 token issuer, a SigV4 signer (AWS's own `aws-sigv4`), a small
//! HTTP(S) client and an echo upstream. Nothing here is on the request path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

type DevError = Box<dyn std::error::Error + Send + Sync>;

/// A throwaway certificate authority.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl DevCa {
    pub fn new(name: &str) -> Result<Self, DevError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self) -> Result<CertPair, DevError> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate, with `uri` as its URI SAN when given.
    pub fn client(&self, uri: Option<&str>) -> Result<CertPair, DevError> {
        self.client_with(uri.as_slice(), false, &[KeyUsagePurpose::DigitalSignature])
    }

    /// A client certificate with any URI SANs, CA flag and key usages (tests
    /// of the X.509-SVID rules).
    pub fn client_with(
        &self,
        uris: &[&str],
        is_ca: bool,
        usages: &[KeyUsagePurpose],
    ) -> Result<CertPair, DevError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "client");
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into()?));
        }
        if is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = usages.to_vec();
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<CertPair, DevError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// An ES256 token issuer with its JWKS.
pub struct TokenIssuer {
    key: jsonwebtoken::EncodingKey,
    kid: String,
    jwks: String,
}

impl TokenIssuer {
    pub fn generate(kid: &str) -> Result<Self, DevError> {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?;
        let raw = pair.public_key_raw();
        if raw.len() != 65 {
            return Err("unexpected P-256 public key encoding".into());
        }
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({
            "keys": [{
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            }]
        })
        .to_string();
        Ok(Self {
            key,
            kid: kid.to_owned(),
            jwks,
        })
    }

    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// Signs `claims` with ES256 under this issuer's `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, DevError> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// What to sign with.
pub struct SigV4Key<'a> {
    pub access_key_id: &'a str,
    pub secret: &'a str,
    /// Temporary credentials' session token, signed as `x-amz-security-token`.
    pub session_token: Option<&'a str>,
    pub region: &'a str,
    pub service: &'a str,
}

impl SigV4Key<'_> {
    fn credentials(&self) -> aws_credential_types::Credentials {
        aws_credential_types::Credentials::new(
            self.access_key_id,
            self.secret,
            self.session_token.map(str::to_owned),
            None,
            "devkit",
        )
    }
}

/// Runs AWS's `aws-sigv4` signer with `settings`; returns its instructions.
fn run_signer(
    key: &SigV4Key<'_>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    time: SystemTime,
    settings: aws_sigv4::http_request::SigningSettings,
) -> Result<aws_sigv4::http_request::SigningInstructions, DevError> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest};
    let identity = key.credentials().into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(key.region)
        .name(key.service)
        .time(time)
        .settings(settings)
        .build()?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )?;
    Ok(sign(signable, &params)?.into_parts().0)
}

/// Signs a request with AWS's `aws-sigv4` signer; returns the headers to add.
/// With `content_sha256`, the signer also sends `x-amz-content-sha256`.
pub fn sign_sigv4(
    key: &SigV4Key<'_>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    time: SystemTime,
    content_sha256: bool,
) -> Result<Vec<(String, String)>, DevError> {
    use aws_sigv4::http_request::{PayloadChecksumKind, SigningSettings};
    let mut settings = SigningSettings::default();
    if content_sha256 {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let instructions = run_signer(key, method, url, headers, body, time, settings)?;
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// Presigns a request with AWS's `aws-sigv4` signer; returns the URL with
/// the `X-Amz-*` query parameters appended.
pub fn presign_sigv4(
    key: &SigV4Key<'_>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    time: SystemTime,
    expires_in: std::time::Duration,
) -> Result<String, DevError> {
    use aws_sigv4::http_request::{SignatureLocation, SigningSettings};
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(expires_in);
    let instructions = run_signer(key, method, url, headers, &[], time, settings)?;
    let mut out = url.to_owned();
    for (i, (k, v)) in instructions.params().iter().enumerate() {
        let sep = if i == 0 && !url.contains('?') {
            '?'
        } else {
            '&'
        };
        const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~');
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, SET).to_string();
        out.push(sep);
        out.push_str(&enc(k));
        out.push('=');
        out.push_str(&enc(v));
    }
    Ok(out)
}

/// An STS-backed bearer token (`k8s-aws-v1.…`), as `aws eks get-token` makes:
/// a presigned `sts:GetCallerIdentity` URL with `audience` in the signed
/// `x-k8s-aws-id` header, valid for 60 s.
pub fn sts_token(
    key: &SigV4Key<'_>,
    endpoint: &str,
    audience: &str,
    time: SystemTime,
) -> Result<String, DevError> {
    let url = format!(
        "{}/?Action=GetCallerIdentity&Version=2011-06-15",
        endpoint.trim_end_matches('/')
    );
    let host = url
        .parse::<http::Uri>()?
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or("endpoint has no host")?;
    let presigned = presign_sigv4(
        key,
        "GET",
        &url,
        &[("host", host.as_str()), ("x-k8s-aws-id", audience)],
        time,
        std::time::Duration::from_secs(60),
    )?;
    Ok(format!(
        "{}{}",
        crate::authn::sts::PREFIX,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(presigned)
    ))
}

/// A TLS client config trusting `ca_pem`, optionally presenting a client certificate.
pub fn client_tls(
    ca_pem: &str,
    client: Option<&CertPair>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, DevError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some(pair) => {
            let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection that stays open for many requests.
pub enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    /// Opens a connection, over TLS when `tls` is given (HTTP/2 when `h2`).
    pub async fn open(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
        h2: bool,
    ) -> Result<Self, DevError> {
        let tcp = TcpStream::connect(addr).await?;
        match tls {
            None => Self::over(tcp, h2).await,
            Some(cfg) => {
                let connector = tokio_rustls::TlsConnector::from(cfg);
                let stream = connector
                    .connect(ServerName::try_from("localhost")?, tcp)
                    .await?;
                Self::over(stream, h2).await
            }
        }
    }

    /// Speaks HTTP over an established stream (TLS or not).
    pub async fn over<IO>(io: IO, h2: bool) -> Result<Self, DevError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        Ok(if h2 {
            let (tx, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await?;
            tokio::spawn(conn);
            Self::Http2(tx)
        } else {
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
            tokio::spawn(conn);
            Self::Http1(tx)
        })
    }

    /// Sends one request and reads the whole response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, DevError> {
        let rsp: Response<Incoming> = match self {
            Self::Http1(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
            Self::Http2(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
        };
        let (parts, body) = rsp.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }
}

/// Sends one request on a new connection, over TLS when `tls` is given
/// (HTTP/2 when `h2`).
pub async fn send(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    h2: bool,
    req: Request<Full<Bytes>>,
) -> Result<Reply, DevError> {
    Conn::open(addr, tls, h2).await?.send(req).await
}

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Answers 200 with what it received, reporting each request on `tx`.
async fn serve_echo<IO>(io: IO, tx: mpsc::UnboundedSender<Seen>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let identity = parts
                .headers
                .get(crate::identity::LATTICE_IDENTITY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let answer = serde_json::json!({
                "upstream_saw": { "path": parts.uri.to_string(), "identity": identity }
            });
            let _ = tx.send(Seen {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                headers: parts.headers,
                body,
            });
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                answer.to_string(),
            ))))
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// Starts an upstream on `127.0.0.1:0` that answers 200 with what it received
/// and reports each request on the returned channel.
pub async fn spawn_upstream() -> Result<(SocketAddr, mpsc::UnboundedReceiver<Seen>), DevError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_echo(stream, tx.clone()));
        }
    });
    Ok((addr, rx))
}

/// The same upstream on a Unix socket at `path`.
pub async fn spawn_upstream_unix(
    path: &std::path::Path,
) -> Result<mpsc::UnboundedReceiver<Seen>, DevError> {
    let listener = tokio::net::UnixListener::bind(path)?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_echo(stream, tx.clone()));
        }
    });
    Ok(rx)
}
