//! The process sandbox's cost, one run (issue 11 item 10), on the node echo
//! fixture (`tests/fixtures/node_server`), all through meshbox's own MCP
//! session so only the sandbox differs:
//!
//! - start-to-running: spawn + MCP handshake (initialize, initialized,
//!   tools/list), bare (a plain child process on pipes, same environment)
//!   vs sandboxed (the process backend: namespaces, own uid, Landlock,
//!   seccomp), with the default network and with `none` (a network
//!   namespace too), median of `STARTS`, interleaved (target ≤ 1.1×); the
//!   filesystem is synced first, and each start begins on a quiet machine
//!   (`SETTLE` after the last: its teardown and the backend's next spare
//!   init are done), so no earlier work runs beside a start;
//! - call p50 of `CALLS` sequential `echo` calls, bare vs sandboxed, in
//!   `ROUNDS` alternating rounds: the ratio of the two p50s, and the median
//!   of the rounds' paired ratios (target ≤ 1.05×);
//! - the same server wrapped by Anthropic's sandbox runtime (`srt`, npm
//!   `@anthropic-ai/sandbox-runtime`: bubblewrap + proxies; install it with
//!   `npm install --prefix target/srt @anthropic-ai/sandbox-runtime` and
//!   `apt-get install bubblewrap socat`), measured beside it when it can run
//!   here; otherwise the bench says exactly why not.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median, sandboxed_config, us, verdict};
use meshbox::mcp::{Session, SessionConfig};
use meshbox::model::{ExitReason, ExitWatch, NetworkMode, NetworkPolicy, Protocol, ServiceKey};
use meshbox::orchestrator::process::host::resolve_program;
use meshbox::orchestrator::process::ProcessBackend;
use meshbox::orchestrator::{Mount, MountSource, Orchestrator, SandboxHandle, SandboxSpec};
use serde_json::json;

/// Starts per variant; `MESHBOX_BENCH_STARTS` overrides.
const STARTS: usize = 61;
const CALLS: usize = 4000;
/// Call measurements alternate between the two servers in this many rounds.
const ROUNDS: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(60);
/// The pause before each measured start: longer than the backend's delay
/// before it loads the next spare init, plus that load.
const SETTLE: Duration = Duration::from_millis(400);

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node_server")
}

fn path_env() -> String {
    std::env::var("PATH").unwrap_or_default()
}

fn which(program: &str) -> Option<PathBuf> {
    resolve_program(program, &path_env(), None)
}

fn spec(argv: Vec<String>, home: &Path, i: usize, network: NetworkPolicy) -> SandboxSpec {
    let env = BTreeMap::from([
        ("PATH".to_owned(), path_env()),
        ("HOME".to_owned(), home.to_string_lossy().into_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]);
    SandboxSpec {
        owner: ServiceKey {
            mesh: "bench".into(),
            name: format!("s{i}"),
        },
        argv,
        env,
        workdir: Some(fixture()),
        home: Some(home.to_path_buf()),
        network,
        mounts: vec![Mount {
            source: MountSource::Host(fixture()),
            target: fixture(),
            read_only: true,
            copy_on_write: true,
        }],
        ..Default::default()
    }
}

/// A started server and meshbox's session on it.
struct Running {
    session: Session,
    stop: Stop,
}

enum Stop {
    Sandbox(Box<dyn SandboxHandle>),
    /// A plain child in a process group of its own: the group is killed
    /// (`srt` leaves its proxies' helpers behind when only it is).
    Child {
        waiter: tokio::task::JoinHandle<()>,
        group: i32,
    },
}

impl Running {
    /// Kills the server and, for a sandbox, waits until it is torn down (as
    /// the supervisor does before it starts a service again), so that no
    /// teardown runs beside the next measured start.
    async fn kill(self) {
        match self.stop {
            Stop::Sandbox(h) => {
                h.kill();
                h.released(Duration::from_secs(10)).await;
            }
            Stop::Child { waiter, group } => {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(group),
                    nix::sys::signal::Signal::SIGKILL,
                );
                waiter.abort();
            }
        }
    }
}

async fn connect(
    stdout: impl tokio::io::AsyncRead + Send + Unpin + 'static,
    stdin: impl tokio::io::AsyncWrite + Send + Unpin + 'static,
    exit: ExitWatch,
) -> Session {
    let session = Session::start(
        stdout,
        stdin,
        exit,
        Arc::new(|_, _| {}),
        SessionConfig::default(),
    );
    session
        .connect(Some(Protocol::Handshake), TIMEOUT)
        .await
        .expect("handshake");
    session
}

/// Starts `argv` as a plain child process (no meshbox backend) and handshakes.
async fn start_plain(argv: &[String], home: &Path) -> (Running, Duration) {
    let t = Instant::now();
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(fixture())
        .env_clear()
        .env("PATH", path_env())
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .expect("spawn");
    let group = child.id().expect("running") as i32;
    let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    let (tx, rx) = tokio::sync::watch::channel(None);
    // Owns the child: aborting the task drops (and so kills) it.
    let waiter = tokio::spawn(async move {
        let _ = child.wait().await;
        tx.send_replace(Some(ExitReason::default()));
    });
    let session = connect(stdout, stdin, rx).await;
    let took = t.elapsed();
    (
        Running {
            session,
            stop: Stop::Child { waiter, group },
        },
        took,
    )
}

