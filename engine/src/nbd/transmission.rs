//! The transmission phase of one connection: requests in, replies out.
//!
//! Owns the read half of the socket after the handshake. It parses requests
//! one after another, checks each before the backend sees it, hands good ones
//! to the backend in arrival order and lets them complete concurrently; their
//! replies go to the connection's single writer in completion order. It bounds
//! how many requests (and payload bytes) one connection may have in flight, so
//! a fast client waits instead of growing the server's memory. It never calls
//! the backend for a request that failed its checks, and never replies to a
//! request twice.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use shorthorn_proto::aligned::{AlignedBuf, IO_ALIGN};
use shorthorn_proto::inflight;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::error::NbdError;
use super::proto::{self, RequestHeader};
use super::request::{self, Op};
use super::writer::{self, Permits, Reply};
use super::NbdBackend;

/// Requests one connection may have in flight.
pub const MAX_INFLIGHT_REQUESTS: usize = 256;
/// READ and WRITE payload bytes one connection may have in flight; two
/// maximum-sized requests fit.
pub const MAX_INFLIGHT_BYTES: usize = 2 * proto::MAX_BLOCK_SIZE as usize;
/// An oversized WRITE up to this length is read and thrown away (and answered
/// with EINVAL); anything longer ends the connection.
pub const MAX_DISCARDED_WRITE: u32 = 2 * proto::MAX_BLOCK_SIZE;
/// Read buffer of a connection: several small requests per syscall, but
/// smaller than a large write's payload, whose rest the buffered reader then
/// reads straight into the payload's own (aligned) memory instead of
/// copying it out of this buffer.
pub const READ_BUFFER: usize = 32 * 1024;

/// Why transmission ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent NBD_CMD_DISC.
    Disconnect,
    /// The client closed the socket between requests.
    Eof,
    /// The server is shutting down.
    Shutdown,
    /// The writer failed (client gone); the reader stopped.
    WriterGone,
}

/// Counters reported when the connection closes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub requests: u64,
    pub errors: u64,
}

/// Serves requests until the client disconnects, breaks the protocol or the
/// server shuts down; returns once every in-flight request has been answered
/// (or the socket failed).
pub async fn run<R, W>(
    reader: BufReader<R>,
    writer: W,
    backend: Arc<dyn NbdBackend>,
    size: u64,
    shutdown: watch::Receiver<bool>,
) -> (io::Result<End>, Stats)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::unbounded_channel();
    // The requests handed to the backend run side by side in this
    // connection's task, not a task each (see `inflight`).
    let (start, started) = mpsc::unbounded_channel();
    let running = inflight::run_started(started, tx.clone());
    let mut reader = RequestReader {
        reader,
        after_large: false,
        backend,
        size,
        tx,
        start,
        requests: Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS)),
        bytes: Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES)),
        stats: Stats::default(),
    };
    let read_side = async move {
        let end = reader.run(shutdown).await;
        // Dropping the reader drops its senders: the writer ends once the
        // requests still in flight have replied.
        (end, reader.stats)
    };
    let ((end, stats), (), written) =
        tokio::join!(read_side, running, writer::write_replies(writer, rx));
    let end = match (end, written) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
        (Ok(end), Ok(())) => Ok(end),
    };
    (end, stats)
}

struct RequestReader<R> {
    reader: BufReader<R>,
    /// The last request was a write too large for the read buffer: the
    /// next may be too (a stream of 128 KiB writes), so its header is read
    /// alone, and its payload then goes from the socket straight into
    /// aligned memory instead of partly through the buffer and a copy.
    after_large: bool,
    backend: Arc<dyn NbdBackend>,
    size: u64,
    /// Replies ready now, to the writer.
    tx: mpsc::UnboundedSender<Reply>,
    /// Requests handed to the backend, to run until their replies are ready.
    start: mpsc::UnboundedSender<Answering>,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    stats: Stats,
}

fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> io::Result<End> {
        loop {
            let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => return Ok(End::Shutdown),
                _ = self.tx.closed() => return Ok(End::WriterGone),
                read = read_header(&mut self.reader, &mut raw, self.after_large) => {
                    if !read? {
                        return Ok(End::Eof);
                    }
                }
            }
            let header = RequestHeader::decode(&raw);
            if header.magic != proto::REQUEST_MAGIC {
                return Err(violation(format!("bad request magic {:#x}", header.magic)));
            }
            if header.command == proto::CMD_DISC {
                return Ok(End::Disconnect);
            }
            self.stats.requests += 1;
            self.handle(header).await?;
        }
    }

    async fn handle(&mut self, header: RequestHeader) -> io::Result<()> {
        let request_permit = acquire(&self.requests, 1).await;
        let checked = request::check(&header, self.size);

        if header.command == proto::CMD_WRITE {
            return self.handle_write(header, checked, request_permit).await;
        }

        let permits = Permits::request(request_permit);
        match checked {
            Err(e) => self.reply_error(header, e, permits),
            Ok(Op::Read { len: 0, .. })
            | Ok(Op::Trim { len: 0, .. })
            | Ok(Op::WriteZeroes { len: 0, .. }) => self.reply_now(header.handle, 0, permits),
            Ok(Op::Read { offset, len }) => {
                let permits = permits.with_bytes(acquire(&self.bytes, len).await);
                let call = BackendCall::Read {
                    offset,
                    len,
                    data: self.backend.read(offset, len),
                };
                self.complete(header.handle, call, permits);
            }
            Ok(Op::Flush) => {
                let call = BackendCall::Done(self.backend.flush());
                self.complete(header.handle, call, permits);
            }
            Ok(Op::Trim { offset, len }) => {
                let call = BackendCall::Done(self.backend.trim(offset, len));
                self.complete(header.handle, call, permits);
            }
            Ok(Op::WriteZeroes { offset, len, fua }) => {
                let call = BackendCall::Done(self.backend.write_zeroes(offset, len, fua));
                self.complete(header.handle, call, permits);
            }
            Ok(Op::Write { .. }) | Ok(Op::Disconnect) => {
                unreachable!("handled before the command was checked")
            }
        }
        Ok(())
    }

    /// A WRITE's payload follows its header whatever we think of the
    /// request, and must be consumed to find the next header: a refused one
    /// is read and thrown away (unless too long to be worth it).
    async fn handle_write(
        &mut self,
        header: RequestHeader,
        checked: Result<Op, NbdError>,
        request_permit: OwnedSemaphorePermit,
    ) -> io::Result<()> {
        if header.len > MAX_DISCARDED_WRITE {
            return Err(violation(format!("write of {} bytes", header.len)));
        }
        let (offset, fua) = match checked {
            Ok(Op::Write { offset, fua, .. }) => (offset, fua),
            Ok(other) => unreachable!("write checked as {other:?}"),
            Err(e) => {
                let mut payload = (&mut self.reader).take(u64::from(header.len));
                let skipped = tokio::io::copy(&mut payload, &mut tokio::io::sink()).await?;
                if skipped != u64::from(header.len) {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                self.reply_error(header, e, Permits::request(request_permit));
                return Ok(());
            }
        };
        if header.len == 0 {
            self.reply_now(header.handle, 0, Permits::request(request_permit));
            return Ok(());
        }
        let bytes_permit = acquire(&self.bytes, header.len).await;
        let len = header.len as usize;
        self.after_large = len >= READ_BUFFER;
        let data = if len.is_multiple_of(IO_ALIGN) {
            // Whole blocks (what filesystems and most clients send): into
            // aligned memory, which a replica's O_DIRECT file takes as is.
            // A large payload past what is already buffered comes straight
            // from the socket; a small one through the buffer, with the
            // requests behind it.
            if self.after_large {
                AlignedBuf::read_from(&mut Unbuffered(&mut self.reader), len).await?
            } else {
                AlignedBuf::read_from(&mut self.reader, len).await?
            }
            .into_bytes()
        } else {
            let mut data = BytesMut::with_capacity(len);
            while data.len() < len {
                let want = len - data.len();
                if self.reader.read_buf(&mut (&mut data).limit(want)).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            data.freeze()
        };
        let call = BackendCall::Done(self.backend.write(offset, data, fua));
        let permits = Permits::request(request_permit).with_bytes(bytes_permit);
        self.complete(header.handle, call, permits);
        Ok(())
    }

    /// Hands a backend call to the connection's running requests; its reply
    /// is queued when it finishes. The call itself was made by the reader,
    /// so the backend sees requests in the order they arrived.
    fn complete(&mut self, handle: u64, call: BackendCall, permits: Permits) {
        // The runner outlives the reader; it is gone only if the connection's
        // task was aborted, when nobody waits for the reply.
        let _ = self.start.send(Answering {
            handle,
            call,
            permits: Some(permits),
        });
    }

    fn reply_error(&mut self, header: RequestHeader, e: NbdError, permits: Permits) {
        self.stats.errors += 1;
        tracing::debug!(
            command = header.command,
            flags = header.flags,
            offset = header.offset,
            len = header.len,
            error = %e,
            "NBD request refused"
        );
        self.reply_now(header.handle, e.to_wire(), permits);
    }

    fn reply_now(&mut self, handle: u64, error: u32, permits: Permits) {
        let _ = self.tx.send(Reply {
            handle,
            error,
            payload: None,
            permits,
        });
    }
}

/// What the backend was asked for one request.
enum BackendCall {
    /// A request answered by success or an error alone.
    Done(BoxFuture<'static, Result<(), NbdError>>),
    /// A read, whose data must be as long as asked.
    Read {
        offset: u64,
        len: u32,
        data: BoxFuture<'static, Result<Bytes, NbdError>>,
    },
}

/// A request the backend works on, until its reply is ready.
struct Answering {
    handle: u64,
    call: BackendCall,
    /// Taken by the reply.
    permits: Option<Permits>,
}

impl std::future::Future for Answering {
    type Output = Reply;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let this = self.get_mut();
        let (result, payload) = match &mut this.call {
            BackendCall::Done(done) => (ready!(done.poll_unpin(cx)), None),
            BackendCall::Read { offset, len, data } => match ready!(data.poll_unpin(cx)) {
                Ok(data) if data.len() == *len as usize => (Ok(()), Some(data)),
                Ok(data) => {
                    tracing::error!(
                        offset,
                        len,
                        got = data.len(),
                        "backend returned a read of the wrong length"
                    );
                    (Err(NbdError::Io), None)
                }
                Err(e) => (Err(e), None),
            },
        };
        let error = match result {
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!(handle = this.handle, error = %e, "NBD request failed in the backend");
                e.to_wire()
            }
        };
        Poll::Ready(Reply {
            handle: this.handle,
            error,
            payload,
            permits: this.permits.take().expect("a request answered twice"),
        })
    }
}

