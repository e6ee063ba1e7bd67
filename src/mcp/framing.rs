//! Newline-delimited framing for the stdio transport.
//!
//! Owns one thing: cutting a byte stream into lines with a hard cap on line
//! length. A line longer than the cap is dropped (reported once as
//! [`Frame::Oversized`]) and the stream carries on at the next newline, so one
//! bad reply never kills the session.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Default cap on one line: 64 MiB.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One complete line without its terminator (`\n` or `\r\n`).
    Line(BytesMut),
    /// A line longer than the cap was dropped; carries how many bytes it had.
    Oversized(usize),
}

#[derive(Debug)]
pub struct LineCodec {
    max: usize,
    /// Bytes already scanned for a newline in the buffer's head.
    scanned: usize,
    /// When set, we are discarding an oversized line; counts its bytes so far.
    discarding: Option<usize>,
}

impl LineCodec {
    pub fn new(max: usize) -> Self {
        LineCodec {
            max: max.max(1),
            scanned: 0,
            discarding: None,
        }
    }
}

impl Default for LineCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

fn trim_cr(mut line: BytesMut) -> BytesMut {
    if line.last() == Some(&b'\r') {
        line.truncate(line.len() - 1);
    }
    line
}

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            if let Some(dropped) = self.discarding {
                match memchr(b'\n', buf) {
                    Some(i) => {
                        buf.advance(i + 1);
                        self.discarding = None;
                        self.scanned = 0;
                        return Ok(Some(Frame::Oversized(dropped + i)));
                    }
                    None => {
                        self.discarding = Some(dropped + buf.len());
                        buf.clear();
                        return Ok(None);
                    }
                }
            }
            // Room for the cap, a `\r`, and the `\n` itself.
            let limit = buf.len().min(self.max + 2);
            match memchr(b'\n', &buf[self.scanned..limit]) {
                Some(i) => {
                    let at = self.scanned + i;
                    self.scanned = 0;
                    let mut line = buf.split_to(at + 1);
                    line.truncate(at);
                    let line = trim_cr(line);
                    if line.len() > self.max {
                        return Ok(Some(Frame::Oversized(line.len())));
                    }
                    return Ok(Some(Frame::Line(line)));
                }
                None if buf.len() > self.max + 1 => {
                    // Over the cap with no newline in sight: start discarding.
                    self.discarding = Some(0);
                    self.scanned = 0;
                    continue;
                }
                None => {
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if let Some(dropped) = self.discarding.take() {
            return Ok(Some(Frame::Oversized(dropped)));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        self.scanned = 0;
        let line = trim_cr(buf.split_to(buf.len()));
        if line.len() > self.max {
            return Ok(Some(Frame::Oversized(line.len())));
        }
        Ok(Some(Frame::Line(line)))
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    memchr::memchr(needle, hay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut c = LineCodec::new(max);
        let mut buf = BytesMut::new();
        let mut out = vec![];
        for ch in chunks {
            buf.extend_from_slice(ch);
            while let Some(f) = c.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        while let Some(f) = c.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(BytesMut::from(s.as_bytes()))
    }

    #[test]
    fn splits_lines_across_chunks() {
        let f = run(100, &[b"ab", b"c\nde", b"f\r\n", b"tail"]);
        assert_eq!(f, vec![line("abc"), line("def"), line("tail")]);
    }

    #[test]
    fn oversized_line_is_dropped_and_stream_continues() {
        let f = run(4, &[b"12345678", b"90\nok\n"]);
        assert_eq!(f, vec![Frame::Oversized(10), line("ok")]);
        let f = run(4, &[b"123456\nok\n"]);
        assert_eq!(f, vec![Frame::Oversized(6), line("ok")]);
        let f = run(4, &[b"1234\n"]);
        assert_eq!(f, vec![line("1234")]);
    }

    #[test]
    fn crlf_line_at_the_cap_is_kept() {
        assert_eq!(run(4, &[b"1234\r\nok"]), vec![line("1234"), line("ok")]);
        assert_eq!(run(1, &[b"\0\r"]), vec![line("\0")]);
        assert_eq!(run(1, &[b"12"]), vec![Frame::Oversized(2)]);
    }

    #[test]
    fn oversized_at_eof() {
        let f = run(2, &[b"12345"]);
        assert_eq!(f, vec![Frame::Oversized(5)]);
    }
}
