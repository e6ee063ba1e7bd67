//! Command-line interface: argument parsing and the commands themselves.
//!
//! `serve` and `run` build the stack in-process; the other commands are thin
//! HTTP clients of a running daemon at `MESHBOX_URL`. Signal handling stays in
//! `main`, which hands a shutdown future in.

mod admin;
mod client;
pub mod progress;
mod run;
mod serve;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    parse_memory_mb, parse_network, EnvValue, NetworkPolicy, Runtime, ServiceSpec, SpecError,
};

/// Resolves when the process is asked to stop (SIGINT/SIGTERM).
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad command-line input: nothing was done (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Name(#[from] crate::model::NameError),
    #[error("cannot reach meshbox at {url} (is `meshbox serve` running?)")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build an HTTP client")]
    HttpClient(#[source] reqwest::Error),
    #[error("{message}")]
    Api {
        status: u16,
        message: String,
        logs: Vec<String>,
    },
    #[error("unexpected answer from meshbox")]
    Decode(#[source] reqwest::Error),
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Whoever read our output went away (`meshbox tools X | head -1`):
    /// nothing more to say, and nothing wrong with that.
    #[error("output closed")]
    BrokenPipe,
    #[error(transparent)]
    Source(#[from] crate::acquire::AcquireError),
    #[error(transparent)]
    Orchestrator(#[from] crate::orchestrator::OrchestratorError),
    #[error(transparent)]
    Start(#[from] crate::supervisor::StartError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    #[error("the tool reported an error")]
    ToolError,
    #[error("server exited ({0})")]
    ServerExit(crate::model::ExitReason),
}

impl CliError {
    /// The exit code: 2 for usage errors (nothing was done), 1 for failures,
    /// 0 for a reader that went away.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) | CliError::Spec(_) | CliError::Name(_) => 2,
            CliError::BrokenPipe => 0,
            _ => 1,
        }
    }
}

/// Writes one line to stdout; a closed pipe is [`CliError::BrokenPipe`],
/// never a panic.
pub fn out_line(line: impl std::fmt::Display) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                CliError::BrokenPipe
            } else {
                CliError::Io {
                    context: "failed to write to stdout".into(),
                    source: e,
                }
            }
        })
}

