//! Workload tokens against remote key sets: `jwks_uri`, discovery, rotation,
//! unknown-kid storms, outages, every algorithm, and the attacks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::harness::{eventually, Harness, Options};

/// A key from `tests/fixtures/jwt-keys.json`.
struct TestKey {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

fn keys() -> Vec<TestKey> {
    let text = include_str!("../fixtures/jwt-keys.json");
    let all: Value = serde_json::from_str(text).unwrap();
    ["RS256", "PS256", "ES256", "ES384", "EdDSA"]
        .iter()
        .map(|name| {
            let k = &all[*name];
            let pem = k["private_pem"].as_str().unwrap().as_bytes();
            let alg: Algorithm = name.parse().unwrap();
            let key = match alg {
                Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(pem),
                Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
                _ => EncodingKey::from_ec_pem(pem),
            }
            .unwrap();
            TestKey {
                alg,
                kid: k["kid"].as_str().unwrap().to_owned(),
                key,
                jwk: k["jwk"].clone(),
            }
        })
        .collect()
}

fn key(alg: Algorithm) -> TestKey {
    keys().into_iter().find(|k| k.alg == alg).unwrap()
}

fn sign(k: &TestKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(k.alg);
    header.kid = Some(kid.unwrap_or(&k.kid).to_owned());
    jsonwebtoken::encode(&header, claims, &k.key).unwrap()
}

/// A JWKS and discovery server on `127.0.0.1:0` whose key set, availability
/// and fetch count the test controls.
struct KeyServer {
    url: String,
    jwks: Arc<Mutex<Value>>,
    up: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
}

impl KeyServer {
    async fn start(jwks: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let jwks = Arc::new(Mutex::new(jwks));
        let up = Arc::new(AtomicBool::new(true));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (j, u, f, base) = (jwks.clone(), up.clone(), fetches.clone(), url.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (j, u, f, base) = (j.clone(), u.clone(), f.clone(), base.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (j, u, f, base) = (j.clone(), u.clone(), f.clone(), base.clone());
                        async move {
                            let mut rsp = Response::new(Full::new(Bytes::new()));
                            if !u.load(Ordering::SeqCst) {
                                *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                return Ok::<_, std::convert::Infallible>(rsp);
                            }
                            let body = match req.uri().path() {
                                "/keys" => {
                                    f.fetch_add(1, Ordering::SeqCst);
                                    j.lock().unwrap().to_string()
                                }
                                "/.well-known/openid-configuration" => {
                                    json!({"issuer": base, "jwks_uri": format!("{base}/keys")})
                                        .to_string()
                                }
                                _ => {
                                    *rsp.status_mut() = StatusCode::NOT_FOUND;
                                    return Ok(rsp);
                                }
                            };
                            *rsp.body_mut() = Full::new(Bytes::from(body));
                            Ok(rsp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            url,
            jwks,
            up,
            fetches,
        }
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.jwks.lock().unwrap() =
            json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn jwks_of(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

/// An `[[authn.jwt]]` block for `issuer`, fetching from `jwks_uri` (or discovery).
fn block(issuer: &str, jwks_uri: Option<&str>, kind: &str, extra: &str) -> String {
    let uri = jwks_uri
        .map(|u| format!("jwks_uri = \"{u}\"\n"))
        .unwrap_or_default();
    format!(
        "[[authn.jwt]]\nissuer = \"{issuer}\"\naudiences = [\"orders\"]\n{uri}principal = \"{kind}\"\n\
         algorithms = [\"RS256\", \"PS256\", \"ES256\", \"EdDSA\"]\n{extra}\n"
    )
}

async fn plain(jwt_block: String) -> Harness {
    Harness::with(Options {
        tls: false,
        jwt_block: Some(jwt_block),
        ..Options::default()
    })
    .await
}

async fn ready(h: &Harness) {
    eventually("readyz", || async { h.admin_get("/readyz").await.0 == 200 }).await;
}

fn sa_claims(iss: &str) -> Value {
    let now = warden::devkit::now_secs();
    json!({
        "iss": iss, "aud": ["orders"], "sub": "system:serviceaccount:shop:checkout",
        "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {"namespace": "shop", "pod": {"name": "checkout-1", "uid": "u-1"},
                          "serviceaccount": {"name": "checkout", "uid": "u-2"}}
    })
}

async fn call(h: &Harness, token: &str, path: &str) -> warden::devkit::Reply {
    let req = h
        .request("GET", path)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    h.send(req).await
}

#[tokio::test]
async fn every_algorithm_via_jwks_uri() {
    let ks = keys();
    let server = KeyServer::start(jwks_of(&ks.iter().collect::<Vec<_>>())).await;
    let iss = "https://oidc.eks.test/id/ABC";
    let mut h = plain(block(iss, Some(&format!("{}/keys", server.url)), "k8s", "")).await;
    ready(&h).await;
    for k in ks.iter().filter(|k| k.alg != Algorithm::ES384) {
        let rsp = call(&h, &sign(k, None, &sa_claims(iss)), "/api/catalog/x").await;
        assert_eq!(rsp.status, StatusCode::OK, "{:?}: {}", k.alg, rsp.text());
        assert_eq!(
            h.upstream_got().headers["x-amzn-lattice-identity"],
            "Principal=shop/checkout; Type=K8S"
        );
    }
    // ES384 is published but not in this issuer's allow-list.
    let rsp = call(
        &h,
        &sign(&key(Algorithm::ES384), None, &sa_claims(iss)),
        "/api/catalog/x",
    )
    .await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(&format!(
            "warden_jwks_refresh_total{{issuer=\"{iss}\",result=\"ok\"}}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("warden_jwks_age_seconds{issuer="),
        "{metrics}"
    );
    // The error series exists before the first failed refresh.
    assert!(
        metrics.contains(&format!(
            "warden_jwks_refresh_total{{issuer=\"{iss}\",result=\"error\"}} 0"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn discovery_and_spiffe_jwt_svid() {
    let es = key(Algorithm::ES256);
    let server = KeyServer::start(jwks_of(&[&es])).await;
    // Discovery: no jwks_uri, keys found via the issuer's openid-configuration.
    let mut h = plain(block(
        &server.url,
        None,
        "spiffe",
        "trust_domains = [\"example.org\"]",
    ))
    .await;
    ready(&h).await;
    let now = warden::devkit::now_secs();
    let svid = |sub: &str| json!({"iss": server.url, "aud": "orders", "sub": sub, "exp": now + 300, "iat": now});
    let rsp = call(
        &h,
        &sign(&es, None, &svid("spiffe://example.org/ns/shop/sa/web")),
        "/api/orders/1",
    )
    .await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(
        h.upstream_got().headers["x-amzn-lattice-identity"],
        "Principal=spiffe://example.org/ns/shop/sa/web; Type=SPIFFE"
    );
    for (sub, reason) in [
        (
            "spiffe://other.org/ns/shop/sa/web",
            "trust domain not allowed",
        ),
        ("spiffe://example.org/ns/../sa/web", "subject does not map"),
        ("web", "subject does not map"),
    ] {
        let rsp = call(&h, &sign(&es, None, &svid(sub)), "/api/orders/1").await;
        assert_eq!(rsp.status, StatusCode::UNAUTHORIZED, "{sub}");
        assert!(rsp.text().contains(reason), "{sub}: {}", rsp.text());
    }
    h.assert_upstream_untouched();
}

#[tokio::test]
async fn rotation_needs_at_most_one_refetch_and_old_keys_keep_working() {
    let (rs, es) = (key(Algorithm::RS256), key(Algorithm::ES256));
    let server = KeyServer::start(jwks_of(&[&rs])).await;
    let iss = "https://oidc.rotate.test";
    let h = plain(block(
        iss,
        Some(&format!("{}/keys", server.url)),
        "k8s",
        "kid_cooldown = \"1h\"",
    ))
    .await;
    ready(&h).await;
    assert_eq!(
        call(&h, &sign(&rs, None, &sa_claims(iss)), "/api/catalog/x")
            .await
            .status,
        StatusCode::OK
    );
    let before = server.fetches();

    // The issuer rotates: both keys published, new tokens under the new kid.
    server.publish(&[&rs, &es]);
    let rsp = call(&h, &sign(&es, None, &sa_claims(iss)), "/api/catalog/x").await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    assert_eq!(
        server.fetches(),
        before + 1,
        "exactly one refetch for the new kid"
    );
    // Old-key tokens keep working while the old key is published.
    assert_eq!(
        call(&h, &sign(&rs, None, &sa_claims(iss)), "/api/catalog/x")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(server.fetches(), before + 1);
}

#[tokio::test]
async fn a_cached_token_is_refused_once_its_key_is_withdrawn() {
    let (rs, es) = (key(Algorithm::RS256), key(Algorithm::ES256));
    let server = KeyServer::start(jwks_of(&[&rs])).await;
    let iss = "https://oidc.withdraw.test";
    let h = plain(block(
        iss,
        Some(&format!("{}/keys", server.url)),
        "k8s",
        "kid_cooldown = \"1h\"",
    ))
    .await;
    ready(&h).await;
    let old = sign(&rs, None, &sa_claims(iss));
    for _ in 0..2 {
        // The second call is served from the verified-token cache, and
        // logged as the first was.
        assert_eq!(
            call(&h, &old, "/api/catalog/x").await.status,
            StatusCode::OK
        );
        let log = h.next_log();
        assert_eq!(log["authn"], "jwt");
        assert_eq!(log["principal"], "K8s::ServiceAccount::\"shop/checkout\"");
    }
    // The issuer withdraws the old key; a new-kid token makes warden refetch.
    server.publish(&[&es]);
    let new = sign(&es, None, &sa_claims(iss));
    assert_eq!(
        call(&h, &new, "/api/catalog/x").await.status,
        StatusCode::OK
    );
    let rsp = call(&h, &old, "/api/catalog/x").await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED, "{}", rsp.text());
}

#[tokio::test]
async fn unknown_kid_storm_causes_a_handful_of_fetches() {
    let es = key(Algorithm::ES256);
    let server = KeyServer::start(jwks_of(&[&es])).await;
    let iss = "https://oidc.storm.test";
    let h = plain(block(iss, Some(&format!("{}/keys", server.url)), "k8s", "")).await;
    ready(&h).await;
    let before = server.fetches();
    for i in 0..1000 {
        let kid = format!("random-{i}-{}", warden::observe::new_request_id());
        let rsp = call(
            &h,
            &sign(&es, Some(&kid), &sa_claims(iss)),
            "/api/catalog/x",
        )
        .await;
        assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
        assert!(rsp.text().contains("unknown key id"), "{}", rsp.text());
    }
    let extra = server.fetches() - before;
    assert!(extra <= 2, "{extra} fetches for 1000 unknown kids");
}

#[tokio::test]
async fn key_server_down_at_start_is_503_then_ready_without_restart() {
    let es = key(Algorithm::ES256);
    let server = KeyServer::start(jwks_of(&[&es])).await;
    server.up.store(false, Ordering::SeqCst);
    let iss = "https://oidc.outage.test";
    let mut h = plain(block(iss, Some(&format!("{}/keys", server.url)), "k8s", "")).await;
    let (code, body) = h.admin_get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains(iss), "{body}");
    let rsp = call(&h, &sign(&es, None, &sa_claims(iss)), "/api/catalog/x").await;
    assert_eq!(rsp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(rsp.headers.contains_key("retry-after"));
    assert_eq!(
        serde_json::from_slice::<Value>(&rsp.body).unwrap()["error"],
        "unavailable"
    );
    h.assert_upstream_untouched();

    server.up.store(true, Ordering::SeqCst);
    ready(&h).await;
    let rsp = call(&h, &sign(&es, None, &sa_claims(iss)), "/api/catalog/x").await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    h.upstream_got();
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(&format!(
            "warden_jwks_refresh_total{{issuer=\"{iss}\",result=\"error\"}}"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_last_good_set() {
    let (rs, es) = (key(Algorithm::RS256), key(Algorithm::ES256));
    let server = KeyServer::start(jwks_of(&[&rs])).await;
    let iss = "https://oidc.keep.test";
    let h = plain(block(
        iss,
        Some(&format!("{}/keys", server.url)),
        "k8s",
        "kid_cooldown = \"1s\"",
    ))
    .await;
    ready(&h).await;
    server.up.store(false, Ordering::SeqCst);
    // An unknown kid triggers a refetch, which fails.
    let rsp = call(&h, &sign(&es, None, &sa_claims(iss)), "/api/catalog/x").await;
    assert_eq!(rsp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&h, &sign(&rs, None, &sa_claims(iss)), "/api/catalog/x")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(h.admin_get("/readyz").await.0, 200);
}

#[tokio::test]
async fn attacks_are_refused() {
    let (rs, es) = (key(Algorithm::RS256), key(Algorithm::ES256));
    let server = KeyServer::start(jwks_of(&[&rs, &es])).await;
    let iss = "https://oidc.attack.test";
    // A second trusted issuer, for another audience, with its own key.
    let ed = key(Algorithm::EdDSA);
    let other = KeyServer::start(jwks_of(&[&ed])).await;
    let other_iss = "https://oidc.billing.test";
    let other_block = block(
        other_iss,
        Some(&format!("{}/keys", other.url)),
        "k8s",
        "cluster = \"billing\"",
    )
    .replace("audiences = [\"orders\"]", "audiences = [\"billing\"]");
    let mut h = plain(
        block(
            iss,
            Some(&format!("{}/keys", server.url)),
            "k8s",
            "max_lifetime = \"1h\"",
        ) + &other_block,
    )
    .await;
    ready(&h).await;
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = warden::devkit::now_secs();
    let good = sa_claims(iss);
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    // HS256 signed with the RSA key's public JWK as the secret.
    let hs = jsonwebtoken::encode(
        &Header {
            kid: Some(rs.kid.clone()),
            ..Header::new(Algorithm::HS256)
        },
        &good,
        &EncodingKey::from_secret(rs.jwk.to_string().as_bytes()),
    )
    .unwrap();
    let es_sig = sign(&es, None, &good);
    let sig = es_sig.rsplit('.').next().unwrap().to_owned();
    let mut bomb = String::new();
    for _ in 0..10_000 {
        bomb.push('[');
    }
    let bomb_payload = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"iss\":\"{iss}\",\"x\":{bomb}}}"))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ),
            "algorithm not allowed",
        ),
        (
            "HS256 with the public key as secret",
            hs,
            "algorithm not allowed",
        ),
        // An ES256 token whose kid names the RSA key.
        (
            "kid of another alg",
            sign(&es, Some(&rs.kid), &good),
            "algorithm not allowed",
        ),
        (
            "expired",
            sign(&es, None, &with(json!({"exp": now - 600}))),
            "token expired",
        ),
        (
            "nbf in the future",
            sign(&es, None, &with(json!({"nbf": now + 3600}))),
            "token not yet valid",
        ),
        (
            "iat in the future",
            sign(
                &es,
                None,
                &with(json!({"iat": now + 3600, "exp": now + 4000})),
            ),
            "issued in the future",
        ),
        (
            "lifetime too long",
            sign(&es, None, &with(json!({"exp": now + 86_400}))),
            "lifetime",
        ),
        (
            "wrong aud",
            sign(&es, None, &with(json!({"aud": "payments"}))),
            "audience mismatch",
        ),
        (
            "missing exp",
            sign(&es, None, &with(json!({"exp": null}))),
            "missing claim `exp`",
        ),
        (
            "unknown iss",
            sign(&es, None, &with(json!({"iss": "https://evil.test"}))),
            "unknown issuer",
        ),
        (
            "namespace claim disagrees",
            sign(
                &es,
                None,
                &with(json!({"kubernetes.io": {"namespace": "kube-system"}})),
            ),
            "namespace claim",
        ),
        (
            "20 KB token (over the 16 KiB token limit)",
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "ES256"})),
                "A".repeat(20 * 1024),
                sig
            ),
            "token too large",
        ),
        (
            "invalid base64",
            format!(
                "{}.!!!.{}",
                b64(&json!({"alg": "ES256", "kid": es.kid})),
                sig
            ),
            "malformed token",
        ),
        (
            "invalid JSON",
            format!("{}.{}.{}", b64(&json!({"alg": "ES256"})), "eyJpc3MiOg", sig),
            "malformed token",
        ),
        (
            "nesting bomb",
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "ES256", "kid": es.kid})),
                bomb_payload,
                sig
            ),
            "malformed token",
        ),
        (
            "unknown typ",
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "ES256", "kid": es.kid, "typ": "dpop+jwt"})),
                b64(&good),
                sig
            ),
            "unexpected token type",
        ),
        (
            "crit extension",
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "ES256", "kid": es.kid, "crit": ["exp"], "exp": 1})),
                b64(&good),
                sig
            ),
            "critical header",
        ),
        (
            "claims swapped under a valid signature",
            format!(
                "{}.{}.{}",
                es_sig.split('.').next().unwrap(),
                b64(&with(json!({"sub": "system:serviceaccount:shop:admin"}))),
                sig
            ),
            "signature invalid",
        ),
        (
            "control character in sub (validly signed)",
            sign(
                &es,
                None,
                &with(json!({"sub": "system:serviceaccount:shop:check\u{7}out"})),
            ),
            "control character in sub",
        ),
        (
            "two dots too many",
            format!("{es_sig}.x"),
            "malformed token",
        ),
    ];
    for (what, token, reason) in cases {
        let rsp = call(&h, &token, "/api/catalog/x").await;
        assert_eq!(
            rsp.status,
            StatusCode::UNAUTHORIZED,
            "{what}: {}",
            rsp.text()
        );
        assert!(rsp.text().contains(reason), "{what}: {}", rsp.text());
    }
    // 100 KB does not even fit the request head (runtime.max_header_bytes): 431.
    let huge = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "ES256"})),
        "A".repeat(100 * 1024),
        sig
    );
    assert_eq!(
        call(&h, &huge, "/api/catalog/x").await.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    h.assert_upstream_untouched();
    // The valid token still works after all that.
    assert_eq!(
        call(&h, &es_sig, "/api/catalog/x").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn token_from_a_configured_header_and_claims_in_context() {
    let es = key(Algorithm::ES256);
    let server = KeyServer::start(jwks_of(&[&es])).await;
    let iss = "https://idp.example.com";
    let mut h = plain(block(
        iss,
        Some(&format!("{}/keys", server.url)),
        "oidc",
        "token_header = \"x-id-token\"\nclaims = [\"groups\", \"email\"]",
    ))
    .await;
    ready(&h).await;
    let now = warden::devkit::now_secs();
    let token = |groups: Value| {
        sign(
            &es,
            None,
            &json!({"iss": iss, "aud": "orders", "sub": "alice", "exp": now + 300,
                                 "groups": groups, "email": "alice@example.com"}),
        )
    };
    // `oidc-profile` lets subjects of this issuer GET /api/profile/.
    let req = h
        .request("GET", "/api/profile/me")
        .header("x-id-token", token(json!(["staff"])))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::OK);
    assert_eq!(
        h.upstream_got().headers["x-amzn-lattice-identity"],
        "Principal=alice; Type=OIDC"
    );
    // `oidc-auditors-reports` needs "auditors" in the `groups` claim.
    let rsp = call(&h, &token(json!(["staff"])), "/api/reports/q3").await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
    let rsp = call(&h, &token(json!(["staff", "auditors"])), "/api/reports/q3").await;
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.text());
    h.upstream_got();
    // The same token in both places is two credentials.
    let t = token(json!([]));
    let req = h
        .request("GET", "/api/profile/me")
        .header("x-id-token", &t)
        .header("authorization", format!("Bearer {t}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::UNAUTHORIZED);
    h.assert_upstream_untouched();
}
