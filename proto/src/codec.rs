//! Async framing over any byte stream: a buffered [`FrameReader`] that hands
//! out whole, checksum-verified frames, and a [`FrameWriter`] that sends many
//! frames in one vectored write, headers and payloads side by side.

use std::io::IoSlice;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::ProtoError;
use crate::frame::{decode_frame, EncodedFrame, RawFrame};

/// Initial receive buffer; it grows to fit one maximum frame when needed.
const READ_BUF: usize = 256 * 1024;

pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_BUF),
        }
    }

    /// The next whole frame; `Ok(None)` on a clean end of stream between
    /// frames. A stream that ends inside a frame is [`ProtoError::Truncated`].
    pub async fn read_frame(&mut self) -> Result<Option<RawFrame>, ProtoError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(READ_BUF);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtoError::Truncated)
                };
            }
        }
    }

    /// A frame already in the buffer, without reading from the stream. Lets
    /// a server drain a burst of pipelined requests before it replies.
    pub fn try_buffered_frame(&mut self) -> Result<Option<RawFrame>, ProtoError> {
        decode_frame(&mut self.buf)
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

pub struct FrameWriter<W> {
    inner: W,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter { inner }
    }

    pub async fn write_frame(&mut self, frame: &EncodedFrame) -> std::io::Result<()> {
        self.write_frames(std::slice::from_ref(frame)).await
    }

    /// Writes every frame, in order, using as few syscalls as the socket
    /// allows (one `writev` per batch when the socket has room).
    pub async fn write_frames(&mut self, frames: &[EncodedFrame]) -> std::io::Result<()> {
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
            let n = self.inner.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        self.inner.flush().await
    }

    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.inner.shutdown().await
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
}
