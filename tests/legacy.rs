//! Seed 001's requests, replayed verbatim against meshbox's legacy routes:
//! every route, every body shape the seed runner accepted, in one sequence.
//! Each answer is compared with the seed's by JSON shape (keys and types, not
//! values) and status code; where meshbox answers otherwise on purpose (bad
//! input is a 400, a wrong method a 405), the row says so and why.
//!
//! The seed's answers are recorded in the table (plain `cargo test`; needs
//! node, as the node fixture does). `seed_runner_answers_like_the_recording`
//! (`needs clients`: node and the seed runner, `MESHBOX_SEED_RUNNER` or
//! `../shared/peers/seed-runner.mjs`) runs the real seed runner side by side
//! with meshbox and checks both the recording and meshbox against it.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{fixture, Daemon};
use serde_json::{json, Value};

/// What meshbox answers where it differs from the seed on purpose.
#[derive(Clone, Copy)]
struct Differs {
    status: u16,
    why: &'static str,
}

struct Row {
    method: &'static str,
    /// Path and query, verbatim.
    path: &'static str,
    /// Raw body; `@DIR@` becomes the server's copy of the node fixture.
    body: Option<&'static str>,
    /// The seed's answer: status and JSON shape.
    seed_status: u16,
    seed_shape: Value,
    differs: Option<Differs>,
}

fn tool() -> Value {
    json!({"name": "string", "description": "string", "inputSchema": {"type": "string"}})
}

fn error() -> Value {
    json!({"error": "string"})
}

fn result() -> Value {
    json!({"result": {"content": [{"type": "string", "text": "string"}]}})
}

fn get(path: &'static str, status: u16, shape: Value) -> Row {
    row("GET", path, None, status, shape)
}

fn post(path: &'static str, body: &'static str, status: u16, shape: Value) -> Row {
    row("POST", path, Some(body), status, shape)
}

fn row(
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    status: u16,
    shape: Value,
) -> Row {
    Row {
        method,
        path,
        body,
        seed_status: status,
        seed_shape: shape,
        differs: None,
    }
}

fn differs(mut r: Row, status: u16, why: &'static str) -> Row {
    r.differs = Some(Differs { status, why });
    r
}

