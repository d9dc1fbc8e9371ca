//! `warden policy import-lattice`: translated policies validate strictly and
//! decide as IAM would (expected decisions written by hand), and what cannot
//! be translated faithfully is refused.

use std::path::Path;

use warden::config::Config;
use warden::tools::{decide, headers_of, load_policies, Extra};

use super::harness::policy_dir_with;

const SVC: &str = "arn:aws:vpc-lattice:us-east-1:123456789012:service/svc-0123456789abcdef0";
const ROLE: &str = "Aws::Role::\"arn:aws:iam::123456789012:role/order-service-role\"";
const OTHER_ROLE: &str = "Aws::Role::\"arn:aws:iam::123456789012:role/other\"";
const FOREIGN: &str = "Aws::User::\"arn:aws:iam::999999999999:user/mallory\"";
const ANON: &str = "Warden::Anonymous::\"anonymous\"";

/// (principal, method, path, headers, source ip, expected allow).
type Case<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], &'a str, bool);

/// Imports `policy`, loads it as the only policy set, and checks every case.
fn check(policy: &str, cases: &[Case<'_>]) {
    let cedar = warden::lattice::import(policy).unwrap_or_else(|e| panic!("{e}\n{policy}"));
    let dir = policy_dir_with("imported.cedar", &cedar);
    let toml = format!(
        "[service]\nname = \"orders\"\narn = \"{SVC}\"\n[authn.aws]\naccounts = {{ \"123456789012\" = \"o-exampleorgid\" }}\n[authz]\npolicies = \"{}\"\n",
        dir.path().display()
    );
    let cfg = Config::from_toml_str(&toml, Path::new("t.toml"), std::iter::empty()).unwrap();
    let set = load_policies(&cfg).unwrap_or_else(|e| panic!("{e}\n{cedar}"));
    for (principal, method, path, headers, ip, want) in cases {
        let headers =
            headers_of(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
        let extra = Extra {
            source_ip: Some(ip.parse().unwrap()),
            ..Extra::default()
        };
        let d = decide(&set, &cfg, principal, method, path, &headers, &extra).unwrap();
        assert_eq!(
            d.allow, *want,
            "{principal} {method} {path} {headers:?} from {ip}\n{cedar}"
        );
    }
}

#[test]
fn role_method_and_path() {
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow",
        "Principal":{{"AWS":["arn:aws:iam::123456789012:role/order-service-role"]}},
        "Action":"vpc-lattice-svcs:Invoke","Resource":"{SVC}/api/orders/*",
        "Condition":{{"StringEquals":{{"vpc-lattice-svcs:RequestMethod":["GET","POST"]}}}}}}]}}"#
    );
    check(
        &policy,
        &[
            (ROLE, "GET", "/api/orders/1", &[], "10.0.0.1", true),
            (ROLE, "POST", "/api/orders/", &[], "10.0.0.1", true),
            (ROLE, "DELETE", "/api/orders/1", &[], "10.0.0.1", false),
            (ROLE, "GET", "/api/orders", &[], "10.0.0.1", false),
            (ROLE, "GET", "/api/other/1", &[], "10.0.0.1", false),
            (ROLE, "GET", "/api/orders/../admin", &[], "10.0.0.1", false),
            (OTHER_ROLE, "GET", "/api/orders/1", &[], "10.0.0.1", false),
            (FOREIGN, "GET", "/api/orders/1", &[], "10.0.0.1", false),
            (ANON, "GET", "/api/orders/1", &[], "10.0.0.1", false),
            (ROLE, "GET", "/api/orders/a/b/c", &[], "10.0.0.1", true),
        ],
    );
}

#[test]
fn org_wide_and_anonymous_and_exfil_guard() {
    let policy = r#"{"Statement":[
      {"Effect":"Allow","Principal":"*","Action":"vpc-lattice-svcs:Invoke","Resource":"*",
       "Condition":{"StringEquals":{"aws:PrincipalOrgID":"o-exampleorgid"}}},
      {"Effect":"Allow","Principal":"*","Action":"vpc-lattice-svcs:Invoke","Resource":"*",
       "Condition":{"StringEquals":{"aws:PrincipalType":"Anonymous"},"StringLike":{"vpc-lattice-svcs:RequestPath":"/public/*"}}},
      {"Sid":"NoExfil","Effect":"Deny","Principal":"*","Action":"*","Resource":"*",
       "Condition":{"StringNotEquals":{"vpc-lattice-svcs:RequestHeader/x-env":"prod"},"NotIpAddress":{"aws:SourceIp":"10.0.0.0/8"}}},
      {"Effect":"Allow","Principal":"*","Action":"vpc-lattice-svcs:Connect","Resource":"*"}
    ]}"#;
    check(
        policy,
        &[
            (ROLE, "GET", "/api/x", &[], "10.0.0.1", true),
            (OTHER_ROLE, "DELETE", "/api/x", &[], "10.1.2.3", true),
            (FOREIGN, "GET", "/api/x", &[], "10.0.0.1", false),
            (ANON, "GET", "/public/a", &[], "10.0.0.1", true),
            (ANON, "GET", "/api/x", &[], "10.0.0.1", false),
            // Outside 10/8 without x-env: prod the deny wins.
            (ROLE, "GET", "/api/x", &[], "192.0.2.1", false),
            (ROLE, "GET", "/api/x", &["x-env:prod"], "192.0.2.1", true),
            (ROLE, "GET", "/api/x", &["x-env:dev"], "192.0.2.1", false),
            (ANON, "GET", "/public/a", &[], "192.0.2.1", false),
            (ANON, "GET", "/public/a", &["x-env:prod"], "192.0.2.1", true),
        ],
    );
}

