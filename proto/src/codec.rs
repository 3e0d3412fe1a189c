//! Async framing over any byte stream: a buffered [`FrameReader`] that hands
//! out whole, checksum-verified frames, and a [`FrameWriter`] that sends many
//! frames in one vectored write, headers and payloads side by side.

use std::io::IoSlice;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::ProtoError;
use crate::frame::{decode_frame, EncodedFrame, RawFrame};

/// Initial receive buffer; it grows to fit one maximum frame when needed.
const READ_BUF: usize = 256 * 1024;

/// Frames in flight each way on an in-process link: about what a socket
/// buffer holds; a sender finding it full waits, as on a socket.
const LOCAL_LINK_FRAMES: usize = 256;

/// One end of an in-process link ([`local_link`]).
pub struct LocalEnd {
    tx: mpsc::Sender<EncodedFrame>,
    rx: mpsc::Receiver<EncodedFrame>,
}

/// Two connected ends that pass frames as they are, in memory: for an
/// engine and a replica daemon in one process. Nothing is serialised,
/// copied or checksummed, since no byte leaves the process; what each end
/// reads is exactly the [`RawFrame`] the same frame would decode to from a
/// stream, with its data payload kept apart.
pub fn local_link() -> (LocalEnd, LocalEnd) {
    let (a_tx, b_rx) = mpsc::channel(LOCAL_LINK_FRAMES);
    let (b_tx, a_rx) = mpsc::channel(LOCAL_LINK_FRAMES);
    (
        LocalEnd { tx: a_tx, rx: a_rx },
        LocalEnd { tx: b_tx, rx: b_rx },
    )
}

impl LocalEnd {
    /// The reading and writing halves, for [`FrameReader::local`] and
    /// [`FrameWriter::local`].
    pub fn split(self) -> (mpsc::Receiver<EncodedFrame>, mpsc::Sender<EncodedFrame>) {
        (self.rx, self.tx)
    }
}

pub struct FrameReader<R> {
    inner: ReaderInner<R>,
}

enum ReaderInner<R> {
    Stream { inner: R, buf: BytesMut },
    Local(mpsc::Receiver<EncodedFrame>),
}

impl<R> FrameReader<R> {
    /// Reads frames from an in-process link instead of a stream.
    pub fn local(rx: mpsc::Receiver<EncodedFrame>) -> FrameReader<R> {
        FrameReader {
            inner: ReaderInner::Local(rx),
        }
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner: ReaderInner::Stream {
                inner,
                buf: BytesMut::with_capacity(READ_BUF),
            },
        }
    }

    /// The next whole frame; `Ok(None)` on a clean end of stream between
    /// frames. A stream that ends inside a frame is [`ProtoError::Truncated`].
    pub async fn read_frame(&mut self) -> Result<Option<RawFrame>, ProtoError> {
        let (inner, buf) = match &mut self.inner {
            ReaderInner::Stream { inner, buf } => (inner, buf),
            ReaderInner::Local(rx) => return rx.recv().await.map(RawFrame::from_local).transpose(),
        };
        loop {
            if let Some(frame) = decode_frame(buf)? {
                return Ok(Some(frame));
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_BUF);
            }
            if inner.read_buf(buf).await? == 0 {
                return if buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtoError::Truncated)
                };
            }
        }
    }
}

pub struct FrameWriter<W> {
    inner: WriterInner<W>,
}

enum WriterInner<W> {
    Stream(W),
    Local(Option<mpsc::Sender<EncodedFrame>>),
}

impl<W> FrameWriter<W> {
    /// Writes frames to an in-process link instead of a stream.
    pub fn local(tx: mpsc::Sender<EncodedFrame>) -> FrameWriter<W> {
        FrameWriter {
            inner: WriterInner::Local(Some(tx)),
        }
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter {
            inner: WriterInner::Stream(inner),
        }
    }

    pub async fn write_frame(&mut self, frame: &EncodedFrame) -> std::io::Result<()> {
        self.write_frames(std::slice::from_ref(frame)).await
    }

