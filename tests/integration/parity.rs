//! Lattice parity through the running proxy: every policy of
//! `tests/fixtures/lattice-parity.json` is imported, loaded as warden's only
//! policy set, and each of its requests — signed by AWS's own signer for five
//! IAM principals, or anonymous — must get the decision written beside it,
//! which is what IAM's evaluation logic gives.

use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;

use super::harness::{policy_dir_with, Harness, Options, Signing, SECRET};

const SVC: &str = "arn:aws:vpc-lattice:us-east-1:123456789012:service/svc-0123456789abcdef0";
const OTHER: &str = "arn:aws:vpc-lattice:us-east-1:123456789012:service/svc-0fedcba987654321f";
const NET: &str = "arn:aws:vpc-lattice:us-east-1:123456789012:servicenetwork/sn-0123456789abcdef0";

/// (name, access key id, secret). `orders` is the harness's own key.
const PRINCIPALS: &[(&str, &str, &str)] = &[
    ("orders", super::harness::ACCESS_KEY, SECRET),
    (
        "billing",
        "AKIDTESTBILLING00001",
        "billing-secret-000000000000000000000000",
    ),
    (
        "alice",
        "AKIDTESTALICE0000001",
        "alice-secret-00000000000000000000000000",
    ),
    (
        "partner",
        "AKIDTESTPARTNER00001",
        "partner-secret-0000000000000000000000000",
    ),
    (
        "bob",
        "AKIDTESTBOB000000001",
        "bob-secret-0000000000000000000000000000",
    ),
];

/// Tags for the harness's `orders` credential (the first block), then the
/// other principals.
const CREDENTIALS: &str = r#"tags = { team = "orders" }

[[credential]]
access_key_id = "AKIDTESTBILLING00001"
secret_access_key = "billing-secret-000000000000000000000000"
principal = "arn:aws:iam::123456789012:role/billing-role"
tags = { team = "billing", env = "prod" }

[[credential]]
access_key_id = "AKIDTESTALICE0000001"
secret_access_key = "alice-secret-00000000000000000000000000"
principal = "arn:aws:iam::123456789012:user/alice"
tags = { team = "orders" }

[[credential]]
access_key_id = "AKIDTESTPARTNER00001"
secret_access_key = "partner-secret-0000000000000000000000000"
principal = "arn:aws:iam::999999999999:role/partner-role"

[[credential]]
access_key_id = "AKIDTESTBOB000000001"
secret_access_key = "bob-secret-0000000000000000000000000000"
principal = "arn:aws:iam::555555555555:user/bob"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_lattice_policies_decide_as_iam_through_the_proxy() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lattice-parity.json");
    let corpus: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(corpus).unwrap()).unwrap();
    let policies = corpus["policies"].as_array().unwrap();
    assert!(
        policies.len() >= 40,
        "the corpus has {} policies",
        policies.len()
    );
    let mut failures = Vec::new();
    let mut checked = 0;
    for entry in policies {
        let name = entry["name"].as_str().unwrap();
        let requests = entry["requests"].as_array().unwrap();
        assert!(requests.len() >= 10, "{name}: {} requests", requests.len());
        let doc = entry["policy"]
            .to_string()
            .replace("$SVC", SVC)
            .replace("$OTHER", OTHER)
            .replace("$NET", NET);
        let cedar = warden::lattice::import(&doc).unwrap_or_else(|e| panic!("{name}: {e}"));
        let dir = policy_dir_with("imported.cedar", &cedar);
        let mut h = Harness::with(Options {
            policies: Some(dir.path().to_owned()),
            service_extra: format!("arn = \"{SVC}\"\nnetwork_arn = \"{NET}\"\n"),
            credentials_extra: CREDENTIALS.to_owned(),
            accounts_extra: r#", "999999999999" = "o-partnerorg""#.to_owned(),
            ..Options::default()
        })
        .await;
        for r in requests {
            let r = r.as_array().unwrap();
            let who = r[0].as_str().unwrap();
            let (method, target) = r[1].as_str().unwrap().split_once(' ').unwrap();
            let want_allow = match r[2].as_str().unwrap() {
                "allow" => true,
                "deny" => false,
                other => panic!("{name}: expected allow or deny, not {other}"),
            };
            let mut b = h.request(method, target);
            if who != "anon" {
                let &(_, key, secret) = PRINCIPALS
                    .iter()
                    .find(|p| p.0 == who)
                    .unwrap_or_else(|| panic!("{name}: unknown principal {who}"));
                let how = Signing {
                    access_key_id: key,
                    secret,
                    ..Signing::default()
                };
                for (k, v) in h.sign(method, target, b"", how) {
                    b = b.header(k, v);
                }
            }
            if let Some(headers) = r.get(3).and_then(|v| v.as_object()) {
                for (k, v) in headers {
                    b = b.header(k.as_str(), v.as_str().unwrap());
                }
            }
            let rsp = h.send(b.body(Full::new(Bytes::new())).unwrap()).await;
            let reached = h.seen.try_recv().is_ok();
            let got = match rsp.status.as_u16() {
                200 if reached => "allow",
                403 if !reached => "deny",
                _ => "error",
            };
            checked += 1;
            if got != r[2].as_str().unwrap() {
                failures.push(format!(
                    "{name}: {who} {method} {target} {:?}: want {}, got {} ({})\n{cedar}",
                    r.get(3),
                    if want_allow { "allow" } else { "deny" },
                    got,
                    rsp.text()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 400, "only {checked} requests checked");
}
