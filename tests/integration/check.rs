//! `warden check`: every problem is refused with the file and the reason.

use std::path::Path;
use std::process::Command;

use super::harness::policies_dir;

fn check(config: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["check", "--config"])
        .arg(config)
        .env_remove("WARDEN_LISTENER__ADDRESS")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

fn base(dir: &Path, policies: &Path) -> String {
    format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n[authz]\npolicies = \"{}\"\nschema = \"{}\"\n",
        policies.display(),
        policies_dir().join("schema.cedarschema").display()
    ) + &format!("# {}\n", dir.display())
}

#[test]
fn accepts_the_shipped_policies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("warden.toml");
    std::fs::write(&cfg, base(dir.path(), &policies_dir())).unwrap();
    let (code, out) = check(&cfg);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn rejects_an_unknown_key_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("warden.toml");
    std::fs::write(
        &cfg,
        base(dir.path(), &policies_dir())
            + "[upstream]\naddress = \"127.0.0.1:8080\"\nconect_timeout = \"1s\"\n",
    )
    .unwrap();
    let (code, out) = check(&cfg);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("warden.toml"), "{out}");
    assert!(out.contains("conect_timeout"), "{out}");
    assert!(out.contains("line 9"), "{out}");
}

#[test]
fn rejects_a_missing_cert_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("warden.toml");
    std::fs::write(
        &cfg,
        base(dir.path(), &policies_dir())
            + "[listener.tls]\ncert = \"missing-cert.pem\"\nkey = \"missing-key.pem\"\n",
    )
    .unwrap();
    let (code, out) = check(&cfg);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("missing-cert.pem"), "{out}");
    assert!(out.to_lowercase().contains("no such file"), "{out}");
}

#[test]
fn rejects_a_policy_failing_schema_validation_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("bad.cedar"),
        "@id(\"fine\")\npermit (principal, action, resource);\n\n@id(\"typo\")\npermit (\n  principal == Aws::Rol::\"x\",\n  action,\n  resource\n);\n",
    )
    .unwrap();
    let cfg = dir.path().join("warden.toml");
    std::fs::write(&cfg, base(dir.path(), &policies)).unwrap();
    let (code, out) = check(&cfg);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("bad.cedar:6"), "{out}");
    assert!(out.contains("Aws::Rol"), "{out}");
}

#[test]
fn rejects_a_policy_with_an_attribute_the_schema_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("ctx.cedar"),
        "@id(\"ctx\")\npermit (principal, action, resource)\nwhen { context.nope == \"x\" };\n",
    )
    .unwrap();
    let cfg = dir.path().join("warden.toml");
    std::fs::write(&cfg, base(dir.path(), &policies)).unwrap();
    let (code, out) = check(&cfg);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("ctx.cedar:3"), "{out}");
}

fn warden(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn shipped() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/shipped-policies.toml")
        .display()
        .to_string()
}

