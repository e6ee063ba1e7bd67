//! Session behaviour over `tokio::io::duplex`, against a scripted fake server.

use std::sync::Mutex;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

use super::*;

/// The server end of a session under test: reads requests, writes anything.
struct Fake {
    lines: Lines<BufReader<DuplexStream>>,
    out: DuplexStream,
}

impl Fake {
    async fn recv(&mut self) -> Value {
        let line = self
            .lines
            .next_line()
            .await
            .unwrap()
            .expect("client closed");
        serde_json::from_str(&line).unwrap()
    }
    async fn send_raw(&mut self, s: &str) {
        self.out.write_all(s.as_bytes()).await.unwrap();
        self.out.write_all(b"\n").await.unwrap();
    }
    async fn send(&mut self, v: Value) {
        self.send_raw(&v.to_string()).await;
    }
    async fn reply(&mut self, id: &Value, result: Value) {
        self.send(json!({"jsonrpc": "2.0", "id": id, "result": result}))
            .await;
    }
    async fn error(&mut self, id: &Value, code: i64, message: &str) {
        self.send(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
            .await;
    }
    /// Answers initialize (with `version`), expects initialized, answers tools/list.
    async fn handshake(&mut self, version: &str) {
        let init = self.recv().await;
        assert_eq!(init["method"], "initialize");
        assert_eq!(
            init["params"]["protocolVersion"],
            protocol::LATEST_HANDSHAKE_VERSION
        );
        self.reply(
            &init["id"],
            json!({"protocolVersion": version, "capabilities": {}}),
        )
        .await;
        let n = self.recv().await;
        assert_eq!(n["method"], "notifications/initialized");
        assert!(n.get("id").is_none());
        let list = self.recv().await;
        self.reply(&list["id"], json!({"tools": [{"name": "t"}]}))
            .await;
    }
}

type Logs = Arc<Mutex<Vec<(LogStream, String)>>>;

struct Harness {
    session: Arc<Session>,
    fake: Fake,
    exit: watch::Sender<Option<ExitReason>>,
    logs: Logs,
}

fn start_with(config: SessionConfig, pipe: usize) -> Harness {
    let (client_w, server_r) = tokio::io::duplex(pipe);
    let (server_w, client_r) = tokio::io::duplex(1 << 20);
    let (exit_tx, exit_rx) = watch::channel(None);
    let logs: Logs = Arc::default();
    let sink = {
        let logs = logs.clone();
        Arc::new(move |s: LogStream, l: &str| logs.lock().unwrap().push((s, l.to_owned())))
    };
    let session = Session::start(client_r, client_w, exit_rx, sink, config);
    Harness {
        session: Arc::new(session),
        fake: Fake {
            lines: BufReader::new(server_r).lines(),
            out: server_w,
        },
        exit: exit_tx,
        logs,
    }
}

fn config(max_line: usize) -> SessionConfig {
    SessionConfig {
        max_line,
        roots: vec![json!({"uri": "file:///data", "name": "data"})],
        exit_grace: Duration::from_millis(100),
        ..Default::default()
    }
}

fn start(max_line: usize) -> Harness {
    start_with(config(max_line), 1 << 20)
}

const T: Duration = Duration::from_secs(5);

async fn connected(version: &str) -> Harness {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(Some(Protocol::Handshake), T).await });
    h.fake.handshake(version).await;
    connect.await.unwrap().unwrap();
    h
}

