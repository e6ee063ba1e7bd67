//! `meshbox serve`: the daemon.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tracing::info;

use super::{CliError, Shutdown};
use crate::api::{self, ApiConfig, ServeConfig};
use crate::gateway::bind::SupervisorUpstreams;
use crate::gateway::{Gateway, GatewayConfig};
use crate::metrics::Metrics;
use crate::orchestrator::docker::{self, DockerBackend, DockerConfig};
use crate::orchestrator::process::{ProcessBackend, ProcessConfig};
use crate::orchestrator::Orchestrator;
use crate::secrets::SecretPolicy;
use crate::store::{DataDirLock, Store};
use crate::supervisor::{FailedRetry, Supervisor, SupervisorConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Docker when an engine answers, else process.
    Auto,
    Docker,
    Process,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; a non-loopback address needs a token (or
    /// --insecure-no-auth). Default 127.0.0.1:7901, or port $RUNNER_PORT.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback --listen with no token: for a private network
    /// only the broker reaches, as the seed's per-mesh containers were.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// File holding the bearer token (else MESHBOX_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Where meshbox keeps its state, caches and server homes.
    #[arg(long, env = "MESHBOX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Seconds a server has for initialize + tools/list.
    #[arg(long, default_value_t = 30)]
    pub handshake_timeout: u64,
    /// Seconds one install step (npm install, pip install, git clone) may take.
    #[arg(long, default_value_t = 600)]
    pub install_timeout: u64,
    /// Do not use cgroups for limits (rlimits only).
    #[arg(long)]
    pub no_cgroups: bool,
    /// On exit, stop docker containers too (by default they keep running and
    /// are re-adopted by the next start).
    #[arg(long)]
    pub stop_containers_on_exit: bool,
    /// Docker: a complete PEM bundle (system CAs plus your own) mounted
    /// read-only into every container, trusted instead of the image's own;
    /// reaches containers of `image:` sources too.
    #[arg(long, env = "MESHBOX_CONTAINER_CA_BUNDLE")]
    pub container_ca_bundle: Option<PathBuf>,
    /// Failed services are retried every this many seconds at first ...
    #[arg(long, default_value_t = 30)]
    pub failed_retry_secs: u64,
    /// ... this many times ...
    #[arg(long, default_value_t = 5)]
    pub failed_retry_count: u32,
    /// ... then every this many seconds.
    #[arg(long, default_value_t = 300)]
    pub failed_retry_slow_secs: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace: u64,
    /// File of mesh-scoped tokens, one `MESH TOKEN` per line: each reaches
    /// only its mesh's `/v1/meshes/{mesh}/…` routes and `/mcp/{mesh}…` endpoints.
    #[arg(long)]
    pub mesh_tokens_file: Option<PathBuf>,
    /// Browser origin allowed to call `/mcp/…` besides loopback ones (repeatable).
    #[arg(long = "allowed-origin")]
    pub allowed_origins: Vec<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = api::DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,
    /// Seconds a client has to send a request head; also the longest an
    /// idle kept-alive connection stays open.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a client has to send a whole request body.
    #[arg(long, default_value_t = 30)]
    pub body_timeout: u64,
    /// Environment of every install step, as K=V (repeatable; literals, never
    /// secrets; a spec's `install_env` wins).
    #[arg(long = "install-env", value_name = "K=V")]
    pub install_env: Vec<String>,
    /// Directory `{"file": …}` env values may come from (repeatable;
    /// default `<data-dir>/secrets`).
    #[arg(long = "secrets-dir", value_name = "DIR")]
    pub secrets_dirs: Vec<PathBuf>,
    /// Directory under which mesh-scoped tokens may deploy `path:` and
    /// `git:file://` sources (repeatable; the admin token may use any).
    #[arg(long = "source-root", value_name = "DIR")]
    pub source_roots: Vec<PathBuf>,
    /// A directory specs may mount from (repeatable); without one, specs
    /// may not mount anything.
    #[arg(long = "mount-root", value_name = "DIR")]
    pub mount_roots: Vec<PathBuf>,
    /// Refuse to start a process-mode server that would run with less than
    /// every isolation layer (own uid, namespaces, Landlock, seccomp).
    #[arg(long)]
    pub require_isolation: bool,
    /// Record no metrics and serve no `/metrics` (to measure their cost).
    #[arg(long, hide = true)]
    pub no_metrics: bool,
}

/// The token from `--token-file` or `MESHBOX_TOKEN`, if any.
pub fn read_token(file: Option<&PathBuf>) -> Result<Option<String>, CliError> {
    let token = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|source| CliError::Io {
                    context: format!("failed to read token file `{}`", f.display()),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("MESHBOX_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned()),
    };
    match token {
        Some(t) if t.is_empty() => Err(CliError::Usage("the bearer token is empty".into())),
        other => Ok(other),
    }
}

/// The `(mesh, token)` pairs of `--mesh-tokens-file`, if given.
pub fn read_mesh_tokens(file: Option<&PathBuf>) -> Result<Vec<(String, String)>, CliError> {
    let Some(f) = file else { return Ok(Vec::new()) };
    let text = std::fs::read_to_string(f).map_err(|source| CliError::Io {
        context: format!("failed to read mesh tokens file `{}`", f.display()),
        source,
    })?;
    api::parse_mesh_tokens(&text).map_err(|e| {
        CliError::Usage(format!(
            "mesh tokens file `{}`: {}",
            f.display(),
            crate::error_chain(&e)
        ))
    })
}

pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("meshbox");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/meshbox"),
        None => PathBuf::from("/var/lib/meshbox"),
    }
}

