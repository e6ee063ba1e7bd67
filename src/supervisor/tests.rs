//! Supervisor behaviour over a fake backend that records its calls, with
//! paused tokio time: restart schedule, crashed state, health restarts.

use std::sync::Mutex as StdMutex;

use async_trait::async_trait;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::*;
use crate::orchestrator::{
    Capabilities, Completed, Enforced, ExitReason, Sandbox, SandboxHandle, SandboxIo,
};

#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Exits with code 1 right after answering tools/list.
    CrashAfterHandshake,
    /// Never answers ping.
    Deaf,
    Healthy,
}

struct Fake {
    script: Script,
    spawns: StdMutex<Vec<Instant>>,
}

struct FakeHandle(watch::Sender<Option<ExitReason>>);

#[async_trait]
impl SandboxHandle for FakeHandle {
    async fn stop(&self, _grace: Duration) -> ExitReason {
        self.0.send_if_modified(|r| {
            let first = r.is_none();
            if first {
                *r = Some(ExitReason {
                    code: Some(0),
                    ..Default::default()
                });
            }
            first
        });
        self.0.borrow().clone().unwrap_or_default()
    }
    fn kill(&self) {
        self.0.send_if_modified(|r| {
            let first = r.is_none();
            if first {
                *r = Some(ExitReason {
                    signal: Some(9),
                    ..Default::default()
                });
            }
            first
        });
    }
}

#[async_trait]
impl Orchestrator for Fake {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "fake",
            images: false,
            sandboxed_install: false,
            detach: false,
        }
    }
    fn check(&self, _: &SandboxSpec) -> Result<Enforced, OrchestratorError> {
        Ok(Enforced::default())
    }
    async fn run_to_completion(
        &self,
        _spec: SandboxSpec,
        _timeout: Duration,
    ) -> Result<Completed, OrchestratorError> {
        Ok(Completed::default())
    }
    async fn spawn(&self, _spec: SandboxSpec) -> Result<Sandbox, OrchestratorError> {
        self.spawns.lock().unwrap().push(Instant::now());
        let (client_w, server_r) = tokio::io::duplex(1 << 16);
        let (mut server_w, client_r) = tokio::io::duplex(1 << 16);
        let (_stderr_w, stderr_r) = tokio::io::duplex(64);
        let (exit_tx, exit_rx) = watch::channel(None);
        let script = self.script;
        let exit = exit_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(server_r).lines();
            let mut exit_rx = exit.subscribe();
            loop {
                let line = tokio::select! {
                    l = lines.next_line() => l,
                    _ = exit_rx.wait_for(Option::is_some) => return,
                };
                let Ok(Some(line)) = line else { return };
                let msg: serde_json::Value = serde_json::from_str(&line).unwrap();
                let id = msg["id"].clone();
                let result = match msg["method"].as_str().unwrap_or("") {
                    "initialize" => json!({"protocolVersion": "2025-06-18", "capabilities": {}}),
                    "tools/list" => json!({"tools": [{"name": "t"}]}),
                    "ping" if script == Script::Deaf => continue,
                    "ping" => json!({}),
                    _ => continue,
                };
                let reply = json!({"jsonrpc": "2.0", "id": id, "result": result});
                server_w
                    .write_all(format!("{reply}\n").as_bytes())
                    .await
                    .unwrap();
                if script == Script::CrashAfterHandshake && msg["method"] == "tools/list" {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    exit.send_replace(Some(ExitReason {
                        code: Some(1),
                        ..Default::default()
                    }));
                    return;
                }
            }
        });
        Ok(Sandbox {
            io: SandboxIo {
                stdin: Box::pin(client_w),
                stdout: Box::pin(client_r),
                stderr: Box::pin(stderr_r),
            },
            exit: exit_rx,
            handle: Box::new(FakeHandle(exit_tx)),
            pid: Some(4242),
            container_id: None,
            enforced: Enforced::default(),
        })
    }
}

fn supervisor(script: Script) -> (Arc<Supervisor>, Arc<Fake>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake {
        script,
        spawns: StdMutex::new(Vec::new()),
    });
    let sup = Supervisor::new(
        fake.clone(),
        SupervisorConfig::new(dir.path().to_path_buf()),
    );
    (Arc::new(sup), fake, dir)
}

fn spec(dir: &tempfile::TempDir) -> ServiceSpec {
    ServiceSpec {
        source: format!("path:{}", dir.path().display()),
        command: Some(vec!["fake-server".into()]),
        ..Default::default()
    }
}

fn key() -> ServiceKey {
    ServiceKey::parse("m", "s").unwrap()
}

