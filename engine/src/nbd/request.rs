//! Turning a transmission request header into a checked operation.
//!
//! Owns the rules that decide, before the backend is ever called, whether a
//! request is acceptable: known command, flags documented for that command,
//! length within the advertised maximum, range inside the export, offset and
//! length aligned to the advertised minimum block size. Pure functions only;
//! the transmission loop does the IO.

use super::error::NbdError;
use super::proto::{self, RequestHeader};

/// A request that passed every check, ready for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, fua: bool },
    Disconnect,
}

/// Checks `header` against an export of `size` bytes.
///
/// Error choices follow the protocol document: writes (and write-zeroes)
/// reaching past the end get `ENOSPC`; reads and trims past the end,
/// misaligned or oversized requests, unknown commands and flags get `EINVAL`.
/// An offset + length that overflows 64 bits is past the end like any other.
pub fn check(header: &RequestHeader, size: u64) -> Result<Op, NbdError> {
    let (offset, len) = (header.offset, header.len);
    let fua = header.flags & proto::CMD_FLAG_FUA != 0;
    match header.command {
        proto::CMD_READ => {
            // Clients are known to set FUA on any command; it is harmless.
            allow_flags(header.flags, proto::CMD_FLAG_FUA)?;
            check_len(len, proto::MAX_BLOCK_SIZE)?;
            check_range(offset, len, size, NbdError::Invalid)?;
            check_alignment(offset, len)?;
            Ok(Op::Read { offset, len })
        }
        proto::CMD_WRITE => {
            allow_flags(header.flags, proto::CMD_FLAG_FUA)?;
            check_len(len, proto::MAX_BLOCK_SIZE)?;
            check_range(offset, len, size, NbdError::NoSpace)?;
            check_alignment(offset, len)?;
            Ok(Op::Write { offset, len, fua })
        }
        proto::CMD_WRITE_ZEROES => {
            // NO_HOLE asks for a fully provisioned range; the volume does not
            // distinguish, so the flag is accepted and ignored. No length cap:
            // there is no payload, and the backend takes up to 4 GiB - 1.
            allow_flags(header.flags, proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE)?;
            check_range(offset, len, size, NbdError::NoSpace)?;
            check_alignment(offset, len)?;
            Ok(Op::WriteZeroes { offset, len, fua })
        }
        proto::CMD_TRIM => {
            allow_flags(header.flags, proto::CMD_FLAG_FUA)?;
            check_range(offset, len, size, NbdError::Invalid)?;
            check_alignment(offset, len)?;
            Ok(Op::Trim { offset, len })
        }
        proto::CMD_FLUSH => {
            // Offset and length are reserved (zero); some kernels have sent
            // other values, and a flush must not fail over them.
            allow_flags(header.flags, proto::CMD_FLAG_FUA)?;
            Ok(Op::Flush)
        }
        proto::CMD_DISC => Ok(Op::Disconnect),
        // CACHE, BLOCK_STATUS (needs structured replies) and anything unknown.
        _ => Err(NbdError::Invalid),
    }
}

fn allow_flags(flags: u16, allowed: u16) -> Result<(), NbdError> {
    if flags & !allowed == 0 {
        Ok(())
    } else {
        Err(NbdError::Invalid)
    }
}

fn check_len(len: u32, max: u32) -> Result<(), NbdError> {
    if len <= max {
        Ok(())
    } else {
        Err(NbdError::Invalid)
    }
}

fn check_range(offset: u64, len: u32, size: u64, past_end: NbdError) -> Result<(), NbdError> {
    match offset.checked_add(u64::from(len)) {
        Some(end) if end <= size => Ok(()),
        _ => Err(past_end),
    }
}

