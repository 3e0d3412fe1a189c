//! The `sync` engine: plain pread/pwrite/fdatasync/fallocate, each run on
//! tokio's blocking thread pool so the reactor never waits on a disk.
//! It is the fallback where io_uring is not allowed, and the reference the
//! uring engine is tested against. Like the uring engine it reads into
//! [`AlignedBuf`]s, so O_DIRECT files work the same through either.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::aligned::AlignedBuf;
use super::{DiskIo, IoFuture};

#[derive(Debug, Default)]
pub struct SyncIo;

impl SyncIo {
    pub fn new() -> SyncIo {
        SyncIo
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(format!("blocking IO task failed: {e}")))?
}

/// Reads until `buf` is full or the file ends; the rest stays zero.
pub(super) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(super) fn punch_hole_blocking(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let too_big = || std::io::Error::from_raw_os_error(libc::EFBIG);
    let off = i64::try_from(offset).map_err(|_| too_big())?;
    let len = i64::try_from(len).map_err(|_| too_big())?;
    fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
    .map_err(std::io::Error::from)
}

impl DiskIo for SyncIo {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn read_at(&self, file: Arc<File>, offset: u64, len: usize) -> IoFuture<AlignedBuf> {
        Box::pin(async move {
            if len == 0 {
                return Ok(AlignedBuf::zeroed(0));
            }
            blocking(move || {
                let mut buf = AlignedBuf::zeroed(len);
                read_full_at(&file, &mut buf, offset)?;
                Ok(buf)
            })
            .await
        })
    }

    fn write_at(&self, file: Arc<File>, offset: u64, data: Bytes) -> IoFuture<()> {
        Box::pin(async move {
            if data.is_empty() {
                return Ok(());
            }
            blocking(move || file.write_all_at(&data, offset)).await
        })
    }

    fn sync_data(&self, file: Arc<File>) -> IoFuture<()> {
        Box::pin(blocking(move || file.sync_data()))
    }

    fn punch_hole(&self, file: Arc<File>, offset: u64, len: u64) -> IoFuture<()> {
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            blocking(move || punch_hole_blocking(&file, offset, len)).await
        })
    }
}