#[rustfmt::skip]
/// Seed 001's routes in a broker's order, with every body shape it took.
fn table() -> Vec<Row> {
    let loaded = || json!({"status": "string", "tools": [tool()]});
    let all = || json!({"svc": [tool()], "svc2": [tool()], "svc3": [tool()]});
    let tools = || json!({"tools": [tool()]});
    let lines = || json!({"lines": ["string"]});
    let ok = || json!({"ok": "bool"});
    let none = || json!({"ok": "bool", "services": []});
    let one = json!({"name": "string", "status": "string", "pid": "number", "tools": "number", "restarts": "number"});
    let wrong_method = "a wrong method is a 405 (with a JSON error), not a missing route";
    vec![
        get("/health", 200, none()),
        get("/list", 200, json!({})),
        // /load: the documented body, then the shapes brokers really send.
        post("/load", r#"{"name":"svc","sourcePath":"@DIR@","env":{"A":"1"},"runtime":"node"}"#, 200, loaded()),
        post("/load", r#"{"name":"svc2","sourcePath":"@DIR@","env":null,"meshId":"mesh-1","gitUrl":null,"gitBranch":null,"npxPackage":""}"#, 200, loaded()),
        post("/load", r#"{"name":"svc3","sourcePath":"@DIR@","env":{"PORT":8080,"DEBUG":true,"S":"x"}}"#, 200, loaded()),
        // A second /load of a name replaces it.
        post("/load", r#"{"name":"svc","sourcePath":"@DIR@"}"#, 200, loaded()),
        post("/load", r#"{"sourcePath":"@DIR@"}"#, 400, error()),
        post("/load", r#"{"name":"nosource"}"#, 400, error()),
        differs(post("/load", r#"{"name":"#, 500, error()), 400, "a body that is not JSON is the caller's error"),
        get("/health", 200, json!({"ok": "bool", "services": [one]})),
        get("/list", 200, all()),
        get("/list?name=svc", 200, tools()),
        get("/list?name=", 200, all()),
        get("/list?name=svc&meshId=mesh-1", 200, tools()),
        get("/list?name=nope", 404, error()),
        get("/logs?name=svc&lines=5", 200, lines()),
        get("/logs?name=svc", 200, lines()),
        get("/logs?name=svc&lines=abc", 200, lines()),
        get("/logs?name=nope", 404, error()),
        differs(get("/logs", 404, error()), 400, "a missing name is the caller's error, not a missing service"),
        post("/call", r#"{"name":"svc","tool":"echo","args":{"text":"hi"}}"#, 200, result()),
        post("/call", r#"{"name":"svc","tool":"add","args":null}"#, 200, result()),
        post("/call", r#"{"name":"svc","tool":"add"}"#, 200, result()),
        post("/call", r#"{"name":"svc","tool":"echo","args":{"text":"x"},"meshId":"mesh-1"}"#, 200, result()),
        // A JSON-RPC error from the server is a 200 with `error`.
        post("/call", r#"{"name":"svc","tool":"no_such_tool","args":{}}"#, 200, error()),
        // So is a server that dies during the call.
        post("/call", r#"{"name":"svc3","tool":"crash","args":{}}"#, 200, error()),
        post("/call", r#"{"name":"nope","tool":"echo","args":{}}"#, 404, error()),
        post("/unload", r#"{"name":"nope"}"#, 404, error()),
        post("/unload", r#"{"name":"svc2","meshId":"mesh-1"}"#, 200, ok()),
        differs(get("/load", 404, error()), 405, wrong_method),
        differs(row("POST", "/health", None, 404, error()), 405, wrong_method),
        get("/no/such/route", 404, error()),
        differs(get("/health?meshId=mesh-1", 404, error()), 200, "unknown query parameters are ignored on every route"),
        post("/unload", r#"{"name":"svc"}"#, 200, ok()),
        post("/unload", r#"{"name":"svc3"}"#, 200, ok()),
        get("/health", 200, none()),
        // Last: the seed registers a service whose install failed.
        differs(
            post("/load", r#"{"name":"baddir","sourcePath":"/nonexistent/meshbox-legacy-test"}"#, 500, error()),
            400,
            "a missing source directory is bad input, refused before anything is registered",
        ),
    ]
}

/// The JSON shape of a value: keys and types, the first element of arrays.
fn shape(v: &Value) -> Value {
    match v {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("bool"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
        Value::Array(a) => Value::Array(a.first().map(shape).into_iter().collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

/// Whether `got` has the seed's shape: the same keys with the same types;
/// an empty array on either side fits any array (a log may be empty).
fn fits(got: &Value, want: &Value, at: &str) -> Result<(), String> {
    match (got, want) {
        (Value::Array(g), Value::Array(w)) => match (g.first(), w.first()) {
            (Some(g), Some(w)) => fits(g, w, &format!("{at}[0]")),
            _ => Ok(()),
        },
        (Value::Object(g), Value::Object(w)) => {
            let gk: BTreeSet<&String> = g.keys().collect();
            let wk: BTreeSet<&String> = w.keys().collect();
            if gk != wk {
                return Err(format!("{at}: keys {gk:?}, the seed's {wk:?}"));
            }
            for k in wk {
                fits(&g[k], &w[k], &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        (g, w) if g == w => Ok(()),
        (g, w) => Err(format!("{at}: {g}, the seed's {w}")),
    }
}

/// An error body: `error` as a string, and at most meshbox's `logs` besides.
fn is_error_shape(v: &Value) -> bool {
    v.get("error").is_some_and(Value::is_string)
        && v.as_object()
            .is_some_and(|m| m.keys().all(|k| k == "error" || k == "logs"))
}

/// The node fixture copied, since the seed runs `npm install` in it.
fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["package.json", "server.js"] {
        std::fs::copy(fixture("node_server").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

async fn send(http: &reqwest::Client, base: &str, r: &Row, dir: &Path) -> (u16, Value) {
    let url = format!("{base}{}", r.path);
    let method = reqwest::Method::from_bytes(r.method.as_bytes()).unwrap();
    let mut req = http.request(method, url).timeout(Duration::from_secs(120));
    if let Some(b) = r.body {
        req = req
            .header("content-type", "application/json")
            .body(b.replace("@DIR@", &dir.display().to_string()));
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "{} {}: not JSON ({status}): {:?}",
            r.method,
            r.path,
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, v)
}

/// Checks meshbox's answer to a row against the seed's (recorded or live).
fn check_ours(r: &Row, seed_status: u16, seed_shape: &Value, status: u16, v: &Value) {
    let what = format!("{} {} {}", r.method, r.path, r.body.unwrap_or(""));
    let want_status = r.differs.map_or(seed_status, |d| d.status);
    assert_eq!(
        status,
        want_status,
        "{what}: status {status}, expected {want_status}{}: {v}",
        r.differs
            .map(|d| format!(" ({})", d.why))
            .unwrap_or_default()
    );
    if status >= 400 {
        assert!(is_error_shape(v), "{what}: not an error body: {v}");
    } else if r.differs.is_none() {
        if let Err(e) = fits(&shape(v), seed_shape, "answer") {
            panic!("{what}: {e}; answer {v}");
        }
    }
}

#[tokio::test]
async fn legacy_routes_answer_like_the_seed() {
    let d = Daemon::start();
    let dir = fixture_copy();
    let http = reqwest::Client::new();
    for r in table() {
        let (status, v) = send(&http, &d.url, &r, dir.path()).await;
        check_ours(&r, r.seed_status, &r.seed_shape, status, &v);
    }
    // The lenient shapes reached the server as the seed would have passed them.
    let (code, _) = d
        .post(
            "/load",
            json!({"name": "envs", "sourcePath": fixture("py_server"), "runtime": "python",
                   "env": {"PORT": 8080, "RATIO": 0.5, "DEBUG": true, "S": "x", "GONE": null}, "meshId": "m"}),
        )
        .await;
    assert_eq!(code, 200);
    let (_, r) = d
        .post(
            "/call",
            json!({"name": "envs", "tool": "env", "args": null}),
        )
        .await;
    let env: Value = serde_json::from_str(&common::text_of(&r)).unwrap();
    assert_eq!(
        (&env["PORT"], &env["RATIO"], &env["DEBUG"], &env["S"]),
        (&json!("8080"), &json!("0.5"), &json!("true"), &json!("x"))
    );
    assert!(env.get("GONE").is_none(), "{env}");
}

/// The seed runner, started on a free port with its own working directory.
struct Seed {
    child: Child,
    url: String,
    _cwd: tempfile::TempDir,
}

impl Drop for Seed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seed_runner_path() -> PathBuf {
    let candidates: Vec<PathBuf> = std::env::var_os("MESHBOX_SEED_RUNNER")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/seed-runner.mjs"),
            PathBuf::from("/work/shared/peers/seed-runner.mjs"),
        ])
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("needs the seed runner: set MESHBOX_SEED_RUNNER (looked at {candidates:?})")
        })
}

fn start_seed() -> Seed {
    let script = seed_runner_path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new("node")
        .arg(&script)
        .current_dir(cwd.path())
        .env("RUNNER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("needs node to run the seed runner");
    let out = child.stdout.take().unwrap();
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap_or(0);
        assert!(
            n > 0,
            "the seed runner did not start: {:?}",
            child.try_wait()
        );
        if line.contains("supervisor listening") {
            break;
        }
    }
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).unwrap_or(0) > 0 {
            eprint!("[seed] {sink}");
            sink.clear();
        }
    });
    Seed {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _cwd: cwd,
    }
}

#[tokio::test]
#[ignore = "needs clients"]
async fn seed_runner_answers_like_the_recording() {
    let seed = start_seed();
    let d = Daemon::start();
    let (seed_dir, our_dir) = (fixture_copy(), fixture_copy());
    let http = reqwest::Client::new();
    for r in table() {
        let (seed_status, seed_v) = send(&http, &seed.url, &r, seed_dir.path()).await;
        let what = format!("{} {} {}", r.method, r.path, r.body.unwrap_or(""));
        // The recording is what the seed really answers.
        assert_eq!(seed_status, r.seed_status, "seed {what}: {seed_v}");
        if seed_status >= 400 {
            assert!(is_error_shape(&seed_v), "seed {what}: {seed_v}");
        } else if let Err(e) = fits(&shape(&seed_v), &r.seed_shape, "seed") {
            panic!("seed {what}: {e}; answer {seed_v}");
        }
        // meshbox, side by side, against the live answer.
        let (status, v) = send(&http, &d.url, &r, our_dir.path()).await;
        check_ours(&r, seed_status, &shape(&seed_v), status, &v);
    }
}
