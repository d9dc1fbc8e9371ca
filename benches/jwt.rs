//! JWT verification per algorithm: cold (signature checked every time) and
//! with the verified-token cache warm. Keys: tests/fixtures/jwt-keys.json.

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use warden::authn::jwt::{Issuer, JwtVerifier};
use warden::config::{Config, JwtIssuerConfig};

const ISS: &str = "https://oidc.eks.bench/id/X";

fn issuer_config() -> JwtIssuerConfig {
    let toml = format!(
        "[[authn.jwt]]\nissuer = \"{ISS}\"\naudiences = [\"orders\"]\njwks_file = \"unused\"\n\
         principal = \"k8s\"\nalgorithms = [\"RS256\", \"PS256\", \"ES256\", \"ES384\", \"EdDSA\"]\n"
    );
    Config::from_toml_str(&toml, std::path::Path::new("bench"), std::iter::empty())
        .expect("bench config")
        .authn
        .jwt
        .remove(0)
}

fn bench(c: &mut Criterion) {
    warden::install_crypto_provider();
    let keys: Value =
        serde_json::from_str(include_str!("../tests/fixtures/jwt-keys.json")).expect("keys");
    let algs = ["RS256", "PS256", "ES256", "ES384", "EdDSA"];
    let jwks = json!({"keys": algs.iter().map(|a| keys[a]["jwk"].clone()).collect::<Vec<_>>()})
        .to_string();
    let cold = JwtVerifier::new(vec![
        Issuer::with_jwks(issuer_config(), &jwks).expect("issuer")
    ])
    .without_cache();
    let warm = JwtVerifier::new(vec![
        Issuer::with_jwks(issuer_config(), &jwks).expect("issuer")
    ]);
    let now = warden::devkit::now_secs();
    let claims = json!({
        "iss": ISS, "aud": ["orders"], "sub": "system:serviceaccount:shop:checkout",
        "iat": now, "exp": now + 3600,
        "kubernetes.io": {"namespace": "shop", "pod": {"name": "p", "uid": "u"}, "serviceaccount": {"name": "checkout", "uid": "v"}}
    });
    let mut group = c.benchmark_group("jwt_verify");
    for alg in algs {
        let k = &keys[alg];
        let pem = k["private_pem"].as_str().expect("pem").as_bytes();
        let a: Algorithm = alg.parse().expect("alg");
        let key = match a {
            Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            _ => EncodingKey::from_ec_pem(pem),
        }
        .expect("key");
        let mut header = Header::new(a);
        header.kid = k["kid"].as_str().map(str::to_owned);
        let token = jsonwebtoken::encode(&header, &claims, &key).expect("token");
        // Verification never waits when the kid is known: poll once.
        let verify = |v: &JwtVerifier| {
            v.verify(&token)
                .now_or_never()
                .expect("ready")
                .expect("valid token")
        };
        verify(&warm);
        group.bench_function(format!("{alg}/cold"), |b| b.iter(|| verify(&cold)));
        group.bench_function(format!("{alg}/cached"), |b| b.iter(|| verify(&warm)));
    }
    group.finish();
}

/// The binary's allocator (proxy/src/main.rs), so an allocation costs here
/// what it costs in the proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_group!(benches, bench);
criterion_main!(benches);