/// Time spent in `spawn` (the sandbox's setup, until its init reports the
/// server about to exec), per variant.
static SETUP: std::sync::Mutex<Vec<Duration>> = std::sync::Mutex::new(Vec::new());

/// Spawns `spec` and handshakes; the time it took.
async fn start(backend: &ProcessBackend, spec: SandboxSpec) -> (Running, Duration) {
    let t = Instant::now();
    let sandbox = backend.spawn(spec).await.expect("spawn");
    SETUP.lock().unwrap().push(t.elapsed());
    let mut stderr = sandbox.io.stderr;
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
    });
    let session = connect(sandbox.io.stdout, sandbox.io.stdin, sandbox.exit).await;
    let took = t.elapsed();
    (
        Running {
            session,
            stop: Stop::Sandbox(sandbox.handle),
        },
        took,
    )
}

/// Call p50s of two servers, measured in alternating rounds so both see the
/// same moments of this (noisy) VM.
struct CallP50s {
    /// Over all calls of each.
    a: Duration,
    b: Duration,
    /// The median over rounds of b's p50 / a's p50 in the same round: a
    /// paired estimate (each pair is taken within a few milliseconds), which
    /// a slow spell of the VM during part of the run cannot tilt.
    paired: f64,
}

async fn call_p50s(a: &Session, b: &Session) -> CallP50s {
    async fn call(s: &Session) -> Duration {
        let t = Instant::now();
        s.call_tool("echo", json!({"text": "hi"}), TIMEOUT)
            .await
            .expect("call");
        t.elapsed()
    }
    // Warm up the JIT and the pipes first.
    for _ in 0..200 {
        call(a).await;
        call(b).await;
    }
    let per_round = CALLS / ROUNDS;
    let (mut la, mut lb) = (Vec::with_capacity(CALLS), Vec::with_capacity(CALLS));
    let mut ratios = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [a, b] } else { [b, a] };
        let (mut ra, mut rb) = (Vec::new(), Vec::new());
        for s in order {
            for _ in 0..per_round {
                let took = call(s).await;
                if std::ptr::eq(s, a) {
                    ra.push(took);
                } else {
                    rb.push(took);
                }
            }
        }
        la.extend_from_slice(&ra);
        lb.extend_from_slice(&rb);
        ratios.push(us(median(rb)) / us(median(ra)));
    }
    ratios.sort_by(f64::total_cmp);
    CallP50s {
        a: median(la),
        b: median(lb),
        paired: ratios[ratios.len() / 2],
    }
}

/// `srt`'s argv prefix, or exactly why it cannot run here.
fn srt(settings: &Path) -> Result<Vec<String>, String> {
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/srt/node_modules/.bin/srt");
    let srt = if local.exists() {
        local
    } else {
        which("srt").ok_or(
            "`srt` is not installed (npm install --prefix target/srt @anthropic-ai/sandbox-runtime)",
        )?
    };
    for tool in ["bwrap", "socat"] {
        if which(tool).is_none() {
            return Err(format!(
                "srt needs `{tool}` on Linux, which is not installed (apt-get install bubblewrap socat)"
            ));
        }
    }
    Ok(vec![
        srt.to_string_lossy().into_owned(),
        "-s".into(),
        settings.to_string_lossy().into_owned(),
    ])
}