#[tokio::test]
async fn handshake_accepts_an_older_version_and_pages_tools() {
    let h = start(1 << 20);
    let s = h.session.clone();
    let server = tokio::spawn(async move {
        let mut f = h.fake;
        let init = f.recv().await;
        let caps = &init["params"]["capabilities"];
        assert!(caps.get("elicitation").is_some() && caps.get("sampling").is_some());
        f.reply(&init["id"], json!({"protocolVersion": "2024-11-05", "capabilities": {"tools": {}}, "serverInfo": {"name": "x"}, "instructions": "be nice"})).await;
        assert_eq!(f.recv().await["method"], "notifications/initialized");
        let p1 = f.recv().await;
        assert_eq!(p1["params"], json!({}));
        f.reply(
            &p1["id"],
            json!({"tools": [{"name": "a"}], "nextCursor": "c1"}),
        )
        .await;
        let p2 = f.recv().await;
        assert_eq!(p2["params"]["cursor"], "c1");
        f.reply(
            &p2["id"],
            json!({"tools": [{"name": "b"}, {"name": "c", "x-extra": 1}]}),
        )
        .await;
        f
    });
    let info = s.connect(Some(Protocol::Handshake), T).await.unwrap();
    assert_eq!(info.protocol, Protocol::Handshake);
    assert_eq!(info.protocol_version, "2024-11-05");
    assert_eq!(info.server_info["name"], "x");
    assert_eq!(info.instructions.as_deref(), Some("be nice"));
    let tools = s.tools();
    let names: Vec<_> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(tools[2]["x-extra"], 1, "unknown fields pass through");
    server.await.unwrap();
}

#[tokio::test]
async fn unsupported_version_is_refused_naming_the_step() {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    tokio::spawn(async move {
        let init = h.fake.recv().await;
        h.fake
            .reply(&init["id"], json!({"protocolVersion": "1999-01-01"}))
            .await;
        h.fake
    });
    let err = s.connect(Some(Protocol::Handshake), T).await.unwrap_err();
    let chain = crate::error_chain(&err);
    assert!(
        chain.contains("initialize") && chain.contains("1999-01-01"),
        "{chain}"
    );
}

#[tokio::test]
async fn tools_list_failure_names_its_step() {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    tokio::spawn(async move {
        let f = &mut h.fake;
        let init = f.recv().await;
        f.reply(&init["id"], json!({"protocolVersion": "2025-06-18"}))
            .await;
        f.recv().await;
        let list = f.recv().await;
        f.error(&list["id"], -32603, "no tools today").await;
        h.fake
    });
    let err = s.connect(Some(Protocol::Handshake), T).await.unwrap_err();
    let chain = crate::error_chain(&err);
    assert!(chain.starts_with("MCP tools/list failed"), "{chain}");
    assert!(chain.contains("no tools today"), "{chain}");
}

#[tokio::test]
async fn concurrent_calls_matched_out_of_order() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    let server = tokio::spawn(async move {
        let mut reqs = Vec::new();
        for _ in 0..20 {
            reqs.push(f.recv().await);
        }
        // Answer newest first.
        for r in reqs.iter().rev() {
            let n = r["params"]["arguments"]["n"].clone();
            f.reply(&r["id"], json!({"n": n})).await;
        }
        f
    });
    let calls = (0..20).map(|i| {
        let s = h.session.clone();
        async move { s.call_tool("t", json!({"n": i}), T).await.unwrap()["n"].clone() }
    });
    let got = futures_util::future::join_all(calls).await;
    assert_eq!(got, (0..20).map(|i| json!(i)).collect::<Vec<_>>());
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn timeout_sends_cancelled_and_session_lives_on() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    let server = tokio::spawn(async move {
        let hung = f.recv().await;
        let cancel = f.recv().await;
        assert_eq!(cancel["method"], "notifications/cancelled");
        assert_eq!(cancel["params"]["requestId"], hung["id"]);
        // A late reply to the cancelled request is ignored.
        f.reply(&hung["id"], json!({"late": true})).await;
        let next = f.recv().await;
        f.reply(&next["id"], json!({"ok": true})).await;
        f
    });
    let s = &h.session;
    let err = s
        .call_tool("hang", json!({}), Duration::from_secs(25))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout(d) if d == Duration::from_secs(25)));
    let ok = s.call_tool("t", json!({}), T).await.unwrap();
    assert_eq!(ok["ok"], true);
    assert_eq!(s.in_flight(), 0);
    server.await.unwrap();
}

