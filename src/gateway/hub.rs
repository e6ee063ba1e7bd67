//! Fan-out of server notifications that belong to no call: one task per
//! endpoint that somebody listens to (a handshake-era session's GET stream,
//! or a stateless client's `subscriptions/listen` stream).
//!
//! list_changed goes to every listener that wants it, `resources/updated` to
//! those subscribed to its URI, `notifications/message` to handshake-era
//! sessions. A hub reads its services' notifications from their
//! [`Followers`](super::follow::Followers) (which follow them through
//! restarts); a service endpoint's hub announces list_changed when its
//! service comes up anew, a mesh endpoint's hub when one of the mesh's
//! services comes up or goes down. A hub ends when nobody listens any more.
//! Queues are bounded: a slow listener loses notifications, never slows the
//! others.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use super::bridge::AbortOnDrop;
use super::follow::Followers;
use super::names;
use super::protocol::META_SUBSCRIPTION_ID;
use super::route::Endpoint;
use super::sessions::Sessions;
use super::upstream::{ServiceKey, Upstreams};

/// A stateless client's `subscriptions/listen` stream.
pub struct Listener {
    pub tx: mpsc::Sender<Value>,
    pub subscription_id: Value,
    pub tools: bool,
    pub prompts: bool,
    pub resources: bool,
    pub uris: HashSet<String>,
}

impl Listener {
    fn wants(&self, method: &str, uri: Option<&str>) -> bool {
        match method {
            "notifications/tools/list_changed" => self.tools,
            "notifications/prompts/list_changed" => self.prompts,
            "notifications/resources/list_changed" => self.resources,
            "notifications/resources/updated" => uri.is_some_and(|u| self.uris.contains(u)),
            _ => false,
        }
    }
}

#[derive(Default)]
struct Set {
    /// Set (under the lock) when the hub decided nobody listens and ends.
    closed: bool,
    list: Vec<Listener>,
}

pub struct Hub {
    listeners: Arc<Mutex<Set>>,
    _task: AbortOnDrop<()>,
}

const LIST_CHANGED: [&str; 3] = [
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/list_changed",
];

/// How often an idle hub checks whether anybody still listens.
const IDLE_CHECK: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Fanout {
    endpoint: Endpoint,
    sessions: Arc<Sessions>,
    listeners: Arc<Mutex<Set>>,
}

impl Fanout {
    /// Whether anybody listens; if not, the hub is closed for good.
    fn anybody(&self) -> bool {
        let mut set = self.listeners.lock().expect("poisoned");
        set.list.retain(|x| !x.tx.is_closed());
        let any = !set.list.is_empty()
            || self
                .sessions
                .of(&self.endpoint)
                .iter()
                .any(|s| s.has_stream());
        if !any {
            set.closed = true;
        }
        any
    }

    fn dispatch(&self, msg: &Value) {
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            return;
        };
        let uri = msg.pointer("/params/uri").and_then(Value::as_str);
        for s in self.sessions.of(&self.endpoint) {
            if method == "notifications/resources/updated" {
                let subscribed =
                    uri.is_some_and(|u| s.subscriptions.lock().expect("poisoned").contains_key(u));
                if !subscribed {
                    continue;
                }
            }
            s.push(msg.clone());
        }
        let mut set = self.listeners.lock().expect("poisoned");
        set.list.retain(|l| !l.tx.is_closed());
        for l in set.list.iter().filter(|l| l.wants(method, uri)) {
            let mut m = msg.clone();
            if !m.get("params").is_some_and(Value::is_object) {
                m["params"] = json!({});
            }
            let params = m["params"].as_object_mut().expect("just made an object");
            let meta = params.entry("_meta").or_insert_with(|| json!({}));
            if let Some(meta) = meta.as_object_mut() {
                meta.insert(META_SUBSCRIPTION_ID.into(), l.subscription_id.clone());
            }
            let _ = l.tx.try_send(m);
        }
    }

    fn list_changed(&self) {
        for m in LIST_CHANGED {
            self.dispatch(&json!({ "jsonrpc": "2.0", "method": m }));
        }
    }
}

