//! A bounded ring of a service's log lines, each stamped with RFC3339 time and
//! its stream, and numbered so followers can ask for what is new.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::model::LogStream;

/// Default lines kept per service.
pub const DEFAULT_LOG_LINES: usize = 1000;
/// Longest line kept; the rest is cut (a 10 MB stderr line must not pin 10 MB).
const MAX_LOG_LINE: usize = 8 * 1024;

pub struct LogRing {
    inner: Mutex<Inner>,
    cap: usize,
    appended: Notify,
}

struct Inner {
    lines: VecDeque<String>,
    /// Sequence number of the next line appended.
    next: u64,
}

impl LogRing {
    pub fn new(cap: usize) -> Self {
        LogRing {
            inner: Mutex::new(Inner {
                lines: VecDeque::with_capacity(cap.min(1024)),
                next: 0,
            }),
            cap: cap.max(1),
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
            if inner.lines.len() == self.cap {
                inner.lines.pop_front();
            }
            inner.lines.push_back(line);
            inner.next += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

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
