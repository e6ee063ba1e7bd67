//! Supervisor behaviour over the recording fake backend, with paused tokio
//! time: restart schedule, crashed and failed states, health, interruptible
//! phases, transactional redeploys, era verdicts.

use std::sync::atomic::Ordering;

use serde_json::json;

use super::*;
use crate::orchestrator::fake::{Fake, Record, Script};

fn supervisor_with(
    fake: Arc<Fake>,
    store: Option<Arc<Store>>,
) -> (Arc<Supervisor>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(fake, SupervisorConfig::new(dir.path().to_path_buf()));
    if let Some(s) = store {
        sup = sup.with_store(s);
    }
    (Arc::new(sup), dir)
}

fn supervisor(script: Script) -> (Arc<Supervisor>, Arc<Fake>, tempfile::TempDir) {
    let fake = Fake::new(script);
    let (sup, dir) = supervisor_with(fake.clone(), None);
    (sup, fake, dir)
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

async fn wait_until(mut pred: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if pred() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held");
}

#[tokio::test(start_paused = true)]
async fn a_directory_is_looked_at_once_per_deploy_and_its_restarts() {
    let (sup, fake, dir) = supervisor(Script::CrashAfterHandshake);
    std::fs::write(dir.path().join("package.json"), r#"{"name":"x"}"#).unwrap();
    std::fs::write(dir.path().join("index.js"), "").unwrap();
    let spec = ServiceSpec {
        source: format!("path:{}", dir.path().display()),
        ..Default::default()
    };
    sup.deploy(key(), spec).await.unwrap();
    // Crashes and is restarted: every start uses the deploy's look.
    wait_until(|| fake.spawns().len() >= 3).await;
    assert_eq!(crate::acquire::looks(dir.path()), 1);
    let argv: Vec<Vec<String>> = fake
        .records
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, r)| match r {
            Record::Spawn { argv, .. } => Some(argv.clone()),
            _ => None,
        })
        .collect();
    assert!(argv.iter().all(|a| a == &["node", "index.js"]), "{argv:?}");
}

#[tokio::test(start_paused = true)]
async fn crash_loop_backs_off_then_crashes_and_retries_slowly() {
    let (sup, fake, dir) = supervisor(Script::CrashAfterHandshake);
    let st = sup.deploy(key(), spec(&dir)).await.unwrap();
    assert_eq!(st.status, Phase::Running);
    wait_phase(&sup, Phase::Crashed).await;
    let spawns = fake.spawns();
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
    assert_eq!(st.restarts, 6);
    assert_eq!(st.pid, None, "no sandbox, no pid");
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
    while fake.spawns().len() < 7 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = before.elapsed();
    assert!(
        waited >= Duration::from_secs(299),
        "retried after {waited:?}"
    );
}

