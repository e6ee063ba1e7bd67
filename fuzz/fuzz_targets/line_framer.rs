//! The JSON-RPC line framer: any bytes, in any chunking, never panic, never
//! yield a line over the cap, and lines that fit come out unchanged.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshbox::mcp::framing::{Frame, LineCodec};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = 1 + (data[0] as usize % 64);
    let chunk = 1 + (data[1] as usize % 17);
    let input = &data[2..];
    let mut codec = LineCodec::new(max);
    let mut buf = BytesMut::new();
    let mut lines = Vec::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(frame) = codec.decode(&mut buf).expect("decode never errs") {
            lines.push(frame);
        }
    }
    while let Some(frame) = codec.decode_eof(&mut buf).expect("decode_eof never errs") {
        lines.push(frame);
    }
    // Every short line of the input comes out, in order.
    let expected: Vec<&[u8]> = {
        let mut parts: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
        if input.is_empty() || input.ends_with(b"\n") {
            parts.pop();
        }
        parts
            .into_iter()
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| l.len() <= max)
            .collect()
    };
    let got: Vec<&[u8]> = lines
        .iter()
        .filter_map(|f| match f {
            Frame::Line(l) => Some(&l[..]),
            Frame::Oversized(_) => None,
        })
        .collect();
    for l in &got {
        assert!(l.len() <= max);
    }
    assert_eq!(got, expected);
});