#[derive(Debug, Parser)]
#[command(
    name = "meshbox",
    version,
    about = "Run MCP servers in sandboxes and serve their tools over HTTP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr as text or as JSON objects.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
    /// Export trace spans over OTLP/HTTP to this collector, e.g. http://127.0.0.1:4318.
    #[arg(long, global = true, env = "MESHBOX_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon a broker talks to.
    Serve(serve::ServeArgs),
    /// Run one server sandboxed, bridging this process's stdin/stdout to it
    /// (use as an MCP client's command instead of `npx`/`uvx`).
    Run(run::RunArgs),
    /// Deploy (or replace) a service: MESH/NAME SOURCE [-- ARGS].
    Deploy(DeployArgs),
    /// List every mesh, or one mesh's services.
    Ls {
        mesh: Option<String>,
        /// Print the daemon's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a service's status as JSON.
    Status {
        service: String,
        /// Print the daemon's JSON answer (the default output is JSON too).
        #[arg(long)]
        json: bool,
    },
    /// List a service's tools.
    Tools {
        service: String,
        /// Print the tools as JSON (`{"tools":[…]}`), schemas included.
        #[arg(long)]
        json: bool,
    },
    /// Call a tool: MESH/NAME TOOL [JSON arguments].
    Call {
        service: String,
        tool: String,
        #[arg(default_value = "{}")]
        arguments: String,
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Show a service's logs.
    Logs {
        service: String,
        #[arg(short = 'n', long = "lines", default_value_t = 100)]
        lines: usize,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
    },
    /// Restart a service now.
    Restart { service: String },
    /// Stop and remove a service.
    Rm { service: String },
    /// Build runner images.
    #[command(subcommand)]
    Images(admin::ImagesCommand),
    /// Report the tools installs need (node, npm, python3, uv, git, bun),
    /// the docker engine, runner images, cgroup and netns support.
    Doctor {
        #[arg(long, env = "MESHBOX_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Egress proxy: HTTP CONNECT and plain HTTP to allowed host:port only
    /// (runs in a mesh's proxy container).
    Proxy {
        #[arg(long, default_value = "0.0.0.0:3128")]
        listen: std::net::SocketAddr,
        /// host:port or *.domain:port (repeatable).
        #[arg(long = "allow", required = true)]
        allow: Vec<String>,
    },
    /// Install a source into a cache and print how to start it (used inside
    /// install containers).
    #[command(hide = true)]
    Install(admin::InstallArgs),
    /// The process sandbox's init (meshbox re-executes itself with this;
    /// its plan arrives at the head of stdin; `main` takes it before this
    /// parser). Never run it by hand.
    #[command(hide = true, name = crate::orchestrator::process::init::COMMAND)]
    SandboxInit,
}

/// Limits and environment, as docker spells them.
#[derive(Debug, Clone, Args, Default)]
pub struct SpecArgs {
    /// Memory limit, e.g. 256m or 1g.
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU share, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Most processes/threads the server may have.
    #[arg(long)]
    pub pids: Option<u64>,
    /// none | full | allow=host:port,...
    #[arg(long)]
    pub network: Option<String>,
    /// Environment for the server (repeatable): KEY=VALUE sets it, KEY alone
    /// passes KEY's value from this environment, KEY={"file":"/abs/path"}
    /// reads a secret file when the server starts.
    #[arg(long = "env", short = 'e', value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Read environment lines (KEY=VALUE or KEY, # comments) from a file
    /// (repeatable; -e wins).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Runtime when detection should be overridden: node, python or bun.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Program to run instead of the detected entry (arguments go after --).
    #[arg(long)]
    pub command: Option<String>,
    /// A host directory the server sees at the same path, PATH or PATH:ro
    /// (repeatable).
    #[arg(long = "mount", value_name = "PATH[:ro]")]
    pub mounts: Vec<String>,
}

/// `PATH` or `PATH:ro` as a mount; a relative path is made absolute.
pub fn parse_mount(s: &str) -> Result<crate::model::HostMount, CliError> {
    let (path, read_only) = match s.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (s.strip_suffix(":rw").unwrap_or(s), false),
    };
    if path.is_empty() {
        return Err(CliError::Usage(format!(
            "--mount `{s}`: expected PATH or PATH:ro"
        )));
    }
    let p = PathBuf::from(path);
    let p = if p.is_absolute() {
        p
    } else {
        std::env::current_dir()
            .map_err(|source| CliError::Io {
                context: "failed to read the current directory".into(),
                source,
            })?
            .join(p)
    };
    Ok(crate::model::HostMount {
        path: p.canonicalize().unwrap_or(p),
        read_only,
    })
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// MESH/NAME
    pub service: String,
    /// npm:PKG, pypi:REQ, git:URL#REF, path:DIR (a relative path is made absolute)
    pub source: String,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Per-call timeout in milliseconds.
    #[arg(long)]
    pub call_timeout_ms: Option<u64>,
    /// Arguments for the server.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// A path relative to the current directory made absolute.
fn absolute(p: PathBuf) -> Result<PathBuf, CliError> {
    if p.is_absolute() {
        return Ok(p);
    }
    let cwd = std::env::current_dir().map_err(|source| CliError::Io {
        context: "failed to read the current directory".into(),
        source,
    })?;
    Ok(cwd.join(p))
}

/// `path:./dir` and bare directories become `path:/abs/dir`.
pub fn absolutize_source(source: &str) -> Result<String, CliError> {
    let rel = match source.strip_prefix("path:") {
        Some(p) => p,
        None if !source.contains(':') && std::path::Path::new(source).is_dir() => source,
        None => return Ok(source.to_owned()),
    };
    let abs = absolute(PathBuf::from(rel))?;
    let abs = abs.canonicalize().unwrap_or(abs);
    Ok(format!("path:{}", abs.display()))
}

/// One environment item, as docker reads `-e` and `--env-file`: `KEY=VALUE`
/// sets it, `KEY` alone takes KEY's value from `lookup` (left out when unset),
/// and a value `{"file": "PATH"}` is a secret file read at start (a relative
/// path is made absolute).
fn env_item(
    item: &str,
    origin: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(String, EnvValue)>, CliError> {
    let (key, value) = match item.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (item, None),
    };
    if key.is_empty() {
        return Err(CliError::Usage(format!(
            "{origin} `{}`: expected KEY or KEY=VALUE",
            crate::model::shown(item, 64)
        )));
    }
    let Some(value) = value.map(str::to_owned).or_else(|| lookup(key)) else {
        return Ok(None);
    };
    let value = match serde_json::from_str::<EnvValue>(&value) {
        Ok(EnvValue::File { file }) if value.trim_start().starts_with('{') => EnvValue::File {
            file: absolute(file)?,
        },
        _ => EnvValue::Literal(value),
    };
    Ok(Some((key.to_owned(), value)))
}

/// The lines of an env file that carry an item (not blank, not `#` comments).
fn env_file_items(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|l| l.trim_start())
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
}

impl SpecArgs {
    /// The environment of `--env-file` files then `-e` items (later wins).
    pub fn env_map(
        &self,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<BTreeMap<String, EnvValue>, CliError> {
        let mut env = BTreeMap::new();
        for f in &self.env_file {
            let text = std::fs::read_to_string(f).map_err(|source| CliError::Io {
                context: format!("failed to read env file `{}`", f.display()),
                source,
            })?;
            let origin = format!("--env-file {}:", f.display());
            for item in env_file_items(&text) {
                if let Some((k, v)) = env_item(item, &origin, lookup)? {
                    env.insert(k, v);
                }
            }
        }
        for item in &self.env {
            if let Some((k, v)) = env_item(item, "--env", lookup)? {
                env.insert(k, v);
            }
        }
        Ok(env)
    }

    pub fn into_spec(self, source: &str, args: Vec<String>) -> Result<ServiceSpec, CliError> {
        let env = self.env_map(&|k| std::env::var(k).ok())?;
        let runtime = self
            .runtime
            .as_deref()
            .map(|r| {
                r.parse::<Runtime>()
                    .map_err(|e| CliError::Usage(format!("--runtime {e}")))
            })
            .transpose()?;
        let (command, args) = match self.command {
            Some(c) => (Some(std::iter::once(c).chain(args).collect()), Vec::new()),
            None => (None, args),
        };
        let mounts = self
            .mounts
            .iter()
            .map(|m| parse_mount(m))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = ServiceSpec {
            source: absolutize_source(source)?,
            mounts,
            args,
            command,
            env,
            runtime,
            memory_mb: self.memory.as_deref().map(parse_memory_mb).transpose()?,
            cpus: self.cpus,
            pids: self.pids,
            network: match self.network.as_deref() {
                Some(n) => parse_network(n)?,
                None => NetworkPolicy::Unset,
            },
            ..Default::default()
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Runs a parsed command line to completion.
pub async fn run(cli: Cli, shutdown: Shutdown) -> Result<i32, CliError> {
    match cli.command {
        Command::Serve(args) => serve::serve(args, shutdown).await.map(|()| 0),
        Command::Run(args) => run::run(args, shutdown).await,
        Command::Images(cmd) => admin::images(cmd).await.map(|()| 0),
        Command::Doctor { data_dir } => {
            admin::doctor(data_dir.unwrap_or_else(serve::default_data_dir))
                .await
                .map(|()| 0)
        }
        Command::Install(args) => admin::install(args).await.map(|()| 0),
        // Dispatched by `main` before any runtime starts; never reached here.
        Command::SandboxInit => Err(CliError::Usage(
            "sandbox-init runs only as meshbox's own sandbox init".into(),
        )),
        Command::Proxy { listen, allow } => {
            let rules = allow
                .iter()
                .map(|a| {
                    crate::proxy::Rule::parse(a).ok_or_else(|| {
                        CliError::Usage(format!(
                            "--allow `{a}`: expected host:port or *.domain:port"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|source| CliError::Io {
                    context: format!("failed to listen on {listen}"),
                    source,
                })?;
            eprintln!(
                "meshbox-proxy listening on {listen}, allowing {}",
                allow.join(", ")
            );
            tokio::select! {
                r = crate::proxy::serve(listener, rules) => r.map(|()| 0).map_err(|source| CliError::Io {
                    context: "proxy failed".into(),
                    source,
                }),
                _ = shutdown => Ok(0),
            }
        }
        other => client::dispatch(other, shutdown).await.map(|()| 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_become_absolute() {
        let s = absolutize_source("path:.").unwrap();
        assert!(s.starts_with("path:/"), "{s}");
        assert_eq!(absolutize_source("npm:x").unwrap(), "npm:x");
    }

    #[test]
    fn spec_args() {
        let a = SpecArgs {
            memory: Some("256m".into()),
            cpus: Some(0.5),
            network: Some("none".into()),
            env: vec!["A=1".into()],
            ..Default::default()
        };
        let s = a.into_spec("path:/x", vec!["--flag".into()]).unwrap();
        assert_eq!(s.memory_mb, Some(256));
        assert_eq!(s.args, vec!["--flag"]);
        assert!(s.network.is_none());
        let bad = SpecArgs {
            env: vec!["=v".into()],
            ..Default::default()
        };
        assert!(matches!(
            bad.into_spec("path:/x", vec![]),
            Err(CliError::Usage(_))
        ));
        let bad = SpecArgs {
            memory: Some("1k".into()),
            ..Default::default()
        };
        assert!(bad.into_spec("path:/x", vec![]).is_err(), "below 16 MiB");
    }

    #[test]
    fn env_items_read_like_docker() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("env");
        std::fs::write(
            &file,
            "# a comment\n\nFROM_FILE=1\nBOTH=file\n  PASSED\nUNSET_HERE\nSECRET={\"file\": \"/run/s/k\"}\n",
        )
        .unwrap();
        let a = SpecArgs {
            env: vec![
                "BOTH=flag".into(),
                "PASSED2".into(),
                "EQ=a=b".into(),
                "EMPTY=".into(),
                "J={\"not\": \"file\"}".into(),
                "REL={\"file\": \"rel/k\"}".into(),
            ],
            env_file: vec![file],
            ..Default::default()
        };
        let lookup = |k: &str| match k {
            "PASSED" => Some("from-env".to_owned()),
            "PASSED2" => Some("2".to_owned()),
            _ => None,
        };
        let env = a.env_map(&lookup).unwrap();
        let lit = |s: &str| EnvValue::Literal(s.to_owned());
        assert_eq!(env["FROM_FILE"], lit("1"));
        assert_eq!(env["BOTH"], lit("flag"), "-e wins over the file");
        assert_eq!(env["PASSED"], lit("from-env"));
        assert_eq!(env["PASSED2"], lit("2"));
        assert!(
            !env.contains_key("UNSET_HERE"),
            "unset: left out, as docker does"
        );
        assert_eq!(env["EQ"], lit("a=b"));
        assert_eq!(env["EMPTY"], lit(""));
        assert_eq!(env["J"], lit("{\"not\": \"file\"}"));
        assert_eq!(
            env["SECRET"],
            EnvValue::File {
                file: "/run/s/k".into()
            }
        );
        match &env["REL"] {
            EnvValue::File { file } => {
                assert!(file.is_absolute() && file.ends_with("rel/k"), "{file:?}")
            }
            other => panic!("{other:?}"),
        }
        let missing = SpecArgs {
            env_file: vec![dir.path().join("nope")],
            ..Default::default()
        };
        assert!(matches!(missing.env_map(&lookup), Err(CliError::Io { .. })));
    }

    #[test]
    fn mounts_parse_like_docker() {
        let m = parse_mount("/srv/data:ro").unwrap();
        assert_eq!(
            (m.path.as_path(), m.read_only),
            (std::path::Path::new("/srv/data"), true)
        );
        let m = parse_mount("/srv/data").unwrap();
        assert!(!m.read_only);
        assert!(parse_mount(":ro").is_err());
        let rel = parse_mount("some/dir").unwrap();
        assert!(rel.path.is_absolute());
        let s = SpecArgs {
            mounts: vec!["/srv/a:ro".into(), "/srv/b".into()],
            ..Default::default()
        }
        .into_spec("path:/x", vec![])
        .unwrap();
        assert_eq!(s.mounts.len(), 2);
        assert!(s.mounts[0].read_only && !s.mounts[1].read_only);
    }
}
