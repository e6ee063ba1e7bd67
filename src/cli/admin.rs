//! `meshbox install` (run inside install containers), `meshbox images build`
//! and `meshbox doctor`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::CliError;
use crate::acquire::sandboxed::{InstallAnswer, PLAN_VAR};
use crate::acquire::{
    AcquireError, AcquireRequest, DirPlan, InstallConfig, Installer, Progress, Source,
};
use crate::images::{self, BuildOptions, ImageError};
use crate::model::{runner_image, Runtime};
use crate::orchestrator::docker::{self, DockerBackend, DockerConfig};
use crate::orchestrator::process::{ProcessBackend, ProcessConfig};

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Cache directory (the source volume inside an install container).
    #[arg(long)]
    pub cache: PathBuf,
    #[arg(long)]
    pub runtime: Option<String>,
    /// The runtime of the image this runs in: a `git:` source without
    /// `--runtime` that needs another one answers `{"needs_runtime": …}`.
    #[arg(long)]
    pub image_runtime: Option<String>,
    /// The spec's `command`, as a JSON array.
    #[arg(long)]
    pub command_json: Option<String>,
    /// A `path:` source's entry as the host found it (JSON): not looked for
    /// again. In the environment, so that a runner image built by an older
    /// meshbox, which does not know it, still installs (and looks itself).
    #[arg(long, env = PLAN_VAR, hide_env_values = true)]
    pub plan_json: Option<String>,
    #[arg(long, default_value_t = 600)]
    pub install_timeout: u64,
    /// Environment of the install steps, as K=V (repeatable).
    #[arg(long = "install-env", value_name = "K=V")]
    pub install_env: Vec<String>,
    pub source: String,
    #[arg(last = true)]
    pub args: Vec<String>,
}

fn parse_runtime(r: &str) -> Result<Runtime, CliError> {
    r.parse()
        .map_err(|e| CliError::Usage(format!("runtime {e}")))
}

/// Acquires a source into `--cache` and prints how to start it, as JSON.
pub async fn install(args: InstallArgs) -> Result<(), CliError> {
    let source: Source = args.source.parse()?;
    let runtime = args.runtime.as_deref().map(parse_runtime).transpose()?;
    let image_runtime = args
        .image_runtime
        .as_deref()
        .map(parse_runtime)
        .transpose()?;
    let command: Option<Vec<String>> = match &args.command_json {
        Some(j) => Some(
            serde_json::from_str(j).map_err(|e| CliError::Usage(format!("--command-json: {e}")))?,
        ),
        None => None,
    };
    let plan: Option<DirPlan> = match &args.plan_json {
        Some(j) => Some(
            serde_json::from_str(j).map_err(|e| CliError::Usage(format!("--plan-json: {e}")))?,
        ),
        None => None,
    };
    let mut config = InstallConfig::new(args.cache.clone());
    config.timeout = Duration::from_secs(args.install_timeout.max(1));
    let installer = Installer::new(config);
    let progress: Progress = Arc::new(|line: &str| eprintln!("{line}"));
    let env = super::serve::parse_install_env(&args.install_env)?;
    let req = AcquireRequest {
        source: &source,
        runtime,
        command: command.as_deref(),
        args: &args.args,
        install_env: &env,
        install_timeout: None,
        plan: plan.as_ref(),
    };
    let answer = match installer.acquire(&req, image_runtime, &progress).await {
        Ok(launch) => InstallAnswer::Launch {
            argv: launch.argv,
            workdir: launch.workdir,
            runtime: launch.runtime.or(runtime),
            env: launch.env,
        },
        Err(AcquireError::NeedsRuntime { needs, .. }) => InstallAnswer::NeedsRuntime {
            needs_runtime: needs,
        },
        Err(e) => return Err(e.into()),
    };
    println!("{}", serde_json::to_string(&answer).unwrap_or_default());
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Build runner images: node, python, bun or all.
    Build(ImagesBuildArgs),
}

#[derive(Debug, Args)]
pub struct ImagesBuildArgs {
    #[arg(default_value = "all")]
    pub which: String,
    /// Base image for every runtime built (default: each Dockerfile's own).
    #[arg(long)]
    pub base_image: Option<String>,
    #[arg(long)]
    pub base_image_node: Option<String>,
    #[arg(long)]
    pub base_image_python: Option<String>,
    #[arg(long)]
    pub base_image_bun: Option<String>,
    /// A PEM bundle of extra CA certificates to trust in the images.
    #[arg(long, env = "MESHBOX_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
}

