//! The `meshbox` binary: parse arguments, set up tracing and signals, run,
//! and turn the error chain into `error: …` lines and an exit code.

use std::io::IsTerminal;

use clap::Parser;
use meshbox::cli::{self, Cli, CliError, Command};
use meshbox::orchestrator::process::init::COMMAND as INIT;
use meshbox::telemetry::{self, TelemetryConfig};

fn main() {
    // The process sandbox's init must stay single-threaded: no runtime, no
    // tracing. It is on every sandboxed start's path: taken before the
    // whole command line's parser is built.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(INIT)) {
        std::process::exit(meshbox::orchestrator::process::init::main());
    }
    meshbox::orchestrator::process::host::keep_inherited_fds_from_children();
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    // Before the runtime: the span exporter's client runs on its own thread.
    let telemetry = match telemetry::init(&TelemetryConfig {
        log_format: cli.log_format,
        default_level,
        ansi: std::io::stderr().is_terminal(),
        otlp_endpoint: cli.otlp_endpoint.clone(),
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}", meshbox::error_chain(&e));
            std::process::exit(2);
        }
    };
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
    // A blocking read of stdin (`meshbox run`) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    telemetry.shutdown();
    std::process::exit(code);
}

/// Lines of a log tail that the server itself wrote on stderr, without the
/// timestamp and stream prefix.
fn server_stderr(logs: &[String]) -> Vec<&str> {
    logs.iter()
        .filter_map(|l| l.split_once(" [stderr] ").map(|(_, m)| m))
        .collect()
}

fn report(e: &CliError) -> i32 {
    use std::io::Write;
    if matches!(e, CliError::BrokenPipe) {
        return e.exit_code();
    }
    // Written with errors ignored: stderr may be closed too.
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "error: {e}");
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let _ = writeln!(err, "  caused by: {c}");
        cur = c.source();
    }
    if let CliError::Api { logs, .. } = e {
        let stderr = server_stderr(logs);
        if !stderr.is_empty() {
            let _ = writeln!(err, "server stderr (last lines):");
            for l in &stderr[stderr.len().saturating_sub(20)..] {
                let _ = writeln!(err, "  {l}");
            }
        } else if !logs.is_empty() {
            let _ = writeln!(err, "last log lines:");
            for l in logs {
                let _ = writeln!(err, "  {l}");
            }
        }
    }
    e.exit_code()
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
