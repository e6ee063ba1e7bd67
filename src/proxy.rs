//! The egress proxy (`meshbox proxy`): HTTP CONNECT and plain HTTP, only to
//! `host:port` patterns on an allowlist. It runs from the runner image on a
//! mesh's networks, so sandboxes on an internal network reach exactly the
//! allowed hosts and nothing else. Every denial is logged.
//!
//! The process backend serves the same proxy on a unix socket per sandbox
//! ([`serve_unix`]), on the host: there it also refuses upstream addresses on
//! the host itself (loopback, link-local, unspecified), whatever name an
//! allowlist entry resolves to.

use std::fmt::Display;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tracing::{info, warn};

/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// `host:port` or `*.domain:port` (subdomains only), case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: String,
    wildcard: bool,
    port: u16,
}

impl Rule {
    pub fn parse(s: &str) -> Option<Rule> {
        let (host, port) = s.rsplit_once(':')?;
        let port = port.parse().ok().filter(|p| *p > 0)?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(h) => (h, true),
            None => (host, false),
        };
        let ok = !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        ok.then(|| Rule {
            host: host.to_ascii_lowercase(),
            wildcard,
            port,
        })
    }

    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        port == self.port
            && if self.wildcard {
                host.len() > self.host.len() + 1
                    && host.ends_with(&self.host)
                    && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
            } else {
                host == self.host
            }
    }
}

pub fn allowed(rules: &[Rule], host: &str, port: u16) -> bool {
    rules.iter().any(|r| r.matches(host, port))
}

/// Where a request wants to go: from `CONNECT host:port` or an absolute URL.
fn target(method: &str, uri: &str) -> Option<(String, u16)> {
    let split = |hp: &str, default: u16| -> Option<(String, u16)> {
        if let Some(rest) = hp.strip_prefix('[') {
            let (h, after) = rest.split_once(']')?;
            let port = after
                .strip_prefix(':')
                .map_or(Some(default), |p| p.parse().ok())?;
            return Some((h.to_owned(), port));
        }
        match hp.rsplit_once(':') {
            Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
            None => Some((hp.to_owned(), default)),
        }
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        let (h, p) = split(uri, 0)?;
        return (p != 0 && !h.is_empty()).then_some((h, p));
    }
    let rest = uri.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    split(authority, 80).filter(|(h, _)| !h.is_empty())
}

async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, status: &str) {
    let _ = stream
        .write_all(
            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
}

/// Which upstream addresses the proxy may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstreams {
    /// Whatever an allowed name resolves to (the proxy runs in its own container).
    Any,
    /// Not the host's own addresses: loopback, link-local, unspecified,
    /// multicast (the proxy runs on the host, beside meshbox).
    NotLocal,
}

/// True for addresses that reach the host itself or its link.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_local(IpAddr::V4(v4)),
            None => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        },
    }
}