pub async fn images(cmd: ImagesCommand) -> Result<(), CliError> {
    let ImagesCommand::Build(args) = cmd;
    let runtimes = match args.which.as_str() {
        "all" => vec![Runtime::Node, Runtime::Python, Runtime::Bun],
        one => vec![parse_runtime(one)?],
    };
    let docker = bollard::Docker::connect_with_local_defaults()
        .map_err(ImageError::Engine)?
        .negotiate_version()
        .await
        .map_err(ImageError::Engine)?;
    for rt in runtimes {
        let base = match rt {
            Runtime::Node => args.base_image_node.clone(),
            Runtime::Python => args.base_image_python.clone(),
            Runtime::Bun => args.base_image_bun.clone(),
        }
        .or_else(|| args.base_image.clone());
        let opts = BuildOptions {
            base_image: base,
            ca_bundle: args.ca_bundle.clone(),
            binary: None,
        };
        eprintln!("building {} …", runner_image(rt));
        let mut bar = super::progress::BuildProgress::new(super::progress::Target::stderr());
        let built = images::build(&docker, rt, &opts, &mut |line: &str| bar.line(line)).await;
        bar.finish();
        super::out_line(built?)?;
    }
    Ok(())
}

/// A program installs or servers need, and what is lost without it.
struct Tool {
    program: &'static str,
    version_arg: &'static str,
    without: &'static str,
}

const TOOLS: &[Tool] = &[
    Tool {
        program: "node",
        version_arg: "--version",
        without: "npm: sources and node path: sources cannot run on the process backend",
    },
    Tool {
        program: "npm",
        version_arg: "--version",
        without:
            "npm: sources and node path: dependencies cannot be installed on the process backend",
    },
    Tool {
        program: "python3",
        version_arg: "--version",
        without: "pypi: sources and python path: sources cannot run on the process backend",
    },
    Tool {
        program: "uv",
        version_arg: "--version",
        without: "pypi: installs fall back to python3 -m venv + pip, about 5x slower",
    },
    Tool {
        program: "git",
        version_arg: "--version",
        without: "git: sources cannot be cloned on the process backend",
    },
    Tool {
        program: "bun",
        version_arg: "--version",
        without: "bun sources (bun.lockb, bunfig.toml) cannot run on the process backend",
    },
];

/// `program --version`'s first line, or `None` when it is not on PATH or
/// does not answer within a few seconds.
async fn tool_version(program: &str, arg: &str) -> Option<String> {
    let out = tokio::process::Command::new(program)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(5), out)
        .await
        .ok()?
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}

/// One line per tool: found with its version, or missing and what that costs.
pub async fn tool_report() -> Vec<String> {
    let versions = futures_util::future::join_all(
        TOOLS.iter().map(|t| tool_version(t.program, t.version_arg)),
    )
    .await;
    TOOLS
        .iter()
        .zip(versions)
        .map(|(t, v)| match v {
            Some(v) => format!("  {:<8} {v}", t.program),
            None => format!("  {:<8} not found: {}", t.program, t.without),
        })
        .collect()
}

/// Reports what this machine offers meshbox.
pub async fn doctor(data_dir: PathBuf) -> Result<(), CliError> {
    super::out_line(format_args!("meshbox {}", env!("CARGO_PKG_VERSION")))?;
    super::out_line("tools:")?;
    for line in tool_report().await {
        super::out_line(line)?;
    }
    let process = ProcessBackend::new(ProcessConfig::default());
    super::out_line(format_args!("process backend: {}", process.describe()))?;
    match DockerBackend::connect(DockerConfig::new(data_dir)).await {
        Ok(d) => {
            super::out_line("docker engine: reachable")?;
            for (k, v) in docker::describe(&d).await {
                super::out_line(format_args!("  {k}: {v}"))?;
            }
        }
        Err(e) => super::out_line(format_args!(
            "docker engine: not reachable ({})",
            crate::error_chain(&e)
        ))?,
    }
    Ok(())
}