fn check_alignment(offset: u64, len: u32) -> Result<(), NbdError> {
    let min = u64::from(proto::MIN_BLOCK_SIZE);
    if offset.is_multiple_of(min) && u64::from(len).is_multiple_of(min) {
        Ok(())
    } else {
        Err(NbdError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn req(command: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            magic: proto::REQUEST_MAGIC,
            flags,
            command,
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn accepts_well_formed_requests() {
        assert_eq!(
            check(&req(proto::CMD_READ, 0, 4096, 4096), SIZE),
            Ok(Op::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(
            check(
                &req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, SIZE - 512, 512),
                SIZE
            ),
            Ok(Op::Write {
                offset: SIZE - 512,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            check(
                &req(
                    proto::CMD_WRITE_ZEROES,
                    proto::CMD_FLAG_NO_HOLE,
                    0,
                    SIZE as u32
                ),
                SIZE
            ),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: SIZE as u32,
                fua: false
            })
        );
        assert_eq!(
            check(&req(proto::CMD_TRIM, 0, 0, 0), SIZE),
            Ok(Op::Trim { offset: 0, len: 0 })
        );
        assert_eq!(check(&req(proto::CMD_FLUSH, 0, 7, 9), SIZE), Ok(Op::Flush));
        assert_eq!(
            check(&req(proto::CMD_DISC, 0, 0, 0), SIZE),
            Ok(Op::Disconnect)
        );
        assert_eq!(
            check(&req(proto::CMD_READ, proto::CMD_FLAG_FUA, 0, 512), SIZE),
            Ok(Op::Read {
                offset: 0,
                len: 512
            })
        );
    }

    #[test]
    fn past_the_end_is_enospc_for_writes_and_einval_otherwise() {
        let past = [(SIZE, 512), (SIZE - 512, 1024), (u64::MAX - 511, 1024)];
        for (offset, len) in past {
            assert_eq!(
                check(&req(proto::CMD_WRITE, 0, offset, len), SIZE),
                Err(NbdError::NoSpace)
            );
            assert_eq!(
                check(&req(proto::CMD_WRITE_ZEROES, 0, offset, len), SIZE),
                Err(NbdError::NoSpace)
            );
            assert_eq!(
                check(&req(proto::CMD_READ, 0, offset, len), SIZE),
                Err(NbdError::Invalid)
            );
            assert_eq!(
                check(&req(proto::CMD_TRIM, 0, offset, len), SIZE),
                Err(NbdError::Invalid)
            );
        }
    }

    #[test]
    fn rejects_oversized_misaligned_and_unknown() {
        let big = proto::MAX_BLOCK_SIZE + 512;
        let huge = 1u64 << 40;
        assert_eq!(
            check(&req(proto::CMD_READ, 0, 0, big), huge),
            Err(NbdError::Invalid)
        );
        assert_eq!(
            check(&req(proto::CMD_WRITE, 0, 0, big), huge),
            Err(NbdError::Invalid)
        );
        for cmd in [
            proto::CMD_READ,
            proto::CMD_WRITE,
            proto::CMD_TRIM,
            proto::CMD_WRITE_ZEROES,
        ] {
            assert_eq!(check(&req(cmd, 0, 1, 512), SIZE), Err(NbdError::Invalid));
            assert_eq!(check(&req(cmd, 0, 0, 100), SIZE), Err(NbdError::Invalid));
            assert_eq!(
                check(&req(cmd, 1 << 7, 0, 512), SIZE),
                Err(NbdError::Invalid)
            );
        }
        assert_eq!(
            check(&req(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 512), SIZE),
            Err(NbdError::Invalid)
        );
        assert_eq!(
            check(
                &req(proto::CMD_WRITE, proto::CMD_FLAG_NO_HOLE, 0, 512),
                SIZE
            ),
            Err(NbdError::Invalid)
        );
        assert_eq!(
            check(
                &req(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_FAST_ZERO, 0, 512),
                SIZE
            ),
            Err(NbdError::Invalid)
        );
        for cmd in [proto::CMD_CACHE, proto::CMD_BLOCK_STATUS, 8, 0xffff] {
            assert_eq!(check(&req(cmd, 0, 0, 512), SIZE), Err(NbdError::Invalid));
        }
    }
}