#[test]
fn authorize_prints_the_decision_and_exits_0_or_1() {
    let cfg = shipped();
    let role = "Aws::Role::\"arn:aws:iam::123456789012:role/order-service-role\"";
    let (code, out) = warden(&[
        "authorize",
        "--config",
        &cfg,
        "--principal",
        role,
        "--method",
        "GET",
        "--path",
        "/api/orders/1",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ALLOW\npolicies: orders-role-invoke"),
        "{out}"
    );
    let (code, out) = warden(&[
        "authorize",
        "--config",
        &cfg,
        "--principal",
        role,
        "--method",
        "DELETE",
        "--path",
        "/api/admin/1",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("DENY\npolicies: no-admin-writes"), "{out}");
    let (code, out) = warden(&[
        "authorize",
        "--config",
        &cfg,
        "--principal",
        "Warden::Anonymous::\"anonymous\"",
        "--method",
        "GET",
        "--path",
        "/api/orders/1",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("default deny"), "{out}");
    // Session names and presigning come from --context.
    let (code, out) = warden(&[
        "authorize",
        "--config",
        &cfg,
        "--principal",
        role,
        "--method",
        "POST",
        "--path",
        "/api/reports/x",
        "--context",
        "{\"session_name\": \"batch-1\"}",
    ]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn authorize_prints_evaluation_errors() {
    let dir = super::harness::policy_dir_with(
        "overflow.cedar",
        "@id(\"overflowing\")\npermit (principal, action, resource) when { (context.port + 2) * 9223372036854775807 > 0 };\n",
    );
    let cfg = dir.path().join("warden.toml");
    std::fs::write(&cfg, base(dir.path(), dir.path())).unwrap();
    let (code, out) = warden(&[
        "authorize",
        "--config",
        cfg.to_str().unwrap(),
        "--principal",
        "Warden::Anonymous::\"anonymous\"",
        "--method",
        "GET",
        "--path",
        "/",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\nerror: ") && out.contains("overflowing"),
        "{out}"
    );
}

#[test]
fn authorize_refuses_bad_input_clearly() {
    let cfg = shipped();
    for (args, want) in [
        (
            vec![
                "--principal",
                "Nope::X::\"a\"",
                "--method",
                "GET",
                "--path",
                "/",
            ],
            "unknown principal type",
        ),
        (
            vec![
                "--principal",
                "Aws::Role::\"not-an-arn\"",
                "--method",
                "GET",
                "--path",
                "/",
            ],
            "not an IAM role",
        ),
        (
            vec![
                "--principal",
                "Warden::Anonymous::\"anonymous\"",
                "--method",
                "TRACE",
                "--path",
                "/",
            ],
            "405",
        ),
        (
            vec![
                "--principal",
                "Warden::Anonymous::\"anonymous\"",
                "--method",
                "GET",
                "--path",
                "/a/../../b",
            ],
            "400",
        ),
        (
            vec![
                "--principal",
                "Warden::Anonymous::\"anonymous\"",
                "--method",
                "GET",
                "--path",
                "/",
                "--context",
                "{\"nope\":1}",
            ],
            "nope",
        ),
    ] {
        let mut all = vec!["authorize", "--config", cfg.as_str()];
        all.extend(args);
        let (code, out) = warden(&all);
        assert_eq!(code, 64, "{out}");
        assert!(out.contains(want), "{want}: {out}");
    }
}

#[test]
fn policy_test_passes_the_shipped_cases_and_fails_a_wrong_expectation() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tests/cases.json");
    let (code, out) = warden(&[
        "policy",
        "test",
        cases.to_str().unwrap(),
        "--config",
        &shipped(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.json");
    std::fs::write(
        &wrong,
        r#"{"cases":[{"name":"anonymous may not read orders","principal":"Warden::Anonymous::\"anonymous\"","method":"GET","path":"/api/orders/1","expect":"ALLOW"}]}"#,
    )
    .unwrap();
    let (code, out) = warden(&[
        "policy",
        "test",
        wrong.to_str().unwrap(),
        "--config",
        &shipped(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL anonymous may not read orders"), "{out}");
    assert!(out.contains("0 passed, 1 failed"), "{out}");
}

#[test]
fn credentials_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("warden.toml");
    std::fs::write(
        &cfg,
        base(dir.path(), &policies_dir())
            + "[authn.sigv4]\ncredentials = \"env:WARDEN_TEST_CREDENTIALS\"\n",
    )
    .unwrap();
    let run = |value: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warden"));
        cmd.args(["check", "--config"]).arg(&cfg);
        match value {
            Some(v) => cmd.env("WARDEN_TEST_CREDENTIALS", v),
            None => cmd.env_remove("WARDEN_TEST_CREDENTIALS"),
        };
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = "[[credential]]\naccess_key_id = \"AKIDENV\"\nsecret_access_key = \"s\"\nprincipal = \"arn:aws:iam::123456789012:role/r\"\n";
    assert_eq!(run(Some(good)).0, Some(0));
    let (code, err) = run(None);
    assert_eq!(code, Some(64));
    assert!(err.contains("WARDEN_TEST_CREDENTIALS"), "{err}");
}

/// Values named in the upstream's identity header cannot hold a control
/// character; `warden check` refuses them in the credentials file and in
/// `[authn.aws] accounts`.
#[test]
fn identity_values_with_control_characters_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials.toml");
    let cfg = dir.path().join("warden.toml");
    let write = |principal: &str, org: &str, account_org: &str| {
        std::fs::write(
            &creds,
            format!(
                "[[credential]]\naccess_key_id = \"AKID1\"\nsecret_access_key = \"s\"\n\
                 principal = \"{principal}\"\norg_id = \"{org}\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            &cfg,
            base(dir.path(), &policies_dir())
                + &format!(
                    "[authn.sigv4]\ncredentials = \"{}\"\n[authn.aws]\naccounts = {{ \"123456789012\" = \"{account_org}\" }}\n",
                    creds.display()
                ),
        )
        .unwrap();
        check(&cfg)
    };
    let role = "arn:aws:iam::123456789012:role/r";
    let (code, out) = write(role, "o-exampleorgid", "o-exampleorgid");
    assert_eq!(code, 0, "{out}");
    for (principal, org, account_org, want) in [
        (
            "arn:aws:iam::123456789012:role/r\\u0007",
            "o-exampleorgid",
            "o-exampleorgid",
            "not an IAM role",
        ),
        (role, "o-ex\\nample", "o-exampleorgid", "control character"),
        (role, "o-exampleorgid", "o-\\u0001", "control character"),
        (role, "o-exampleorgid", "", "empty"),
    ] {
        let (code, out) = write(principal, org, account_org);
        assert_eq!(code, 64, "{principal} {org:?} {account_org:?}: {out}");
        assert!(out.contains(want), "{out}");
    }
}

#[test]
fn healthcheck_fails_without_an_admin_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{port}/readyz"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn every_shipped_deploy_config_parses_and_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let configs = [
        "deploy/warden.toml",
        "deploy/ecs/warden.toml",
        "deploy/compose/warden.toml",
        "deploy/kubernetes/base/warden.toml",
        "deploy/kubernetes/overlays/gateway/warden.toml",
    ];
    for c in configs {
        let text = std::fs::read_to_string(root.join(c)).unwrap();
        let cfg = warden::config::Config::from_toml_str(&text, Path::new(c), std::iter::empty())
            .unwrap_or_else(|e| panic!("{e}"));
        cfg.validate().unwrap_or_else(|e| panic!("{c}: {e}"));
    }
}

#[test]
fn upstream_addresses_take_host_names() {
    for (addr, ok) in [
        ("app:8080", true),
        ("payments.payments.svc.cluster.local:8080", true),
        ("127.0.0.1:8080", true),
        ("[::1]:8080", true),
        ("unix:/run/app.sock", true),
        ("app", false),
        ("app:0", false),
        ("app:http", false),
        (":8080", false),
        ("unix:", false),
    ] {
        let toml = format!("[upstream]\naddress = \"{addr}\"\n");
        let parsed =
            warden::config::Config::from_toml_str(&toml, Path::new("t"), std::iter::empty());
        assert_eq!(parsed.is_ok(), ok, "{addr}");
    }
}
