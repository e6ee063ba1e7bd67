//! The `meshbox` binary: parse arguments, set up tracing and signals, run,
//! and turn the error chain into `error: …` lines and an exit code.

use std::io::IsTerminal;

use clap::Parser;
use meshbox::cli::{self, Cli, CliError, Command};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("MESHBOX_LOG")
                .unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        let shutdown = Box::pin(shutdown_signal());
        match cli::run(cli, shutdown).await {
            Ok(code) => code,
            Err(e) => report(&e),
        }
    });
    drop(runtime);
    std::process::exit(code);
}

fn report(e: &CliError) -> i32 {
    eprintln!("error: {e}");
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        eprintln!("  caused by: {c}");
        cur = c.source();
    }
    if let CliError::Api { logs, .. } = e {
        if !logs.is_empty() {
            eprintln!("last log lines:");
            for l in logs {
                eprintln!("  {l}");
            }
        }
    }
    match e {
        CliError::Usage(_) | CliError::Spec(_) | CliError::Name(_) => 2,
        _ => 1,
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
