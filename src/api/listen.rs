//! Serving a router on a listener so that slow, idle or many clients cannot
//! lock others out.
//!
//! Owns the accept loop and each connection's life: HTTP/1 connections from
//! hyper with a header read timeout (which also bounds how long a kept-alive
//! connection may sit idle: hyper times the wait for every request head), a
//! total deadline on reading each request body, and a cap on live
//! connections below the file-descriptor limit. At the cap, a new connection
//! evicts the oldest idle one (no request in flight: never sent a complete
//! head, or kept alive between requests); when every connection is busy the
//! new one is closed at once. It knows nothing of routes: the API and the
//! gateway mount theirs on the router it is given.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::ServiceExt;
use tracing::{debug, warn};

/// How connections are bounded.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The longest a connection may take to send a request head, counted
    /// from when the server starts waiting for one: bounds half-sent headers
    /// and idle kept-alive connections alike.
    pub header_timeout: Duration,
    /// The longest reading one request body may take, from its head.
    pub body_timeout: Duration,
    /// Live connections at most (see [`connection_cap`]).
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: connection_cap(1024),
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; the soft limit now in
/// force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let want = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, want) {
            Ok(()) => lim = getrlimit(Resource::Nofile),
            Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    lim.current.unwrap_or(1 << 20)
}

/// Connections allowed under a file-descriptor limit: half of it, leaving
/// the rest to servers' pipes, the store and the install steps.
pub fn connection_cap(fd_limit: u64) -> usize {
    usize::try_from(fd_limit / 2)
        .unwrap_or(usize::MAX)
        .clamp(16, 65_536)
}

/// One live connection, as the accept loop sees it.
struct Entry {
    /// Requests whose response has not been fully sent.
    in_flight: Arc<AtomicUsize>,
    evict: Arc<Notify>,
}

/// Live connections by age (ids only grow).
#[derive(Default)]
struct Tracker {
    next: AtomicUsize,
    live: Mutex<BTreeMap<usize, Entry>>,
}

/// Removes its connection from the tracker when the connection ends.
struct Registered {
    id: usize,
    tracker: Arc<Tracker>,
    in_flight: Arc<AtomicUsize>,
    evict: Arc<Notify>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.tracker
            .live
            .lock()
            .expect("connection tracker poisoned")
            .remove(&self.id);
    }
}

impl Tracker {
    fn len(&self) -> usize {
        self.live.lock().expect("connection tracker poisoned").len()
    }

    fn register(self: &Arc<Self>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let evict = Arc::new(Notify::new());
        self.live
            .lock()
            .expect("connection tracker poisoned")
            .insert(
                id,
                Entry {
                    in_flight: in_flight.clone(),
                    evict: evict.clone(),
                },
            );
        Registered {
            id,
            tracker: self.clone(),
            in_flight,
            evict,
        }
    }

    /// Closes the oldest connection with no request in flight; false when
    /// every connection is busy.
    fn evict_oldest_idle(&self) -> bool {
        let mut live = self.live.lock().expect("connection tracker poisoned");
        let idle = live
            .iter()
            .find(|(_, e)| e.in_flight.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        match idle.and_then(|id| live.remove(&id)) {
            Some(e) => {
                // `notify_one` keeps the permit if the task is not waiting yet.
                e.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Counts a request as in flight until its response body is dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted while it streams.
struct Counted {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body took longer than the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {}s", .0.as_secs())]
pub struct BodyTimeout(Duration);

/// A request body that fails once its deadline passes (a total deadline,
/// not an inactivity timer: a body dripped a byte at a time ends too).
struct Deadline<B> {
    inner: B,
    after: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<B> Deadline<B> {
    fn new(inner: B, after: Duration) -> Self {
        Deadline {
            inner,
            after,
            sleep: Box::pin(tokio::time::sleep(after)),
        }
    }
}

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(axum::Error::new)));
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(this.after))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops
/// accepting, lets in-flight requests finish and closes idle connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tracker = Arc::new(Tracker::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    let (closing_tx, closing) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = listener.accept() => r,
        };
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors (or a transient error): make room, pause.
                warn!(error = %e, "accept failed");
                tracker.evict_oldest_idle();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if tracker.len() >= config.max_connections && !tracker.evict_oldest_idle() {
            debug!(%peer, "every connection is busy; refusing one");
            drop(stream);
            continue;
        }
        // Small answers go out at once, not after the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let reg = tracker.register();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(handler(
                router.clone(),
                peer,
                reg.in_flight.clone(),
                config.body_timeout,
            )),
        );
        let mut closing = closing.clone();
        tasks.spawn(async move {
            let reg = reg;
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "connection ended");
                    }
                }
                // Idle by definition: dropping it closes the socket.
                () = reg.evict.notified() => debug!(%peer, "idle connection evicted"),
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

type Handler = Pin<
    Box<dyn Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send>,
>;

/// One connection's request handler: the router, with the peer address as
/// `ConnectInfo`, the body under its deadline and the request counted.
fn handler(
    router: Router,
    peer: SocketAddr,
    in_flight: Arc<AtomicUsize>,
    body_timeout: Duration,
) -> impl Fn(Request<Incoming>) -> Handler + Clone {
    move |req: Request<Incoming>| {
        let counted = InFlight::new(in_flight.clone());
        let mut req = req.map(|b| Body::new(Deadline::new(b, body_timeout)));
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        Box::pin(async move {
            let resp = router.oneshot(req).await?;
            Ok(resp.map(|inner| {
                Body::new(Counted {
                    inner,
                    _in_flight: counted,
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn defaults_close_slow_clients_within_fifteen_seconds() {
        let c = ServeConfig::default();
        assert!(c.header_timeout <= Duration::from_secs(15));
        assert!(c.body_timeout <= Duration::from_secs(30));
    }

    #[test]
    fn caps_follow_the_fd_limit() {
        assert_eq!(connection_cap(1024), 512);
        assert_eq!(connection_cap(10), 16);
        assert_eq!(connection_cap(u64::MAX), 65_536);
    }

    #[test]
    fn evicts_the_oldest_idle_connection_never_a_busy_one() {
        let t = Arc::new(Tracker::default());
        let a = t.register();
        let b = t.register();
        let c = t.register();
        let _busy = InFlight::new(a.in_flight.clone());
        assert!(t.evict_oldest_idle());
        // `a` is busy: `b`, the oldest idle one, goes.
        let live: Vec<usize> = t.live.lock().unwrap().keys().copied().collect();
        assert_eq!(live, vec![a.id, c.id]);
        let _busy_c = InFlight::new(c.in_flight.clone());
        assert!(!t.evict_oldest_idle(), "evicted a busy connection");
        drop(b);
        drop(c);
        assert_eq!(t.len(), 1);
        drop(a);
        assert_eq!(t.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dripping_body_ends_at_its_deadline() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
            );
        let mut body = Deadline::new(Body::from_stream(stream), Duration::from_secs(30));
        let drip = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if tx.send(Ok(Bytes::from_static(b"x"))).await.is_err() {
                    return;
                }
            }
        });
        let started = tokio::time::Instant::now();
        let mut got = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(_)) => got += 1,
                Some(Err(e)) => break e,
                None => panic!("body ended"),
            }
        };
        assert!(got >= 5, "{got}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(err.to_string().contains("within 30s"), "{err}");
        drip.abort();
    }
}