/// The middle half of `v`: its first and third quartiles.
fn quartiles(v: &[Duration]) -> (Duration, Duration) {
    let mut v = v.to_vec();
    v.sort();
    (v[v.len() / 4], v[(3 * v.len()) / 4])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let node = which("node")
        .expect("node on PATH")
        .to_string_lossy()
        .into_owned();
    let server = vec![node.clone(), "server.js".to_owned()];
    let boxed = ProcessBackend::new(sandboxed_config());
    // As `meshbox serve` does: an init loads ahead of each start.
    boxed.keep_spare();
    let homes = tempfile::tempdir().unwrap();
    let home = |name: &str| {
        let h = homes.path().join(name);
        std::fs::create_dir_all(&h).unwrap();
        h
    };
    let none = NetworkPolicy::Mode(NetworkMode::None);
    // What earlier benches wrote is flushed now, not by the first measured
    // sandboxes' teardowns (unmounting an overlay syncs the filesystem).
    nix::unistd::sync();
    println!("meshbox sandbox bench — fixture: tests/fixtures/node_server (node), one run");
    println!("process backend: {}", boxed.describe());
    println!();

    let starts = std::env::var("MESHBOX_BENCH_STARTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(STARTS)
        .max(1);
    let (mut b, mut s, mut n) = (Vec::new(), Vec::new(), Vec::new());
    let (mut s_setup, mut n_setup) = (Vec::new(), Vec::new());
    let last_setup = || SETUP.lock().unwrap().last().copied().unwrap_or_default();
    for i in 0..starts {
        tokio::time::sleep(SETTLE).await;
        let (r, took) = start_plain(&server, &home("bare")).await;
        b.push(took);
        r.kill().await;
        // The default network (full): no network namespace.
        let spec_full = spec(
            server.clone(),
            &home(&format!("s{i}")),
            i,
            NetworkPolicy::Unset,
        );
        tokio::time::sleep(SETTLE).await;
        let (r, took) = start(&boxed, spec_full).await;
        s.push(took);
        s_setup.push(last_setup());
        r.kill().await;
        let spec_none = spec(server.clone(), &home(&format!("n{i}")), i, none.clone());
        tokio::time::sleep(SETTLE).await;
        let (r, took) = start(&boxed, spec_none).await;
        n.push(took);
        n_setup.push(last_setup());
        r.kill().await;
    }
    let spread = |v: &[Duration]| {
        let (q1, q3) = quartiles(v);
        format!("[{:.1}–{:.1}]", ms(q1), ms(q3))
    };
    let (bq, sq, nq) = (spread(&b), spread(&s), spread(&n));
    println!(
        "sandbox setup alone (spawn until the server's exec): {:.2} ms {} | network none {:.2} ms {}",
        ms(median(s_setup.clone())),
        spread(&s_setup),
        ms(median(n_setup.clone())),
        spread(&n_setup)
    );
    // Each start's sandboxed time over the bare one just before it.
    let paired = |v: &[Duration]| {
        let mut r: Vec<f64> = v.iter().zip(&b).map(|(x, y)| ms(*x) / ms(*y)).collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    let (s_paired, n_paired) = (paired(&s), paired(&n));
    let (b, s, n) = (median(b), median(s), median(n));
    println!("== start-to-running: spawn + handshake (median of {starts}, [p25–p75] ms) ==");
    println!(
        "bare {:>7.1} ms {bq} | sandboxed {:>7.1} ms {sq} | network none {:>7.1} ms {nq}",
        ms(b),
        ms(s),
        ms(n)
    );
    let start_ratio = ms(s) / ms(b);
    println!(
        "bare {:>7.1} ms | sandboxed {:>7.1} ms | ratio of the medians {start_ratio:.2}x | paired, median of {starts} {s_paired:.2}x (target ≤ 1.10x, both): {}",
        ms(b),
        ms(s),
        verdict(start_ratio <= 1.10 && s_paired <= 1.10)
    );
    println!(
        "bare {:>7.1} ms | sandboxed, network none {:>7.1} ms | ratio of the medians {:.2}x | paired {:.2}x",
        ms(b),
        ms(n),
        ms(n) / ms(b),
        n_paired
    );

    println!();
    println!("== call p50, 1 caller, {CALLS} echo calls ==");
    let (bare, _) = start_plain(&server, &home("bare")).await;
    let (r, _) = start(
        &boxed,
        spec(server.clone(), &home("calls"), 999, none.clone()),
    )
    .await;
    let p = call_p50s(&bare.session, &r.session).await;
    r.kill().await;
    let call_ratio = us(p.b) / us(p.a);
    println!(
        "bare {:>7.1} µs | sandboxed {:>7.1} µs | ratio of the p50s {call_ratio:.3}x | paired, median of {ROUNDS} rounds {:.3}x (target ≤ 1.05x, both): {}",
        us(p.a),
        us(p.b),
        p.paired,
        verdict(call_ratio <= 1.05 && p.paired <= 1.05)
    );

    println!();
    println!("== the same server under Anthropic's sandbox runtime (srt) ==");
    let settings = homes.path().join("srt-settings.json");
    std::fs::write(
        &settings,
        json!({
            "network": {"allowedDomains": [], "deniedDomains": []},
            "filesystem": {"denyRead": [], "allowWrite": [], "denyWrite": []}
        })
        .to_string(),
    )
    .unwrap();
    match srt(&settings) {
        Err(why) => println!("srt not measured: {why}"),
        Ok(prefix) => {
            let argv: Vec<String> = prefix.into_iter().chain(server.iter().cloned()).collect();
            let mut w = Vec::new();
            for _ in 0..STARTS {
                let (r, took) = start_plain(&argv, &home("srt")).await;
                w.push(took);
                r.kill().await;
            }
            let w = median(w);
            let (r, _) = start_plain(&argv, &home("srt")).await;
            let p = call_p50s(&bare.session, &r.session).await;
            r.kill().await;
            println!(
                "srt start-to-running {:>7.1} ms ({:.2}x bare) | call p50 {:>7.1} µs ({:.2}x bare {:.1} µs; paired {:.2}x)",
                ms(w),
                ms(w) / ms(b),
                us(p.b),
                us(p.b) / us(p.a),
                us(p.a),
                p.paired
            );
        }
    }
    bare.kill().await;
}
