//! `meshbox run`: one sandboxed server whose stdio is this process's stdio, so
//! an MCP client can use `meshbox run SOURCE` where it used `npx`/`uvx`.
//! Bytes pass through untouched; meshbox does not parse the protocol here.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::io::AsyncWriteExt;

use super::{CliError, Shutdown, SpecArgs};
use crate::acquire::sandboxed::SandboxedInstalls;
use crate::acquire::{InstallConfig, Installer, Progress, Source};
use crate::model::{wait_exit, ServiceKey};
use crate::orchestrator::process::{ProcessBackend, ProcessConfig};
use crate::orchestrator::Orchestrator;
use crate::supervisor::prepare::{self, Acquirers, Validated};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// npm:PKG, pypi:REQ, git:URL#REF, path:DIR (a relative path is made absolute)
    pub source: String,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Seconds one install step may take.
    #[arg(long, default_value_t = 600)]
    pub install_timeout: u64,
    /// Do not use cgroups for limits.
    #[arg(long)]
    pub no_cgroups: bool,
    /// Arguments for the server.
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub async fn run(args: RunArgs, shutdown: Shutdown) -> Result<i32, CliError> {
    let spec = args.spec.into_spec(&args.source, args.args)?;
    let source: Source = spec.source.parse()?;
    let data_dir = super::serve::default_data_dir();
    let mut install = InstallConfig::new(data_dir.join("cache"));
    install.timeout = Duration::from_secs(args.install_timeout.max(1));
    let installer = Installer::new(install);
    let sandboxed = SandboxedInstalls::new(data_dir.join("docker-installs"));
    // Progress on a terminal only: stdout is the MCP stream, pipes stay quiet.
    let progress: Progress = if std::io::stderr().is_terminal() {
        Arc::new(|line: &str| eprintln!("meshbox: {line}"))
    } else {
        crate::acquire::install::quiet()
    };
    let backend = ProcessBackend::new(ProcessConfig {
        cgroups: !args.no_cgroups,
        ..Default::default()
    });
    let owner = ServiceKey {
        mesh: "local".into(),
        name: "run".into(),
    };
    let acquirers = Acquirers {
        installer: &installer,
        sandboxed: &sandboxed,
        install_timeout: Duration::from_secs(args.install_timeout.max(1)),
    };
    let v = Validated { spec, source };
    let prepared = prepare::acquire(&backend, &acquirers, &owner, &v, &progress).await?;
    let home = prepare::server_home(&data_dir, &owner)?;
    // Its user is the operator: secret files may be anywhere they can read.
    let env = prepare::server_env(
        &crate::environ::runner_path(),
        &home,
        &v.spec.env,
        &crate::secrets::SecretPolicy::Anywhere,
    )
    .await?;
    let mut sandbox = backend
        .spawn(prepare::server_sandbox(
            &owner,
            &v.spec,
            &prepared,
            env,
            Some(home),
        ))
        .await?;
    let mut stdin = sandbox.io.stdin;
    let mut stdout = sandbox.io.stdout;
    let mut stderr = sandbox.io.stderr;
    // Client → server; EOF from the client closes the server's stdin.
    let to_server = tokio::spawn(async move {
        let mut ours = tokio::io::stdin();
        let _ = tokio::io::copy(&mut ours, &mut stdin).await;
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
    let reason = tokio::select! {
        r = wait_exit(&mut sandbox.exit) => r,
        _ = shutdown => sandbox.handle.stop(Duration::from_secs(3)).await,
    };
    to_server.abort();
    // Let the last replies reach the client.
    let _ = tokio::time::timeout(Duration::from_secs(2), from_server).await;
    let _ = tokio::time::timeout(Duration::from_millis(500), errors).await;
    Ok(match (reason.code, reason.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}
