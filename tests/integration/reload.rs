//! Policy hot reload through the running proxy: a new set takes effect
//! without a restart, a broken one is refused and the old set keeps deciding.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

use super::harness::{eventually, policies_dir, Harness, Options};

async fn status(h: &Harness, path: &str) -> StatusCode {
    h.send(
        h.request("GET", path)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .status
}

#[tokio::test]
async fn a_new_set_applies_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(policies_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let h = Harness::with(Options {
        tls: false,
        policies: Some(dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    assert_eq!(status(&h, "/api/new/x").await, StatusCode::FORBIDDEN);
    let (_, ready) = h.admin_get("/readyz").await;
    let first = ready.lines().nth(1).unwrap().to_owned();

    std::fs::write(
        dir.path().join("new.cedar"),
        "@id(\"new-read\")\npermit (principal, action == Action::\"GET\", resource in Http::Path::\"/api/new/\");\n",
    )
    .unwrap();
    eventually("the new policy applies", || async {
        status(&h, "/api/new/x").await == StatusCode::OK
    })
    .await;
    let (_, ready) = h.admin_get("/readyz").await;
    assert_ne!(ready.lines().nth(1).unwrap(), first, "the set hash changed");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("warden_policy_reloads_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warden_policy_set_info{hash="),
        "{metrics}"
    );

    // A set that fails validation is refused; the last good one keeps deciding.
    std::fs::write(
        dir.path().join("broken.cedar"),
        "@id(\"broken\")\npermit (principal == Aws::Rol::\"x\", action, resource);\n",
    )
    .unwrap();
    eventually("the broken set is refused", || async {
        h.metrics()
            .await
            .contains("warden_policy_reloads_total{result=\"error\"}")
    })
    .await;
    assert_eq!(status(&h, "/api/new/x").await, StatusCode::OK);
    assert_eq!(status(&h, "/api/orders/1").await, StatusCode::FORBIDDEN);
    assert_eq!(h.admin_get("/readyz").await.0, 200);

    // Removing the new policy (and the broken file) takes it away again.
    std::fs::remove_file(dir.path().join("broken.cedar")).unwrap();
    std::fs::remove_file(dir.path().join("new.cedar")).unwrap();
    eventually("the policy is gone", || async {
        status(&h, "/api/new/x").await == StatusCode::FORBIDDEN
    })
    .await;
}
