//! Surviving restarts (process backend): desired state in the data dir,
//! restored after the daemon is SIGKILLed mid-call.

mod common;

use std::time::Duration;

use common::{fixture, pid_alive, text_of, Daemon};
use serde_json::json;

#[tokio::test]
async fn sigkill_mid_call_then_restore_everything() {
    let mut a = Daemon::start();
    let (code, s1) = a.deploy_py("m", "one", &[], json!({})).await;
    assert_eq!(code, 200, "{s1}");
    let (code, _) = a
        .put(
            "/v1/meshes/n/services/two",
            json!({"source": format!("path:{}", fixture("node_server").display())}),
        )
        .await;
    assert_eq!(code, 200);
    let (code, _) = a.deploy_py("m", "gone", &[], json!({})).await;
    assert_eq!(code, 200);
    let (code, _) = a.delete("/v1/meshes/m/services/gone").await;
    assert_eq!(code, 204);

    // Calls in flight when meshbox dies.
    let url = format!("{}/v1/meshes/m/services/one/call", a.url);
    let inflight: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(url)
                    .json(&json!({"tool": "slow", "arguments": {"ms": 5000}}))
                    .send()
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    for call in inflight {
        assert!(call.await.unwrap().is_err(), "a call survived the SIGKILL?");
    }
    // The old servers die with their supervisor.
    let old_pid = s1["pid"].as_u64().unwrap() as u32;
    for _ in 0..100 {
        if !pid_alive(old_pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid_alive(old_pid), "server outlived its supervisor");

    let b = Daemon::start_on(a.data.path(), &[]);
    let one = b
        .wait_status("m", "one", Duration::from_secs(20), |s| {
            s["status"] == "running"
        })
        .await;
    assert_ne!(one["pid"], s1["pid"], "re-spawned");
    b.wait_status("n", "two", Duration::from_secs(20), |s| {
        s["status"] == "running"
    })
    .await;
    let (code, _) = b.get("/v1/meshes/m/services/gone").await;
    assert_eq!(code, 404, "an undeployed service stays gone");
    let (code, r) = b.call("m", "one", "echo", json!({"text": "again"})).await;
    assert_eq!((code, text_of(&r)), (200, "again".to_owned()));
    let (code, r) = b.call("n", "two", "add", json!({"a": 2, "b": 3})).await;
    assert_eq!((code, text_of(&r)), (200, "5".to_owned()));
}

#[tokio::test]
async fn a_failing_service_does_not_hold_the_others_back() {
    let a = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("py_server/server.py"), dir.path().join("server.py")).unwrap();
    let (code, _) = a
        .put(
            "/v1/meshes/m/services/fragile",
            json!({"source": format!("path:{}", dir.path().display())}),
        )
        .await;
    assert_eq!(code, 200);
    let (code, _) = a.deploy_py("m", "solid", &[], json!({})).await;
    assert_eq!(code, 200);
    let data = a.data.path().to_path_buf();
    let mut a = a;
    a.terminate();
    // Its directory vanishes while meshbox is down.
    drop(dir);
    let b = Daemon::start_on(&data, &[]);
    b.wait_status("m", "solid", Duration::from_secs(20), |s| {
        s["status"] == "running"
    })
    .await;
    let st = b
        .wait_status("m", "fragile", Duration::from_secs(20), |s| {
            s["status"] == "failed"
        })
        .await;
    assert!(
        st["last_error"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{st}"
    );
    assert_eq!(st["retry"]["attempts"], 1, "{st}");
    assert!(st["retry"]["next_retry_at"].as_str().is_some(), "{st}");
}

#[tokio::test]
async fn failed_service_heals_when_its_secret_file_appears() {
    let d = Daemon::start_with(&["--failed-retry-secs", "1"], &[]);
    // Inside the default secrets directory (`<data-dir>/secrets`).
    let secret = d.data.path().join("secrets/late-secret");
    let (code, e) = d
        .deploy_py(
            "m",
            "late",
            &[],
            json!({"env": {"API_TOKEN": {"file": secret}}}),
        )
        .await;
    assert_eq!(code, 502, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains("API_TOKEN"), "{msg}");
    let st = d.status("m", "late").await;
    assert_eq!(st["status"], "failed");
    assert!(st["retry"]["attempts"].as_u64() >= Some(1), "{st}");
    std::fs::write(&secret, "tok-value").unwrap();
    let st = d
        .wait_status("m", "late", Duration::from_secs(20), |s| {
            s["status"] == "running"
        })
        .await;
    assert!(st.get("retry").is_none(), "{st}");
    let (_, r) = d.call("m", "late", "env", json!({})).await;
    assert!(text_of(&r).contains("tok-value"));
    // The value never appears in status or logs.
    let (_, logs) = d.get("/v1/meshes/m/services/late/logs?lines=1000").await;
    assert!(!logs.to_string().contains("tok-value") && !st.to_string().contains("tok-value"));
}
