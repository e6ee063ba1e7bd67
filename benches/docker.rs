//! `make bench`, docker part (fails, naming what is missing, when no engine
//! answers or the python runner image is absent: `make images-local`):
//! 1. warm deploy-to-running on docker vs `docker run -i` of the same image
//!    with the same command + the MCP handshake;
//! 2. the same `echo` call through meshbox on docker vs on the process backend.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median, Direct};
use meshbox::api::{self, ApiConfig};
use meshbox::orchestrator::docker::{DockerBackend, DockerConfig};
use meshbox::orchestrator::process::{ProcessBackend, ProcessConfig};
use meshbox::orchestrator::Orchestrator;
use meshbox::supervisor::{Supervisor, SupervisorConfig};
use serde_json::json;
use tokio::sync::oneshot;

const RUNS: usize = 5;
const CALLS: usize = 1000;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/py_server")
}

async fn serve(
    backend: Arc<dyn Orchestrator>,
    data: PathBuf,
) -> (String, Arc<Supervisor>, oneshot::Sender<()>) {
    let sup = Arc::new(Supervisor::new(backend, SupervisorConfig::new(data)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(api::serve(
        listener,
        api::router(sup.clone(), ApiConfig::default()),
        api::ServeConfig::default(),
        async {
            let _ = rx.await;
        },
    ));
    (format!("http://{addr}"), sup, tx)
}

async fn call_p50(http: &reqwest::Client, base: &str, name: &str) -> Duration {
    let url = format!("{base}/v1/meshes/bench/services/{name}/call");
    let body = json!({"tool": "echo", "arguments": {"text": "hi"}}).to_string();
    let mut lat = Vec::with_capacity(CALLS);
    for i in 0..CALLS + 100 {
        let t = Instant::now();
        let r = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
        if i >= 100 {
            lat.push(t.elapsed());
        }
    }
    median(lat)
}

#[tokio::main]
async fn main() {
    let data = tempfile::tempdir().unwrap();
    let docker = match DockerBackend::connect(DockerConfig::new(data.path().to_path_buf())).await {
        Ok(d) => Arc::new(d),
        Err(e) => panic!(
            "the docker bench needs a docker engine: {}",
            meshbox::error_chain(&e)
        ),
    };
    let image = "meshbox/runner-python:latest";
    if let Err(e) = docker.client().inspect_image(image).await {
        panic!("the docker bench needs {image} (run `make images-local`): {e}");
    }
    println!(
        "meshbox bench — docker backend (engine API {})",
        docker.api_version()
    );
    let http = reqwest::Client::new();
    let (base, sup, stop) = serve(docker.clone(), data.path().join("d")).await;
    let spec = json!({"source": format!("path:{}", fixture().display())});
    // The first deploy fills the source volume; the rest are warm.
    let r = http
        .put(format!("{base}/v1/meshes/bench/services/first"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // The source volume of the deployed service, read from its container.
    let first: serde_json::Value = http
        .get(format!("{base}/v1/meshes/bench/services/first"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = first["container_id"]
        .as_str()
        .expect("container id")
        .to_owned();
    let volume = docker
        .client()
        .inspect_container(&id, None)
        .await
        .unwrap()
        .mounts
        .unwrap_or_default()
        .into_iter()
        .find_map(|m| m.name)
        .expect("source volume");
    let mut bare = Vec::new();
    let mut warm = Vec::new();
    for i in 0..RUNS {
        let t = Instant::now();
        let mount = format!("{volume}:/cache:ro");
        // Named, to be removed: killing the docker CLI leaves its container.
        let name = format!("meshbox-bench-bare-{}-{i}", std::process::id());
        let d = Direct::spawn(
            &[
                "docker",
                "run",
                "-i",
                "--rm",
                "--name",
                &name,
                "-v",
                &mount,
                "-w",
                "/cache/src",
                image,
                "python3",
                "server.py",
            ],
            data.path(),
        )
        .await;
        d.handshake().await;
        bare.push(t.elapsed());
        drop(d);
        let _ = docker
            .client()
            .remove_container(
                &name,
                Some(bollard::query_parameters::RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        let t = Instant::now();
        let r = http
            .put(format!("{base}/v1/meshes/bench/services/warm{i}"))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        warm.push(t.elapsed());
    }
    let (b, w) = (median(bare), median(warm));
    println!(
        "warm deploy: docker run -i + handshake {:>7.1} ms | meshbox deploy-to-running {:>7.1} ms | ratio {:.2}x",
        b.as_secs_f64() * 1e3,
        w.as_secs_f64() * 1e3,
        w.as_secs_f64() / b.as_secs_f64()
    );
    let docker_p50 = call_p50(&http, &base, "first").await;
    // A shutdown leaves containers to be adopted by the next meshbox: the
    // bench removes what it deployed.
    let deployed = std::iter::once("first".to_owned()).chain((0..RUNS).map(|i| format!("warm{i}")));
    for name in deployed {
        let r = http
            .delete(format!("{base}/v1/meshes/bench/services/{name}"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{name}: {}", r.status());
    }
    sup.shutdown().await;
    let _ = stop.send(());

    let process: Arc<dyn Orchestrator> = Arc::new(ProcessBackend::new(ProcessConfig::default()));
    let (base, sup, stop) = serve(process, data.path().join("p")).await;
    let r = http
        .put(format!("{base}/v1/meshes/bench/services/first"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let process_p50 = call_p50(&http, &base, "first").await;
    println!(
        "echo call p50 ({CALLS} calls): process {:>7.1} µs | docker {:>7.1} µs | ratio {:.2}x",
        process_p50.as_secs_f64() * 1e6,
        docker_p50.as_secs_f64() * 1e6,
        docker_p50.as_secs_f64() / process_p50.as_secs_f64()
    );
    sup.shutdown().await;
    let _ = stop.send(());
}
