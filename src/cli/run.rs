//! `meshbox run`: one sandboxed server whose stdio is this process's stdio, so
//! an MCP client can use `meshbox run SOURCE ARGS…` where it used
//! `npx -y PKG ARGS…` or `uvx PKG ARGS…`.
//!
//! Bytes pass through untouched; meshbox does not parse the protocol here.
//! Every phase (install, start, bridging) ends within a second of SIGTERM,
//! SIGINT or the client closing stdin, and takes what it started with it.
//! Status goes to stderr as plain `meshbox: …` lines, so a client's log shows
//! why a start is slow or failed. The sandbox is assembled by
//! `supervisor::prepare`, exactly as `serve` does.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::progress::Target;
use super::{CliError, Shutdown, SpecArgs};
use crate::acquire::sandboxed::SandboxedInstalls;
use crate::acquire::{InstallConfig, Installer, Progress, Source};
use crate::model::{wait_exit, ExitReason, ServiceKey};
use crate::orchestrator::docker::{DockerBackend, DockerConfig};
use crate::orchestrator::process::{ProcessBackend, ProcessConfig};
use crate::orchestrator::{Orchestrator, RELEASE_LIMIT};
use crate::supervisor::prepare::{self, Acquirers, Validated};

/// How long a server gets to exit on its own once its stdin is closed, and
/// again after SIGTERM: together well under the one second a client waits.
const STOP_GRACE: Duration = Duration::from_millis(300);
/// Client bytes held while the server is not started yet (its `initialize`).
const EARLY_INPUT_CHUNKS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunBackend {
    /// The process sandbox on this machine.
    Process,
    /// A hardened container (needs a docker engine and the runner images).
    Docker,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    #[arg(long, value_enum, default_value = "process")]
    pub backend: RunBackend,
    /// Docker: a complete PEM bundle (system CAs plus your own) mounted
    /// read-only into the install and server containers, as `serve` has it.
    #[arg(long, env = "MESHBOX_CONTAINER_CA_BUNDLE")]
    pub container_ca_bundle: Option<PathBuf>,
    /// Where installs are cached and the server's home lives.
    #[arg(long, env = "MESHBOX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds one install step may take.
    #[arg(long, default_value_t = 600)]
    pub install_timeout: u64,
    /// Environment of the install step, as K=V (repeatable; literals, e.g.
    /// PUPPETEER_SKIP_DOWNLOAD=1), as `serve --install-env`.
    #[arg(long = "install-env", value_name = "K=V")]
    pub install_env: Vec<String>,
    /// Do not use cgroups for limits.
    #[arg(long)]
    pub no_cgroups: bool,
    /// npm:PKG, pypi:REQ, git:URL#REF, path:DIR (a relative path is made absolute)
    pub source: String,
    /// Arguments for the server: everything after SOURCE (a `--` right after
    /// SOURCE is dropped, as before).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "SERVER_ARGS"
    )]
    pub args: Vec<String>,
}

/// A status line on stderr; a closed stderr is no reason to fail.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "meshbox: {line}");
}

/// This process's stdin, read from the start so that its end is noticed in
/// any phase; what the client sends before the server runs is held (bounded)
/// and delivered in order.
struct Input {
    chunks: mpsc::Receiver<Bytes>,
    closed: watch::Receiver<bool>,
}

impl Input {
    fn start() -> Input {
        let (tx, chunks) = mpsc::channel(EARLY_INPUT_CHUNKS);
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
            closed_tx.send_replace(true);
        });
        Input { chunks, closed }
    }

    /// Resolves once the client has closed our stdin.
    async fn closed(closed: &mut watch::Receiver<bool>) {
        let _ = closed.wait_for(|c| *c).await;
    }
}

/// Why `run` stopped waiting on the server.
enum Stop {
    Exited(ExitReason),
    Signal,
    InputClosed,
}