async fn wait_phase(sup: &Supervisor, phase: Phase) {
    let svc = sup.get(&key()).unwrap();
    while svc.phase() != phase {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn crash_loop_backs_off_then_crashes_and_retries_slowly() {
    let (sup, fake, dir) = supervisor(Script::CrashAfterHandshake);
    let st = sup.deploy(key(), spec(&dir)).await.unwrap();
    assert_eq!(st.status, Phase::Running);
    wait_phase(&sup, Phase::Crashed).await;
    let spawns = fake.spawns.lock().unwrap().clone();
    assert_eq!(spawns.len(), 6, "first start + 5 restarts before crashed");
    let gaps: Vec<f64> = spawns
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    for (gap, expect) in gaps.iter().zip([1.0, 2.0, 4.0, 8.0, 16.0]) {
        assert!(
            *gap >= expect * 0.75 && *gap <= expect + 0.5,
            "gap {gap}, expected ~{expect}: {gaps:?}"
        );
    }
    let st = sup.get(&key()).unwrap().status();
    assert_eq!(st.status, Phase::Crashed);
    assert_eq!(st.last_exit.as_ref().unwrap().code, Some(1));
    assert_eq!(st.restarts, 5);
    // A call to a crashed service fails at once.
    let err = sup.call(&key(), "t", json!({}), None).await.unwrap_err();
    assert!(
        matches!(
            err,
            SupervisorError::NotRunning {
                status: Phase::Crashed,
                ..
            }
        ),
        "{err}"
    );
    // Not forgotten: retried on the slow schedule.
    let before = Instant::now();
    while fake.spawns.lock().unwrap().len() < 7 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = before.elapsed();
    assert!(
        waited >= Duration::from_secs(299),
        "retried after {waited:?}"
    );
    assert_eq!(fake.spawns.lock().unwrap().len(), 7);
}

#[tokio::test(start_paused = true)]
async fn unanswered_pings_restart_after_three_intervals() {
    let (sup, fake, dir) = supervisor(Script::Deaf);
    sup.deploy(key(), spec(&dir)).await.unwrap();
    let svc = sup.get(&key()).unwrap();
    let t0 = Instant::now();
    // First failed check at 30 s (+5 s timeout): degraded, not restarted.
    tokio::time::sleep(Duration::from_secs(36)).await;
    assert_eq!(svc.status().health, Health::Degraded);
    assert_eq!(fake.spawns.lock().unwrap().len(), 1);
    while fake.spawns.lock().unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_secs(95) && at < Duration::from_secs(110),
        "restarted at {at:?}"
    );
    wait_phase(&sup, Phase::Running).await;
    assert_eq!(fake.spawns.lock().unwrap().len(), 2);
    assert_eq!(svc.status().restarts, 1);
    assert_eq!(svc.status().health, Health::Healthy);
}

#[tokio::test(start_paused = true)]
async fn calls_wait_through_a_restart() {
    let (sup, fake, dir) = supervisor(Script::Healthy);
    sup.deploy(key(), spec(&dir)).await.unwrap();
    let svc = sup.get(&key()).unwrap();
    let old = svc.session(Instant::now()).await.unwrap();
    svc.request(service::Control::Restart);
    // Asked while the server goes down: the call waits for the new session.
    while !old.is_closed() {
        tokio::task::yield_now().await;
    }
    let new = svc
        .session(Instant::now() + Duration::from_secs(25))
        .await
        .unwrap();
    assert!(!Arc::ptr_eq(&old, &new));
    assert_eq!(fake.spawns.lock().unwrap().len(), 2);
    // `restart` waits for the new run even when it is over at once.
    let st = sup.restart(&key()).await.unwrap();
    assert_eq!((st.status, st.restarts), (Phase::Running, 2));
    assert_eq!(fake.spawns.lock().unwrap().len(), 3);
    let err = {
        sup.undeploy(&key()).await.unwrap();
        sup.call(&key(), "t", json!({}), None).await.unwrap_err()
    };
    assert!(matches!(err, SupervisorError::NotFound { .. }));
}

#[tokio::test(start_paused = true)]
async fn bad_specs_change_nothing() {
    let (sup, fake, dir) = supervisor(Script::Healthy);
    let mut s = spec(&dir);
    s.memory_mb = Some(1);
    assert!(matches!(
        sup.deploy(key(), s).await,
        Err(SupervisorError::Spec(_))
    ));
    let mut s = spec(&dir);
    s.source = "path:/definitely/not/here".into();
    assert!(matches!(
        sup.deploy(key(), s).await,
        Err(SupervisorError::Source(_))
    ));
    assert!(sup.is_empty());
    assert!(fake.spawns.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn failed_service_heals_in_place_when_its_secret_appears() {
    let (sup, fake, dir) = supervisor(Script::Healthy);
    let secret = dir.path().join("token");
    let mut s = spec(&dir);
    s.env.insert(
        "TOKEN".into(),
        crate::config::EnvValue::File {
            file: secret.clone(),
        },
    );
    let err = sup.deploy(key(), s).await.unwrap_err();
    assert!(err.to_string().contains("TOKEN"), "{err}");
    let svc = sup.get(&key()).unwrap();
    let st = svc.status();
    assert_eq!(st.status, Phase::Failed);
    assert_eq!(st.retry.as_ref().unwrap().attempts, 1);
    assert!(
        fake.spawns.lock().unwrap().is_empty(),
        "nothing started without its secret"
    );
    // Still missing at the next try: attempt 2, 30 s later.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(svc.status().retry.unwrap().attempts, 2);
    std::fs::write(&secret, "s3cret").unwrap();
    let t0 = Instant::now();
    while svc.phase() != Phase::Running {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t0.elapsed() <= Duration::from_secs(31),
        "healed at the next retry"
    );
    assert!(svc.status().retry.is_none());
    assert_eq!(fake.spawns.lock().unwrap().len(), 1);
}

#[test]
fn failed_retry_schedule() {
    let r = FailedRetry::default();
    let delays: Vec<u64> = (1..=7).map(|n| r.delay(n).as_secs()).collect();
    assert_eq!(delays, [30, 30, 30, 30, 30, 300, 300]);
}
