//! The docker lane: the same scenarios on the docker backend, container
//! hardening read back with inspect, OOM, networks, and real packages.
//!
//! Every test is `#[ignore = "needs docker"]`: a plain `cargo test` leaves
//! the lane out, `cargo test --test docker -- --ignored` runs it and fails
//! when no engine answers or the runner images are missing (build them with
//! `make images-local`).

mod common;

use std::time::{Duration, Instant};

use bollard::Docker;
use common::{fixture, text_of, Daemon};
use serde_json::{json, Value};

/// The engine, with the runner images the lane needs; panics naming what
/// is missing (the lane runs only when asked: `cargo test -- --ignored`).
async fn engine() -> Docker {
    let docker = Docker::connect_with_local_defaults()
        .unwrap_or_else(|e| panic!("needs docker: cannot connect to a docker engine: {e}"));
    let docker = docker
        .negotiate_version()
        .await
        .unwrap_or_else(|e| panic!("needs docker: no docker engine answers: {e}"));
    for image in ["meshbox/runner-node:latest", "meshbox/runner-python:latest"] {
        if let Err(e) = docker.inspect_image(image).await {
            panic!("needs docker: runner image {image} is missing (run `make images-local`): {e}");
        }
    }
    docker
}

/// A listener on the host and the address containers reach it at (the
/// default bridge's gateway), for "can the sandbox get out" checks.
async fn host_listener(docker: &Docker) -> (std::net::TcpListener, String, u16) {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, bridge_gateway(docker).await, port)
}

/// The address containers reach the host at: the default bridge's gateway.
async fn bridge_gateway(docker: &Docker) -> String {
    docker
        .inspect_network("bridge", None)
        .await
        .ok()
        .and_then(|n| n.ipam?.config?.first()?.gateway.clone())
        .unwrap_or_else(|| "172.17.0.1".into())
}

