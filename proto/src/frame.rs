//! Frame layout: a fixed 24-byte header, then a body of message fields
//! followed by the data payload (for writes and read replies).
//!
//! ```text
//! offset size field
//!  0      4   magic     b"SHRP"
//!  4      1   version   PROTOCOL_VERSION
//!  5      1   kind      message kind (requests < 0x80 <= replies)
//!  6      2   flags     reserved, zero
//!  8      8   id        request id, echoed by the reply
//! 16      4   body_len  length of fields + payload
//! 20      4   crc       crc32 of header bytes 0..20, then the whole body
//! ```
//!
//! All integers are little-endian. The checksum covers the header too, so a
//! flipped length or id is caught, not only a flipped payload byte. Headers
//! and payloads travel apart: [`EncodedFrame`] keeps the payload as its own
//! `Bytes`, and decoding hands the payload out as a slice of the receive
//! buffer, never copied.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ProtoError;
use crate::PROTOCOL_VERSION;

pub const MAGIC: [u8; 4] = *b"SHRP";
pub const FRAME_HEADER_LEN: usize = 24;

/// Largest data payload in one READ or WRITE. Engines split bigger client
/// requests.
pub const MAX_IO_LEN: u32 = 4 << 20;

/// Largest body accepted: one full IO payload plus room for fields.
pub const MAX_BODY_LEN: u32 = MAX_IO_LEN + 64 * 1024;

/// Bodies this long or longer are received into a buffer of their own,
/// placed so that a data payload lands IO-aligned (`FrameReader`).
pub(crate) const LARGE_BODY: usize = 64 * 1024;

/// A received frame whose checksum has been verified, body not yet parsed.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub kind: u8,
    pub id: u64,
    pub body: Bytes,
}

impl RawFrame {
    /// A frame read off a stream: fields and payload in one body.
    pub fn new(kind: u8, id: u64, body: Bytes) -> RawFrame {
        RawFrame { kind, id, body }
    }
}

/// A frame ready to send: the header and fields in `head`, the data payload
/// (if any) separately so it can go out in a vectored write without a copy.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub head: Bytes,
    pub payload: Option<Bytes>,
}

impl EncodedFrame {
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.as_ref().map_or(0, |p| p.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Header, fields and payload as one contiguous buffer (tests, tools).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = self.head.to_vec();
        if let Some(p) = &self.payload {
            v.extend_from_slice(p);
        }
        v
    }
}

/// Builds one frame: call [`FrameBuilder::new`], put the fields into
/// [`FrameBuilder::fields`], then [`FrameBuilder::finish`] with the payload.
pub(crate) struct FrameBuilder {
    buf: BytesMut,
    kind: u8,
    id: u64,
}

impl FrameBuilder {
    pub(crate) fn new(kind: u8, id: u64) -> FrameBuilder {
        let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + 64);
        buf.resize(FRAME_HEADER_LEN, 0);
        FrameBuilder { buf, kind, id }
    }

    pub(crate) fn fields(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    pub(crate) fn finish(mut self, payload: Option<Bytes>) -> EncodedFrame {
        let fields_len = self.buf.len() - FRAME_HEADER_LEN;
        let payload_len = payload.as_ref().map_or(0, |p| p.len());
        let body_len = u32::try_from(fields_len + payload_len).expect("frame body fits in u32");
        {
            let mut h = &mut self.buf[..FRAME_HEADER_LEN];
            h.put_slice(&MAGIC);
            h.put_u8(PROTOCOL_VERSION);
            h.put_u8(self.kind);
            h.put_u16_le(0);
            h.put_u64_le(self.id);
            h.put_u32_le(body_len);
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.buf[..20]);
        crc.update(&self.buf[FRAME_HEADER_LEN..]);
        if let Some(p) = &payload {
            crc.update(p);
        }
        let sum = crc.finalize();
        self.buf[20..24].copy_from_slice(&sum.to_le_bytes());
        EncodedFrame {
            head: self.buf.freeze(),
            payload,
        }
    }
}

