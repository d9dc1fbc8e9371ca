//! `warden demo`, the README's first command: self-contained, from any
//! directory, and it checks its own answers.

use std::process::Command;

#[test]
fn the_demo_answers_every_request_as_expected() {
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .arg("demo")
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("all requests answered as expected"),
        "{stdout}"
    );
    // Each kind of answer is there: allowed, denied, unauthenticated, malformed.
    for status in ["-> 200", "-> 403", "-> 401", "-> 400"] {
        assert!(stdout.contains(status), "{status} missing:\n{stdout}");
    }
    assert!(!stdout.contains("\nFAIL"), "{stdout}");
    assert!(
        stdout.contains("warden_requests_total{"),
        "no metrics excerpt:\n{stdout}"
    );
}
