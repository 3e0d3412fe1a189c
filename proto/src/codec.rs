//! Async framing over any byte stream: a buffered [`FrameReader`] that hands
//! out whole, checksum-verified frames, and a [`FrameWriter`] that sends many
//! frames in one vectored write, headers and payloads side by side.

use std::io::IoSlice;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::aligned::{AlignedBuf, IO_ALIGN};
use crate::error::ProtoError;
use crate::frame::{
    decode_frame, finish_large, EncodedFrame, RawFrame, FRAME_HEADER_LEN, LARGE_BODY,
};

/// Initial receive buffer; it grows to fit one maximum frame when needed.
const READ_BUF: usize = 256 * 1024;

pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    /// The last frame had a large body: the next one may too (a stream of
    /// 128 KiB writes, a rebuild's copies), so its header is read alone
    /// first, and its body then goes straight from the socket into aligned
    /// memory instead of through `buf` and a copy.
    after_large: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_BUF),
            after_large: false,
        }
    }

    /// The next whole frame; `Ok(None)` on a clean end of stream between
    /// frames. A stream that ends inside a frame is [`ProtoError::Truncated`].
    pub async fn read_frame(&mut self) -> Result<Option<RawFrame>, ProtoError> {
        let FrameReader {
            inner,
            buf,
            after_large,
        } = self;
        loop {
            if let Some(frame) = decode_frame(buf)? {
                *after_large = frame.body.len() >= LARGE_BODY;
                return Ok(Some(frame));
            }
            if buf.len() >= FRAME_HEADER_LEN {
                // decode_frame checked the header: only the body is missing.
                let body_len = u32::from_le_bytes(buf[16..20].try_into().unwrap()) as usize;
                if body_len >= LARGE_BODY {
                    *after_large = true;
                    return read_large(inner, buf, body_len).await.map(Some);
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_BUF);
            }
            let read = if *after_large && buf.len() < FRAME_HEADER_LEN {
                let header_rest = FRAME_HEADER_LEN - buf.len();
                inner.read_buf(&mut (&mut *buf).limit(header_rest)).await?
            } else {
                inner.read_buf(buf).await?
            };
            if read == 0 {
                return if buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtoError::Truncated)
                };
            }
        }
    }
}

