//! The one writer of a connection's replies.
//!
//! Owns the write half of the socket once transmission starts. It takes every
//! reply that is ready, packs the small headers together and sends headers and
//! READ payloads as separate buffers of one vectored write, so read data is
//! never copied. It holds each reply's in-flight permits until the reply is on
//! the wire: that is what bounds a connection's memory. It never reorders bytes
//! within a reply and never writes a payload without its header.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::proto;

/// Replies packed into one batch at most.
const MAX_BATCH_REPLIES: usize = 256;
/// Payload bytes packed into one batch at most; past this the batch goes out
/// so that its permits are released.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Buffers handed to one `writev` at most (Linux's IOV_MAX is 1024).
const MAX_IOV: usize = 512;
/// A client that takes no bytes for this long is gone.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One simple reply, ready to go out.
pub struct Reply {
    pub handle: u64,
    /// 0 for success, else an NBD error value.
    pub error: u32,
    /// The data of a successful READ.
    pub payload: Option<Bytes>,
    /// Released when the reply has been written (or dropped).
    pub permits: Permits,
}

/// What a request holds of its connection's in-flight limits: a place
/// among its requests, and for a READ or WRITE its payload's bytes.
#[derive(Default)]
pub struct Permits {
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Permits {
    pub fn request(permit: OwnedSemaphorePermit) -> Permits {
        Permits {
            _request: Some(permit),
            _bytes: None,
        }
    }

    pub fn with_bytes(self, permit: OwnedSemaphorePermit) -> Permits {
        Permits {
            _bytes: Some(permit),
            ..self
        }
    }
}

/// Writes replies from `rx` until every sender is gone and the queue is empty,
/// then shuts the write half down. Returns early (dropping `rx`, which the
/// reader notices) when the socket fails.
pub async fn write_replies<W>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut batch = Batch::default();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.replies < MAX_BATCH_REPLIES && batch.payload_bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(reply) => batch.push(reply),
                Err(_) => break,
            }
        }
        batch.write_to(&mut writer).await?;
    }
    writer.flush().await?;
    writer.shutdown().await
}

/// Replies collected for one vectored write.
#[derive(Default)]
struct Batch {
    /// Buffers in wire order: runs of headers, and payloads between them.
    chunks: VecDeque<Bytes>,
    /// Headers not yet moved into `chunks`.
    headers: BytesMut,
    permits: Vec<Permits>,
    replies: usize,
    payload_bytes: usize,
}

impl Batch {
    fn push(&mut self, mut reply: Reply) {
        proto::put_simple_reply(&mut self.headers, reply.error, reply.handle);
        if let Some(payload) = reply.payload.take().filter(|p| !p.is_empty()) {
            self.chunks.push_back(self.headers.split().freeze());
            self.payload_bytes += payload.len();
            self.chunks.push_back(payload);
        }
        self.permits.push(reply.permits);
        self.replies += 1;
    }

    async fn write_to<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        if !self.headers.is_empty() {
            self.chunks.push_back(self.headers.split().freeze());
        }
        while !self.chunks.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .chunks
                .iter()
                .take(MAX_IOV)
                .map(|c| IoSlice::new(c))
                .collect();
            let written = tokio::time::timeout(WRITE_STALL_TIMEOUT, writer.write_vectored(&slices))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "client stopped reading replies")
                })??;
            drop(slices);
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.advance(written);
        }
        self.permits.clear();
        self.replies = 0;
        self.payload_bytes = 0;
        Ok(())
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self.chunks.front_mut().expect("wrote more than queued");
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use tokio::sync::Semaphore;

    /// Accepts at most `step` bytes per call and records how calls arrived.
    #[derive(Default)]
    struct Trickle {
        step: usize,
        data: Vec<u8>,
        calls: usize,
        shut: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.step);
            this.data.extend_from_slice(&buf[..n]);
            this.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            let mut left = this.step;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                this.data.extend_from_slice(&b[..take]);
                left -= take;
                n += take;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    fn expected(replies: &[(u64, u32, &[u8])]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for (handle, error, payload) in replies {
            proto::put_simple_reply(&mut out, *error, *handle);
            out.extend_from_slice(payload);
        }
        out.to_vec()
    }

    #[tokio::test]
    async fn partial_vectored_writes_keep_every_byte_in_order() {
        let sem = Arc::new(Semaphore::new(8));
        let (tx, rx) = mpsc::unbounded_channel();
        let big = vec![7u8; 10_000];
        let cases: Vec<(u64, u32, &[u8])> = vec![
            (1, 0, b"abc"),
            (2, 22, b""),
            (3, 0, &big),
            (4, 0, b""),
            (5, 5, b""),
        ];
        for (handle, error, payload) in &cases {
            tx.send(Reply {
                handle: *handle,
                error: *error,
                payload: (!payload.is_empty()).then(|| Bytes::copy_from_slice(payload)),
                permits: Permits::request(sem.clone().try_acquire_owned().unwrap()),
            })
            .unwrap();
        }
        assert_eq!(sem.available_permits(), 3);
        drop(tx);
        let mut sink = Trickle {
            step: 7,
            ..Default::default()
        };
        write_replies(&mut sink, rx).await.unwrap();
        assert_eq!(sink.data, expected(&cases));
        assert!(sink.shut);
        assert_eq!(sem.available_permits(), 8, "permits released after writing");
    }

    #[tokio::test]
    async fn queued_replies_go_out_in_one_vectored_write() {
        let (tx, rx) = mpsc::unbounded_channel();
        for handle in 0..100u64 {
            tx.send(Reply {
                handle,
                error: 0,
                payload: Some(Bytes::from(vec![handle as u8; 4096])),
                permits: Permits::default(),
            })
            .unwrap();
        }
        drop(tx);
        let mut sink = Trickle {
            step: usize::MAX,
            ..Default::default()
        };
        write_replies(&mut sink, rx).await.unwrap();
        assert_eq!(sink.calls, 1);
        assert_eq!(sink.data.len(), 100 * (16 + 4096));
    }
}