/// The exit code that tells the client how the server ended.
fn exit_code(reason: &ExitReason) -> i32 {
    if reason.oom_killed {
        return 137;
    }
    match (reason.code, reason.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}

/// Runs `work` (a phase before the server runs) unless a signal or the
/// client's leaving comes first; then the exit code to end with, and `work`
/// is dropped, killing what it started.
async fn unless_stopped<T>(
    work: impl std::future::Future<Output = T>,
    shutdown: &mut Shutdown,
    closed: &mut watch::Receiver<bool>,
) -> Result<T, i32> {
    tokio::select! {
        biased;
        _ = shutdown => {
            note("stopped before the server started");
            Err(1)
        }
        _ = Input::closed(closed) => Err(0),
        r = work => Ok(r),
    }
}

pub async fn run(args: RunArgs, shutdown: Shutdown) -> Result<i32, CliError> {
    let spec = args.spec.into_spec(&args.source, args.args)?;
    let source: Source = spec.source.parse()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(super::serve::default_data_dir);
    let install_env = super::serve::parse_install_env(&args.install_env)?;
    let input = Input::start();
    // Process: one owner per source (its uid and home persist); docker: one
    // per run (a container's home is a tmpfs, and the run's own owner
    // labels exactly the containers this run removes).
    let owner = match args.backend {
        RunBackend::Process => run_owner(&source, nix::unistd::getuid().as_raw()),
        RunBackend::Docker => ServiceKey {
            mesh: "local".into(),
            name: format!("run-{}", std::process::id()),
        },
    };
    // Docker: an instance of its own per run, so a `serve` of the same data
    // dir sweeping its leftovers never takes a `meshbox run` down, and this
    // run can remove everything it started (awaited) before it exits.
    let instance_dir = data_dir.join("run").join(std::process::id().to_string());
    let backend: Box<dyn Orchestrator> = match args.backend {
        RunBackend::Process => {
            let backend = ProcessBackend::new(ProcessConfig {
                cgroups: !args.no_cgroups,
                data_dir: Some(data_dir.clone()),
                ..Default::default()
            });
            // Its init loads while the source is looked at or installed.
            backend.start_spare();
            Box::new(backend)
        }
        RunBackend::Docker => Box::new(
            DockerBackend::connect(DockerConfig {
                data_dir: instance_dir.clone(),
                ca_bundle: args.container_ca_bundle.clone(),
            })
            .await?,
        ),
    };
    let one = One {
        backend: &*backend,
        owner: &owner,
        data_dir: &data_dir,
        install_timeout: Duration::from_secs(args.install_timeout.max(1)),
        install_env,
    };
    let result = one
        .run(
            Validated {
                spec,
                source,
                plan: None,
            },
            input,
            shutdown,
        )
        .await;
    if args.backend == RunBackend::Docker {
        // What a dropped phase (an install) left to a background removal.
        backend.sweep(&[]).await;
        let _ = std::fs::remove_dir_all(&instance_dir);
    }
    backend.release(&owner).await;
    result
}

/// The owner of `meshbox run SOURCE`: one per source (as written after
/// parsing: `npm:pkg` and `npm:pkg@1` are two) and invoking user, so repeated
/// runs of one server get the same uid and the same home, where its state
/// persists between runs as it does for `npx` users. Concurrent runs of one
/// source share that uid and home (a server that keeps one state file sees
/// both runs' writes); each still gets sandboxes, cgroups and egress of its own.
fn run_owner(source: &Source, uid: u32) -> ServiceKey {
    ServiceKey {
        mesh: "local".into(),
        name: format!(
            "run-{}",
            crate::model::stable_hash(&format!("{uid}\n{source}"))
        ),
    }
}

/// One server's run: what it needs besides the spec.
struct One<'a> {
    backend: &'a dyn Orchestrator,
    owner: &'a ServiceKey,
    data_dir: &'a std::path::Path,
    install_timeout: Duration,
    install_env: std::collections::BTreeMap<String, String>,
}

