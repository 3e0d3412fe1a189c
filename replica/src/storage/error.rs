//! The storage layer's one error type, and its mapping to the wire's
//! [`ErrorCode`]. Nothing else in the replica invents a storage error.

use shorthorn_proto::{ErrorCode, Generation};

// The OS error is part of each message (the wire carries only the text),
// so it is not also chained as a source: a chain would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error("{context}: no space left on device")]
    NoSpace {
        context: String,
        error: std::io::Error,
    },
    #[error("IO of {len} bytes at offset {offset} is past the end of the {size}-byte volume")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("no volume named {0:?}")]
    NotFound(String),
    #[error("volume {name:?} already exists with size {size}, not {requested}")]
    AlreadyExists {
        name: String,
        size: u64,
        requested: u64,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("generation {requested} is older than the replica's {current}")]
    StaleGeneration {
        current: Generation,
        requested: Generation,
    },
    #[error("generation {generation} is already held by {owner:?}")]
    GenerationTaken {
        generation: Generation,
        owner: String,
    },
    #[error("replica data is corrupt: {0}")]
    Corrupt(String),
    /// The volume was deleted while a handle to it was still held.
    #[error("volume {0:?} was deleted")]
    Deleted(String),
    /// Someone else holds what was asked for (a data directory).
    #[error("{0}")]
    InUse(String),
    /// A new volume would not fit on this daemon's disk.
    #[error("{0}")]
    NoRoom(String),
}

impl StorageError {
    /// Wraps an IO error with what was being done; a full disk becomes
    /// [`StorageError::NoSpace`] so the engine can tell it apart.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> StorageError {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.kind() == std::io::ErrorKind::StorageFull
        {
            StorageError::NoSpace {
                context,
                error: source,
            }
        } else {
            StorageError::Io {
                context,
                error: source,
            }
        }
    }

    /// The code a replica daemon answers with on the wire.
    pub fn code(&self) -> ErrorCode {
        match self {
            StorageError::Io { .. } => ErrorCode::Io,
            StorageError::NoSpace { .. } => ErrorCode::NoSpace,
            StorageError::OutOfRange { .. } => ErrorCode::OutOfRange,
            StorageError::NotFound(_) | StorageError::Deleted(_) => ErrorCode::NotFound,
            StorageError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            StorageError::Invalid(_) => ErrorCode::Invalid,
            StorageError::InUse(_) => ErrorCode::Busy,
            StorageError::NoRoom(_) => ErrorCode::NoSpace,
            StorageError::StaleGeneration { .. } | StorageError::GenerationTaken { .. } => {
                ErrorCode::StaleGeneration
            }
            // A replica whose files cannot be trusted is as good as a failed
            // disk: the engine drops it and rebuilds.
            StorageError::Corrupt(_) => ErrorCode::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_no_space() {
        let e = StorageError::io("write", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(e, StorageError::NoSpace { .. }));
        assert_eq!(e.code(), ErrorCode::NoSpace);
        let e = StorageError::io("write", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.code(), ErrorCode::Io);
        // The OS error is said once, in the message, and not again as a
        // source (which error reports print after the message).
        assert_eq!(e.to_string().matches("os error 5").count(), 1, "{e}");
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(
            StorageError::OutOfRange {
                offset: 1,
                len: 2,
                size: 3
            }
            .code(),
            ErrorCode::OutOfRange
        );
    }
}
