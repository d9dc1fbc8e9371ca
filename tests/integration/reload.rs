//! Policy hot reload through the running proxy: a new set takes effect
//! without a restart, a broken one is refused and the old set keeps deciding.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

use warden::devkit;

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

/// Version `i` of the policy set: valid ones allow GET under `/api/allowed/`
/// and never `/api/denied/`; every fourth is broken in a different way.
fn version(i: usize) -> (bool, Vec<(&'static str, String)>) {
    let schema = std::fs::read_to_string(policies_dir().join("schema.cedarschema")).unwrap();
    let main = format!(
        "// version {i}\n@id(\"allowed\")\npermit (principal, action == Action::\"GET\", resource in Http::Path::\"/api/allowed/\");\n"
    );
    let extra = format!(
        "@id(\"extra-{i}\")\npermit (principal, action == Action::\"GET\", resource in Http::Path::\"/api/extra-{i}/\");\n"
    );
    let (valid, main, extra) = match (i % 4, i / 4 % 4) {
        (3, 0) => (
            false,
            "permit (principal, action resource);\n".to_owned(),
            extra,
        ),
        (3, 1) => (
            false,
            main.clone(),
            "@id(\"x\")\npermit (principal == Aws::Rol::\"x\", action, resource);\n".to_owned(),
        ),
        (3, 2) => (false, main.clone(), main),
        (3, _) => (false, main[..main.len() / 2].to_owned(), extra),
        _ => (true, main, extra),
    };
    (
        valid,
        vec![
            ("main.cedar", main),
            ("extra.cedar", extra),
            ("schema.cedarschema", schema),
        ],
    )
}

/// Acceptance: 2 000 requests/s for 30 s over kept-alive mTLS connections
/// while the policy directory is swapped 20 times, 5 of them broken. Every
/// request gets the answer all valid sets agree on, no connection fails, and
/// every decision-log line names one of the valid sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a load test: scripts/test runs it on a release build"]
async fn load_policy_swaps_never_decide_with_a_partial_set() {
    const RATE: u64 = 2_000;
    const SECS: u64 = 30;
    const CONNS: u64 = 8;
    const SWAPS: usize = 20;
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use warden::authz::PolicySnapshot;
    use warden::config::{AuthzMode, ServiceConfig};

    let dir = tempfile::tempdir().unwrap();
    let mut projected = super::harness::Projected::new(dir.path(), &version(0).1);
    // The hash of every valid version, computed the way warden computes it.
    let mut valid = HashSet::new();
    for i in 0..=SWAPS {
        let (ok, files) = version(i);
        if !ok {
            continue;
        }
        let v = tempfile::tempdir().unwrap();
        for (name, text) in &files {
            std::fs::write(v.path().join(name), text).unwrap();
        }
        let set = PolicySnapshot::load(
            v.path(),
            &v.path().join("schema.cedarschema"),
            AuthzMode::Enforce,
            &ServiceConfig::default(),
        )
        .unwrap();
        valid.insert(set.hash.to_string());
    }
    let mut h = Harness::with(Options {
        client_auth: "required",
        policies: Some(dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;

    // The decision log, tallied by set hash as it arrives.
    let log = std::mem::replace(&mut h.log, std::sync::mpsc::channel().1);
    let sets: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let tally = sets.clone();
    std::thread::spawn(move || {
        for line in log {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let set = v["policy_set"].as_str().unwrap_or("<none>").to_owned();
            *tally.lock().unwrap().entry(set).or_default() += 1;
        }
    });
    // The upstream's record of each request is not needed here.
    let mut seen = std::mem::replace(&mut h.seen, tokio::sync::mpsc::unbounded_channel().1);
    tokio::spawn(async move { while seen.recv().await.is_some() {} });

    let start = tokio::time::Instant::now();
    let per_conn = RATE * SECS / CONNS;
    let mut clients = Vec::new();
    for c in 0..CONNS {
        let tls = h.tls(true, &[b"http/1.1"]);
        let addr = h.addr;
        let host = h.host();
        clients.push(tokio::spawn(async move {
            let mut conn = devkit::Conn::open(addr, tls, false).await.unwrap();
            let mut tick =
                tokio::time::interval(std::time::Duration::from_micros(1_000_000 * CONNS / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut wrong = Vec::new();
            for n in 0..per_conn {
                tick.tick().await;
                let (path, want) = if (n + c) % 2 == 0 {
                    ("/api/allowed/x", StatusCode::OK)
                } else {
                    ("/api/denied/x", StatusCode::FORBIDDEN)
                };
                let req = http::Request::get(path)
                    .header("host", &host)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                // A failed send is a dropped connection: fatal.
                let rsp = conn.send(req).await.expect("the connection dropped");
                if rsp.status != want {
                    wrong.push(format!("{path}: {} {}", rsp.status, rsp.text()));
                }
            }
            wrong
        }));
    }
    for i in 1..=SWAPS {
        // Every 1.4 s, so the last swap lands well before the load ends.
        tokio::time::sleep_until(start + std::time::Duration::from_millis(1_400 * i as u64)).await;
        projected.swap(&version(i).1);
    }
    let mut wrong = Vec::new();
    for c in clients {
        wrong.extend(c.await.unwrap());
    }
    let elapsed = start.elapsed();
    let total = per_conn * CONNS;
    eprintln!(
        "{total} requests in {:.1} s ({:.0}/s) over {CONNS} connections, {SWAPS} swaps",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    eventually("every decision is logged", || async {
        sets.lock().unwrap().values().sum::<u64>() >= total
    })
    .await;
    let sets = sets.lock().unwrap().clone();
    eprintln!("decisions by policy set: {sets:?}");
    for set in sets.keys() {
        assert!(
            valid.contains(set),
            "a decision by set {set}, not a valid one: {sets:?}"
        );
    }
    assert!(sets.len() >= 10, "the swaps took effect: {sets:?}");
    let count = |metrics: &str, result: &str| -> u64 {
        let key = format!("warden_policy_reloads_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    // The first load and each of the 15 valid swaps; each broken one refused.
    eventually("the last swap is applied", || async {
        count(&h.metrics().await, "ok") >= 16
    })
    .await;
    let metrics = h.metrics().await;
    assert_eq!(count(&metrics, "ok"), 16, "{metrics}");
    assert!(count(&metrics, "error") >= 5, "{metrics}");
}
