//! The client commands: thin HTTP calls to the daemon at `MESHBOX_URL`.

use std::io::IsTerminal;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{out_line, CliError, Command, DeployArgs, Shutdown};
use crate::supervisor::ServiceKey;

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn from_env() -> Result<Client, CliError> {
        let base = std::env::var("MESHBOX_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:7901".into())
            .trim_end_matches('/')
            .to_owned();
        let http = reqwest::Client::builder()
            .build()
            .map_err(CliError::HttpClient)?;
        Ok(Client {
            http,
            base,
            token: std::env::var("MESHBOX_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), CliError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|source| CliError::Connect {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(CliError::Decode)?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_success() {
            return Ok((status, value));
        }
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {status}"));
        let logs = value
            .get("logs")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Err(CliError::Api {
            status: status.as_u16(),
            message,
            logs,
        })
    }
}

fn parse_key(s: &str) -> Result<ServiceKey, CliError> {
    let (mesh, name) = s
        .split_once('/')
        .ok_or_else(|| CliError::Usage(format!("`{s}`: expected MESH/NAME")))?;
    Ok(ServiceKey::parse(mesh, name)?)
}

fn service_path(key: &ServiceKey) -> String {
    format!("/v1/meshes/{}/services/{}", key.mesh, key.name)
}

fn print_json(v: &Value) -> Result<(), CliError> {
    out_line(serde_json::to_string_pretty(v).map_err(CliError::Encode)?)
}

fn tool_names(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.get("name").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

pub async fn dispatch(cmd: Command, shutdown: Shutdown) -> Result<(), CliError> {
    let c = Client::from_env()?;
    match cmd {
        Command::Deploy(args) => deploy(&c, args).await,
        Command::Ls { mesh: None, json } => {
            let (_, v) = c.send(Method::GET, "/v1/meshes", None).await?;
            if json {
                return print_json(&v);
            }
            out_line(format_args!("{:<24} {:>8}", "MESH", "SERVICES"))?;
            for m in v
                .get("meshes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out_line(format_args!(
                    "{:<24} {:>8}",
                    m.get("name").and_then(Value::as_str).unwrap_or("-"),
                    m.get("services").and_then(Value::as_u64).unwrap_or(0)
                ))?;
            }
            Ok(())
        }
        Command::Ls {
            mesh: Some(mesh),
            json,
        } => {
            crate::config::validate_name("mesh", &mesh)?;
            let (_, v) = c
                .send(Method::GET, &format!("/v1/meshes/{mesh}/services"), None)
                .await?;
            if json {
                return print_json(&v);
            }
            out_line(format_args!(
                "{:<24} {:<11} {:<10} {:>8} {:>5}  SOURCE",
                "NAME", "STATUS", "HEALTH", "RESTARTS", "TOOLS"
            ))?;
            for s in v
                .get("services")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let f = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
                out_line(format_args!(
                    "{:<24} {:<11} {:<10} {:>8} {:>5}  {}",
                    format!("{}/{}", f("mesh"), f("name")),
                    f("status"),
                    f("health"),
                    s.get("restarts").and_then(Value::as_u64).unwrap_or(0),
                    s.get("tools").and_then(Value::as_array).map_or(0, Vec::len),
                    f("source")
                ))?;
            }
            Ok(())
        }
        // The status is JSON either way; `--json` is accepted for symmetry.
        Command::Status { service, json: _ } => {
            let key = parse_key(&service)?;
            let (_, v) = c.send(Method::GET, &service_path(&key), None).await?;
            print_json(&v)
        }
        Command::Tools { service, json } => {
            let key = parse_key(&service)?;
            let (_, v) = c
                .send(Method::GET, &format!("{}/tools", service_path(&key)), None)
                .await?;
            if json {
                return print_json(&v);
            }
            for t in v
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = t.get("name").and_then(Value::as_str).unwrap_or("?");
                let desc = t.get("description").and_then(Value::as_str).unwrap_or("");
                let first = desc.lines().next().unwrap_or("");
                out_line(format_args!("{name:<32} {first}"))?;
            }
            Ok(())
        }
        Command::Call {
            service,
            tool,
            arguments,
            timeout_ms,
        } => {
            let key = parse_key(&service)?;
            let arguments: Value = serde_json::from_str(&arguments)
                .map_err(|e| CliError::Usage(format!("arguments are not valid JSON: {e}")))?;
            let mut body = json!({"tool": tool, "arguments": arguments});
            if let Some(t) = timeout_ms {
                body["timeout_ms"] = json!(t);
            }
            let (_, v) = c
                .send(
                    Method::POST,
                    &format!("{}/call", service_path(&key)),
                    Some(body),
                )
                .await?;
            let result = v.get("result").cloned().unwrap_or(Value::Null);
            print_json(&result)?;
            if result.get("isError").and_then(Value::as_bool) == Some(true) {
                return Err(CliError::ToolError);
            }
            Ok(())
        }
        Command::Logs {
            service,
            lines,
            follow,
        } => {
            let key = parse_key(&service)?;
            let path = format!("{}/logs", service_path(&key));
            let (_, v) = c
                .send(Method::GET, &format!("{path}?lines={lines}"), None)
                .await?;
            let mut next = print_lines(&v)?;
            if !follow {
                return Ok(());
            }
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let (_, v) = c
                    .send(
                        Method::GET,
                        &format!("{path}?since={next}&lines=1000"),
                        None,
                    )
                    .await?;
                next = print_lines(&v)?.max(next);
            }
        }
        Command::Restart { service } => {
            let key = parse_key(&service)?;
            let (_, v) = c
                .send(
                    Method::POST,
                    &format!("{}/restart", service_path(&key)),
                    None,
                )
                .await?;
            summarize(&v)
        }
        Command::Rm { service } => {
            let key = parse_key(&service)?;
            c.send(Method::DELETE, &service_path(&key), None).await?;
            Ok(())
        }
        Command::Serve(_)
        | Command::Run(_)
        | Command::Images(_)
        | Command::Doctor { .. }
        | Command::Install(_)
        | Command::Proxy { .. }
        | Command::SandboxInit => unreachable!("handled in cli::run"),
    }
}

