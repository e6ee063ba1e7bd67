//! Command-line interface: argument parsing and the commands themselves.
//!
//! `serve` and `run` build the stack in-process; the other commands are thin
//! HTTP clients of a running daemon at `MESHBOX_URL`. Signal handling stays in
//! `main`, which hands a shutdown future in.

mod admin;
mod client;
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
    #[error("{message}")]
    Api {
        status: u16,
        message: String,
        logs: Vec<String>,
    },
    #[error("unexpected answer from meshbox")]
    Decode(#[source] reqwest::Error),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] crate::acquire::AcquireError),
    #[error(transparent)]
    Orchestrator(#[from] crate::orchestrator::OrchestratorError),
    #[error(transparent)]
    Start(#[from] crate::supervisor::StartError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the tool reported an error")]
    ToolError,
    #[error("server exited ({0})")]
    ServerExit(crate::model::ExitReason),
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
    /// List a mesh's services.
    Ls {
        #[arg(default_value = "default")]
        mesh: String,
    },
    /// Show a service's status as JSON.
    Status { service: String },
    /// List a service's tools.
    Tools { service: String },
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
    /// Report the docker engine, runner images, cgroup and netns support.
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
    /// Environment for the server, K=V (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Runtime when detection should be overridden: node, python or bun.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Program to run instead of the detected entry (arguments go after --).
    #[arg(long)]
    pub command: Option<String>,
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

/// `path:./dir` and bare directories become `path:/abs/dir`.
pub fn absolutize_source(source: &str) -> Result<String, CliError> {
    let rel = match source.strip_prefix("path:") {
        Some(p) => p,
        None if !source.contains(':') && std::path::Path::new(source).is_dir() => source,
        None => return Ok(source.to_owned()),
    };
    let p = PathBuf::from(rel);
    let abs = if p.is_absolute() {
        p
    } else {
        std::env::current_dir()
            .map_err(|source| CliError::Io {
                context: "failed to read the current directory".into(),
                source,
            })?
            .join(p)
    };
    let abs = abs.canonicalize().unwrap_or(abs);
    Ok(format!("path:{}", abs.display()))
}

impl SpecArgs {
    pub fn into_spec(self, source: &str, args: Vec<String>) -> Result<ServiceSpec, CliError> {
        let mut env = BTreeMap::new();
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| CliError::Usage(format!("--env `{kv}` must be K=V")))?;
            env.insert(k.to_owned(), EnvValue::Literal(v.to_owned()));
        }
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
        let spec = ServiceSpec {
            source: absolutize_source(source)?,
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
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        };
        assert!(bad.into_spec("path:/x", vec![]).is_err());
        let bad = SpecArgs {
            memory: Some("1k".into()),
            ..Default::default()
        };
        assert!(bad.into_spec("path:/x", vec![]).is_err(), "below 16 MiB");
    }
}