#[tokio::test]
async fn dropping_a_call_cancels_it_upstream() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    let s = h.session.clone();
    let call = tokio::spawn(async move { s.call_tool("slow", json!({}), T).await });
    let req = f.recv().await;
    call.abort();
    let cancel = f.recv().await;
    assert_eq!(cancel["method"], "notifications/cancelled");
    assert_eq!(cancel["params"]["requestId"], req["id"]);
    assert_eq!(h.session.in_flight(), 0);
}

/// A server that stops reading its stdin: a large request times out at its
/// deadline (queueing and writing included), and so does every later call;
/// nothing hangs.
#[tokio::test(start_paused = true)]
async fn a_server_that_stops_reading_cannot_wedge_calls() {
    let mut h = start_with(config(1 << 20), 4096);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(Some(Protocol::Handshake), T).await });
    h.fake.handshake("2025-11-25").await;
    connect.await.unwrap().unwrap();
    // The fake never reads again.
    let big = "x".repeat(300 * 1024);
    let t0 = Instant::now();
    let err = h
        .session
        .call_tool("echo", json!({"text": big}), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err}");
    assert!(
        t0.elapsed() <= Duration::from_millis(1100),
        "{:?}",
        t0.elapsed()
    );
    let t1 = Instant::now();
    let err = h
        .session
        .call_tool("echo", json!({}), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err}");
    assert!(t1.elapsed() <= Duration::from_millis(2100));
    let err = h.session.probe(Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err}");
    // The reader is not blocked: the server dying still fails calls at once.
    let s = h.session.clone();
    let pending =
        tokio::spawn(async move { s.call_tool("x", json!({}), Duration::from_secs(60)).await });
    tokio::task::yield_now().await;
    h.exit.send_replace(Some(ExitReason {
        code: Some(1),
        ..Default::default()
    }));
    drop(h.fake);
    let t2 = Instant::now();
    assert!(matches!(pending.await.unwrap(), Err(CallError::Exited(_))));
    assert!(t2.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn answers_server_requests_nobody_else_can() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    f.send(json!({"jsonrpc": "2.0", "id": "p1", "method": "ping"}))
        .await;
    let a = f.recv().await;
    assert_eq!(
        (a["id"].clone(), a["result"].clone()),
        (json!("p1"), json!({}))
    );
    f.send(json!({"jsonrpc": "2.0", "id": 7, "method": "roots/list"}))
        .await;
    let a = f.recv().await;
    assert_eq!(a["result"]["roots"][0]["uri"], "file:///data");
    f.send(json!({"jsonrpc": "2.0", "id": 8, "method": "sampling/createMessage", "params": {}}))
        .await;
    let a = f.recv().await;
    assert_eq!(a["id"], 8);
    assert_eq!(a["error"]["code"], -32601);
}

/// 100k pings from a server that does not read: answers beyond the queue
/// are dropped, so meshbox holds at most the queue, and the session lives.
#[tokio::test]
async fn a_ping_flood_while_not_reading_stays_bounded() {
    let mut c = config(1 << 20);
    c.queue_len = 64;
    let mut h = start_with(c, 4096);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(Some(Protocol::Handshake), T).await });
    h.fake.handshake("2025-11-25").await;
    connect.await.unwrap().unwrap();
    let mut flood = String::new();
    for i in 0..100_000 {
        flood.push_str(&format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"ping\"}}\n"
        ));
    }
    h.fake.out.write_all(flood.as_bytes()).await.unwrap();
    // Now read what was queued: bounded by the queue (plus what the pipe held).
    let mut answered = 0;
    while let Ok(Ok(Some(_))) =
        tokio::time::timeout(Duration::from_millis(300), h.fake.lines.next_line()).await
    {
        answered += 1;
    }
    assert!(answered > 0 && answered <= 64 + 200, "answered {answered}");
    // Still usable.
    let s = h.session.clone();
    let call = tokio::spawn(async move { s.call_tool("t", json!({}), T).await });
    let r = h.fake.recv().await;
    h.fake.reply(&r["id"], json!({"ok": 1})).await;
    assert_eq!(call.await.unwrap().unwrap()["ok"], 1);
}

