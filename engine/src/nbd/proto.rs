//! NBD wire constants and the fixed-size messages of the protocol.
//!
//! Owns every magic number, flag and type value the frontend speaks, and the
//! encoding of the small fixed headers (request, simple reply, option request,
//! option reply). It never does IO: the handshake and transmission modules read
//! and write the bytes; this module only turns them into typed values and back.
//! Values follow the NBD protocol document (`doc/proto.md` of the reference
//! implementation).

use bytes::{BufMut, BytesMut};

/// `NBDMAGIC`, the first 8 bytes the server sends on every connection.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent after `NBD_MAGIC` in newstyle negotiation, and by the client
/// in front of every option.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply in fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (client → server, 32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Transmission flags (16 bits, sent with the export size).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types. Errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information types carried in `REP_INFO` replies to `OPT_INFO` / `OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Error values of the transmission phase (NBD's own numbering, which matches
/// the common Linux errno values but is defined by the protocol, not the OS).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Smallest request alignment we advertise and enforce. 512 keeps the kernel's
/// logical sector size and lets the volume assume sector-aligned IO.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The size at which IO is efficient (the replicas' block size).
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// The largest READ or WRITE payload accepted: 32 MiB, the size the protocol
/// says no client should be refused.
pub const MAX_BLOCK_SIZE: u32 = 32 * 1024 * 1024;

/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Size of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Size of an option request header: magic, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Zero padding after the `OPT_EXPORT_NAME` reply unless NO_ZEROES was agreed.
pub const EXPORT_NAME_PADDING: usize = 124;

/// The server's first message on a connection.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OPTION_MAGIC.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// The header of one option the client sent during negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(buf: &[u8; OPTION_HEADER_LEN]) -> Self {
        OptionHeader {
            magic: u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes")),
            option: u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes")),
            len: u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes")),
        }
    }
}

/// Appends one option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    let len = u32::try_from(data.len()).expect("option replies are small");
    out.reserve(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(len);
    out.put_slice(data);
}

/// The payload of a `REP_INFO` carrying `INFO_EXPORT`.
pub fn info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// The payload of a `REP_INFO` carrying `INFO_BLOCK_SIZE`.
pub fn info_block_size() -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
    out[6..10].copy_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
    out[10..14].copy_from_slice(&MAX_BLOCK_SIZE.to_be_bytes());
    out
}

/// The payload of a `REP_INFO` carrying a string (`INFO_NAME`, `INFO_DESCRIPTION`).
pub fn info_string(info_type: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&info_type.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// One transmission request header as sent by the client (the WRITE payload,
/// if any, follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub fn decode(buf: &[u8; REQUEST_HEADER_LEN]) -> Self {
        RequestHeader {
            magic: u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes")),
            flags: u16::from_be_bytes(buf[4..6].try_into().expect("2 bytes")),
            command: u16::from_be_bytes(buf[6..8].try_into().expect("2 bytes")),
            handle: u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(buf[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(buf[24..28].try_into().expect("4 bytes")),
        }
    }

    /// The bytes a client puts on the wire for this header (used by tests and
    /// kept next to `decode` so the two cannot drift apart).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&self.magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Appends a simple reply header (the READ payload, if any, travels apart).
pub fn put_simple_reply(out: &mut BytesMut, error: u32, handle: u64) {
    out.reserve(SIMPLE_REPLY_LEN);
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(handle);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes_are_pinned() {
        assert_eq!(
            greeting(),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0x00, 0x03
            ]
        );
    }

    #[test]
    fn request_header_round_trips() {
        let header = RequestHeader {
            magic: REQUEST_MAGIC,
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 0x1000,
            len: 512,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&bytes), header);
    }

    #[test]
    fn simple_reply_layout() {
        let mut out = BytesMut::new();
        put_simple_reply(&mut out, EINVAL, 7);
        assert_eq!(
            &out[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn option_reply_layout() {
        let mut out = BytesMut::new();
        put_option_reply(&mut out, OPT_GO, REP_ERR_UNKNOWN, b"");
        assert_eq!(
            &out[..],
            &[0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 0]
        );
    }

    #[test]
    fn block_size_info_layout() {
        let info = info_block_size();
        assert_eq!(u16::from_be_bytes([info[0], info[1]]), INFO_BLOCK_SIZE);
        assert_eq!(u32::from_be_bytes(info[2..6].try_into().unwrap()), 512);
        assert_eq!(u32::from_be_bytes(info[6..10].try_into().unwrap()), 4096);
        assert_eq!(
            u32::from_be_bytes(info[10..14].try_into().unwrap()),
            32 << 20
        );
    }
}
