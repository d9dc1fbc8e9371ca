//! Certificate rotation under load, with the real binary: the server
//! certificate and the client CA bundle are replaced three times (one of them
//! broken) the way Kubernetes updates a mounted Secret, while mTLS requests
//! keep flowing. Nothing that should pass fails, new handshakes see the new
//! certificate (by serial), kept-alive connections are untouched, and the
//! broken bundle is refused with a log line and a metric.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use rustls::pki_types::ServerName;
use warden::devkit::{self, CertPair, Conn, DevCa};

use super::harness::{eventually, policies_dir, Projected, Proxy};

const SPIFFE: &str = "spiffe://example.org/ns/shop/sa/web";

fn serial_of_der(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial_as_string()
}

fn serial_of(pair: &CertPair) -> String {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
    serial_of_der(der.as_ref())
}

use rustls::pki_types::pem::PemObject;

/// One request on a new mTLS connection; the server certificate's serial.
async fn one_request(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let serial = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| serial_of_der(c.as_ref()))
        .ok_or("no server certificate")?;
    let mut conn = Conn::over(stream, false).await.map_err(|e| e.to_string())?;
    request(&mut conn, addr).await?;
    Ok(serial)
}

async fn request(conn: &mut Conn, addr: std::net::SocketAddr) -> Result<(), String> {
    let req = http::Request::get("/api/orders/1")
        .header("host", format!("localhost:{}", addr.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let rsp = conn.send(req).await.map_err(|e| e.to_string())?;
    if rsp.status != http::StatusCode::OK {
        return Err(format!("{} {}", rsp.status, rsp.text()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_and_a_broken_bundle_is_refused() {
    warden::install_crypto_provider();
    let ca1 = DevCa::new("rotation CA 1").unwrap();
    let ca2 = DevCa::new("rotation CA 2").unwrap();
    let s1 = ca1.server().unwrap();
    let s2 = ca1.server().unwrap();
    let s3 = ca2.server().unwrap();
    let stray = ca2.server().unwrap();
    let (serial1, serial2, serial3) = (serial_of(&s1), serial_of(&s2), serial_of(&s3));
    let client1 = ca1.client(Some(SPIFFE)).unwrap();
    let client2 = ca2.client(Some(SPIFFE)).unwrap();
    let both = ca1.pem() + &ca2.pem();
    let tls1 = devkit::client_tls(&both, Some(&client1), &[b"http/1.1"]).unwrap();
    let tls2 = devkit::client_tls(&both, Some(&client2), &[b"http/1.1"]).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("tls");
    std::fs::create_dir(&secret).unwrap();
    let bundle = |cert: &CertPair, key: &CertPair, ca: String| {
        vec![
            ("tls.crt", cert.cert_pem.clone()),
            ("tls.key", key.key_pem.clone()),
            ("ca.crt", ca),
        ]
    };
    let mut projected = Projected::new(&secret, &bundle(&s1, &s1, ca1.pem()));
    let (upstream, mut seen) = devkit::spawn_upstream().await.unwrap();
    tokio::spawn(async move { while seen.recv().await.is_some() {} });
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\naddress = \"127.0.0.1:0\"\n[listener.tls]\ncert = \"tls/tls.crt\"\nkey = \"tls/tls.key\"\nclient_ca = \"tls/ca.crt\"\nclient_auth = \"required\"\n\
             [upstream]\naddress = \"{upstream}\"\n[admin]\naddress = \"127.0.0.1:0\"\n[authz]\npolicies = \"{}\"\n",
            policies_dir().display()
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&config);
    let addr = proxy.addr;

    // Clients: four that open a new connection per request (switching to the
    // second CA's client certificate once the server presents serial 2), and
    // two kept-alive connections made with the first CA's certificate.
    let stop = Arc::new(AtomicBool::new(false));
    let switched = Arc::new(AtomicBool::new(false));
    let seen_serials = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let fresh_ok = Arc::new(AtomicU64::new(0));
    let kept_ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (stop, switched, seen_serials, failures, fresh_ok) = (
            stop.clone(),
            switched.clone(),
            seen_serials.clone(),
            failures.clone(),
            fresh_ok.clone(),
        );
        let (tls1, tls2, serial2) = (tls1.clone(), tls2.clone(), serial2.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                let tls = if switched.load(Ordering::Acquire) {
                    tls2.clone()
                } else {
                    tls1.clone()
                };
                match one_request(addr, tls).await {
                    Ok(serial) => {
                        if serial == serial2 {
                            switched.store(true, Ordering::Release);
                        }
                        // Distinct serials, in order of first sight: requests
                        // on concurrent connections finish in any order.
                        let mut s = seen_serials.lock().unwrap();
                        if !s.contains(&serial) {
                            s.push(serial);
                        }
                        fresh_ok.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    for _ in 0..2 {
        let (stop, failures, kept_ok, tls1) = (
            stop.clone(),
            failures.clone(),
            kept_ok.clone(),
            tls1.clone(),
        );
        let mut conn = {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls1)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            Conn::over(stream, false).await.unwrap()
        };
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                match request(&mut conn, addr).await {
                    Ok(()) => {
                        kept_ok.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("kept-alive: {e}")),
                }
            }
        }));
    }
    let progress = |n: u64| {
        let fresh_ok = fresh_ok.clone();
        let start = fresh_ok.load(Ordering::Acquire);
        move || {
            let fresh_ok = fresh_ok.clone();
            async move { fresh_ok.load(Ordering::Acquire) >= start + n }
        }
    };
    eventually("traffic flows", progress(50)).await;

    // 1: a new server certificate, and a bundle trusting both client CAs.
    projected.swap(&bundle(&s2, &s2, both.clone()));
    eventually("new handshakes present serial 2", || async {
        switched.load(Ordering::Acquire)
    })
    .await;
    eventually("more traffic", progress(50)).await;

    // 2: broken — the key does not belong to the certificate.
    projected.swap(&bundle(&s3, &stray, ca2.pem()));
    eventually("the broken bundle is counted", || async {
        proxy
            .metric("warden_cert_reloads_total{result=\"error\"} ")
            .await
            == 1
    })
    .await;
    eventually("traffic continues on serial 2", progress(50)).await;
    assert!(
        proxy.logged("certificate reload refused"),
        "no log line for the refusal"
    );
    // The broken bundle's certificate was never served.
    let serials = seen_serials.lock().unwrap().clone();
    assert_eq!(serials, vec![serial1.clone(), serial2.clone()]);

    // 3: a server certificate from the second CA, which alone is trusted now.
    projected.swap(&bundle(&s3, &s3, ca2.pem()));
    eventually("new handshakes present serial 3", || async {
        seen_serials.lock().unwrap().contains(&serial3)
    })
    .await;
    let kept_before = kept_ok.load(Ordering::Acquire);
    eventually("more traffic", progress(50)).await;
    eventually("kept-alive connections keep working", || async {
        kept_ok.load(Ordering::Acquire) > kept_before + 20
    })
    .await;

    // SIGHUP reloads too.
    let ok_before = proxy
        .metric("warden_cert_reloads_total{result=\"ok\"} ")
        .await;
    assert_eq!(ok_before, 2);
    let hup = Command::new("kill")
        .args(["-HUP", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually("SIGHUP reloads the certificates", || async {
        proxy
            .metric("warden_cert_reloads_total{result=\"ok\"} ")
            .await
            == 3
    })
    .await;

    stop.store(true, Ordering::Release);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // New connections saw each certificate in turn.
    assert_eq!(
        *seen_serials.lock().unwrap(),
        vec![serial1, serial2, serial3]
    );
    assert!(
        proxy
            .metric("warden_tls_cert_expiry_timestamp_seconds ")
            .await
            > 0
    );
    eprintln!(
        "{} new-connection and {} kept-alive requests, none failed",
        fresh_ok.load(Ordering::Acquire),
        kept_ok.load(Ordering::Acquire)
    );
}
