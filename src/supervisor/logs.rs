//! A bounded ring of a service's log lines, each stamped with RFC3339 time and
//! its stream, and numbered so followers can ask for what is new; and the
//! reader that turns a server's stderr into such lines with bounded memory.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;

use crate::model::LogStream;

/// Default lines kept per service.
pub const DEFAULT_LOG_LINES: usize = 1000;
/// Default bytes kept per service.
pub const DEFAULT_LOG_BYTES: usize = 1 << 20;
/// Longest line kept; the rest is cut (a 10 MB stderr line must not pin 10 MB).
pub const MAX_LOG_LINE: usize = 8 * 1024;

pub struct LogRing {
    inner: Mutex<Inner>,
    cap: usize,
    max_bytes: usize,
    appended: Notify,
}

struct Inner {
    lines: VecDeque<String>,
    bytes: usize,
    /// Sequence number of the next line appended.
    next: u64,
}

impl LogRing {
    pub fn new(cap: usize) -> Self {
        Self::with_limits(cap, DEFAULT_LOG_BYTES)
    }

    /// At most `cap` lines and `max_bytes` bytes; the oldest go first.
    pub fn with_limits(cap: usize, max_bytes: usize) -> Self {
        LogRing {
            inner: Mutex::new(Inner {
                lines: VecDeque::new(),
                bytes: 0,
                next: 0,
            }),
            cap: cap.max(1),
            max_bytes: max_bytes.max(MAX_LOG_LINE + 64),
            appended: Notify::new(),
        }
    }

    pub fn push(&self, stream: LogStream, text: &str) {
        let ts = humantime::format_rfc3339_millis(SystemTime::now());
        let mut cut = text.trim_end_matches(['\r', '\n']);
        if cut.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !cut.is_char_boundary(end) {
                end -= 1;
            }
            cut = &cut[..end];
        }
        let line = format!("{ts} [{stream}] {cut}");
        {
            let mut inner = self.inner.lock().expect("log ring poisoned");
            inner.bytes += line.len();
            inner.lines.push_back(line);
            inner.next += 1;
            while inner.lines.len() > self.cap || inner.bytes > self.max_bytes {
                match inner.lines.pop_front() {
                    Some(old) => inner.bytes -= old.len(),
                    None => break,
                }
            }
        }
        self.appended.notify_waiters();
    }

    /// The last `n` lines, oldest first, and the sequence number after them.
    pub fn tail(&self, n: usize) -> (Vec<String>, u64) {
        let inner = self.inner.lock().expect("log ring poisoned");
        let skip = inner.lines.len().saturating_sub(n);
        (inner.lines.iter().skip(skip).cloned().collect(), inner.next)
    }

    /// Lines numbered `since` and later that are still held, and the next number.
    pub fn since(&self, since: u64) -> (Vec<String>, u64) {
        let inner = self.inner.lock().expect("log ring poisoned");
        let first = inner.next - inner.lines.len() as u64;
        let skip = since.saturating_sub(first) as usize;
        (inner.lines.iter().skip(skip).cloned().collect(), inner.next)
    }

    /// Resolves at the next append.
    pub async fn appended(&self) {
        self.appended.notified().await;
    }
}

/// Reads `reader` (a server's stderr) into lines for `push` until it ends.
/// A line longer than [`MAX_LOG_LINE`] is cut there (marked `…(cut)`) and the
/// rest of it dropped, so a stream without newlines costs a fixed buffer.
pub async fn drain_lines<R, F>(mut reader: R, mut push: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(&str),
{
    let mut buf = vec![0u8; 4 * 1024];
    let mut line: Vec<u8> = Vec::new();
    // Past the cap: discarding until the next newline.
    let mut cutting = false;
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let nl = chunk.iter().position(|b| *b == b'\n');
            let (part, rest, ends) = match nl {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &[][..], false),
            };
            if !cutting {
                // Room left for the cut marker within the ring's line cap.
                let room = MAX_LOG_LINE - 16 - line.len();
                line.extend_from_slice(&part[..part.len().min(room)]);
                if part.len() > room {
                    push(&format!("{} …(cut)", String::from_utf8_lossy(&line)));
                    line.clear();
                    cutting = true;
                }
            }
            if ends {
                if !cutting {
                    push(&String::from_utf8_lossy(&line));
                }
                line.clear();
                cutting = false;
            }
            chunk = rest;
        }
        if line.capacity() > 4 * MAX_LOG_LINE {
            line = Vec::new();
        }
    }
    if !line.is_empty() && !cutting {
        push(&String::from_utf8_lossy(&line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stderr_lines_are_cut_at_the_cap_with_bounded_memory() {
        let mut input = b"short\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 * MAX_LOG_LINE));
        input.extend_from_slice(b"\nafter\npartial");
        let mut got = Vec::new();
        drain_lines(&input[..], |l| got.push(l.to_owned())).await;
        assert_eq!(
            got.len(),
            4,
            "{:?}",
            got.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        assert_eq!(got[0], "short");
        assert!(got[1].ends_with("…(cut)") && got[1].len() < MAX_LOG_LINE + 16);
        assert_eq!(got[2], "after");
        assert_eq!(got[3], "partial");
    }

    #[tokio::test]
    async fn a_gigabyte_without_newline_is_one_cut_line() {
        // 64 MiB of one line through a reader that yields 16 KiB at a time.
        struct Endless(usize);
        impl AsyncRead for Endless {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let n = buf.remaining().min(self.0);
                buf.put_slice(&vec![b'z'; n]);
                self.0 -= n;
                std::task::Poll::Ready(Ok(()))
            }
        }
        let mut got = Vec::new();
        drain_lines(Endless(64 << 20), |l| got.push(l.len())).await;
        assert_eq!(got.len(), 1);
        assert!(got[0] < MAX_LOG_LINE + 16);
    }

    #[test]
    fn ring_is_bounded_in_bytes() {
        let r = LogRing::with_limits(1000, 64 * 1024);
        for _ in 0..100 {
            r.push(LogStream::Stderr, &"b".repeat(4000));
        }
        let (lines, next) = r.tail(1000);
        assert_eq!(next, 100);
        let total: usize = lines.iter().map(String::len).sum();
        assert!(total <= 64 * 1024, "{total}");
        assert!(lines.len() >= 10);
    }

    #[test]
    fn ring_keeps_last_lines_with_tags() {
        let r = LogRing::new(3);
        for i in 0..5 {
            r.push(LogStream::Stderr, &format!("line {i}\n"));
        }
        let (lines, next) = r.tail(10);
        assert_eq!(next, 5);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with("[stderr] line 2"), "{}", lines[0]);
        assert!(humantime::parse_rfc3339(lines[0].split(' ').next().unwrap()).is_ok());
        let (new, _) = r.since(4);
        assert_eq!(new.len(), 1);
        assert!(new[0].ends_with("line 4"));
        assert_eq!(r.since(0).0.len(), 3, "lines already dropped are skipped");
        assert_eq!(r.tail(1).0.len(), 1);
    }

    #[test]
    fn long_lines_are_cut() {
        let r = LogRing::new(2);
        r.push(LogStream::Stdout, &"é".repeat(10_000));
        assert!(r.tail(1).0[0].len() < MAX_LOG_LINE + 64);
    }
}