#[tokio::test]
async fn progress_reaches_the_caller_with_its_own_token() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    let (tx, mut rx) = mpsc::channel(8);
    let s = h.session.clone();
    let call = tokio::spawn(async move {
        let mut opts = CallOptions::timeout(T);
        opts.progress = Some(tx);
        s.request(
            "tools/call",
            Some(json!({"name": "long", "_meta": {"progressToken": "client-tok"}})),
            opts,
        )
        .await
    });
    let req = f.recv().await;
    let upstream_token = req["params"]["_meta"]["progressToken"].clone();
    assert_eq!(
        upstream_token, req["id"],
        "rewritten to a session-unique token"
    );
    f.send(json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": upstream_token, "progress": 1, "total": 2}})).await;
    // Progress for a token nobody holds goes nowhere.
    f.send(json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 12345, "progress": 1}})).await;
    let p = rx.recv().await.unwrap();
    assert_eq!(p["progressToken"], "client-tok");
    assert_eq!(p["progress"], 1);
    f.reply(&req["id"], json!({"done": true})).await;
    assert_eq!(call.await.unwrap().unwrap()["done"], true);
    assert!(rx.try_recv().is_err());
}

struct Peer {
    id: u64,
    asked: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl ClientPeer for Peer {
    fn client_id(&self) -> u64 {
        self.id
    }
    async fn request(&self, method: &str, _params: Option<Value>) -> Result<Value, RpcError> {
        self.asked.lock().unwrap().push(method.to_owned());
        Ok(json!({"action": "accept", "content": {"from": self.id}}))
    }
}

#[tokio::test]
async fn server_requests_reach_the_client_whose_call_caused_them() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    let peers: Vec<Arc<Peer>> = (1..=2)
        .map(|id| {
            Arc::new(Peer {
                id,
                asked: Mutex::default(),
            })
        })
        .collect();
    let call = |peer: Arc<Peer>| {
        let s = h.session.clone();
        tokio::spawn(async move {
            let mut opts = CallOptions::timeout(T);
            opts.peer = Some(peer);
            s.request("tools/call", Some(json!({"name": "ask"})), opts)
                .await
        })
    };
    // One call in flight: its client is asked.
    let c1 = call(peers[0].clone());
    let r1 = f.recv().await;
    f.send(json!({"jsonrpc": "2.0", "id": "s1", "method": "elicitation/create", "params": {"message": "?"}})).await;
    let a = f.recv().await;
    assert_eq!(
        (a["id"].clone(), a["result"]["content"]["from"].clone()),
        (json!("s1"), json!(1))
    );
    // Two clients in flight: a related-request id picks the right one.
    let c2 = call(peers[1].clone());
    let r2 = f.recv().await;
    f.send(json!({"jsonrpc": "2.0", "id": "s2", "method": "elicitation/create", "params": {"_meta": {"io.modelcontextprotocol/related-request-id": r2["id"]}}})).await;
    let a = f.recv().await;
    assert_eq!(a["result"]["content"]["from"], 2);
    // Without one it is ambiguous: meshbox answers with an error, asks no one.
    f.send(json!({"jsonrpc": "2.0", "id": "s3", "method": "sampling/createMessage", "params": {}}))
        .await;
    let a = f.recv().await;
    assert_eq!(a["id"], "s3");
    assert!(a["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sampling/createMessage"));
    f.reply(&r1["id"], json!({})).await;
    f.reply(&r2["id"], json!({})).await;
    c1.await.unwrap().unwrap();
    c2.await.unwrap().unwrap();
    assert_eq!(peers[0].asked.lock().unwrap().len(), 1);
    assert_eq!(peers[1].asked.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn list_changed_refreshes_tools_and_is_broadcast() {
    let h = connected("2025-11-25").await;
    let mut notes = h.session.notifications();
    let mut f = h.fake;
    f.send(json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}))
        .await;
    let list = f.recv().await;
    assert_eq!(list["method"], "tools/list");
    f.reply(
        &list["id"],
        json!({"tools": [{"name": "t"}, {"name": "new"}]}),
    )
    .await;
    let n = notes.recv().await.unwrap();
    assert_eq!(n["method"], "notifications/tools/list_changed");
    for _ in 0..200 {
        if h.session.tools().len() == 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("tool list not refreshed: {:?}", h.session.tools());
}

#[tokio::test]
async fn oversized_notifications_are_logged_not_broadcast() {
    let mut c = config(1 << 20);
    c.max_notification = 1024;
    let mut h = start_with(c, 1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(Some(Protocol::Handshake), T).await });
    h.fake.handshake("2025-11-25").await;
    connect.await.unwrap().unwrap();
    let mut notes = h.session.notifications();
    let big = "y".repeat(4096);
    h.fake
        .send(json!({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": big}}))
        .await;
    h.fake
        .send(json!({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": "file:///a"}}))
        .await;
    let n = notes.recv().await.unwrap();
    assert_eq!(n["params"]["uri"], "file:///a");
    assert!(h
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|(s, l)| *s == LogStream::Meshbox && l.contains("not forwarded")));
}

#[tokio::test]
async fn garbage_and_oversized_lines_go_to_logs() {
    let mut h = start(1024);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(Some(Protocol::Handshake), T).await });
    h.fake.handshake("2025-11-25").await;
    connect.await.unwrap().unwrap();
    let s = h.session.clone();
    let call = tokio::spawn(async move { s.call_tool("t", json!({}), T).await });
    let r = h.fake.recv().await;
    h.fake.send_raw("starting up... not json").await;
    h.fake.send_raw(&"y".repeat(5000)).await;
    h.fake.send_raw("[1,2,3]").await;
    h.fake.reply(&r["id"], json!({"fine": true})).await;
    assert_eq!(call.await.unwrap().unwrap()["fine"], true);
    let logs = h.logs.lock().unwrap().clone();
    assert!(
        logs.contains(&(LogStream::Stdout, "starting up... not json".into())),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|(s, l)| *s == LogStream::Meshbox && l.contains("5000 bytes")),
        "{logs:?}"
    );
    assert!(logs.contains(&(LogStream::Stdout, "[1,2,3]".into())));
}

#[tokio::test]
async fn pending_calls_fail_at_once_when_the_server_dies() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    let s = h.session.clone();
    let call =
        tokio::spawn(async move { s.call_tool("t", json!({}), Duration::from_secs(60)).await });
    let _ = f.recv().await;
    let started = std::time::Instant::now();
    h.exit.send_replace(Some(ExitReason {
        code: None,
        signal: Some(9),
        oom_killed: true,
    }));
    drop(f);
    let err = call.await.unwrap().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    match &err {
        CallError::Exited(r) => assert!(r.oom_killed),
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("out of memory"), "{err}");
    // Later calls fail at once with the same reason.
    let again = h.session.call_tool("t", json!({}), T).await.unwrap_err();
    assert!(matches!(again, CallError::Exited(_)), "{again:?}");
    assert!(matches!(h.session.closed().await, CallError::Exited(_)));
}

/// stdout closed while the process lives on: calls fail at once, not after
/// their timeout.
#[tokio::test]
async fn stdout_closed_fails_calls_at_once() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    let s = h.session.clone();
    let call =
        tokio::spawn(async move { s.call_tool("t", json!({}), Duration::from_secs(60)).await });
    let _ = f.recv().await;
    let started = std::time::Instant::now();
    drop(f.out);
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::StdoutClosed), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(
        h.session.call_tool("t", json!({}), T).await,
        Err(CallError::StdoutClosed)
    ));
}

