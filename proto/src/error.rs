//! Errors: what can go wrong decoding a stream ([`ProtoError`]) and what a
//! replica answers when a well-formed request fails ([`RemoteError`]).

use std::fmt;

/// A failure to read or decode the byte stream. Any of these ends the
/// connection it happened on (and only that one).
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame magic {0:#010x}: not a shorthorn replica protocol peer")]
    BadMagic(u32),
    #[error("peer speaks protocol version {0}, this build speaks {ours}", ours = crate::PROTOCOL_VERSION)]
    UnsupportedVersion(u8),
    #[error("frame body of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("checksum mismatch on frame {id}: expected {expected:#010x}, got {actual:#010x}")]
    Checksum { id: u64, expected: u32, actual: u32 },
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

impl ProtoError {
    pub(crate) fn malformed(kind: &'static str, reason: impl Into<String>) -> ProtoError {
        ProtoError::Malformed {
            kind,
            reason: reason.into(),
        }
    }

    /// The wire error code a server answers with before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::Io(_) => ErrorCode::Io,
            ProtoError::UnsupportedVersion(_) => ErrorCode::VersionMismatch,
            ProtoError::Checksum { .. } => ErrorCode::Checksum,
            ProtoError::UnknownKind(_) => ErrorCode::Unsupported,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// Why a replica refused or failed a request. Part of the protocol: the
/// numbers are stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The disk returned an IO error.
    Io,
    /// The disk is full.
    NoSpace,
    /// Offset or length past the end of the volume.
    OutOfRange,
    /// No such volume on this replica daemon.
    NotFound,
    /// The volume exists with a different size.
    AlreadyExists,
    /// The volume name is not acceptable.
    InvalidName,
    /// The connection's generation is older than the replica's.
    StaleGeneration,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The frame could not be decoded.
    BadFrame,
    /// The frame's checksum did not match its contents.
    Checksum,
    /// Request kind not supported here (or not in this session kind).
    Unsupported,
    /// An IO request arrived on a connection not bound to a volume.
    NotBound,
    /// A request's arguments are invalid (zero size, bad alignment...).
    Invalid,
    /// The replica cannot serve this right now (volume being deleted...).
    Busy,
    /// Anything else; the message says what.
    Internal,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Io => 1,
            ErrorCode::NoSpace => 2,
            ErrorCode::OutOfRange => 3,
            ErrorCode::NotFound => 4,
            ErrorCode::AlreadyExists => 5,
            ErrorCode::InvalidName => 6,
            ErrorCode::StaleGeneration => 7,
            ErrorCode::VersionMismatch => 8,
            ErrorCode::BadFrame => 9,
            ErrorCode::Checksum => 10,
            ErrorCode::Unsupported => 11,
            ErrorCode::NotBound => 12,
            ErrorCode::Invalid => 13,
            ErrorCode::Busy => 14,
            ErrorCode::Internal => 15,
            ErrorCode::Other(n) => n,
        }
    }

    pub fn from_u16(n: u16) -> ErrorCode {
        match n {
            1 => ErrorCode::Io,
            2 => ErrorCode::NoSpace,
            3 => ErrorCode::OutOfRange,
            4 => ErrorCode::NotFound,
            5 => ErrorCode::AlreadyExists,
            6 => ErrorCode::InvalidName,
            7 => ErrorCode::StaleGeneration,
            8 => ErrorCode::VersionMismatch,
            9 => ErrorCode::BadFrame,
            10 => ErrorCode::Checksum,
            11 => ErrorCode::Unsupported,
            12 => ErrorCode::NotBound,
            13 => ErrorCode::Invalid,
            14 => ErrorCode::Busy,
            15 => ErrorCode::Internal,
            n => ErrorCode::Other(n),
        }
    }
}

/// An error answer from the peer: a code for programs, a message for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RemoteError {
        RemoteError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for n in 0..40u16 {
            assert_eq!(ErrorCode::from_u16(n).to_u16(), n);
        }
    }
}