impl Hub {
    pub fn start(
        endpoint: Endpoint,
        upstreams: Arc<dyn Upstreams>,
        followers: Arc<Followers>,
        sessions: Arc<Sessions>,
    ) -> Arc<Hub> {
        let listeners = Arc::new(Mutex::new(Set::default()));
        let fan = Fanout {
            endpoint: endpoint.clone(),
            sessions,
            listeners: listeners.clone(),
        };
        let task = match endpoint {
            Endpoint::Service(key) => tokio::spawn(service_hub(key, upstreams, followers, fan)),
            Endpoint::Mesh(mesh) => tokio::spawn(mesh_hub(mesh, upstreams, followers, fan)),
        };
        Arc::new(Hub {
            listeners,
            _task: AbortOnDrop(task),
        })
    }

    /// Whether the hub still serves (it ends once nobody listens).
    pub fn is_running(&self) -> bool {
        !self.listeners.lock().expect("poisoned").closed
    }

    /// Adds a listener; gives it back if this hub has closed meanwhile.
    pub fn listen(&self, l: Listener) -> Result<(), Listener> {
        let mut set = self.listeners.lock().expect("poisoned");
        if set.closed {
            return Err(l);
        }
        set.list.push(l);
        Ok(())
    }
}

/// Dispatches one follower's notifications until it ends; `prefix`
/// rewrites resource URIs for a mesh.
async fn relay(mut rx: broadcast::Receiver<Arc<Value>>, fan: &Fanout, prefix: Option<&str>) {
    loop {
        match rx.recv().await {
            Ok(m) => fan.dispatch(&prefixed(&m, prefix)),
            // Missed some: whatever changed, lists must be fetched again.
            Err(broadcast::error::RecvError::Lagged(_)) => fan.list_changed(),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn prefixed(m: &Value, prefix: Option<&str>) -> Value {
    let mut m = m.clone();
    if let (Some(svc), Some(uri)) = (prefix, m.pointer("/params/uri").and_then(Value::as_str)) {
        let exposed = names::encode(svc, uri);
        m["params"]["uri"] = json!(exposed);
    }
    m
}

async fn service_hub(
    key: ServiceKey,
    upstreams: Arc<dyn Upstreams>,
    followers: Arc<Followers>,
    fan: Fanout,
) {
    let mut events = upstreams.events();
    let mut check = tokio::time::interval(IDLE_CHECK);
    check.tick().await;
    loop {
        let relayed = relay(followers.receiver(&key), &fan, None);
        tokio::pin!(relayed);
        loop {
            tokio::select! {
                // The follower ended (it cannot while this hub listens, but if so: a new one).
                _ = &mut relayed => break,
                ev = events.recv() => match ev {
                    // A new server process: its lists may differ.
                    Ok(ev) if ev.key == key && ev.up => fan.list_changed(),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => fan.list_changed(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = check.tick() => {
                    if !fan.anybody() {
                        return;
                    }
                }
            }
        }
    }
}

async fn mesh_hub(
    mesh: String,
    upstreams: Arc<dyn Upstreams>,
    followers: Arc<Followers>,
    fan: Fanout,
) {
    let mut events = upstreams.events();
    let mut check = tokio::time::interval(IDLE_CHECK);
    let mut relays: HashMap<String, AbortOnDrop<()>> = HashMap::new();
    let sync = |relays: &mut HashMap<String, AbortOnDrop<()>>| {
        let running = upstreams.running(&mesh);
        relays.retain(|name, r| running.contains(name) && !r.0.is_finished());
        for name in running {
            if relays.contains_key(&name) {
                continue;
            }
            let key = ServiceKey {
                mesh: mesh.clone(),
                name: name.clone(),
            };
            let rx = followers.receiver(&key);
            let fan2 = fan.clone();
            let task = tokio::spawn(async move { relay(rx, &fan2, Some(&key.name)).await });
            relays.insert(name, AbortOnDrop(task));
        }
    };
    sync(&mut relays);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) if ev.key.mesh == mesh => {
                    sync(&mut relays);
                    fan.list_changed();
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    sync(&mut relays);
                    fan.list_changed();
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = check.tick() => {
                if !fan.anybody() {
                    return;
                }
                sync(&mut relays);
            }
        }
    }
}