#[tokio::test]
async fn rpc_errors_carry_code_and_message() {
    let h = connected("2025-11-25").await;
    let mut f = h.fake;
    tokio::spawn(async move {
        let r = f.recv().await;
        f.send(json!({"jsonrpc": "2.0", "id": r["id"], "error": {"code": -32000, "message": "boom", "data": {"k": 1}}})).await;
        f
    });
    match h.session.call_tool("t", json!({}), T).await.unwrap_err() {
        CallError::Rpc {
            code,
            message,
            data,
        } => {
            assert_eq!((code, message.as_str()), (-32000, "boom"));
            assert_eq!(data.unwrap()["k"], 1);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn tool_lists_are_bounded() {
    let mut c = config(1 << 20);
    c.max_tools = 3;
    let mut h = start_with(c, 1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(Some(Protocol::Handshake), T).await });
    let f = &mut h.fake;
    let init = f.recv().await;
    f.reply(&init["id"], json!({"protocolVersion": "2025-11-25"}))
        .await;
    f.recv().await;
    let p1 = f.recv().await;
    f.reply(
        &p1["id"],
        json!({"tools": [{"name": "a"}, {"name": "b"}], "nextCursor": "2"}),
    )
    .await;
    let p2 = f.recv().await;
    f.reply(&p2["id"], json!({"tools": [{"name": "c"}, {"name": "d"}]}))
        .await;
    let err = connect.await.unwrap().unwrap_err();
    let chain = crate::error_chain(&err);
    assert!(chain.contains("tool list is larger"), "{chain}");
}

// ---- protocol eras -------------------------------------------------------

#[tokio::test]
async fn auto_detects_a_stateless_server_and_adds_meta() {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(None, T).await });
    let f = &mut h.fake;
    let d = f.recv().await;
    assert_eq!(d["method"], "server/discover");
    assert_eq!(
        d["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
        "2026-07-28"
    );
    f.reply(&d["id"], json!({"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "serverInfo": {"name": "modern"}, "resultType": "complete"})).await;
    let list = f.recv().await;
    assert_eq!(list["method"], "tools/list");
    let m = &list["params"]["_meta"];
    assert_eq!(m["io.modelcontextprotocol/protocolVersion"], "2026-07-28");
    assert_eq!(m["io.modelcontextprotocol/clientInfo"]["name"], "meshbox");
    assert!(m["io.modelcontextprotocol/clientCapabilities"].is_object());
    f.reply(
        &list["id"],
        json!({"tools": [{"name": "t"}], "resultType": "complete"}),
    )
    .await;
    let info = connect.await.unwrap().unwrap();
    assert_eq!(info.protocol, Protocol::Stateless);
    assert_eq!(info.server_info["name"], "modern");
    // Every later request carries `_meta`; the caller's own entries win.
    let s = h.session.clone();
    let call = tokio::spawn(async move {
        s.request(
            "tools/call",
            Some(json!({"name": "t", "_meta": {"io.modelcontextprotocol/clientInfo": {"name": "inspector"}}})),
            CallOptions::timeout(T),
        )
        .await
    });
    let r = h.fake.recv().await;
    assert_eq!(
        r["params"]["_meta"]["io.modelcontextprotocol/clientInfo"]["name"],
        "inspector"
    );
    assert_eq!(
        r["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
        "2026-07-28"
    );
    h.fake
        .reply(&r["id"], json!({"resultType": "complete"}))
        .await;
    call.await.unwrap().unwrap();
    // Liveness of a stateless server is a discover, not a ping.
    let s = h.session.clone();
    let probe = tokio::spawn(async move { s.probe(T).await });
    let p = h.fake.recv().await;
    assert_eq!(p["method"], "server/discover");
    h.fake
        .reply(&p["id"], json!({"supportedVersions": ["2026-07-28"]}))
        .await;
    probe.await.unwrap().unwrap();
}

#[tokio::test]
async fn auto_falls_back_to_the_handshake_on_an_error() {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(None, T).await });
    let d = h.fake.recv().await;
    assert_eq!(d["method"], "server/discover");
    h.fake.error(&d["id"], -32601, "method not found").await;
    h.fake.handshake("2025-06-18").await;
    let info = connect.await.unwrap().unwrap();
    assert_eq!(info.protocol, Protocol::Handshake);
    // Handshake-era requests get no `_meta`.
    let s = h.session.clone();
    let call = tokio::spawn(async move { s.call_tool("t", json!({}), T).await });
    let r = h.fake.recv().await;
    assert!(r["params"].get("_meta").is_none(), "{r}");
    h.fake.reply(&r["id"], json!({})).await;
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_probe_means_the_handshake_era() {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(None, Duration::from_secs(30)).await });
    let d = h.fake.recv().await;
    assert_eq!(d["method"], "server/discover");
    // No answer: after the probe's few seconds, initialize follows.
    let init = h.fake.recv().await;
    assert_eq!(init["method"], "initialize");
    h.fake
        .reply(&init["id"], json!({"protocolVersion": "2025-11-25"}))
        .await;
    h.fake.recv().await;
    let list = h.fake.recv().await;
    h.fake.reply(&list["id"], json!({"tools": []})).await;
    assert_eq!(
        connect.await.unwrap().unwrap().protocol,
        Protocol::Handshake
    );
}

#[tokio::test]
async fn exiting_on_the_probe_is_reported_as_such() {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(None, T).await });
    let d = h.fake.recv().await;
    assert_eq!(d["method"], "server/discover");
    h.exit.send_replace(Some(ExitReason {
        code: Some(1),
        ..Default::default()
    }));
    drop(h.fake);
    match connect.await.unwrap().unwrap_err() {
        ConnectError::ExitedDuringProbe(r) => assert_eq!(r.code, Some(1)),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_pinned_stateless_server_must_say_so() {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(Some(Protocol::Stateless), T).await });
    let d = h.fake.recv().await;
    h.fake
        .reply(&d["id"], json!({"supportedVersions": ["2025-11-25"]}))
        .await;
    let err = connect.await.unwrap().unwrap_err();
    assert!(
        crate::error_chain(&err).contains("server/discover"),
        "{err}"
    );
}

