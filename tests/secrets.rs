//! Secret env values (`{"file": …}`) as DESIGN.md "Secrets" says: only from
//! the operator's secret directories, only small regular files, read off the
//! async runtime; anything else is a 400 naming the key, stores nothing, and
//! never stalls the daemon.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{text_of, Daemon};
use serde_json::{json, Value};

fn mkfifo(p: &std::path::Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

/// Polls `/v1/health` until told to stop; every answer must come within 1 s.
fn watch_health(
    url: String,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<u32>,
) {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut answers = 0;
        loop {
            let started = Instant::now();
            let r = http
                .get(format!("{url}/v1/health"))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            assert!(
                r.is_ok_and(|r| r.status() == 200),
                "/v1/health did not answer within 1 s (after {:?})",
                started.elapsed()
            );
            answers += 1;
            tokio::select! {
                _ = &mut rx => return answers,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    (tx, task)
}

#[tokio::test]
async fn hostile_secret_files_are_refused_naming_the_key_and_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "admin-token-value\n").unwrap();
    mkfifo(&secrets.join("fifo"));
    std::fs::write(secrets.join("big"), vec![b'x'; 65 * 1024]).unwrap();
    std::os::unix::fs::symlink(&token_file, secrets.join("to-token")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", secrets.join("to-shadow")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", secrets.join("to-zero")).unwrap();
    let secrets_arg = secrets.to_string_lossy().into_owned();
    let token_arg = token_file.to_string_lossy().into_owned();
    // `/dev` is a secrets dir too, so /dev/zero is refused for what it is
    // (not a regular file), not only for where it is.
    let d = Daemon::start_with(
        &[
            "--secrets-dir",
            &secrets_arg,
            "--secrets-dir",
            "/dev",
            "--token-file",
            &token_arg,
        ],
        &[("MESHBOX_TOKEN", "admin-token-value")],
    );
    let (stop, health) = watch_health(d.url.clone());
    let cases = [
        ("ZERO", "/dev/zero".to_owned(), "not a regular file"),
        (
            "ZERO_LINK",
            format!("{secrets_arg}/to-zero"),
            "not a regular file",
        ),
        ("FIFO", format!("{secrets_arg}/fifo"), "not a regular file"),
        ("SHADOW", "/etc/shadow".to_owned(), "outside"),
        ("SHADOW_LINK", format!("{secrets_arg}/to-shadow"), "outside"),
        ("TOKEN", token_arg.clone(), "outside"),
        ("TOKEN_LINK", format!("{secrets_arg}/to-token"), "outside"),
        (
            "BIG",
            format!("{secrets_arg}/big"),
            "larger than 65536 bytes",
        ),
        ("NOWHERE", "/nonexistent/secret".to_owned(), "outside"),
    ];
    for (i, (key, file, why)) in cases.iter().enumerate() {
        let name = format!("s{i}");
        let (code, e) = d
            .deploy_py(
                "sec",
                &name,
                &[],
                json!({"env": {*key: {"file": file}, "PLAIN": "x"}}),
            )
            .await;
        assert_eq!(code, 400, "{key}: {e}");
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains(&format!("env.{key}")), "{key}: {msg}");
        assert!(msg.contains(why), "{key}: {msg}");
        assert!(!msg.contains("admin-token-value"), "{msg}");
        let (code, _) = d.get(&format!("/v1/meshes/sec/services/{name}")).await;
        assert_eq!(code, 404, "{key}: a refused deploy registered a service");
    }
    // Not there yet, inside the directories: accepted, failed at start
    // (retried in place until it appears), never a 400.
    let (code, e) = d
        .deploy_py(
            "sec",
            "later",
            &[],
            json!({"env": {"LATER": {"file": format!("{secrets_arg}/later")}}}),
        )
        .await;
    assert_eq!(code, 502, "{e}");
    assert!(e["error"].as_str().unwrap().contains("env `LATER`"), "{e}");
    d.delete("/v1/meshes/sec/services/later").await;
    let _ = stop.send(());
    let answers = health.await.expect("health watcher");
    assert!(answers > 0);
    let (_, list) = d.get("/v1/meshes/sec/services").await;
    assert_eq!(list["services"], json!([]));

    // Nothing was stored: a new daemon on the same data dir restores nothing
    // (the first one stopped, its data dir kept).
    let data = d.data.path().to_path_buf();
    let mut d = d;
    d.terminate();
    assert!(data.join("meshbox.db").exists());
    let again = Daemon::start_on(&data, &[]);
    let (_, h) = again.get("/v1/health").await;
    assert_eq!(h["services"], 0, "{h}");
}

#[tokio::test]
async fn a_secret_reaches_the_server_and_nothing_else() {
    let d = Daemon::start();
    // The default secrets directory is `<data-dir>/secrets`, made at start.
    let secrets = d.data.path().join("secrets");
    assert!(secrets.is_dir());
    std::fs::write(secrets.join("api"), "sk-very-secret-42\n").unwrap();
    let file = secrets.join("api").to_string_lossy().into_owned();
    let (code, st) = d
        .deploy_py(
            "sec",
            "ok",
            &[],
            json!({"env": {"API_KEY": {"file": file}}}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let (code, r) = d.call("sec", "ok", "env", json!({})).await;
    assert_eq!(code, 200, "{r}");
    let env: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert_eq!(env["API_KEY"], "sk-very-secret-42");
    // Not in the API, the logs or the store.
    let (_, status) = d.get("/v1/meshes/sec/services/ok").await;
    let (_, logs) = d.get("/v1/meshes/sec/services/ok/logs?lines=1000").await;
    for v in [&st, &status, &logs] {
        assert!(!v.to_string().contains("sk-very-secret-42"), "{v}");
    }
    let (_, list) = d.get("/v1/meshes/sec/services").await;
    assert!(!list.to_string().contains("sk-very-secret-42"));
    for entry in std::fs::read_dir(d.data.path()).unwrap().flatten() {
        let p = entry.path();
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains("sk-very-secret-42"),
                "{} holds the secret",
                p.display()
            );
        }
    }
}
