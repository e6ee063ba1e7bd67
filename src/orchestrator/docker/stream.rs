//! Request bodies produced off the async runtime.
//!
//! Owns the bridge from a blocking producer (a tar of a build context or of
//! a directory to upload) to a byte stream a bollard request sends as it is
//! written: the producer runs on the blocking pool and writes into a small
//! bounded channel, so no whole archive is ever held in memory and no
//! runtime thread reads a file. Knows nothing of what is produced.

use std::io::{self, Write};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes gathered before a chunk is sent.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight between the producer and the request.
const DEPTH: usize = 4;

/// A `Write` that sends what is written as chunks of a byte stream; fails
/// with `BrokenPipe` once the stream is gone (the request ended or was
/// dropped), which stops the producer.
pub struct ChannelWriter {
    buf: Vec<u8>,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl ChannelWriter {
    fn send(&mut self, item: io::Result<Bytes>) -> io::Result<()> {
        self.tx
            .blocking_send(item)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the request body was dropped"))
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.send(Ok(chunk))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() >= CHUNK {
            self.send_buffered()?;
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

/// A producer's write error that only says its stream was dropped first
/// (the request failed or ended): the request's own error says why.
pub fn cut_short(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// Runs `produce` on the blocking pool and streams what it writes. The
/// stream ends after the last byte when `produce` succeeds, and with an
/// error item when it fails (so a half-written archive is never taken for
/// a whole one); the handle gives the producer's own result.
pub fn produced<E>(
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), E> + Send + 'static,
) -> (
    impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    JoinHandle<Result<(), E>>,
)
where
    E: Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(DEPTH);
    let handle = tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            buf: Vec::with_capacity(CHUNK),
            tx,
        };
        let result = produce(&mut w);
        let _ = match &result {
            Ok(()) => w.send_buffered(),
            Err(_) => w.send(Err(io::Error::other(
                "the request body could not be produced",
            ))),
        };
        result
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (stream, handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn streams_everything_written_in_bounded_chunks() {
        let (stream, handle) = produced(|w| -> io::Result<()> {
            for i in 0..1000u32 {
                w.write_all(&[(i % 251) as u8; 1000])?;
            }
            Ok(())
        });
        let chunks: Vec<_> = stream.collect().await;
        handle.await.unwrap().unwrap();
        let mut all = Vec::new();
        for c in chunks {
            let c = c.unwrap();
            assert!(c.len() <= CHUNK);
            all.extend_from_slice(&c);
        }
        assert_eq!(all.len(), 1_000_000);
        assert!(all[999_000..].iter().all(|b| *b == (999 % 251) as u8));
    }

    #[tokio::test]
    async fn a_failed_producer_ends_the_stream_with_an_error() {
        let (stream, handle) = produced(|w| {
            w.write_all(b"half an archive")?;
            Err(io::Error::new(io::ErrorKind::NotFound, "gone"))
        });
        let items: Vec<_> = stream.collect().await;
        assert!(items.last().unwrap().is_err(), "{items:?}");
        assert_eq!(
            handle.await.unwrap().unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn a_dropped_stream_stops_the_producer() {
        let (stream, handle) = produced(|w| -> io::Result<()> {
            loop {
                w.write_all(&[0; CHUNK])?;
            }
        });
        drop(stream);
        let err = handle.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