    /// Writes every frame, in order, using as few syscalls as the socket
    /// allows (one `writev` per batch when the socket has room).
    pub async fn write_frames(&mut self, frames: &[EncodedFrame]) -> std::io::Result<()> {
        let inner = match &mut self.inner {
            WriterInner::Stream(inner) => inner,
            WriterInner::Local(tx) => {
                let closed = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
                let tx = tx.as_ref().ok_or_else(closed)?;
                for f in frames {
                    tx.send(f.clone()).await.map_err(|_| closed())?;
                }
                return Ok(());
            }
        };
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(frames.len() * 2);
        for f in frames {
            slices.push(IoSlice::new(&f.head));
            if let Some(p) = &f.payload {
                if !p.is_empty() {
                    slices.push(IoSlice::new(p));
                }
            }
        }
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let n = inner.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        inner.flush().await
    }

    /// Ends the writing direction: the other end reads a clean end.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            WriterInner::Stream(inner) => inner.shutdown().await,
            WriterInner::Local(tx) => {
                tx.take();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Request;
    use bytes::Bytes;

    #[tokio::test]
    async fn many_frames_cross_a_pipe_in_order() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a);
            let frames: Vec<_> = (0..200u64)
                .map(|i| {
                    Request::Write {
                        offset: i * 4096,
                        fua: false,
                        data: Bytes::from(vec![i as u8; 4096]),
                    }
                    .encode(i)
                })
                .collect();
            w.write_frames(&frames).await.unwrap();
        });
        let mut r = FrameReader::new(b);
        for i in 0..200u64 {
            let raw = r.read_frame().await.unwrap().unwrap();
            assert_eq!(raw.id, i);
            match Request::decode(&raw).unwrap() {
                Request::Write { offset, data, .. } => {
                    assert_eq!(offset, i * 4096);
                    assert!(data.iter().all(|&x| x == i as u8));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        writer.await.unwrap();
        assert!(r.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let enc = Request::Ping.encode(1).to_vec();
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&enc[..enc.len() - 1]).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b);
        assert!(matches!(r.read_frame().await, Err(ProtoError::Truncated)));
    }

    #[tokio::test]
    async fn bad_magic_is_seen_before_a_full_header() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(r.read_frame().await, Err(ProtoError::BadMagic(_))));
    }

    #[tokio::test]
    async fn flipped_bit_fails_the_checksum() {
        let mut enc = Request::Write {
            offset: 0,
            fua: false,
            data: Bytes::from(vec![7u8; 512]),
        }
        .encode(3)
        .to_vec();
        enc[100] ^= 1;
        let (mut a, b) = tokio::io::duplex(4096);
        a.write_all(&enc).await.unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(
            r.read_frame().await,
            Err(ProtoError::Checksum { id: 3, .. })
        ));
    }

    #[tokio::test]
    async fn absurd_length_is_refused_without_waiting() {
        let mut enc = Request::Ping.encode(1).to_vec();
        enc[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let (mut a, b) = tokio::io::duplex(4096);
        a.write_all(&enc).await.unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(
            r.read_frame().await,
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn wrong_version_is_named() {
        let mut enc = Request::Ping.encode(1).to_vec();
        enc[4] = 9;
        let (mut a, b) = tokio::io::duplex(4096);
        a.write_all(&enc).await.unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(
            r.read_frame().await,
            Err(ProtoError::UnsupportedVersion(9))
        ));
    }

    #[tokio::test]
    async fn a_local_link_delivers_frames_in_order_with_payloads_apart() {
        let (a, b) = local_link();
        let (_a_rx, a_tx) = a.split();
        let (b_rx, _b_tx) = b.split();
        let mut writer = FrameWriter::<tokio::io::Sink>::local(a_tx);
        let mut reader = FrameReader::<tokio::io::Empty>::local(b_rx);
        let data = Bytes::from(vec![7u8; 8192]);
        let frames: Vec<EncodedFrame> = (0..300u64)
            .map(|id| {
                Request::Write {
                    offset: id * 8192,
                    fua: id % 2 == 0,
                    data: data.clone(),
                }
                .encode(id)
            })
            .collect();
        let sender = tokio::spawn(async move {
            writer.write_frames(&frames).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        for id in 0..300u64 {
            let raw = reader.read_frame().await.unwrap().unwrap();
            assert_eq!(raw.id, id);
            // The very same buffer, not a copy.
            assert_eq!(raw.payload.as_ref().unwrap().as_ptr(), data.as_ptr());
            match Request::decode(&raw).unwrap() {
                Request::Write {
                    offset,
                    fua,
                    data: got,
                } => {
                    assert_eq!((offset, fua), (id * 8192, id % 2 == 0));
                    assert_eq!(got, data);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        sender.await.unwrap();
        assert!(reader.read_frame().await.unwrap().is_none());
    }
}