/// `--install-env K=V` pairs.
pub(super) fn parse_install_env(pairs: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if crate::config::is_env_key(k) && !v.contains('\0') => {
                Ok((k.to_owned(), v.to_owned()))
            }
            _ => Err(CliError::Usage(format!(
                "--install-env `{}` must be KEY=VALUE with KEY a variable name",
                crate::model::shown(kv, 80)
            ))),
        })
        .collect()
}

/// `--secrets-dir` directories, or `<data-dir>/secrets` (created, private).
fn secrets_policy(dirs: &[PathBuf], data_dir: &Path) -> Result<SecretPolicy, CliError> {
    if !dirs.is_empty() {
        return Ok(SecretPolicy::Dirs(dirs.to_vec()));
    }
    let dir = data_dir.join("secrets");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| CliError::Io {
            context: format!("failed to create secrets dir `{}`", dir.display()),
            source,
        })?;
    Ok(SecretPolicy::Dirs(vec![dir]))
}

/// Default port of `serve`.
pub const DEFAULT_PORT: u16 = 7901;

/// `--listen`, else loopback on `RUNNER_PORT` (the seed runner's variable),
/// else 127.0.0.1:7901.
pub fn listen_addr(
    listen: Option<SocketAddr>,
    runner_port: Option<&str>,
) -> Result<SocketAddr, CliError> {
    if let Some(addr) = listen {
        return Ok(addr);
    }
    let port = match runner_port.map(str::trim).filter(|p| !p.is_empty()) {
        Some(p) => p.parse::<u16>().map_err(|_| {
            CliError::Usage(format!(
                "RUNNER_PORT `{}` is not a port number",
                crate::model::shown(p, 16)
            ))
        })?,
        None => DEFAULT_PORT,
    };
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Refuses a non-loopback listen without a token unless the operator said
/// `--insecure-no-auth`; then the warning to log and show in `/v1/health`.
pub fn auth_policy(
    listen: SocketAddr,
    has_token: bool,
    insecure_no_auth: bool,
) -> Result<Option<String>, CliError> {
    if has_token || listen.ip().is_loopback() {
        return Ok(None);
    }
    if !insecure_no_auth {
        return Err(CliError::Usage(format!(
            "refusing to listen on {listen} without a token: set --token-file or MESHBOX_TOKEN, listen on a loopback address, or pass --insecure-no-auth on a private network"
        )));
    }
    Ok(Some(format!(
        "no authentication: listening on {listen} without a token (--insecure-no-auth); anyone who can reach this address controls meshbox"
    )))
}

pub async fn serve(args: ServeArgs, shutdown: Shutdown) -> Result<(), CliError> {
    let token = read_token(args.token_file.as_ref())?;
    let mesh_tokens = read_mesh_tokens(args.mesh_tokens_file.as_ref())?;
    let listen = listen_addr(args.listen, std::env::var("RUNNER_PORT").ok().as_deref())?;
    let has_token = token.is_some() || !mesh_tokens.is_empty();
    let warning = auth_policy(listen, has_token, args.insecure_no_auth)?;
    if let Some(w) = &warning {
        eprintln!("warning: {w}");
    }
    // Room for connections and servers' pipes; connections are capped below it.
    let fd_limit = api::listen::raise_fd_limit();
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir).map_err(|source| CliError::Io {
        context: format!("failed to create data dir `{}`", data_dir.display()),
        source,
    })?;
    let process = || -> Arc<dyn Orchestrator> {
        let backend = ProcessBackend::new(ProcessConfig {
            cgroups: !args.no_cgroups,
            data_dir: Some(data_dir.clone()),
            require_isolation: args.require_isolation,
            ..Default::default()
        });
        // No start waits for meshbox to be executed again.
        backend.keep_spare();
        Arc::new(backend)
    };
    let docker_config = DockerConfig {
        data_dir: data_dir.clone(),
        ca_bundle: args.container_ca_bundle.clone(),
    };
    let backend: Arc<dyn Orchestrator> = match args.backend {
        Backend::Process => process(),
        Backend::Docker => {
            let d = DockerBackend::connect(docker_config).await?;
            docker::warn_of_stale_runner_images(&d).await;
            Arc::new(d)
        }
        Backend::Auto => match DockerBackend::connect(docker_config).await {
            Ok(d) => {
                docker::warn_of_stale_runner_images(&d).await;
                Arc::new(d)
            }
            Err(e) => {
                info!(reason = %crate::error_chain(&e), "no docker engine; using the process backend");
                process()
            }
        },
    };
    let mut config = SupervisorConfig::new(data_dir.clone());
    config.mount_roots = args.mount_roots.clone();
    config.handshake_timeout = Duration::from_secs(args.handshake_timeout.max(1));
    config.install.timeout = Duration::from_secs(args.install_timeout.max(1));
    config.install.env = parse_install_env(&args.install_env)?;
    config.failed_retry = FailedRetry {
        fast: args.failed_retry_count,
        fast_interval: Duration::from_secs(args.failed_retry_secs.max(1)),
        slow_interval: Duration::from_secs(args.failed_retry_slow_secs.max(1)),
    };
    config.secrets = secrets_policy(&args.secrets_dirs, &data_dir)?;
    config.source_roots = args.source_roots.clone();
    // One daemon per data dir: a second one would run every server twice.
    let _lock = DataDirLock::acquire(&data_dir)?;
    let store = Arc::new(Store::open(&data_dir)?);
    let metrics = Arc::new(if args.no_metrics {
        Metrics::disabled()
    } else {
        Metrics::new()
    });
    let supervisor = Arc::new(
        Supervisor::new(backend, config)
            .with_store(store)
            .with_metrics(metrics.clone()),
    );
    let gateway = Gateway::new(
        SupervisorUpstreams::new(supervisor.clone()),
        GatewayConfig {
            allowed_origins: args.allowed_origins.clone(),
            metrics,
            ..Default::default()
        },
    );
    let router = api::router(
        supervisor.clone(),
        ApiConfig {
            token,
            mesh_tokens,
            body_limit: args.body_limit,
            mcp: Some(gateway.router()),
            warning,
        },
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| CliError::Io {
            context: format!("failed to listen on {listen}"),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| CliError::Io {
        context: "failed to read the listening address".into(),
        source,
    })?;
    info!(%addr, backend = supervisor.backend(), data_dir = %data_dir.display(), "meshbox listening");
    // Machine-readable for tests and scripts that bind port 0.
    eprintln!("meshbox listening on http://{addr}");
    // Restore in the background: the API answers (and shows progress) meanwhile.
    let restoring = {
        let supervisor = supervisor.clone();
        tokio::spawn(async move { supervisor.restore(4).await })
    };
    // In-flight calls get a grace period after the signal, not forever.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = Duration::from_secs(args.shutdown_grace);
    let serve_config = ServeConfig {
        header_timeout: Duration::from_secs(args.header_timeout.max(1)),
        body_timeout: Duration::from_secs(args.body_timeout.max(1)),
        max_connections: api::listen::connection_cap(fd_limit),
    };
    let server = tokio::spawn(api::serve(listener, router, serve_config, async move {
        let _ = stop_rx.await;
    }));
    shutdown.await;
    info!(
        "shutting down: no new requests; in-flight calls have {}s",
        grace.as_secs()
    );
    let _ = stop_tx.send(());
    let served = match tokio::time::timeout(grace, server).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Ok(()),
        Err(_) => Ok(()),
    };
    restoring.abort();
    if args.stop_containers_on_exit || supervisor.backend() != "docker" {
        info!("stopping services");
        supervisor.shutdown().await;
    } else {
        info!("leaving containers running for re-adoption");
        supervisor.detach_all().await;
    }
    served.map_err(|source| CliError::Io {
        context: "HTTP server failed".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_port_is_the_default_port() {
        let given: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(listen_addr(Some(given), Some("7000")).unwrap(), given);
        assert_eq!(
            listen_addr(None, Some("7000")).unwrap(),
            "127.0.0.1:7000".parse().unwrap()
        );
        assert_eq!(
            listen_addr(None, None).unwrap(),
            "127.0.0.1:7901".parse().unwrap()
        );
        assert_eq!(
            listen_addr(None, Some("")).unwrap(),
            "127.0.0.1:7901".parse().unwrap()
        );
        assert!(matches!(
            listen_addr(None, Some("http")),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn no_token_off_loopback_needs_the_operators_word() {
        let open: SocketAddr = "0.0.0.0:7901".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:7901".parse().unwrap();
        assert!(matches!(
            auth_policy(open, false, false),
            Err(CliError::Usage(_))
        ));
        let w = auth_policy(open, false, true).unwrap().unwrap();
        assert!(
            w.contains("0.0.0.0:7901") && w.contains("--insecure-no-auth"),
            "{w}"
        );
        assert_eq!(auth_policy(open, true, false).unwrap(), None);
        assert_eq!(
            auth_policy(open, true, true).unwrap(),
            None,
            "the token applies"
        );
        assert_eq!(auth_policy(lo, false, false).unwrap(), None);
    }
}
