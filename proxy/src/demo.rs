//! `warden demo`: the real proxy in front of an embedded service, on loopback.
//!
//! Generates a throwaway CA, server and client certificates, a token issuer
//! and an access key; writes a config, the schema and example policies to a
//! temporary directory; starts an echo upstream and warden; sends signed,
//! token, mTLS, unsigned and forged requests; prints every decision and the
//! metrics. Exits non-zero if any request is answered other than expected.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::app::App;
use crate::audit::DecisionLog;
use crate::config::Config;
use crate::devkit::{self, DevCa, SigV4Key, TokenIssuer};

const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");
const POLICIES: [(&str, &str); 4] = [
    ("public.cedar", include_str!("../../policies/public.cedar")),
    ("aws.cedar", include_str!("../../policies/aws.cedar")),
    (
        "workloads.cedar",
        include_str!("../../policies/workloads.cedar"),
    ),
    ("admin.cedar", include_str!("../../policies/admin.cedar")),
];

const ACCESS_KEY: &str = "AKIDEMOORDERS0000001";
const ISSUER: &str = "https://oidc.eks.us-east-1.amazonaws.com/id/DEMO";

type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, DemoError> {
        let mut bytes = [0u8; 8];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness")?;
        let dir = std::env::temp_dir().join(format!("warden-demo-{}", hex::encode(bytes)));
        std::fs::create_dir_all(dir.join("policies"))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), DemoError> {
    std::fs::write(dir.join(name), text)?;
    Ok(())
}

struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    expect: u16,
}