fn print_lines(v: &Value) -> Result<u64, CliError> {
    for l in v
        .get("lines")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(s) = l.as_str() {
            out_line(s)?;
        }
    }
    Ok(v.get("next").and_then(Value::as_u64).unwrap_or(0))
}

fn summarize(v: &Value) -> Result<(), CliError> {
    let f = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    out_line(format_args!(
        "{}/{} {} ({} tools: {})",
        f("mesh"),
        f("name"),
        f("status"),
        v.get("tools").and_then(Value::as_array).map_or(0, Vec::len),
        tool_names(v.get("tools").unwrap_or(&Value::Null))
    ))
}

/// A failed deploy's error with the server's own last stderr lines: the
/// answer's logs, topped up from the service's log ring (a server's last
/// words can land there a moment after the failure is decided).
async fn with_server_stderr(c: &Client, path: &str, e: CliError) -> CliError {
    let CliError::Api {
        status,
        message,
        mut logs,
    } = e
    else {
        return e;
    };
    if !logs.iter().any(|l| l.contains(" [stderr] ")) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok((_, v)) = c
            .send(Method::GET, &format!("{path}/logs?lines=200"), None)
            .await
        {
            let ring: Vec<String> = v
                .get("lines")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            if ring.iter().any(|l| l.contains(" [stderr] ")) {
                logs = ring;
            }
        }
    }
    CliError::Api {
        status,
        message,
        logs,
    }
}

async fn deploy(c: &Client, args: DeployArgs) -> Result<(), CliError> {
    let key = parse_key(&args.service)?;
    let mut spec = args.spec.into_spec(&args.source, args.args)?;
    spec.call_timeout_ms = args.call_timeout_ms;
    spec.validate()?;
    let body = serde_json::to_value(&spec).map_err(CliError::Encode)?;
    let path = service_path(&key);
    let put = c.send(Method::PUT, &path, Some(body));
    if !std::io::stderr().is_terminal() {
        let (_, v) = match put.await {
            Ok(r) => r,
            Err(e) => return Err(with_server_stderr(c, &path, e).await),
        };
        return summarize(&v);
    }
    // On a terminal, show the service's install/start notes while it comes up.
    eprintln!("deploying {key} from {} …", spec.source);
    tokio::pin!(put);
    let mut next = 0u64;
    let started = std::time::Instant::now();
    let result = loop {
        tokio::select! {
            r = &mut put => break r,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Ok((_, v)) = c.send(Method::GET, &format!("{path}/logs?since={next}&lines=1000"), None).await {
                    for l in v.get("lines").and_then(Value::as_array).into_iter().flatten() {
                        if let Some(s) = l.as_str().filter(|s| s.contains(" [meshbox] ")) {
                            eprintln!("  {}", s.split_once(" [meshbox] ").map_or(s, |(_, m)| m));
                        }
                    }
                    next = v.get("next").and_then(Value::as_u64).unwrap_or(next);
                }
            }
        }
    };
    let (_, v) = match result {
        Ok(r) => r,
        Err(e) => return Err(with_server_stderr(c, &path, e).await),
    };
    eprintln!("done in {:.1}s", started.elapsed().as_secs_f64());
    summarize(&v)
}
