//! The frontend's error type and its one mapping to NBD error values.
//!
//! A backend (the volume) answers every failed IO with an [`NbdError`]; the
//! transmission loop turns it into the error field of the reply here and
//! nowhere else. This module must not grow errors that cannot be expressed on
//! the wire: anything richer is logged by the backend before it answers.

use super::proto;

/// Why an NBD request failed, as the client will see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum NbdError {
    /// The data could not be read or written (for the volume: no healthy
    /// replica left, or every replica failed).
    #[error("input/output error")]
    Io,
    /// No space left (also the answer to writes past the end of the export).
    #[error("no space left on the volume")]
    NoSpace,
    /// The request itself is wrong: out of range, misaligned, too long, an
    /// unknown command or flag.
    #[error("invalid request")]
    Invalid,
    /// A value is too large to be represented in the reply.
    #[error("value too large")]
    Overflow,
    /// The server (or the volume behind it) is shutting down.
    #[error("server is shutting down")]
    Shutdown,
    /// The operation is not permitted (writes to a read-only volume).
    #[error("operation not permitted")]
    NotPermitted,
    /// The operation is not supported by this backend.
    #[error("operation not supported")]
    NotSupported,
}

impl NbdError {
    /// The value this error puts in the error field of a reply.
    pub fn to_wire(self) -> u32 {
        match self {
            NbdError::Io => proto::EIO,
            NbdError::NoSpace => proto::ENOSPC,
            NbdError::Invalid => proto::EINVAL,
            NbdError::Overflow => proto::EOVERFLOW,
            NbdError::Shutdown => proto::ESHUTDOWN,
            NbdError::NotPermitted => proto::EPERM,
            // The protocol reserves ENOTSUP for fast-zero requests, which we do
            // not advertise, so an unsupported operation is reported as EINVAL.
            NbdError::NotSupported => proto::EINVAL,
        }
    }

    /// The error a client should see for a failed system call, mapped the way
    /// the protocol asks (quota and file-size limits are out-of-space).
    pub fn from_io(e: &std::io::Error) -> NbdError {
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => NbdError::NoSpace,
            Some(libc::EINVAL) => NbdError::Invalid,
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => NbdError::NotPermitted,
            Some(libc::EOVERFLOW) => NbdError::Overflow,
            Some(libc::ESHUTDOWN) => NbdError::Shutdown,
            Some(libc::EOPNOTSUPP) => NbdError::NotSupported,
            _ => NbdError::Io,
        }
    }
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        NbdError::from_io(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_match_the_protocol() {
        assert_eq!(NbdError::Io.to_wire(), 5);
        assert_eq!(NbdError::NoSpace.to_wire(), 28);
        assert_eq!(NbdError::Invalid.to_wire(), 22);
        assert_eq!(NbdError::Overflow.to_wire(), 75);
        assert_eq!(NbdError::Shutdown.to_wire(), 108);
        assert_eq!(NbdError::NotPermitted.to_wire(), 1);
        assert_eq!(NbdError::NotSupported.to_wire(), 22);
    }

    #[test]
    fn system_errors_map_as_the_protocol_asks() {
        let os = std::io::Error::from_raw_os_error;
        assert_eq!(NbdError::from(os(libc::EDQUOT)), NbdError::NoSpace);
        assert_eq!(NbdError::from(os(libc::EFBIG)), NbdError::NoSpace);
        assert_eq!(NbdError::from(os(libc::ENOSPC)), NbdError::NoSpace);
        assert_eq!(NbdError::from(os(libc::EROFS)), NbdError::NotPermitted);
        assert_eq!(NbdError::from(os(libc::EIO)), NbdError::Io);
        assert_eq!(
            NbdError::from(std::io::Error::other("no replica left")),
            NbdError::Io
        );
    }
}