/// A stateless server too slow to answer the probe in time answers it late
/// and refuses the `initialize` that followed with -32022: meshbox asks again.
#[tokio::test(start_paused = true)]
async fn a_slow_stateless_server_is_still_detected() {
    let mut h = start(1 << 20);
    let s = h.session.clone();
    let connect = tokio::spawn(async move { s.connect(None, Duration::from_secs(30)).await });
    let d = h.fake.recv().await;
    assert_eq!(d["method"], "server/discover");
    let init = h.fake.recv().await;
    assert_eq!(init["method"], "initialize");
    // Now awake: the late answer to the probe, then a refusal of initialize.
    h.fake
        .reply(&d["id"], json!({"supportedVersions": ["2026-07-28"]}))
        .await;
    h.fake
        .error(
            &init["id"],
            -32022,
            "connection is serving the 2026-07-28 protocol",
        )
        .await;
    let again = h.fake.recv().await;
    assert_eq!(again["method"], "server/discover");
    h.fake
        .reply(
            &again["id"],
            json!({"supportedVersions": ["2026-07-28"], "capabilities": {}}),
        )
        .await;
    let list = h.fake.recv().await;
    assert!(list["params"]["_meta"].is_object());
    h.fake.reply(&list["id"], json!({"tools": []})).await;
    assert_eq!(
        connect.await.unwrap().unwrap().protocol,
        Protocol::Stateless
    );
}
