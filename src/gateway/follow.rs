//! One follower per service that somebody listens to or subscribes on: the
//! gateway's single line to that server for everything that belongs to no
//! call.
//!
//! A follower relays the server's notifications (list_changed,
//! `resources/updated`, `notifications/message`) to the endpoint hubs that
//! listen, through one bounded broadcast, and keeps the server's resource
//! subscriptions equal to the union of what the gateway's clients want:
//! - a handshake-era server gets `resources/subscribe` when the first client
//!   wants a URI and `resources/unsubscribe` when the last one lets go, and
//!   every wanted URI again when its process is replaced;
//! - a stateless server sends change notifications only on a
//!   `subscriptions/listen` stream, so the follower keeps one open upstream,
//!   asking for every list_changed the server offers and for the wanted URIs,
//!   and opens it anew when the wanted set changes.
//!
//! It follows its service through restarts and ends once nobody listens and
//! nothing is subscribed. It never talks to a process: only to the
//! [`Upstream`] the registry hands out.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, oneshot, Notify};
use tokio::time::Instant;
use tracing::debug;

use super::bridge::AbortOnDrop;
use super::protocol::{rpc_error, INTERNAL_ERROR, META_SUBSCRIPTION_ID};
use super::route::to_rpc_error;
use super::upstream::{
    CallOptions, Protocol, RpcError, ServiceKey, Upstream, UpstreamError, Upstreams,
};

/// How often an idle follower checks whether anybody still needs it, and
/// how long it waits for a service that is not running before looking again.
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// An upstream `subscriptions/listen` is opened anew after this long.
const LISTEN_TTL: Duration = Duration::from_secs(3600);
/// Notifications a slow hub may fall behind by before it resyncs.
const RELAY_CAPACITY: usize = 256;
/// URIs one service is subscribed to for the gateway's clients, at most.
pub const MAX_URIS_PER_SERVICE: usize = 4096;

const LIST_CHANGED: [&str; 3] = [
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/list_changed",
];
const ACKNOWLEDGED: &str = "notifications/subscriptions/acknowledged";

/// What a client waiting for its subscription learns.
pub type Outcome = oneshot::Receiver<Result<(), RpcError>>;

#[derive(Default)]
struct State {
    /// Set (under the lock) when the follower decided nobody needs it.
    closed: bool,
    /// URI → how many clients want it.
    wanted: HashMap<String, usize>,
    /// Clients whose subscription made a URI wanted, waiting for the server.
    waiting: HashMap<String, Vec<oneshot::Sender<Result<(), RpcError>>>>,
}

struct Shared {
    key: ServiceKey,
    tx: broadcast::Sender<Arc<Value>>,
    state: Mutex<State>,
    changed: Notify,
}

/// One client's interest in one URI; dropping it lets go.
pub struct SubGuard {
    shared: Arc<Shared>,
    uri: String,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().expect("poisoned");
        if let Some(n) = st.wanted.get_mut(&self.uri) {
            *n -= 1;
            if *n == 0 {
                st.wanted.remove(&self.uri);
                drop(st);
                self.shared.changed.notify_one();
            }
        }
    }
}

/// The service has [`MAX_URIS_PER_SERVICE`] subscribed URIs already.
#[derive(Debug)]
pub struct SubscriptionsFull;

impl Shared {
    /// Whether anybody needs the follower; if not, it is closed for good.
    fn needed(&self) -> bool {
        let mut st = self.state.lock().expect("poisoned");
        let needed = !st.wanted.is_empty() || self.tx.receiver_count() > 0;
        if !needed {
            st.closed = true;
        }
        needed
    }

    fn wanted(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .state
            .lock()
            .expect("poisoned")
            .wanted
            .keys()
            .cloned()
            .collect();
        w.sort();
        w
    }

    /// Tells the clients waiting for `uris` (all, when `None`) how it went.
    fn settle(&self, uris: Option<&[String]>, outcome: &Result<(), RpcError>) {
        let waiters: Vec<_> = {
            let mut st = self.state.lock().expect("poisoned");
            match uris {
                None => st.waiting.drain().flat_map(|(_, v)| v).collect(),
                Some(uris) => uris
                    .iter()
                    .filter_map(|u| st.waiting.remove(u))
                    .flatten()
                    .collect(),
            }
        };
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
    }