pub async fn run() -> Result<(), DemoError> {
    let dir = TempDir::new()?;
    let d = &dir.0;
    let ca = DevCa::new("warden demo CA")?;
    let server = ca.server()?;
    let client = ca.client(Some("spiffe://example.org/ns/shop/sa/web"))?;
    let issuer = TokenIssuer::generate("demo-key")?;
    let mut secret = [0u8; 20];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| "no randomness")?;
    let secret = hex::encode(secret);

    write(d, "ca.pem", &ca.pem())?;
    write(d, "server.pem", &server.cert_pem)?;
    write(d, "server.key", &server.key_pem)?;
    write(d, "jwks.json", issuer.jwks())?;
    write(
        d,
        "credentials.toml",
        &format!(
            "[[credential]]\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{secret}\"\n\
             principal = \"arn:aws:iam::123456789012:role/order-service-role\"\norg_id = \"o-exampleorgid\"\n"
        ),
    )?;
    write(&d.join("policies"), "schema.cedarschema", SCHEMA)?;
    for (name, text) in POLICIES {
        write(&d.join("policies"), name, text)?;
    }

    let (upstream, _seen) = devkit::spawn_upstream().await?;
    write(
        d,
        "warden.toml",
        &format!(
            r#"[listener]
address = "127.0.0.1:0"
[listener.tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
client_auth = "optional"

[upstream]
address = "{upstream}"

[admin]
address = "127.0.0.1:0"

[service]
name = "orders"

[authn.sigv4]
region = "us-east-1"
service = "vpc-lattice-svcs"
credentials = "credentials.toml"

[[authn.jwt]]
issuer = "{ISSUER}"
audiences = ["orders"]
jwks_file = "jwks.json"
principal = "k8s"
cluster = "demo"

[authz]
policies = "policies"
"#
        ),
    )?;
    let cfg = Config::load(&d.join("warden.toml"))?;
    let (log, lines) = DecisionLog::channel();
    let app = App::bind(cfg, log).await?;
    let addr = app.proxy_addr().ok_or("no proxy address")?;
    let admin = app.admin_addr().ok_or("no admin address")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    println!("warden demo: upstream on {upstream}, warden (mTLS optional) on https://{addr}, admin on http://{admin}\n");

    let plain_tls = devkit::client_tls(&ca.pem(), None, &[b"http/1.1"])?;
    let mtls = devkit::client_tls(&ca.pem(), Some(&client), &[b"h2"])?;
    let url = |path: &str| format!("https://localhost:{}{path}", addr.port());
    let host = format!("localhost:{}", addr.port());
    let key = SigV4Key {
        access_key_id: ACCESS_KEY,
        secret: &secret,
        session_token: None,
        region: "us-east-1",
        service: "vpc-lattice-svcs",
    };
    let token = issuer.sign(&serde_json::json!({
        "iss": ISSUER, "aud": "orders", "sub": "system:serviceaccount:shop:checkout",
        "exp": devkit::now_secs() + 600, "iat": devkit::now_secs(),
    }))?;

    let mut failures = 0;
    let cases = [
        (
            Case {
                what: "SigV4 (order-service-role)",
                method: "POST",
                path: "/api/orders/",
                expect: 200,
            },
            "sigv4",
        ),
        (
            Case {
                what: "EKS service-account JWT (shop/checkout)",
                method: "GET",
                path: "/api/catalog/items",
                expect: 200,
            },
            "jwt",
        ),
        (
            Case {
                what: "mTLS SPIFFE ID (example.org/ns/shop/sa/web), HTTP/2",
                method: "GET",
                path: "/api/orders/42",
                expect: 200,
            },
            "mtls",
        ),
        (
            Case {
                what: "anonymous, public path",
                method: "GET",
                path: "/public/status",
                expect: 200,
            },
            "none",
        ),
        (
            Case {
                what: "unsigned, protected path",
                method: "GET",
                path: "/api/orders/42",
                expect: 403,
            },
            "none",
        ),
        (
            Case {
                what: "SigV4 with a forged signature",
                method: "POST",
                path: "/api/orders/",
                expect: 401,
            },
            "forged",
        ),
        (
            Case {
                what: "expired JWT",
                method: "GET",
                path: "/api/catalog/items",
                expect: 401,
            },
            "expired",
        ),
        (
            Case {
                what: "path climbing above /",
                method: "GET",
                path: "/public/../../etc/passwd",
                expect: 400,
            },
            "none",
        ),
    ];
    for (case, how) in cases {
        let body = if case.method == "POST" {
            &b"{\"item\":\"book\"}"[..]
        } else {
            &b""[..]
        };
        let mut builder = Request::builder().method(case.method).uri(case.path);
        let mut tls = plain_tls.clone();
        let mut h2 = false;
        match how {
            "sigv4" | "forged" => {
                let signed = devkit::sign_sigv4(
                    &key,
                    case.method,
                    &url(case.path),
                    &[("host", &host)],
                    body,
                    SystemTime::now(),
                    false,
                )?;
                for (k, mut v) in signed {
                    if how == "forged" && k == "authorization" {
                        let last = v.pop().map_or('0', |c| if c == '0' { '1' } else { '0' });
                        v.push(last);
                    }
                    builder = builder.header(k, v);
                }
            }
            "jwt" => builder = builder.header("authorization", format!("Bearer {token}")),
            "expired" => {
                let old = issuer.sign(&serde_json::json!({
                    "iss": ISSUER, "aud": "orders", "sub": "system:serviceaccount:shop:checkout",
                    "exp": devkit::now_secs() - 3600,
                }))?;
                builder = builder.header("authorization", format!("Bearer {old}"));
            }
            "mtls" => {
                tls = mtls.clone();
                h2 = true;
                builder = builder.uri(url(case.path));
            }
            _ => {}
        }
        if !h2 {
            builder = builder.header("host", &host);
        }
        // A client may not claim an identity: this header never reaches the upstream.
        builder = builder.header(
            "x-amzn-lattice-identity",
            "Principal=arn:aws:iam::999999999999:role/admin",
        );
        let reply = devkit::send(
            addr,
            Some(tls),
            h2,
            builder.body(Full::new(Bytes::copy_from_slice(body)))?,
        )
        .await?;
        let ok = reply.status.as_u16() == case.expect;
        if !ok {
            failures += 1;
        }
        println!(
            "{} {:<52} {} {:<28} -> {} {}",
            if ok { "ok  " } else { "FAIL" },
            case.what,
            case.method,
            case.path,
            reply.status.as_u16(),
            reply.text().trim()
        );
        if let Ok(line) = lines.try_recv() {
            println!("     decision log: {line}");
        }
    }

    let metrics = devkit::send(
        admin,
        None,
        false,
        Request::get("/metrics")
            .header("host", "admin")
            .body(Full::new(Bytes::new()))?,
    )
    .await?;
    println!("\nmetrics (http://{admin}/metrics, excerpt):");
    for line in metrics.text().lines().filter(|l| {
        l.starts_with("warden_requests_total")
            || l.starts_with("warden_authn_failures_total")
            || l.starts_with("warden_authz_decisions_total")
            || l.starts_with("warden_request_duration_seconds_count")
    }) {
        println!("  {line}");
    }
    let _ = stop.send(());
    let _ = server_task.await;
    if failures > 0 {
        return Err(format!("{failures} request(s) were not answered as expected").into());
    }
    println!("\nall requests answered as expected");
    Ok(())
}