/// Takes one whole frame off the front of `buf`, if one is there.
///
/// Returns `Ok(None)` when more bytes are needed. Any error means the stream
/// can no longer be trusted and the connection must close.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<RawFrame>, ProtoError> {
    if buf.len() < FRAME_HEADER_LEN {
        // Reject a wrong magic as soon as it is visible, so a stray HTTP
        // client or port scan is answered at once rather than waited on.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            return Err(ProtoError::BadMagic(magic_of(&buf[..n])));
        }
        return Ok(None);
    }
    let mut h = &buf[..FRAME_HEADER_LEN];
    let mut magic = [0u8; 4];
    h.copy_to_slice(&mut magic);
    if magic != MAGIC {
        return Err(ProtoError::BadMagic(u32::from_be_bytes(magic)));
    }
    let version = h.get_u8();
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::UnsupportedVersion(version));
    }
    let kind = h.get_u8();
    let _flags = h.get_u16_le();
    let id = h.get_u64_le();
    let body_len = h.get_u32_le();
    let expected = h.get_u32_le();
    if body_len > MAX_BODY_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: body_len as u64,
            max: MAX_BODY_LEN as u64,
        });
    }
    let total = FRAME_HEADER_LEN + body_len as usize;
    if buf.len() < total {
        // A large body is read into memory of its own (`FrameReader`);
        // growing this buffer for it would copy what is here already.
        if (body_len as usize) < LARGE_BODY {
            buf.reserve(total - buf.len());
        }
        return Ok(None);
    }
    check_sum(&buf[..20], &buf[FRAME_HEADER_LEN..total], id, expected)?;
    buf.advance(FRAME_HEADER_LEN);
    let body = buf.split_to(body_len as usize).freeze();
    Ok(Some(RawFrame::new(kind, id, body)))
}

/// Verifies a frame whose header was checked by [`decode_frame`] and whose
/// body was received apart from it.
pub(crate) fn finish_large(
    header: &[u8; FRAME_HEADER_LEN],
    body: Bytes,
) -> Result<RawFrame, ProtoError> {
    let kind = header[5];
    let id = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let expected = u32::from_le_bytes(header[20..24].try_into().unwrap());
    check_sum(&header[..20], &body, id, expected)?;
    Ok(RawFrame::new(kind, id, body))
}

/// The frame checksum: crc32 over the header's first 20 bytes and the body.
fn check_sum(header: &[u8], body: &[u8], id: u64, expected: u32) -> Result<(), ProtoError> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(header);
    crc.update(body);
    let actual = crc.finalize();
    if actual != expected {
        return Err(ProtoError::Checksum {
            id,
            expected,
            actual,
        });
    }
    Ok(())
}

fn magic_of(bytes: &[u8]) -> u32 {
    let mut m = [0u8; 4];
    m[..bytes.len()].copy_from_slice(bytes);
    u32::from_be_bytes(m)
}

/// Reads message fields from a frame body, with bounds checks that turn
/// short bodies into errors instead of panics.
pub(crate) struct FieldReader<'a> {
    kind: &'static str,
    body: &'a Bytes,
    pos: usize,
}

impl<'a> FieldReader<'a> {
    /// Reads `frame`'s fields; [`rest`](Self::rest) is its payload.
    pub(crate) fn of(kind: &'static str, frame: &'a RawFrame) -> FieldReader<'a> {
        FieldReader {
            kind,
            body: &frame.body,
            pos: 0,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.body.len());
        let end = end.ok_or_else(|| {
            ProtoError::malformed(
                self.kind,
                format!("body too short: need {n} bytes at {}", self.pos),
            )
        })?;
        let s = &self.body[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    pub(crate) fn string(&mut self) -> Result<String, ProtoError> {
        let n = self.u16()? as usize;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| ProtoError::malformed(self.kind, "string is not UTF-8"))
    }

    /// The rest of the body (the payload), as a zero-copy slice.
    pub(crate) fn rest(&mut self) -> Bytes {
        let rest = self.body.slice(self.pos..);
        self.pos = self.body.len();
        rest
    }

    /// Checks that the body held nothing after the fields.
    pub(crate) fn end(&self) -> Result<(), ProtoError> {
        if self.pos != self.body.len() {
            return Err(ProtoError::malformed(
                self.kind,
                format!("{} unexpected trailing bytes", self.body.len() - self.pos),
            ));
        }
        Ok(())
    }
}

pub(crate) fn put_string(buf: &mut BytesMut, s: &str) {
    // Strings on the wire are names and messages; truncate rather than fail
    // if a message is absurdly long, cutting at a character boundary.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.put_u16_le(end as u16);
    buf.put_slice(&s.as_bytes()[..end]);
}
