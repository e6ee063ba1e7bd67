//! Shared pieces of the benchmarks: a direct stdio client (the baseline)
//! and an in-process meshbox daemon.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshbox::api::{self, ApiConfig};
use meshbox::orchestrator::process::{ProcessBackend, ProcessConfig};
use meshbox::supervisor::{Supervisor, SupervisorConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::oneshot;

/// A minimal pipelined JSON-RPC client straight on the server's pipes: the baseline.
pub struct Direct {
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next: AtomicU64,
    _child: tokio::process::Child,
}

impl Direct {
    /// Spawns `argv` in `cwd` with the same curated environment meshbox gives servers.
    pub async fn spawn(argv: &[&str], cwd: &Path) -> Direct {
        Self::spawn_with(argv, cwd, &[]).await
    }

    /// As `spawn`, with extra environment (an installer's cache dir, CA bundle).
    pub async fn spawn_with(argv: &[&str], cwd: &Path, extra: &[(String, String)]) -> Direct {
        let home = std::env::temp_dir().join("meshbox-bench-home");
        std::fs::create_dir_all(&home).unwrap();
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .current_dir(cwd)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            .envs(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        let p = pending.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if let Some(id) = v["id"].as_u64() {
                    if let Some(tx) = p.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                }
            }
        });
        Direct {
            stdin: tokio::sync::Mutex::new(child.stdin.take().unwrap()),
            pending,
            next: AtomicU64::new(1),
            _child: child,
        }
    }

    pub async fn request(&self, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let line = format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
        );
        {
            let mut w = self.stdin.lock().await;
            w.write_all(line.as_bytes()).await.unwrap();
            w.flush().await.unwrap();
        }
        rx.await.unwrap()
    }

    pub async fn notify(&self, method: &str) {
        let line = format!("{}\n", json!({"jsonrpc": "2.0", "method": method}));
        let mut w = self.stdin.lock().await;
        w.write_all(line.as_bytes()).await.unwrap();
        w.flush().await.unwrap();
    }

    /// initialize → initialized → tools/list following nextCursor.
    pub async fn handshake(&self) -> usize {
        self.request("initialize", json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}))
            .await;
        self.notify("notifications/initialized").await;
        let mut n = 0;
        let mut cursor: Option<String> = None;
        loop {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let r = self.request("tools/list", params).await;
            n += r["result"]["tools"].as_array().map_or(0, Vec::len);
            match r["result"]["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return n,
            }
        }
    }
}

/// meshbox's supervisor and API in this process, on 127.0.0.1:0.
pub struct Daemon {
    pub base: String,
    pub supervisor: Arc<Supervisor>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    pub async fn start(data_dir: PathBuf, path: Option<String>) -> Daemon {
        let backend = Arc::new(ProcessBackend::new(ProcessConfig::default()));
        let mut config = SupervisorConfig::new(data_dir);
        if let Some(p) = path {
            config.server_path = p.clone();
            config.install.path = p;
        }
        let supervisor = Arc::new(Supervisor::new(backend, config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = api::router(supervisor.clone(), ApiConfig::default());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(api::serve(listener, router, async {
            let _ = stop_rx.await;
        }));
        Daemon {
            base: format!("http://{addr}"),
            supervisor,
            stop: Some(stop_tx),
            server: Some(server),
        }
    }

    pub async fn stop(mut self) {
        self.supervisor.shutdown().await;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