/// A server's end is known before its sandbox has let go of what it held
/// (a process sandbox's teardown syncs the filesystem under its overlay):
/// the status says so at once, the next start waits for the release (it
/// reuses the layer), and an undeploy meanwhile takes effect at once.
#[tokio::test(start_paused = true)]
async fn a_restart_waits_for_the_last_sandbox_to_let_go() {
    let (sup, fake, dir) = supervisor(Script::Healthy);
    fake.then(&[Script::CrashAfterHandshake, Script::CrashAfterHandshake]);
    *fake.release_delay.lock().unwrap() = Duration::from_secs(5);
    sup.deploy(key(), spec(&dir)).await.unwrap();
    wait_until(|| fake.spawns().len() >= 2).await;
    let records = fake.records.lock().unwrap().clone();
    let released = records
        .iter()
        .find(|(_, r)| *r == Record::Released)
        .map(|(t, _)| *t)
        .expect("the first sandbox was released");
    let spawns = fake.spawns();
    assert!(
        released <= spawns[1],
        "started before the last sandbox let go"
    );
    assert!(
        spawns[1] - spawns[0] >= Duration::from_secs(5),
        "{:?}",
        spawns[1] - spawns[0]
    );
    // The second crashes too: while its sandbox lets go the status already
    // says it is not running, and an undeploy does not wait.
    wait_until(|| {
        sup.get(&key()).unwrap().status().last_exit.is_some()
            && fake.spawns().len() == 2
            && sup.get(&key()).unwrap().phase() != Phase::Running
    })
    .await;
    let st = sup.get(&key()).unwrap().status();
    assert_eq!(st.pid, None, "{st:?}");
    let t = Instant::now();
    sup.undeploy(&key()).await.unwrap();
    assert!(t.elapsed() <= Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(fake.spawns().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn unanswered_pings_restart_after_three_intervals() {
    let (sup, fake, dir) = supervisor(Script::Deaf);
    let st = sup.deploy(key(), spec(&dir)).await.unwrap();
    assert_eq!(st.health, Health::Unknown, "no probe has passed yet");
    let svc = sup.get(&key()).unwrap();
    let t0 = Instant::now();
    // First failed check at 30 s (+5 s timeout): degraded, not restarted.
    tokio::time::sleep(Duration::from_secs(36)).await;
    assert_eq!(svc.status().health, Health::Degraded);
    assert_eq!(fake.spawns().len(), 1);
    while fake.spawns().len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_secs(95) && at < Duration::from_secs(110),
        "restarted at {at:?}"
    );
    wait_phase(&sup, Phase::Running).await;
    assert_eq!(svc.status().restarts, 1);
    assert_eq!(
        svc.status().health,
        Health::Unknown,
        "a new run starts unknown"
    );
}

/// A server that stops reading its stdin cannot wedge anything: calls time
/// out at their deadline, liveness probes time out and restart it, and an
/// undeploy takes effect at once.
#[tokio::test(start_paused = true)]
async fn a_server_that_stops_reading_is_restarted_and_never_wedges() {
    let (sup, fake, dir) = supervisor(Script::StopReading);
    sup.deploy(key(), spec(&dir)).await.unwrap();
    let big = "x".repeat(300 * 1024);
    let t0 = Instant::now();
    let err = sup
        .call(
            &key(),
            "echo",
            json!({"text": big}),
            Some(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Timeout), "{err}");
    assert!(t0.elapsed() <= Duration::from_millis(1100));
    // Liveness: three timed-out probes → restart.
    while fake.spawns().len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "{:?}",
        t0.elapsed()
    );
    wait_phase(&sup, Phase::Running).await;
    let t1 = Instant::now();
    sup.undeploy(&key()).await.unwrap();
    assert!(t1.elapsed() <= Duration::from_secs(1), "{:?}", t1.elapsed());
    wait_until(|| fake.alive.load(Ordering::SeqCst) == 0).await;
}

#[tokio::test(start_paused = true)]
async fn readiness_failures_mark_unhealthy_with_the_probe_message_and_never_restart() {
    let (sup, fake, dir) = supervisor(Script::ReadinessFails);
    let mut s = spec(&dir);
    s.health = Some(crate::config::HealthSpec {
        tool: Some("ready".into()),
        ..Default::default()
    });
    sup.deploy(key(), s).await.unwrap();
    tokio::time::sleep(Duration::from_secs(100)).await;
    let st = sup.get(&key()).unwrap().status();
    assert_eq!(st.health, Health::Unhealthy);
    assert!(
        st.health_error.as_deref().unwrap_or("").contains("db down"),
        "{:?}",
        st.health_error
    );
    assert_eq!(fake.spawns().len(), 1, "readiness never restarts");
    assert_eq!(st.status, Phase::Running);
}

#[tokio::test(start_paused = true)]
async fn stdout_closed_restarts_at_once_and_says_why() {
    let (sup, fake, dir) = supervisor(Script::CloseStdout);
    fake.set_default(Script::CloseStdout);
    let t0 = Instant::now();
    sup.deploy(key(), spec(&dir)).await.unwrap();
    while fake.spawns().len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let logs = sup.get(&key()).unwrap().logs.tail(50).0.join("\n");
    assert!(logs.contains("closed its stdout"), "{logs}");
    assert!(fake.count(|r| *r == Record::Kill) >= 1);
}

#[tokio::test(start_paused = true)]
async fn calls_wait_through_a_restart() {
    let (sup, fake, dir) = supervisor(Script::Healthy);
    sup.deploy(key(), spec(&dir)).await.unwrap();
    let svc = sup.get(&key()).unwrap();
    let old = svc.upstream(Instant::now()).await.unwrap();
    svc.request(service::Control::Restart);
    // Asked while the server goes down: the call waits for the new session.
    while !old.is_closed() {
        tokio::task::yield_now().await;
    }
    let new = svc
        .upstream(Instant::now() + Duration::from_secs(25))
        .await
        .unwrap();
    assert!(!Arc::ptr_eq(&old, &new));
    assert_eq!(fake.spawns().len(), 2);
    // `restart` waits for the new run even when it is over at once.
    let st = sup.restart(&key()).await.unwrap();
    assert_eq!((st.status, st.restarts), (Phase::Running, 2));
    assert_eq!(fake.spawns().len(), 3);
    sup.undeploy(&key()).await.unwrap();
    let err = sup.call(&key(), "t", json!({}), None).await.unwrap_err();
    assert!(matches!(err, SupervisorError::NotFound { .. }));
    assert_eq!(fake.count(|r| matches!(r, Record::Release(_))), 1);
}

/// Stop takes effect within a second whatever the service is doing, and
/// kills what the phase started.
#[tokio::test(start_paused = true)]
async fn undeploy_takes_effect_at_once_in_every_phase() {
    let hour = Duration::from_secs(3600);
    // Installing: a sandboxed install that would take an hour.
    {
        let fake = Fake::with_sandboxed_install(Script::Healthy, hour);
        let (sup, _dir) = supervisor_with(fake.clone(), None);
        let s = ServiceSpec {
            source: "npm:some-server@1.0.0".into(),
            ..Default::default()
        };
        let deploying = {
            let sup = sup.clone();
            tokio::spawn(async move { sup.deploy(key(), s).await })
        };
        wait_until(|| fake.count(|r| *r == Record::InstallStarted) == 1).await;
        assert_eq!(sup.get(&key()).unwrap().phase(), Phase::Installing);
        let t = Instant::now();
        sup.undeploy(&key()).await.unwrap();
        assert!(t.elapsed() <= Duration::from_secs(1));
        assert_eq!(
            fake.count(|r| *r == Record::InstallDropped),
            1,
            "install cancelled"
        );
        assert!(deploying.await.unwrap().is_err());
    }
    // Starting: a spawn that would take an hour.
    {
        let (sup, fake, dir) = supervisor(Script::Healthy);
        *fake.spawn_delay.lock().unwrap() = hour;
        let s = spec(&dir);
        let sup2 = sup.clone();
        tokio::spawn(async move { sup2.deploy(key(), s).await });
        wait_until(|| {
            sup.get(&key())
                .map(|s| s.phase() == Phase::Starting)
                .unwrap_or(false)
        })
        .await;
        let t = Instant::now();
        sup.undeploy(&key()).await.unwrap();
        assert!(t.elapsed() <= Duration::from_secs(1));
        assert!(fake.spawns().is_empty());
    }
    // Connecting: a server that never answers initialize.
    for script in [Script::Silent, Script::CrashAfterHandshake, Script::Healthy] {
        let (sup, fake, dir) = supervisor(script);
        let s = spec(&dir);
        let sup2 = sup.clone();
        tokio::spawn(async move { sup2.deploy(key(), s).await });
        wait_until(|| !fake.spawns().is_empty()).await;
        if script == Script::CrashAfterHandshake {
            // Waiting out a restart backoff.
            wait_until(|| {
                sup.get(&key())
                    .map(|s| s.phase() == Phase::Restarting)
                    .unwrap_or(false)
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        sup.undeploy(&key()).await.unwrap();
        assert!(
            t.elapsed() <= Duration::from_secs(1),
            "{script:?}: {:?}",
            t.elapsed()
        );
        wait_until(|| fake.alive.load(Ordering::SeqCst) == 0).await;
    }
    // Failed, waiting for its next retry.
    {
        let (sup, fake, dir) = supervisor(Script::Healthy);
        fake.spawn_failures.store(100, Ordering::SeqCst);
        assert!(sup.deploy(key(), spec(&dir)).await.is_err());
        assert_eq!(sup.get(&key()).unwrap().phase(), Phase::Failed);
        let t = Instant::now();
        sup.undeploy(&key()).await.unwrap();
        assert!(t.elapsed() <= Duration::from_secs(1));
    }
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
    assert!(fake.spawns().is_empty());
}

#[tokio::test(start_paused = true)]
async fn failed_service_heals_in_place_when_its_secret_appears() {
    let (sup, fake, dir) = supervisor(Script::Healthy);
    // Inside the default secrets directory, `<data-dir>/secrets`.
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    let secret = dir.path().join("secrets/token");
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
        fake.spawns().is_empty(),
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
    let st = svc.status();
    assert!(st.retry.is_none());
    assert!(st.last_error.is_none(), "cleared once running again");
    assert_eq!(fake.spawns().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_attempts_survive_a_restart_of_meshbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fake = Fake::new(Script::Healthy);
    fake.spawn_failures.store(1000, Ordering::SeqCst);
    let (sup, _d) = supervisor_with(fake.clone(), Some(store.clone()));
    let _ = sup.deploy(key(), spec(&dir)).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(sup.get(&key()).unwrap().status().retry.unwrap().attempts, 3);
    sup.shutdown().await;
    // A new meshbox on the same store carries on counting.
    let (sup2, _d2) = supervisor_with(fake.clone(), Some(store));
    assert_eq!(sup2.restore(4).await, 1);
    let st = sup2.get(&key()).unwrap().status();
    assert_eq!(st.retry.unwrap().attempts, 4);
}

#[tokio::test(start_paused = true)]
async fn an_exit_on_the_era_probe_costs_no_restart_and_the_verdict_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fake = Fake::new(Script::ExitOnProbe);
    let (sup, _d) = supervisor_with(fake.clone(), Some(store.clone()));
    let st = sup.deploy(key(), spec(&dir)).await.unwrap();
    assert_eq!(st.status, Phase::Running);
    assert_eq!(st.restarts, 0);
    assert_eq!(st.protocol.as_deref(), Some("2025-06-18"));
    assert_eq!(fake.spawns().len(), 2, "probe exit, then the handshake");
    sup.shutdown().await;
    // Restored: the verdict skips the probe, so one spawn, no exit.
    let (sup2, _d2) = supervisor_with(fake.clone(), Some(store));
    sup2.restore(1).await;
    assert_eq!(sup2.get(&key()).unwrap().phase(), Phase::Running);
    assert_eq!(fake.spawns().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_stateless_server_is_detected_and_shown() {
    let (sup, _fake, dir) = supervisor(Script::Stateless);
    let st = sup.deploy(key(), spec(&dir)).await.unwrap();
    assert_eq!(st.protocol.as_deref(), Some("2026-07-28"));
    let svc = sup.get(&key()).unwrap();
    assert_eq!(
        svc.server_info().unwrap().protocol,
        crate::model::Protocol::Stateless
    );
    let r = sup.call(&key(), "t", json!({}), None).await.unwrap();
    assert_eq!(r["content"][0]["text"], "ok");
}

#[tokio::test(start_paused = true)]
async fn a_failing_redeploy_leaves_the_running_instance_serving_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fake = Fake::new(Script::Healthy);
    let (sup, _d) = supervisor_with(fake.clone(), Some(store.clone()));
    let first = spec(&dir);
    sup.deploy(key(), first.clone()).await.unwrap();
    let old = sup.get(&key()).unwrap();
    // The new spec's server dies during its handshake.
    fake.then(&[Script::Silent]);
    let mut broken = first.clone();
    broken.args = vec!["--broken".into()];
    broken.protocol = crate::model::ProtocolChoice::Handshake;
    let mut cfg_short = broken.clone();
    cfg_short.call_timeout_ms = Some(1000);
    let err = sup.deploy(key(), cfg_short).await.unwrap_err();
    assert!(matches!(err, SupervisorError::StartFailed { .. }), "{err}");
    assert!(Arc::ptr_eq(&sup.get(&key()).unwrap(), &old));
    assert_eq!(old.phase(), Phase::Running);
    assert!(sup.call(&key(), "t", json!({}), None).await.is_ok());
    assert_eq!(store.all().unwrap()[0].spec.as_ref().unwrap(), &first);
    // A good redeploy swaps and stops the old one.
    let mut better = first.clone();
    better.args = vec!["--better".into()];
    let st = sup.deploy(key(), better.clone()).await.unwrap();
    assert_eq!(st.status, Phase::Running);
    assert!(!Arc::ptr_eq(&sup.get(&key()).unwrap(), &old));
    assert_eq!(old.phase(), Phase::Stopped);
    assert_eq!(store.all().unwrap()[0].spec.as_ref().unwrap(), &better);
}

#[tokio::test(start_paused = true)]
async fn an_undeploy_during_a_redeploy_wins() {
    let (sup, fake, dir) = supervisor(Script::Healthy);
    sup.deploy(key(), spec(&dir)).await.unwrap();
    *fake.spawn_delay.lock().unwrap() = Duration::from_secs(3600);
    let mut next = spec(&dir);
    next.args = vec!["--v2".into()];
    let redeploy = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.deploy(key(), next).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    sup.undeploy(&key()).await.unwrap();
    let t = Instant::now();
    let err = redeploy.await.unwrap().unwrap_err();
    assert!(matches!(err, SupervisorError::Superseded { .. }), "{err}");
    assert!(t.elapsed() <= Duration::from_secs(1));
    assert!(sup.is_empty());
}

/// A removed install cache is installed again, not a crash loop.
#[tokio::test(start_paused = true)]
async fn a_removed_install_cache_is_installed_again() {
    let fake = Fake::with_sandboxed_install(Script::Healthy, Duration::from_secs(1));
    let (sup, _dir) = supervisor_with(fake.clone(), None);
    let s = ServiceSpec {
        source: "npm:some-server@1.0.0".into(),
        ..Default::default()
    };
    sup.deploy(key(), s.clone()).await.unwrap();
    assert_eq!(fake.count(|r| *r == Record::InstallDone), 1);
    // Warm: a restart runs the same sandbox, no install.
    sup.restart(&key()).await.unwrap();
    assert_eq!(fake.count(|r| *r == Record::InstallDone), 1);
    fake.volume_missing.store(true, Ordering::SeqCst);
    let st = sup.restart(&key()).await.unwrap();
    assert_eq!(st.status, Phase::Running);
    assert_eq!(
        fake.count(|r| *r == Record::InstallStarted),
        2,
        "installed again"
    );
}