async fn connect_upstream(host: &str, port: u16, upstreams: Upstreams) -> Option<TcpStream> {
    let attempt = async {
        match upstreams {
            Upstreams::Any => TcpStream::connect((host, port)).await.ok(),
            Upstreams::NotLocal => {
                let addrs = tokio::net::lookup_host((host, port)).await.ok()?;
                for a in addrs.filter(|a| !is_local(a.ip())) {
                    if let Ok(s) = TcpStream::connect(a).await {
                        return Some(s);
                    }
                }
                None
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .ok()
        .flatten()
}

async fn handle<S>(mut client: S, peer: impl Display, rules: Arc<Vec<Rule>>, upstreams: Upstreams)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > MAX_HEAD {
            reply(&mut client, "431 Request Header Fields Too Large").await;
            return;
        }
        match tokio::time::timeout(Duration::from_secs(30), client.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => head.extend_from_slice(&buf[..n]),
        }
    };
    let line = String::from_utf8_lossy(&head[..head.iter().position(|b| *b == b'\r').unwrap_or(0)])
        .into_owned();
    let mut parts = line.split_whitespace();
    let (method, uri) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let Some((host, port)) = target(method, uri) else {
        warn!(%peer, request = %line, "denied: not a proxy request");
        reply(&mut client, "400 Bad Request").await;
        return;
    };
    if !allowed(&rules, &host, port) {
        warn!(%peer, %method, %host, port, "denied by allowlist");
        eprintln!("meshbox-proxy: denied {method} {host}:{port} from {peer}");
        reply(&mut client, "403 Forbidden").await;
        return;
    }
    let Some(mut upstream) = connect_upstream(&host, port, upstreams).await else {
        warn!(%peer, %method, %host, port, "no reachable upstream");
        reply(&mut client, "502 Bad Gateway").await;
        return;
    };
    info!(%peer, %method, %host, port, "allowed");
    if method.eq_ignore_ascii_case("CONNECT") {
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        // Bytes that came after the head belong to the tunnel.
        if upstream.write_all(&head[end..]).await.is_err() {
            return;
        }
    } else if upstream.write_all(&head).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Serves the proxy on `listener` until the process ends.
pub async fn serve(listener: TcpListener, rules: Vec<Rule>) -> std::io::Result<()> {
    let rules = Arc::new(rules);
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(handle(stream, peer, rules.clone(), Upstreams::Any));
    }
}

/// Serves the proxy on a unix socket until the future is dropped; at most
/// `max_conns` connections at once (more wait in the backlog).
pub async fn serve_unix(
    listener: UnixListener,
    rules: Vec<Rule>,
    upstreams: Upstreams,
    max_conns: usize,
    label: String,
) -> std::io::Result<()> {
    let rules = Arc::new(rules);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_conns.max(1)));
    let label: Arc<str> = label.into();
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(std::io::Error::other)?;
        let (stream, _) = listener.accept().await?;
        let (rules, label) = (rules.clone(), label.clone());
        tokio::spawn(async move {
            handle(stream, label, rules, upstreams).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_exactly() {
        let r = Rule::parse("registry.npmjs.org:443").unwrap();
        assert!(r.matches("registry.npmjs.org", 443));
        assert!(r.matches("Registry.NPMJS.org.", 443));
        assert!(!r.matches("registry.npmjs.org", 80));
        assert!(!r.matches("evil-registry.npmjs.org", 443));
        let w = Rule::parse("*.example.com:443").unwrap();
        assert!(w.matches("a.example.com", 443) && w.matches("a.b.example.com", 443));
        assert!(
            !w.matches("example.com", 443),
            "the apex is not a subdomain"
        );
        assert!(!w.matches("badexample.com", 443));
        assert!(
            Rule::parse("x").is_none()
                && Rule::parse("a b:1").is_none()
                && Rule::parse("h:0").is_none()
        );
    }

    #[test]
    fn targets() {
        assert_eq!(target("CONNECT", "a.b:443"), Some(("a.b".into(), 443)));
        assert_eq!(target("GET", "http://a.b/x"), Some(("a.b".into(), 80)));
        assert_eq!(
            target("GET", "http://u:p@a.b:8080/x"),
            Some(("a.b".into(), 8080))
        );
        assert_eq!(target("CONNECT", "[::1]:443"), Some(("::1".into(), 443)));
        assert_eq!(target("GET", "/relative"), None);
        assert_eq!(target("CONNECT", "nohost"), None);
    }

    #[test]
    fn local_addresses() {
        for a in [
            "127.0.0.1",
            "127.5.0.1",
            "0.0.0.0",
            "169.254.169.254",
            "::1",
            "::ffff:127.0.0.1",
            "fe80::1",
            "224.0.0.1",
        ] {
            assert!(is_local(a.parse().unwrap()), "{a}");
        }
        for a in ["10.0.0.1", "93.184.216.34", "2606:2800:220:1::1"] {
            assert!(!is_local(a.parse().unwrap()), "{a}");
        }
    }

    #[tokio::test]
    async fn unix_proxy_refuses_the_host_itself() {
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_port = up.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("egress.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let rules = vec![Rule::parse(&format!("localhost:{up_port}")).unwrap()];
        tokio::spawn(serve_unix(
            listener,
            rules,
            Upstreams::NotLocal,
            4,
            "t".into(),
        ));
        let mut c = tokio::net::UnixStream::connect(&sock).await.unwrap();
        c.write_all(format!("CONNECT localhost:{up_port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
        drop(up);
    }

    #[tokio::test]
    async fn connect_allowed_and_denied() {
        // An upstream that echoes.
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_port = up.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = up.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        let rules = vec![Rule::parse(&format!("localhost:{up_port}")).unwrap()];
        tokio::spawn(serve(proxy, rules));

        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("CONNECT localhost:{up_port} HTTP/1.1\r\nHost: x\r\n\r\nping").as_bytes(),
        )
        .await
        .unwrap();
        let mut got = [0u8; 64];
        let mut n = 0;
        while !String::from_utf8_lossy(&got[..n]).ends_with("ping") {
            n += c.read(&mut got[n..]).await.unwrap();
        }
        assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 200"));

        for req in [
            format!("CONNECT 127.0.0.1:{up_port} HTTP/1.1\r\n\r\n"),
            "CONNECT example.com:443 HTTP/1.1\r\n\r\n".to_owned(),
            "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n".to_owned(),
        ] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 403"), "{req}: {out}");
        }
    }
}