#[test]
fn query_header_port_account_and_if_exists() {
    let policy = r#"{"Statement":[
      {"Effect":"Allow","Principal":{"AWS":"123456789012"},"Action":"vpc-lattice-svcs:*",
       "Resource":"arn:aws:vpc-lattice:*:*:service/*",
       "Condition":{"ForAnyValue:StringEquals":{"vpc-lattice-svcs:RequestQueryString/view":["summary","full"]},
                    "NumericEquals":{"vpc-lattice-svcs:Port":"15001"},
                    "StringEqualsIfExists":{"vpc-lattice-svcs:RequestHeader/x-team":"orders"}}}
    ]}"#;
    check(
        policy,
        &[
            (ROLE, "GET", "/x?view=full", &[], "10.0.0.1", true),
            (
                ROLE,
                "GET",
                "/x?view=raw&view=summary",
                &[],
                "10.0.0.1",
                true,
            ),
            (ROLE, "GET", "/x?view=raw", &[], "10.0.0.1", false),
            (ROLE, "GET", "/x", &[], "10.0.0.1", false),
            (OTHER_ROLE, "GET", "/x?view=full", &[], "10.0.0.1", true),
            (FOREIGN, "GET", "/x?view=full", &[], "10.0.0.1", false),
            (ANON, "GET", "/x?view=full", &[], "10.0.0.1", false),
            // IfExists: an absent header passes, a present one must match.
            (
                ROLE,
                "GET",
                "/x?view=full",
                &["x-team:orders"],
                "10.0.0.1",
                true,
            ),
            (
                ROLE,
                "GET",
                "/x?view=full",
                &["x-team:billing"],
                "10.0.0.1",
                false,
            ),
            (
                ROLE,
                "GET",
                "/x?view=full",
                &["x-team:billing", "x-team:orders"],
                "10.0.0.1",
                true,
            ),
        ],
    );
}

#[test]
fn untranslatable_statements_are_refused_with_the_reason() {
    for (policy, reason) in [
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Condition":{"Bool":{"aws:MultiFactorAuthPresent":"true"}}}]}"#,
            "MultiFactorAuthPresent",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Condition":{"StringEqualsIgnoreCase":{"vpc-lattice-svcs:RequestMethod":"get"}}}]}"#,
            "case folding",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Condition":{"StringLike":{"vpc-lattice-svcs:RequestPath":"/a?c"}}}]}"#,
            "`?`",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","NotPrincipal":"*","Action":"*","Resource":"*"}]}"#,
            "NotPrincipal",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"*","Resource":"*"}]}"#,
            "principal type `Service`",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Condition":{"StringLike":{"vpc-lattice-svcs:RequestHeader/x":"a*"}}}]}"#,
            "multi-valued",
        ),
        (
            r#"{"Statement":[{"Sid":"A","Effect":"Allow","Principal":"*","Action":"*","Resource":"*"},{"Sid":"A","Effect":"Deny","Principal":"*","Action":"*","Resource":"*"}]}"#,
            "statement 2 (A)",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"arn:aws:vpc-lattice:us-east-1:123456789012:service/svc-0123456789abcdef0"}]}"#,
            "never matches an Invoke request",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"arn:aws:vpc-lattice:us-east-1:123456789012:service/svc-*/admin/*"}]}"#,
            "wildcard in the service id followed by a path",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"arn:aws:vpc-lattice:us-east-1:123456789012:service/svc-*x"}]}"#,
            "wildcard inside the service id",
        ),
        (
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Condition":{"ForAnyValue:StringLike":{"vpc-lattice-svcs:RequestQueryString/x":"a*"}}}]}"#,
            "multi-valued",
        ),
    ] {
        let err = warden::lattice::import(policy).unwrap_err().to_string();
        assert!(err.contains(reason), "{reason}: {err}");
    }
}

#[test]
fn connect_only_statements_translate_to_nothing() {
    let policy = r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"vpc-lattice-svcs:Connect","Resource":"*"}]}"#;
    let cedar = warden::lattice::import(policy).unwrap();
    assert!(
        !cedar.contains("permit") && !cedar.contains("forbid"),
        "{cedar}"
    );
}

#[test]
fn principal_tags_and_secure_transport_validate_strictly() {
    let policy = r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"vpc-lattice-svcs:Invoke","Resource":"*",
      "Condition":{"StringEquals":{"aws:PrincipalTag/team":"orders"},"Bool":{"aws:SecureTransport":"true"}}}]}"#;
    // Offline requests carry no tags and no TLS: denied, and the set loaded.
    check(
        policy,
        &[
            (ROLE, "GET", "/x", &[], "10.0.0.1", false),
            (ANON, "GET", "/x", &[], "10.0.0.1", false),
        ],
    );
}

#[test]
fn the_cli_prints_cedar_or_refuses_with_the_statement() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(
        &good,
        r#"{"Statement":{"Sid":"Reads","Effect":"Allow","Principal":"*","Action":"vpc-lattice-svcs:Invoke","Resource":"*","Condition":{"StringEquals":{"vpc-lattice-svcs:RequestMethod":"GET"}}}}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["policy", "import-lattice", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("@id(\"Reads\")\npermit (principal, action, resource)"),
        "{text}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"Statement":[{"Sid":"Mfa","Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Condition":{"Bool":{"aws:MultiFactorAuthPresent":"true"}}}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["policy", "import-lattice", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        out.stdout.is_empty(),
        "nothing is printed for a refused policy"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json: statement 1 (Mfa): condition key `aws:MultiFactorAuthPresent`"),
        "{err}"
    );
}