impl One<'_> {
    async fn run(&self, v: Validated, input: Input, shutdown: Shutdown) -> Result<i32, CliError> {
        let (backend, owner) = (self.backend, self.owner);
        let mut shutdown = shutdown;
        let Input {
            chunks: mut early,
            mut closed,
        } = input;
        let caps = backend.capabilities();
        let mut install = InstallConfig::new(self.data_dir.join("cache"));
        install.timeout = self.install_timeout;
        install.env = self.install_env.clone();
        let installer = Installer::new(install);
        let sandboxed = SandboxedInstalls::new(self.data_dir.join("docker-installs"));
        // A bar on a terminal's stderr, else the same `meshbox: …` lines.
        let progress: Progress = super::progress::install_sink(Target::stderr(), "meshbox: ");
        let acquirers = Acquirers {
            installer: &installer,
            sandboxed: &sandboxed,
            install_timeout: self.install_timeout,
        };
        // Secrets first: a missing one fails before any download. Containers get
        // their own home (a tmpfs).
        let home = match caps.sandboxed_install {
            true => None,
            false => Some(prepare::server_home(self.data_dir, owner)?),
        };
        // Its user is the operator: secret files may be anywhere they can read.
        let env = prepare::server_env(
            &crate::environ::runner_path(),
            home.as_deref().unwrap_or(std::path::Path::new("/tmp")),
            &v.spec.env,
            &crate::secrets::SecretPolicy::Anywhere,
        )
        .await?;

        // Install, raced against the signal and the client going away: dropping
        // the acquisition kills what it started.
        let acquiring = prepare::acquire(backend, &acquirers, owner, &v, &progress);
        let prepared = match unless_stopped(acquiring, &mut shutdown, &mut closed).await {
            Ok(r) => r?,
            Err(code) => return Ok(code),
        };
        drop(progress); // the bar leaves before the server's own stderr flows
        let spec = prepare::server_sandbox(owner, &v.spec, &prepared, env, home);
        let mut sandbox =
            match unless_stopped(backend.spawn(spec), &mut shutdown, &mut closed).await {
                Ok(r) => r?,
                Err(code) => return Ok(code),
            };

        let mut stdin = sandbox.io.stdin;
        let mut stdout = sandbox.io.stdout;
        let mut stderr = sandbox.io.stderr;
        // Client → server, early bytes first; the end of our stdin closes the server's.
        let to_server = tokio::spawn(async move {
            while let Some(chunk) = early.recv().await {
                if stdin.write_all(&chunk).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
            let _ = stdin.shutdown().await;
        });
        let from_server = tokio::spawn(async move {
            let mut ours = tokio::io::stdout();
            let _ = tokio::io::copy(&mut stdout, &mut ours).await;
            let _ = ours.flush().await;
        });
        let errors = tokio::spawn(async move {
            let mut ours = tokio::io::stderr();
            let _ = tokio::io::copy(&mut stderr, &mut ours).await;
        });

        let stop = tokio::select! {
            r = wait_exit(&mut sandbox.exit) => Stop::Exited(r),
            _ = &mut shutdown => Stop::Signal,
            _ = Input::closed(&mut closed) => Stop::InputClosed,
        };
        let requested = !matches!(stop, Stop::Exited(_));
        let reason = match stop {
            Stop::Exited(r) => {
                // Nothing of it may outlive this command: its teardown
                // included, unless a signal says not to wait.
                tokio::select! {
                    () = sandbox.handle.released(RELEASE_LIMIT) => {}
                    _ = &mut shutdown => {}
                }
                r
            }
            Stop::Signal | Stop::InputClosed => {
                // Closing the server's stdin is its cue; then SIGTERM, SIGKILL.
                to_server.abort();
                sandbox.handle.stop(STOP_GRACE).await
            }
        };
        to_server.abort();
        // Let the last replies reach the client.
        let _ = tokio::time::timeout(Duration::from_millis(500), from_server).await;
        let _ = tokio::time::timeout(Duration::from_millis(200), errors).await;
        if reason.oom_killed {
            note("server killed: out of memory (raise --memory)");
        } else if let (Some(sig), false) = (reason.signal, requested) {
            note(&format!("server killed by signal {sig}"));
        }
        // Asked to end, we killed it: that is how it should end, not a failure.
        Ok(
            if requested && reason.signal.is_some() && !reason.oom_killed {
                0
            } else {
                exit_code(&reason)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(argv: &[&str]) -> RunArgs {
        let mut full = vec!["meshbox", "run"];
        full.extend_from_slice(argv);
        match crate::cli::Cli::try_parse_from(full).unwrap().command {
            crate::cli::Command::Run(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn everything_after_the_source_is_the_servers() {
        let a = parse(&[
            "--memory", "256m", "npm:pkg", "stdio", "--port", "3", "-e", "X",
        ]);
        assert_eq!(a.source, "npm:pkg");
        assert_eq!(a.spec.memory.as_deref(), Some("256m"));
        assert_eq!(a.args, ["stdio", "--port", "3", "-e", "X"]);
        let a = parse(&["-e", "K", "pypi:x", "--", "--flag"]);
        assert_eq!(a.spec.env, ["K"]);
        assert_eq!(a.args, ["--flag"]);
        let a = parse(&["npm:pkg"]);
        assert!(a.args.is_empty());
        let a = parse(&["npm:pkg", "--", "--", "x"]);
        assert_eq!(a.args, ["--", "x"], "only the first -- is ours");
        let a = parse(&["npm:pkg", "stdio", "--", "x"]);
        assert_eq!(a.args, ["stdio", "--", "x"]);
    }

    #[test]
    fn runs_of_one_source_by_one_user_share_an_owner() {
        let src = |s: &str| s.parse::<Source>().unwrap();
        let a = run_owner(&src("npm:@modelcontextprotocol/server-memory"), 0);
        assert_eq!(
            a,
            run_owner(&src("npm:@modelcontextprotocol/server-memory"), 0)
        );
        assert_ne!(
            a,
            run_owner(&src("npm:@modelcontextprotocol/server-memory"), 1000)
        );
        assert_ne!(
            a,
            run_owner(&src("npm:@modelcontextprotocol/server-everything"), 0)
        );
        assert_ne!(
            a,
            run_owner(&src("npm:@modelcontextprotocol/server-memory@1.0.0"), 0)
        );
        ServiceKey::parse(&a.mesh, &a.name).expect("a valid service key");
    }

    #[test]
    fn exit_codes_say_how_the_server_ended() {
        let r = |code, signal, oom| ExitReason {
            code,
            signal,
            oom_killed: oom,
        };
        assert_eq!(exit_code(&r(Some(3), None, false)), 3);
        assert_eq!(exit_code(&r(None, Some(9), false)), 137);
        assert_eq!(exit_code(&r(None, Some(9), true)), 137);
        assert_eq!(exit_code(&r(None, None, false)), 1);
    }
}