    /// Passes one server notification on, without the upstream's own
    /// subscription id (each listener gets its own).
    fn relay(&self, msg: &Value) {
        let mut m = msg.clone();
        if let Some(meta) = m
            .get_mut("params")
            .and_then(|p| p.get_mut("_meta"))
            .and_then(Value::as_object_mut)
        {
            meta.remove(META_SUBSCRIPTION_ID);
            if meta.is_empty() {
                if let Some(p) = m.get_mut("params").and_then(Value::as_object_mut) {
                    p.remove("_meta");
                }
            }
        }
        let _ = self.tx.send(Arc::new(m));
    }

    /// Missed notifications: whatever changed, lists must be fetched again.
    fn resync(&self) {
        for method in LIST_CHANGED {
            let _ = self
                .tx
                .send(Arc::new(json!({ "jsonrpc": "2.0", "method": method })));
        }
    }
}

/// A follower's state and its task.
type Running = (Arc<Shared>, AbortOnDrop<()>);

/// The followers of all services, started on demand.
pub struct Followers {
    upstreams: Arc<dyn Upstreams>,
    map: Mutex<HashMap<ServiceKey, Running>>,
}

impl Followers {
    pub fn new(upstreams: Arc<dyn Upstreams>) -> Self {
        Followers {
            upstreams,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The running follower of `key`, started if there is none.
    fn shared(&self, key: &ServiceKey) -> Arc<Shared> {
        let mut map = self.map.lock().expect("poisoned");
        if let Some((s, task)) = map.get(key) {
            if !s.state.lock().expect("poisoned").closed && !task.0.is_finished() {
                return s.clone();
            }
        }
        let shared = Arc::new(Shared {
            key: key.clone(),
            tx: broadcast::channel(RELAY_CAPACITY).0,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        });
        let task = tokio::spawn(run(shared.clone(), self.upstreams.clone()));
        map.insert(key.clone(), (shared.clone(), AbortOnDrop(task)));
        shared
    }

    /// The notifications of `key`'s server, for as long as the receiver lives.
    pub fn receiver(&self, key: &ServiceKey) -> broadcast::Receiver<Arc<Value>> {
        loop {
            let shared = self.shared(key);
            let st = shared.state.lock().expect("poisoned");
            // Subscribed under the lock: a closing follower cannot miss it.
            if !st.closed {
                return shared.tx.subscribe();
            }
        }
    }

    /// Registers interest in `uri` of `key`'s server. When nobody wanted it
    /// before, the outcome says whether the server took the subscription.
    pub fn subscribe(
        &self,
        key: &ServiceKey,
        uri: &str,
    ) -> Result<(SubGuard, Option<Outcome>), SubscriptionsFull> {
        loop {
            let shared = self.shared(key);
            let mut st = shared.state.lock().expect("poisoned");
            if st.closed {
                continue;
            }
            let first = !st.wanted.contains_key(uri);
            if first && st.wanted.len() >= MAX_URIS_PER_SERVICE {
                return Err(SubscriptionsFull);
            }
            *st.wanted.entry(uri.to_owned()).or_insert(0) += 1;
            let outcome = first.then(|| {
                let (tx, rx) = oneshot::channel();
                st.waiting.entry(uri.to_owned()).or_default().push(tx);
                rx
            });
            drop(st);
            if first {
                shared.changed.notify_one();
            }
            let guard = SubGuard {
                shared,
                uri: uri.to_owned(),
            };
            return Ok((guard, outcome));
        }
    }
}

/// Why following one server session stopped.
enum Ended {
    /// The session ended or the service came up anew: find its next one.
    Session,
    /// Nobody needs the follower any more.
    Unneeded,
}

async fn run(shared: Arc<Shared>, upstreams: Arc<dyn Upstreams>) {
    let mut events = upstreams.events();
    loop {
        if !shared.needed() {
            return;
        }
        let up = match upstreams
            .upstream(&shared.key, Instant::now() + IDLE_CHECK)
            .await
        {
            Ok(up) => up,
            Err(e) => {
                shared.settle(None, &Err(to_rpc_error(&e)));
                // Not running: look again when it comes up, or a while later.
                let wait = async {
                    loop {
                        match events.recv().await {
                            Ok(ev) if ev.key == shared.key && ev.up => return,
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout(IDLE_CHECK, wait).await;
                continue;
            }
        };
        let timeout = upstreams.call_timeout(&shared.key);
        let ended = match up.protocol() {
            Protocol::Handshake => follow_handshake(&shared, &*up, &mut events, timeout).await,
            Protocol::Stateless => follow_stateless(&shared, &*up, &mut events).await,
        };
        if let Ended::Unneeded = ended {
            return;
        }
    }
}

/// What woke a follower up besides its own work.
enum Wake {
    Note(Arc<Value>),
    Lagged,
    Changed,
    Restarted,
    Tick,
    Gone,
}

async fn next_wake(
    shared: &Shared,
    rx: &mut broadcast::Receiver<Arc<Value>>,
    events: &mut broadcast::Receiver<super::upstream::ServiceEvent>,
    tick: &mut tokio::time::Interval,
) -> Wake {
    tokio::select! {
        biased;
        m = rx.recv() => match m {
            Ok(m) => Wake::Note(m),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                debug!(service = %shared.key, missed = n, "server notifications lagged");
                Wake::Lagged
            }
            Err(broadcast::error::RecvError::Closed) => Wake::Gone,
        },
        _ = shared.changed.notified() => Wake::Changed,
        ev = events.recv() => match ev {
            Ok(ev) if ev.key == shared.key && ev.up => Wake::Restarted,
            Ok(_) => Wake::Tick,
            // Missed events: maybe this service came up anew.
            Err(broadcast::error::RecvError::Lagged(_)) => Wake::Restarted,
            Err(broadcast::error::RecvError::Closed) => Wake::Gone,
        },
        _ = tick.tick() => Wake::Tick,
    }
}

fn idle_ticker() -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(Instant::now() + IDLE_CHECK, IDLE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// A handshake-era session: relays its notifications and keeps its
/// resource subscriptions equal to what is wanted.
async fn follow_handshake(
    shared: &Shared,
    up: &dyn Upstream,
    events: &mut broadcast::Receiver<super::upstream::ServiceEvent>,
    timeout: Duration,
) -> Ended {
    let mut rx = up.notifications();
    let mut tick = idle_ticker();
    // What this server process has been subscribed to; refused URIs are not asked again.
    let mut has: HashSet<String> = HashSet::new();
    let mut refused: HashSet<String> = HashSet::new();
    loop {
        let wanted: HashSet<String> = shared.wanted().into_iter().collect();
        refused.retain(|u| wanted.contains(u));
        for uri in wanted.difference(&has).cloned().collect::<Vec<_>>() {
            if refused.contains(&uri) {
                continue;
            }
            let r = up
                .request(
                    "resources/subscribe",
                    Some(json!({ "uri": uri })),
                    CallOptions::timeout(timeout),
                )
                .await;
            let outcome = match r {
                Ok(_) => {
                    has.insert(uri.clone());
                    Ok(())
                }
                Err(e) => {
                    debug!(service = %shared.key, uri, error = %e, "resources/subscribe failed");
                    if matches!(e, UpstreamError::Unavailable { .. }) {
                        shared.settle(Some(std::slice::from_ref(&uri)), &Err(to_rpc_error(&e)));
                        return Ended::Session;
                    }
                    refused.insert(uri.clone());
                    Err(to_rpc_error(&e))
                }
            };
            shared.settle(Some(std::slice::from_ref(&uri)), &outcome);
        }
        for uri in has.difference(&wanted).cloned().collect::<Vec<_>>() {
            has.remove(&uri);
            let r = up
                .request(
                    "resources/unsubscribe",
                    Some(json!({ "uri": uri })),
                    CallOptions::timeout(timeout),
                )
                .await;
            if let Err(e) = r {
                debug!(service = %shared.key, uri, error = %e, "resources/unsubscribe failed");
            }
        }
        match next_wake(shared, &mut rx, events, &mut tick).await {
            Wake::Note(m) => shared.relay(&m),
            Wake::Lagged => shared.resync(),
            Wake::Changed => {}
            Wake::Restarted | Wake::Gone => return Ended::Session,
            Wake::Tick => {
                if up.is_closed() {
                    return Ended::Session;
                }
                // Unsubscribed from everything above before ending.
                if has.is_empty() && !shared.needed() {
                    return Ended::Unneeded;
                }
            }
        }
    }
}

/// The upstream listen filter: every list_changed the server offers, and
/// the wanted URIs when it offers subscriptions.
fn listen_filter(capabilities: &Value, uris: &[String]) -> Value {
    let offers = |pointer: &str| capabilities.pointer(pointer) == Some(&json!(true));
    let mut n = Map::new();
    for (key, cap) in [
        ("toolsListChanged", "/tools/listChanged"),
        ("promptsListChanged", "/prompts/listChanged"),
        ("resourcesListChanged", "/resources/listChanged"),
    ] {
        if offers(cap) {
            n.insert(key.into(), json!(true));
        }
    }
    if offers("/resources/subscribe") && !uris.is_empty() {
        n.insert("resourceSubscriptions".into(), json!(uris));
    }
    json!({ "notifications": n })
}

/// A stateless session: one upstream `subscriptions/listen`, opened anew
/// whenever the wanted URIs change.
async fn follow_stateless(
    shared: &Shared,
    up: &dyn Upstream,
    events: &mut broadcast::Receiver<super::upstream::ServiceEvent>,
) -> Ended {
    let capabilities = up.info().capabilities;
    let subscribable = capabilities.pointer("/resources/subscribe") == Some(&json!(true));
    let mut rx = up.notifications();
    let mut tick = idle_ticker();
    loop {
        let uris = shared.wanted();
        if !subscribable && !uris.is_empty() {
            shared.settle(
                Some(&uris),
                &Err(rpc_error(
                    INTERNAL_ERROR,
                    "the server does not offer resource subscriptions",
                )),
            );
        }
        let params = listen_filter(&capabilities, &uris);
        let listen = up.request(
            "subscriptions/listen",
            Some(params),
            CallOptions::timeout(LISTEN_TTL),
        );
        tokio::pin!(listen);
        // Whether the listen failed: then wait for a reason to try again.
        let mut failed = false;
        loop {
            let wake = tokio::select! {
                biased;
                r = &mut listen, if !failed => {
                    match r {
                        // Closed by the server (or its TTL): open it again.
                        Ok(_) | Err(UpstreamError::Timeout(_)) => break,
                        Err(e @ UpstreamError::Unavailable { .. }) => {
                            shared.settle(Some(&uris), &Err(to_rpc_error(&e)));
                            return Ended::Session;
                        }
                        Err(e) => {
                            debug!(service = %shared.key, error = %e, "subscriptions/listen failed");
                            shared.settle(Some(&uris), &Err(to_rpc_error(&e)));
                            failed = true;
                            continue;
                        }
                    }
                }
                w = next_wake(shared, &mut rx, events, &mut tick) => w,
            };
            match wake {
                Wake::Note(m) if m.get("method").and_then(Value::as_str) == Some(ACKNOWLEDGED) => {
                    shared.settle(Some(&uris), &Ok(()));
                }
                Wake::Note(m) => shared.relay(&m),
                Wake::Lagged => shared.resync(),
                Wake::Changed => {
                    if shared.wanted() != uris {
                        break;
                    }
                }
                Wake::Restarted | Wake::Gone => return Ended::Session,
                Wake::Tick => {
                    if up.is_closed() {
                        return Ended::Session;
                    }
                    if !shared.needed() {
                        return Ended::Unneeded;
                    }
                    if failed {
                        break;
                    }
                }
            }
        }
        // Dropping the listen future cancels it upstream.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_filter_asks_only_for_what_the_server_offers() {
        let caps = json!({"tools": {"listChanged": true}, "resources": {"subscribe": true}});
        assert_eq!(
            listen_filter(&caps, &["a".into()]),
            json!({"notifications": {"toolsListChanged": true, "resourceSubscriptions": ["a"]}})
        );
        let caps = json!({"prompts": {"listChanged": true}, "resources": {"listChanged": true}});
        assert_eq!(
            listen_filter(&caps, &["a".into()]),
            json!({"notifications": {"promptsListChanged": true, "resourcesListChanged": true}})
        );
    }
}