/// Reads one request header. `Ok(false)` when the client closed the socket
/// cleanly before its first byte; a header cut short is an error. `alone`:
/// when nothing is buffered, take only the header's bytes off the socket.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    raw: &mut [u8; proto::REQUEST_HEADER_LEN],
    alone: bool,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < raw.len() {
        let n = if alone && reader.buffer().is_empty() {
            reader.get_mut().read(&mut raw[filled..]).await?
        } else {
            reader.read(&mut raw[filled..]).await?
        };
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(violation("request header cut short"))
            };
        }
        filled += n;
    }
    Ok(true)
}

/// Reads what `0` has buffered, then straight from its socket: the buffer
/// is never refilled (and then copied out of) on the way.
struct Unbuffered<'a, R>(&'a mut BufReader<R>);

impl<R: AsyncRead + Unpin> AsyncRead for Unbuffered<'_, R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let reader = &mut *self.0;
        let buffered = reader.buffer();
        if buffered.is_empty() {
            return std::pin::Pin::new(reader.get_mut()).poll_read(cx, out);
        }
        let n = buffered.len().min(out.remaining());
        out.put_slice(&buffered[..n]);
        std::pin::Pin::new(reader).consume(n);
        std::task::Poll::Ready(Ok(()))
    }
}

async fn acquire(sem: &Arc<Semaphore>, n: u32) -> OwnedSemaphorePermit {
    sem.clone()
        .acquire_many_owned(n)
        .await
        .expect("in-flight semaphores are never closed")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::tests::MemBackend;
    use super::*;

    /// The socket side of a connection, noting how much room each read that
    /// got data offered: a whole [`READ_BUFFER`] of room is the buffered
    /// reader refilling its buffer.
    struct Noting<R> {
        inner: R,
        rooms: Arc<Mutex<Vec<usize>>>,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Noting<R> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let (room, before) = (out.remaining(), out.filled().len());
            let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, out);
            if out.filled().len() > before {
                self.rooms.lock().unwrap().push(room);
            }
            polled
        }
    }

    #[tokio::test]
    async fn a_stream_of_large_writes_goes_around_the_read_buffer() {
        const WRITES: u64 = 16;
        const LEN: usize = 128 * 1024;
        let size = WRITES as usize * LEN;
        let backend = MemBackend::new(size);
        let (client, server) = tokio::io::duplex(4 * LEN);
        let (server_rd, server_wr) = tokio::io::split(server);
        let rooms = Arc::new(Mutex::new(Vec::new()));
        let reader = BufReader::with_capacity(
            READ_BUFFER,
            Noting {
                inner: server_rd,
                rooms: rooms.clone(),
            },
        );
        let (_stop, shutdown) = watch::channel(false);
        let serving = tokio::spawn(run(
            reader,
            server_wr,
            Arc::new(backend.clone()),
            size as u64,
            shutdown,
        ));

        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        let sending = tokio::spawn(async move {
            for i in 0..WRITES {
                let header = RequestHeader {
                    magic: proto::REQUEST_MAGIC,
                    flags: 0,
                    command: proto::CMD_WRITE,
                    handle: i,
                    offset: i * LEN as u64,
                    len: LEN as u32,
                };
                let mut request = header.encode().to_vec();
                request.extend(std::iter::repeat_n(i as u8 + 1, LEN));
                client_wr.write_all(&request).await.unwrap();
            }
            let disc = RequestHeader {
                magic: proto::REQUEST_MAGIC,
                flags: 0,
                command: proto::CMD_DISC,
                handle: WRITES,
                offset: 0,
                len: 0,
            };
            client_wr.write_all(&disc.encode()).await.unwrap();
        });
        for _ in 0..WRITES {
            let mut reply = [0u8; proto::SIMPLE_REPLY_LEN];
            client_rd.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply[4..8], &[0; 4], "a write failed");
        }
        sending.await.unwrap();
        let (end, _) = serving.await.unwrap();
        assert_eq!(end.unwrap(), End::Disconnect);

        let data = backend.snapshot();
        for i in 0..WRITES as usize {
            assert!(data[i * LEN..(i + 1) * LEN]
                .iter()
                .all(|&b| b == i as u8 + 1));
        }
        // Only the first header, before anyone knew the writes were large,
        // may have come through the buffer.
        let rooms = rooms.lock().unwrap();
        let fills = rooms.iter().filter(|&&room| room == READ_BUFFER).count();
        assert!(
            fills <= 1,
            "the buffer was refilled {fills} times: {rooms:?}"
        );
    }
}