/// Runs a command to success (argv only), panicking with its stderr.
fn run(argv: &[&str], dir: &std::path::Path) {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A git repository holding a copy of `source`, served over HTTPS (smart
/// HTTP, `git http-backend`) on the docker bridge's gateway, where install
/// containers reach it as they would a forge. Its certificate is
/// self-signed for that address; `bundle` is the system's CAs plus it, for
/// `--container-ca-bundle`.
struct GitServer {
    child: std::process::Child,
    url: String,
    bundle: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl GitServer {
    async fn start(docker: &Docker, source: &std::path::Path) -> GitServer {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let work = root.join("work");
        std::fs::create_dir_all(&work).unwrap();
        for e in std::fs::read_dir(source).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), work.join(e.file_name())).unwrap();
        }
        run(&["git", "init", "--quiet", "work"], root);
        run(&["git", "-C", "work", "add", "."], root);
        run(
            &[
                "git",
                "-C",
                "work",
                "-c",
                "user.name=meshbox",
                "-c",
                "user.email=meshbox@localhost",
                "commit",
                "--quiet",
                "-m",
                "server",
            ],
            root,
        );
        std::fs::create_dir_all(root.join("served")).unwrap();
        run(
            &[
                "git",
                "clone",
                "--quiet",
                "--bare",
                "work",
                "served/server.git",
            ],
            root,
        );
        let gateway = bridge_gateway(docker).await;
        run(
            &[
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-subj",
                "/CN=meshbox-git-test",
                "-addext",
                &format!("subjectAltName=IP:{gateway}"),
            ],
            root,
        );
        let mut bundle = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
        bundle.extend(std::fs::read(root.join("cert.pem")).unwrap());
        std::fs::write(root.join("bundle.pem"), bundle).unwrap();
        let mut child = std::process::Command::new("python3")
            .arg(fixture("git_https.py"))
            .arg(root.join("served"))
            .arg(&gateway)
            .arg(root.join("cert.pem"))
            .arg(root.join("key.pem"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the git server");
        let mut port = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut port,
        )
        .unwrap();
        let port: u16 = port.trim().parse().expect("the git server's port");
        GitServer {
            child,
            url: format!("https://{gateway}:{port}/server.git"),
            bundle: root.join("bundle.pem"),
            _dir: dir,
        }
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The container a service status names.
async fn container_of(
    docker: &Docker,
    status: &Value,
) -> bollard::models::ContainerInspectResponse {
    let id = status["container_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no container id: {status}"));
    docker.inspect_container(id, None).await.unwrap()
}

/// A running container carrying `labels` that only sleeps: what a dead
/// meshbox could have left behind.
async fn sleeper(docker: &Docker, labels: std::collections::HashMap<String, String>) -> String {
    let id = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            bollard::models::ContainerCreateBody {
                image: Some("meshbox/runner-python:latest".into()),
                cmd: Some(vec!["sleep".into(), "300".into()]),
                labels: Some(labels),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id;
    docker
        .start_container(
            &id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .unwrap();
    id
}

fn py_spec(extra: Value) -> Value {
    let mut spec = json!({"source": format!("path:{}", fixture("py_server").display())});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

#[tokio::test]
#[ignore = "needs docker"]
async fn runner_images_carry_the_version_of_the_meshbox_inside() {
    let docker = engine().await;
    let this = env!("CARGO_PKG_VERSION");
    for rt in ["node", "python", "bun"] {
        let image = format!("meshbox/runner-{rt}:latest");
        let info = docker.inspect_image(&image).await.unwrap();
        let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
        assert_eq!(
            labels.get("io.meshbox.version").map(String::as_str),
            Some(this),
            "{image}: {labels:?}"
        );
    }
    let out = std::process::Command::new(common::meshbox_bin())
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for rt in ["node", "python", "bun"] {
        assert!(
            text.contains(&format!(
                "meshbox/runner-{rt}:latest: present (meshbox {this})"
            )),
            "{text}"
        );
    }
}

#[tokio::test]
#[ignore = "needs docker"]
async fn containers_are_hardened_and_limited() {
    let docker = engine().await;
    let d = Daemon::start_docker(&[]);
    let (code, st) = d
        .put(
            "/v1/meshes/dk/services/hard",
            py_spec(json!({"memory_mb": 128, "cpus": 0.5})),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["backend"], "docker");
    assert_eq!(st["status"], "running");
    assert_eq!(st["tools"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    assert_eq!(
        st["limits"]["enforced"],
        json!({"memory": true, "cpus": true, "pids": true, "network": true, "filesystem": true})
    );
    let id = st["container_id"]
        .as_str()
        .expect("container id")
        .to_owned();
    let info = docker.inspect_container(&id, None).await.unwrap();
    let hc = info.host_config.unwrap();
    assert_eq!(hc.memory, Some(128 << 20));
    assert_eq!(hc.memory_swap, Some(128 << 20), "memory-swap equals memory");
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    assert_eq!(hc.pids_limit, Some(256), "default pids limit");
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert!(hc.tmpfs.unwrap().contains_key("/tmp"));
    assert_eq!(hc.init, Some(true));
    // The mesh's own network, found by id: named for the mesh and instance.
    let instance = std::fs::read_to_string(d.data.path().join("instance-id")).unwrap();
    let net_id = hc.network_mode.clone().unwrap();
    let net = docker.inspect_network(&net_id, None).await.unwrap();
    assert_eq!(net.name, Some(format!("meshbox-dk.{}", instance.trim())));
    assert_eq!(net.internal, Some(false));
    let cfg = info.config.unwrap();
    assert_eq!(cfg.user.as_deref(), Some("10001"));
    assert_eq!(cfg.tty, Some(false));
    assert_eq!(cfg.open_stdin, Some(true));
    let labels = cfg.labels.unwrap();
    assert_eq!(labels["meshbox.managed"], "true");
    assert_eq!(labels["meshbox.mesh"], "dk");
    assert_eq!(labels["meshbox.service"], "hard");
    assert!(labels.contains_key("meshbox.spec-hash"));
    // The source is mounted read-only; nothing is bind-mounted from the host.
    let mounts = info.mounts.unwrap();
    assert!(mounts.iter().all(|m| m.rw == Some(false)), "{mounts:?}");
    assert!(
        mounts
            .iter()
            .all(|m| format!("{:?}", m.typ).to_lowercase().contains("volume")),
        "{mounts:?}"
    );
    // The environment is curated.
    let (_, r) = d.call("dk", "hard", "env", json!({})).await;
    let env: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert!(env.get("CARGO_MANIFEST_DIR").is_none(), "{env}");

    // Undeploy removes the container, and the mesh network with the last service.
    let (code, _) = d.delete("/v1/meshes/dk/services/hard").await;
    assert_eq!(code, 204);
    let gone = wait_until(|| async { docker.inspect_container(&id, None).await.is_err() }).await;
    assert!(gone, "container left behind");
    let net_gone =
        wait_until(|| async { docker.inspect_network(&net_id, None).await.is_err() }).await;
    assert!(net_gone, "mesh network left behind");
}

async fn wait_until<F, Fut>(f: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
#[ignore = "needs docker"]
async fn scenarios_on_docker() {
    let _docker = engine().await;
    let d = Daemon::start_docker(&[]);
    let (code, st) = d.put("/v1/meshes/ds/services/s", py_spec(json!({}))).await;
    assert_eq!(code, 200, "{st}");

    // Concurrency: 50 overlapping calls.
    let started = Instant::now();
    let calls = (0..50).map(|i| {
        let d = &d;
        async move {
            let (code, r) = d.call("ds", "s", "slow", json!({"ms": 300})).await;
            assert_eq!(code, 200, "call {i}: {r}");
        }
    });
    futures_util::future::join_all(calls).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // Garbage and a 10 MB reply.
    let (code, r) = d.call("ds", "s", "big", json!({"bytes": 10_000_000})).await;
    assert_eq!(code, 200);
    assert_eq!(text_of(&r).len(), 10_000_000);

    // Timeout: 504, then still usable.
    let (code, _) = d
        .post(
            "/v1/meshes/ds/services/s/call",
            json!({"tool": "hang", "timeout_ms": 1500}),
        )
        .await;
    assert_eq!(code, 504);
    let (code, r) = d.call("ds", "s", "echo", json!({"text": "alive"})).await;
    assert_eq!((code, text_of(&r)), (200, "alive".to_owned()));

    // Crash mid-call: fails fast, restarts, next call works.
    let t = Instant::now();
    let (code, r) = d.call("ds", "s", "crash", json!({})).await;
    assert_eq!(code, 503, "{r}");
    assert!(t.elapsed() < Duration::from_secs(3));
    let (code, r) = d.call("ds", "s", "echo", json!({"text": "back"})).await;
    assert_eq!((code, text_of(&r)), (200, "back".to_owned()), "{r}");
    let st = d.status("ds", "s").await;
    assert_eq!(st["restarts"], 1);
    assert_eq!(st["last_exit"]["code"], 1);

    let (code, st) = d
        .put(
            "/v1/meshes/ds/services/g",
            py_spec(json!({"args": ["--garbage"]})),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let (code, r) = d.call("ds", "g", "add", json!({"a": 1, "b": 1})).await;
    assert_eq!((code, text_of(&r)), (200, "2".to_owned()));
    let (_, logs) = d.get("/v1/meshes/ds/services/g/logs?lines=100").await;
    assert!(
        logs["lines"]
            .to_string()
            .contains("[stdout] this is not json"),
        "{logs}"
    );
}

#[tokio::test]
#[ignore = "needs docker"]
async fn oom_is_reported_and_restarted() {
    let _docker = engine().await;
    let d = Daemon::start_docker(&[]);
    let (code, st) = d
        .put(
            "/v1/meshes/do/services/hog",
            py_spec(json!({"memory_mb": 64})),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let (code, r) = d.call("do", "hog", "alloc", json!({"mb": 256})).await;
    assert_eq!(code, 503, "{r}");
    let st = d
        .wait_status("do", "hog", Duration::from_secs(30), |s| {
            s["status"] == "running" && s["restarts"] == 1
        })
        .await;
    assert_eq!(st["last_exit"]["oom_killed"], true, "{st}");
}

#[tokio::test]
#[ignore = "needs docker"]
async fn network_none_has_no_network_and_full_joins_the_mesh() {
    let docker = engine().await;
    // A listener on the host, reached from containers through the bridge gateway.
    let (_listener, gateway, port) = host_listener(&docker).await;
    let d = Daemon::start_docker(&[]);
    let target = json!({"host": gateway, "port": port});

    let (code, st) = d
        .put(
            "/v1/meshes/dn/services/closed",
            py_spec(json!({"network": "none"})),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let info = container_of(&docker, &st).await;
    assert_eq!(
        info.host_config.unwrap().network_mode.as_deref(),
        Some("none")
    );
    let (_, r) = d.call("dn", "closed", "connect", target.clone()).await;
    assert_eq!(r["result"]["isError"], true, "{r}");

    let (code, st) = d
        .put(
            "/v1/meshes/dn/services/open",
            py_spec(json!({"network": "full"})),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let info = container_of(&docker, &st).await;
    let net = info.host_config.unwrap().network_mode.unwrap();
    let net = docker.inspect_network(&net, None).await.unwrap();
    assert!(
        net.name.as_deref().unwrap().starts_with("meshbox-dn."),
        "{net:?}"
    );
    assert_eq!(net.labels.unwrap()["meshbox.role"], "mesh-network");
    let (_, r) = d.call("dn", "open", "connect", target).await;
    assert_eq!(text_of(&r), "connected", "{r}");
}

#[tokio::test]
#[ignore = "needs docker"]
async fn registry_packages_install_in_a_container_once() {
    let _docker = engine().await;
    let d = Daemon::start_docker(&[]);
    let spec = json!({"source": "pypi:mcp-server-time", "network": "none"});
    let (code, st) = d.put("/v1/meshes/dr/services/time", spec.clone()).await;
    assert_eq!(code, 200, "{st}");
    let (code, r) = d
        .call("dr", "time", "get_current_time", json!({"timezone": "UTC"}))
        .await;
    assert_eq!(code, 200, "{r}");
    assert!(text_of(&r).contains("UTC"), "{r}");
    let (_, logs) = d.get("/v1/meshes/dr/services/time/logs?lines=100").await;
    assert!(
        logs["lines"].to_string().contains("in a python container"),
        "{logs}"
    );
    // A second deploy reuses the volume: no install container.
    let (code, _) = d.put("/v1/meshes/dr/services/time2", spec).await;
    assert_eq!(code, 200);
    let (_, logs) = d.get("/v1/meshes/dr/services/time2/logs?lines=100").await;
    assert!(!logs["lines"].to_string().contains("installing"), "{logs}");

    let (code, st) = d
        .put(
            "/v1/meshes/dr/services/everything",
            json!({"source": "npm:@modelcontextprotocol/server-everything", "args": ["stdio"], "network": "none"}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    let (code, r) = d
        .call("dr", "everything", "get-sum", json!({"a": 2, "b": 3}))
        .await;
    assert_eq!(code, 200, "{r}");
    assert!(text_of(&r).contains('5'), "{r}");
}

#[tokio::test]
#[ignore = "needs docker"]
async fn restarts_readopt_running_containers() {
    let docker = engine().await;
    let keep = ["--backend", "docker"];
    let mut a = Daemon::start_docker(&[]);
    let data = tempfile::tempdir().unwrap();
    // Re-run `a` on a data dir that outlives it, without stopping containers on exit.
    a.kill();
    let mut a = Daemon::start_on_with(data.path(), &keep);
    let (code, st) = a
        .put("/v1/meshes/da/services/keep", py_spec(json!({})))
        .await;
    assert_eq!(code, 200, "{st}");
    let id = st["container_id"].as_str().unwrap().to_owned();
    let (_, r) = a.call("da", "keep", "pid", json!({})).await;
    let server_pid = text_of(&r);
    let instance = std::fs::read_to_string(data.path().join("instance-id")).unwrap();
    // A managed container no stored spec asks for.
    let stray = sleeper(
        &docker,
        std::collections::HashMap::from([
            ("meshbox.managed".into(), "true".into()),
            ("meshbox.instance".into(), instance.clone()),
            ("meshbox.mesh".into(), "da".into()),
            ("meshbox.service".into(), "stray".into()),
        ]),
    )
    .await;

    // SIGKILL with a call in flight.
    let url = format!("{}/v1/meshes/da/services/keep/call", a.url);
    let inflight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&json!({"tool": "slow", "arguments": {"ms": 3000}}))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    assert!(inflight.await.unwrap().is_err());

    let mut b = Daemon::start_on_with(data.path(), &keep);
    let st = b
        .wait_status("da", "keep", Duration::from_secs(30), |s| {
            s["status"] == "running"
        })
        .await;
    assert_eq!(
        st["container_id"],
        id.as_str(),
        "re-adopted, not recreated: {st}"
    );
    assert_eq!(st["restarts"], 0);
    assert_eq!(
        st["tools"].as_array().unwrap().len(),
        common::FIXTURE_TOOLS,
        "tool list refreshed"
    );
    let (code, r) = b.call("da", "keep", "pid", json!({})).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(text_of(&r), server_pid, "the MCP server was not restarted");
    let (code, _) = b.get("/v1/meshes/da/services/gone").await;
    assert_eq!(code, 404, "an undeployed service stays gone");
    assert!(
        wait_until(|| async { docker.inspect_container(&stray, None).await.is_err() }).await,
        "stray managed container not removed"
    );

    // SIGTERM leaves the container running for the next start ...
    assert!(b.terminate().success());
    let info = docker.inspect_container(&id, None).await.unwrap();
    assert_eq!(info.state.unwrap().running, Some(true));
    // ... unless told otherwise.
    let mut c = Daemon::start_on_with(
        data.path(),
        &["--backend", "docker", "--stop-containers-on-exit"],
    );
    let st = c
        .wait_status("da", "keep", Duration::from_secs(30), |s| {
            s["status"] == "running"
        })
        .await;
    assert_eq!(st["container_id"], id.as_str());
    let (code, _) = c.delete("/v1/meshes/da/services/keep").await;
    assert_eq!(code, 204);
    assert!(c.terminate().success());
    assert!(wait_until(|| async { docker.inspect_container(&id, None).await.is_err() }).await);
}

#[tokio::test]
#[ignore = "needs docker"]
async fn allowlist_egress_goes_only_through_the_proxy() {
    let docker = engine().await;
    let (_listener, gateway, port) = host_listener(&docker).await;
    let d = Daemon::start_docker(&[]);
    let (code, st) = d
        .put(
            "/v1/meshes/de/services/s",
            py_spec(json!({"network": {"allow": ["registry.npmjs.org:443"]}})),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["network"], "allow=registry.npmjs.org:443");
    assert_eq!(st["limits"]["enforced"]["network"], true);
    let info = container_of(&docker, &st).await;
    let net = info.host_config.unwrap().network_mode.unwrap();
    let n = docker.inspect_network(&net, None).await.unwrap();
    assert!(n.name.as_deref().unwrap().ends_with(".egress"), "{n:?}");
    assert_eq!(n.labels.clone().unwrap()["meshbox.role"], "egress-network");
    assert_eq!(
        n.internal,
        Some(true),
        "the service's network has no route out"
    );
    let env = info.config.unwrap().env.unwrap();
    assert!(
        env.iter()
            .any(|e| e.starts_with("HTTPS_PROXY=http://meshbox-proxy-de-")),
        "{env:?}"
    );

    // The allowed registry host is reachable through the proxy.
    let (_, r) = d
        .call(
            "de",
            "s",
            "http_get",
            json!({"url": "https://registry.npmjs.org/is-number"}),
        )
        .await;
    assert_eq!(text_of(&r), "status 200", "{r}");
    // Another host is denied by the proxy.
    let (_, r) = d
        .call(
            "de",
            "s",
            "http_get",
            json!({"url": "https://pypi.org/simple/six/"}),
        )
        .await;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(text_of(&r).contains("403"), "{r}");
    // A direct connect to an IP goes nowhere.
    let (_, r) = d
        .call("de", "s", "connect", json!({"host": gateway, "port": port}))
        .await;
    assert_eq!(r["result"]["isError"], true, "{r}");
    // The proxy logged the denial.
    let proxies = docker
        .list_containers(Some(
            bollard::query_parameters::ListContainersOptionsBuilder::default()
                .filters(&std::collections::HashMap::from([(
                    "label".to_owned(),
                    vec![
                        "meshbox.role=proxy".to_owned(),
                        "meshbox.mesh=de".to_owned(),
                    ],
                )]))
                .build(),
        ))
        .await
        .unwrap();
    let proxy = proxies[0].id.clone().unwrap();
    let mut logs = docker.logs(
        &proxy,
        Some(
            bollard::query_parameters::LogsOptionsBuilder::default()
                .stderr(true)
                .stdout(true)
                .build(),
        ),
    );
    let mut text = String::new();
    while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut logs).await {
        text.push_str(&chunk.to_string());
    }
    assert!(text.contains("denied CONNECT pypi.org:443"), "{text}");

    // Proxy and networks go with the mesh's last service.
    let (code, _) = d.delete("/v1/meshes/de/services/s").await;
    assert_eq!(code, 204);
    assert!(wait_until(|| async { docker.inspect_container(&proxy, None).await.is_err() }).await);
    assert!(wait_until(|| async { docker.inspect_network(&net, None).await.is_err() }).await);
}

/// A mesh name no earlier run used.
fn fresh_mesh(prefix: &str) -> String {
    format!("{prefix}{:08x}", fastrand::u32(..))
}

/// Networks carrying the mesh label `mesh`.
async fn mesh_networks(docker: &Docker, mesh: &str) -> Vec<bollard::models::Network> {
    docker
        .list_networks(Some(
            bollard::query_parameters::ListNetworksOptionsBuilder::default()
                .filters(&std::collections::HashMap::from([(
                    "label".to_owned(),
                    vec![format!("meshbox.mesh={mesh}")],
                )]))
                .build(),
        ))
        .await
        .unwrap()
}

/// Egress proxy containers of `mesh`, running or not.
async fn mesh_proxies(docker: &Docker, mesh: &str) -> Vec<bollard::models::ContainerSummary> {
    docker
        .list_containers(Some(
            bollard::query_parameters::ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&std::collections::HashMap::from([(
                    "label".to_owned(),
                    vec![
                        "meshbox.role=proxy".to_owned(),
                        format!("meshbox.mesh={mesh}"),
                    ],
                )]))
                .build(),
        ))
        .await
        .unwrap()
}

#[tokio::test]
#[ignore = "needs docker"]
async fn concurrent_first_deploys_make_one_network_and_leave_none() {
    let docker = engine().await;
    let d = Daemon::start_docker(&[]);
    let instance = std::fs::read_to_string(d.data.path().join("instance-id")).unwrap();
    // The source volume is filled once, beforehand: this is about networks.
    let (code, st) = d
        .put(
            &format!("/v1/meshes/{}/services/warm", fresh_mesh("dw")),
            py_spec(json!({"network": "none"})),
        )
        .await;
    assert_eq!(code, 200, "{st}");

    let mesh = fresh_mesh("dc");
    let allow = json!({"allow": ["registry.npmjs.org:443"]});
    let deploys = (0..8).map(|i| {
        let (d, mesh) = (&d, &mesh);
        let network = if i % 2 == 0 {
            json!("full")
        } else {
            allow.clone()
        };
        async move {
            let (code, st) = d
                .put(
                    &format!("/v1/meshes/{mesh}/services/s{i}"),
                    py_spec(json!({ "network": network })),
                )
                .await;
            assert_eq!(code, 200, "deploy {i}: {st}");
        }
    });
    futures_util::future::join_all(deploys).await;

    let nets = mesh_networks(&docker, &mesh).await;
    let (internal, bridge): (Vec<_>, Vec<_>) = nets.iter().partition(|n| n.internal == Some(true));
    assert_eq!(bridge.len(), 1, "one mesh network: {nets:?}");
    assert_eq!(internal.len(), 1, "one egress network: {nets:?}");
    for n in &nets {
        let labels = n.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("meshbox.instance").map(String::as_str),
            Some(instance.trim()),
            "{n:?}"
        );
    }
    let proxies = mesh_proxies(&docker, &mesh).await;
    assert_eq!(proxies.len(), 1, "one proxy per allowlist: {proxies:?}");
    assert_eq!(
        proxies[0]
            .labels
            .as_ref()
            .and_then(|l| l.get("meshbox.instance"))
            .map(String::as_str),
        Some(instance.trim())
    );
    // Every service answers on its network.
    for i in 0..8 {
        let (code, r) = d
            .call(&mesh, &format!("s{i}"), "echo", json!({"text": "hi"}))
            .await;
        assert_eq!((code, text_of(&r)), (200, "hi".to_owned()), "s{i}: {r}");
    }

    let removals = (0..8).map(|i| {
        let (d, mesh) = (&d, &mesh);
        async move {
            let (code, r) = d.delete(&format!("/v1/meshes/{mesh}/services/s{i}")).await;
            assert_eq!(code, 204, "remove {i}: {r}");
        }
    });
    futures_util::future::join_all(removals).await;
    assert!(
        wait_until(|| async { mesh_networks(&docker, &mesh).await.is_empty() }).await,
        "networks left: {:?}",
        mesh_networks(&docker, &mesh).await
    );
    assert!(
        wait_until(|| async { mesh_proxies(&docker, &mesh).await.is_empty() }).await,
        "proxies left: {:?}",
        mesh_proxies(&docker, &mesh).await
    );
}

#[tokio::test]
#[ignore = "needs docker"]
async fn sweep_removes_this_instances_stray_networks_and_proxies() {
    let docker = engine().await;
    let data = tempfile::tempdir().unwrap();
    // The first start writes the instance id; nothing is deployed.
    let mut a = Daemon::start_on_with(data.path(), &["--backend", "docker"]);
    a.terminate();
    let instance = std::fs::read_to_string(data.path().join("instance-id")).unwrap();
    let mesh = fresh_mesh("dsw");
    let ours = std::collections::HashMap::from([
        ("meshbox.managed".to_owned(), "true".to_owned()),
        ("meshbox.instance".to_owned(), instance.trim().to_owned()),
        ("meshbox.mesh".to_owned(), mesh.clone()),
    ]);
    let network = |name: String, labels| async {
        docker
            .create_network(bollard::models::NetworkCreateRequest {
                name,
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .unwrap()
            .id
    };
    let net = network(format!("meshbox-{mesh}-stray"), ours.clone()).await;
    let mut proxy_labels = ours.clone();
    proxy_labels.insert("meshbox.role".into(), "proxy".into());
    let proxy = sleeper(&docker, proxy_labels).await;
    // Another instance's network is not ours to remove.
    let mut theirs = ours.clone();
    theirs.insert("meshbox.instance".into(), "0123456789abcdef".into());
    let other = network(format!("meshbox-{mesh}-other"), theirs).await;

    let _b = Daemon::start_on_with(data.path(), &["--backend", "docker"]);
    assert!(
        wait_until(|| async { docker.inspect_container(&proxy, None).await.is_err() }).await,
        "stray proxy not removed"
    );
    assert!(
        wait_until(|| async { docker.inspect_network(&net, None).await.is_err() }).await,
        "stray network not removed"
    );
    assert!(
        docker.inspect_network(&other, None).await.is_ok(),
        "another instance's network was removed"
    );
    docker.remove_network(&other).await.unwrap();
}

/// Removes the cache volumes a daemon's instance created.
async fn remove_volumes_of(docker: &Docker, data_dir: &std::path::Path) {
    let instance = std::fs::read_to_string(data_dir.join("instance-id")).unwrap();
    let volumes = docker
        .list_volumes(Some(
            bollard::query_parameters::ListVolumesOptionsBuilder::default()
                .filters(&std::collections::HashMap::from([(
                    "label".to_owned(),
                    vec![format!("meshbox.instance={}", instance.trim())],
                )]))
                .build(),
        ))
        .await
        .unwrap();
    for v in volumes.volumes.unwrap_or_default() {
        let _ = docker
            .remove_volume(
                &v.name,
                None::<bollard::query_parameters::RemoveVolumeOptions>,
            )
            .await;
    }
}

#[tokio::test]
#[ignore = "needs docker"]
async fn a_python_git_source_without_runtime_runs_in_the_python_image() {
    let docker = engine().await;
    let git = GitServer::start(&docker, &fixture("py_server")).await;
    let d = Daemon::start_docker(&["--container-ca-bundle", git.bundle.to_str().unwrap()]);
    // No `runtime`: the clone in the node image finds a python server.
    let (code, st) = d
        .put(
            "/v1/meshes/dg/services/py",
            json!({"source": format!("git:{}", git.url), "network": "none"}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["runtime"], "python", "{st}");
    assert_eq!(st["tools"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    let info = container_of(&docker, &st).await;
    assert_eq!(
        info.config.unwrap().image.as_deref(),
        Some("meshbox/runner-python:latest")
    );
    let (code, r) = d.call("dg", "py", "echo", json!({"text": "cloned"})).await;
    assert_eq!((code, text_of(&r)), (200, "cloned".to_owned()), "{r}");
    let (_, logs) = d.get("/v1/meshes/dg/services/py/logs?lines=200").await;
    let logs = logs["lines"].to_string();
    assert!(logs.contains("in a node container"), "{logs}");
    assert!(logs.contains("in a python container"), "{logs}");
    let (code, _) = d.delete("/v1/meshes/dg/services/py").await;
    assert_eq!(code, 204);
    remove_volumes_of(&docker, d.data.path()).await;
}

/// Builds `tag` from `dockerfile` with the files of `dir` as its context.
async fn build_image(docker: &Docker, tag: &str, dockerfile: &str, dir: &std::path::Path) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, name, data).unwrap();
    };
    add("Dockerfile", dockerfile.as_bytes());
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        add(
            &e.file_name().to_string_lossy(),
            &std::fs::read(e.path()).unwrap(),
        );
    }
    let context = tar.into_inner().unwrap();
    let mut build = docker.build_image(
        bollard::query_parameters::BuildImageOptionsBuilder::default()
            .dockerfile("Dockerfile")
            .t(tag)
            .rm(true)
            .build(),
        None,
        Some(bollard::body_full(context.into())),
    );
    while let Some(item) = futures_util::StreamExt::next(&mut build).await {
        let info = item.unwrap_or_else(|e| panic!("building {tag}: {e}"));
        assert!(info.error_detail.is_none(), "building {tag}: {info:?}");
    }
}

#[tokio::test]
#[ignore = "needs docker"]
async fn image_sources_run_their_own_command_with_the_same_hardening() {
    let docker = engine().await;
    // An arbitrary image that would run as root with its own command.
    let image = "meshbox-test/py-server:latest";
    build_image(
        &docker,
        image,
        "FROM meshbox/runner-python:latest\n\
         USER root\n\
         COPY server.py /app/server.py\n\
         WORKDIR /app\n\
         CMD [\"python3\", \"/app/server.py\"]\n",
        &fixture("py_server"),
    )
    .await;
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    let d = Daemon::start_docker(&["--container-ca-bundle", bundle]);
    let (code, st) = d
        .put(
            "/v1/meshes/di/services/img",
            json!({"source": format!("image:{image}"), "memory_mb": 96, "network": "none"}),
        )
        .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["tools"].as_array().unwrap().len(), common::FIXTURE_TOOLS);
    let info = container_of(&docker, &st).await;
    let cfg = info.config.unwrap();
    assert_eq!(cfg.image.as_deref(), Some(image));
    assert_eq!(cfg.user.as_deref(), Some("10001"), "not the image's root");
    assert_eq!(
        cfg.cmd,
        Some(vec!["python3".to_owned(), "/app/server.py".to_owned()]),
        "the image's own command"
    );
    assert_eq!(cfg.working_dir.as_deref(), Some("/app"));
    let labels = cfg.labels.unwrap();
    assert_eq!(labels["meshbox.mesh"], "di");
    assert_eq!(labels["meshbox.service"], "img");
    let hc = info.host_config.unwrap();
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert!(hc.tmpfs.unwrap().contains_key("/tmp"));
    assert_eq!(hc.init, Some(true));
    assert_eq!(hc.memory, Some(96 << 20));
    assert_eq!(hc.memory_swap, Some(96 << 20));
    assert_eq!(hc.pids_limit, Some(256));
    assert_eq!(hc.network_mode.as_deref(), Some("none"));
    // The operator's CA bundle reaches it, read-only.
    let ca = info
        .mounts
        .unwrap()
        .into_iter()
        .find(|m| m.destination.as_deref() == Some("/etc/meshbox/ca-bundle.pem"))
        .expect("CA bundle mounted");
    assert_eq!(ca.rw, Some(false));
    let (_, r) = d.call("di", "img", "env", json!({})).await;
    let env: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert_eq!(env["HOME"], "/tmp");
    assert_eq!(env["SSL_CERT_FILE"], "/etc/meshbox/ca-bundle.pem");
    // The pids limit holds inside.
    let (code, r) = d.call("di", "img", "threads", json!({"n": 600})).await;
    assert_eq!(code, 200, "{r}");
    let started: u64 = text_of(&r).parse().unwrap();
    assert!(started < 256, "{started} threads under a pids limit of 256");
    let (code, _) = d.delete("/v1/meshes/di/services/img").await;
    assert_eq!(code, 204);
}