/// Receives a large body into memory of its own, placed so that a data
/// payload starts on an IO-aligned address: a replica then writes it to its
/// O_DIRECT file without copying it, and the receive buffer is never grown
/// (and copied) to hold it.
async fn read_large<R: AsyncRead + Unpin>(
    inner: &mut R,
    buf: &mut BytesMut,
    body_len: usize,
) -> Result<RawFrame, ProtoError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    header.copy_from_slice(&buf[..FRAME_HEADER_LEN]);
    buf.advance(FRAME_HEADER_LEN);
    let pad = crate::message::payload_offset(header[5])
        .map_or(0, |fields| (IO_ALIGN - fields % IO_ALIGN) % IO_ALIGN);
    let have = buf.len().min(body_len);
    let body = AlignedBuf::read_after(inner, pad, &buf[..have], body_len)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProtoError::Truncated,
            _ => ProtoError::from(e),
        })?;
    buf.advance(have);
    let body = body.into_bytes().slice(pad..);
    finish_large(&header, body)
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
    pub async fn write_frames<'f>(
        &mut self,
        frames: impl IntoIterator<Item = &'f EncodedFrame>,
    ) -> std::io::Result<()> {
        let inner = &mut self.inner;
        let frames = frames.into_iter();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(frames.size_hint().0 * 2);
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
    async fn small_writes_in_flight_leave_the_receive_buffer_free() {
        // 8 MiB of 4 KiB writes, the last 64 decoded ones kept as if still
        // being written (a queue depth of 64): their payloads must not hold
        // on to the receive buffer, which is then reused in place whenever
        // it fills. Bodies landing outside one buffer's span mean it was
        // replaced by a new allocation.
        const WRITES: u64 = 2048;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a);
            for i in 0..WRITES {
                let (frame, _) = write_frame(i, 4096);
                w.write_frame(&frame).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut r = FrameReader::new(b);
        let mut in_flight = std::collections::VecDeque::new();
        let (mut lowest, mut highest) = (usize::MAX, 0);
        for i in 0..WRITES {
            let raw = r.read_frame().await.unwrap().unwrap();
            assert_eq!(raw.id, i);
            let at = raw.body.as_ptr() as usize;
            (lowest, highest) = (lowest.min(at), highest.max(at + raw.body.len()));
            let Request::Write { data, .. } = Request::decode(&raw).unwrap() else {
                panic!("not a write");
            };
            assert_eq!(data, write_frame(i, 4096).1);
            in_flight.push_back(data);
            if in_flight.len() > 64 {
                in_flight.pop_front();
            }
        }
        assert!(r.read_frame().await.unwrap().is_none());
        writer.await.unwrap();
        assert!(
            highest - lowest <= READ_BUF,
            "bodies spread over {} KiB: the receive buffer was replaced",
            (highest - lowest) >> 10
        );
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

    fn write_frame(id: u64, len: usize) -> (EncodedFrame, Bytes) {
        let data: Bytes = (0..len).map(|i| (i * 31 + id as usize) as u8).collect();
        let frame = Request::Write {
            offset: id << 20,
            fua: false,
            data: data.clone(),
        }
        .encode(id);
        (frame, data)
    }

    #[tokio::test]
    async fn large_bodies_arrive_whole_with_aligned_payloads() {
        // Large writes (received into their own memory) between small ones,
        // through a pipe much smaller than a frame.
        let sizes = [
            4096,
            128 << 10,
            100,
            1 << 20,
            64 << 10,
            (256 << 10) + 5,
            8192,
        ];
        let frames: Vec<(EncodedFrame, Bytes)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| write_frame(i as u64, len))
            .collect();
        let (a, b) = tokio::io::duplex(7000);
        let wire: Vec<EncodedFrame> = frames.iter().map(|(f, _)| f.clone()).collect();
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a);
            w.write_frames(&wire).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut r = FrameReader::new(b);
        for (i, (_, data)) in frames.iter().enumerate() {
            let raw = r.read_frame().await.unwrap().unwrap();
            assert_eq!(raw.id, i as u64);
            let Request::Write {
                offset, data: got, ..
            } = Request::decode(&raw).unwrap()
            else {
                panic!("not a write");
            };
            assert_eq!(offset, (i as u64) << 20);
            assert_eq!(&got, data);
            if raw.body.len() >= crate::frame::LARGE_BODY {
                assert_eq!(got.as_ptr() as usize % IO_ALIGN, 0, "payload of frame {i}");
            }
        }
        assert!(r.read_frame().await.unwrap().is_none());
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_stream_of_large_writes_is_received_without_copies() {
        // All of it waiting at once, as when an engine streams 128 KiB
        // writes: a greedy read would take whole frames into the receive
        // buffer, and their payloads would then need copying to aligned
        // memory before an O_DIRECT write. After the first large frame each
        // header is read alone and each body straight into aligned memory.
        let frames: Vec<(EncodedFrame, Bytes)> =
            (0..8u64).map(|i| write_frame(i, 128 << 10)).collect();
        let (a, b) = tokio::io::duplex(4 << 20);
        let mut w = FrameWriter::new(a);
        let wire: Vec<EncodedFrame> = frames.iter().map(|(f, _)| f.clone()).collect();
        w.write_frames(&wire).await.unwrap();
        w.shutdown().await.unwrap();
        let mut r = FrameReader::new(b);
        for (i, (_, data)) in frames.iter().enumerate() {
            let raw = r.read_frame().await.unwrap().unwrap();
            let Request::Write { data: got, .. } = Request::decode(&raw).unwrap() else {
                panic!("not a write");
            };
            assert_eq!(&got, data, "frame {i}");
            if i > 0 {
                assert!(
                    crate::aligned::is_aligned(&got),
                    "frame {i}'s payload was received unaligned (through the buffer)"
                );
            }
        }
        assert!(r.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_large_body_with_a_bad_checksum_or_cut_short_is_refused() {
        // Through a small pipe, so the body is received on its own.
        async fn read_from_trickle(bytes: Vec<u8>) -> Result<Option<RawFrame>, ProtoError> {
            let (mut a, b) = tokio::io::duplex(5000);
            let writer = tokio::spawn(async move {
                let _ = a.write_all(&bytes).await;
            });
            let mut r = FrameReader::new(b);
            let got = r.read_frame().await;
            writer.await.unwrap();
            got
        }
        let (frame, _) = write_frame(9, 128 << 10);
        let mut bytes = frame.to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            read_from_trickle(bytes).await,
            Err(ProtoError::Checksum { id: 9, .. })
        ));
        let mut whole = frame.to_vec();
        whole.truncate(whole.len() - 1000);
        assert!(matches!(
            read_from_trickle(whole).await,
            Err(ProtoError::Truncated)
        ));
    }
}
