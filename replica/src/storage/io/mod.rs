//! The one boundary between the replica and its disk: [`DiskIo`].
//!
//! Two engines implement it: `uring` (an io_uring driven by a task of the
//! async runtime, many requests per syscall) and `sync` (pread/pwrite on
//! tokio's blocking pool). [`open_io`] picks one at start-up; nothing above
//! this module knows which runs. No implementation may block the async
//! reactor: the uring engine only ever enters the kernel to submit and
//! never waits there, the sync engine runs every syscall on a thread of
//! its own.
//!
//! Layer files are opened with O_DIRECT where the filesystem allows it, so
//! the engines pass memory straight to the device: reads land in
//! [`AlignedBuf`]s, and for an O_DIRECT file the caller passes offsets,
//! lengths and write buffers aligned to [`IO_ALIGN`] (the data path does;
//! the engines do not check, the kernel answers EINVAL). For a buffered
//! file anything goes.
//!
//! The trait is object-safe and takes owned buffers and `Arc<File>`s, so a
//! wrapper (fault injection, metrics) can sit in front of either engine.

pub use shorthorn_proto::aligned;
pub mod fault;
mod sync;
mod uring;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

pub use aligned::{AlignedBuf, IO_ALIGN};
pub use sync::SyncIo;
pub use uring::UringIo;

pub type IoFuture<T> = Pin<Box<dyn Future<Output = std::io::Result<T>> + Send>>;

/// Positioned disk IO on open files. Futures must be polled inside a tokio
/// runtime. A future that is dropped early may still complete its IO; one
/// never polled may not start it.
pub trait DiskIo: Send + Sync + 'static {
    /// `"uring"` or `"sync"`.
    fn name(&self) -> &'static str;
    /// Reads `len` bytes at `offset` into aligned memory. Bytes past the end
    /// of the file read as zeros: the buffer returned is always `len` long.
    fn read_at(&self, file: Arc<File>, offset: u64, len: usize) -> IoFuture<AlignedBuf>;
    /// Writes all of `data` at `offset` (short writes are continued).
    fn write_at(&self, file: Arc<File>, offset: u64, data: Bytes) -> IoFuture<()>;
    /// fdatasync: everything written to `file` so far is on stable storage.
    fn sync_data(&self, file: Arc<File>) -> IoFuture<()>;
    /// Deallocates `offset .. offset+len`, keeping the file's size; the range
    /// reads as zeros afterwards.
    fn punch_hole(&self, file: Arc<File>, offset: u64, len: u64) -> IoFuture<()>;
}

/// Which engine to run, as chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEngineChoice {
    /// io_uring if the kernel allows it, else sync.
    Auto,
    /// io_uring or fail.
    Uring,
    /// pread/pwrite on a thread pool.
    Sync,
}

impl FromStr for IoEngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IoEngineChoice::Auto),
            "uring" => Ok(IoEngineChoice::Uring),
            "sync" => Ok(IoEngineChoice::Sync),
            other => Err(format!(
                "unknown IO engine {other:?}: expected auto, uring or sync"
            )),
        }
    }
}

impl fmt::Display for IoEngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoEngineChoice::Auto => "auto",
            IoEngineChoice::Uring => "uring",
            IoEngineChoice::Sync => "sync",
        })
    }
}

/// Starts the chosen engine. `Auto` probes io_uring (sets up a ring and runs
/// a NOP through it) and falls back to sync if the kernel refuses;
/// `Uring` fails instead of falling back.
pub fn open_io(choice: IoEngineChoice) -> std::io::Result<Arc<dyn DiskIo>> {
    let io: Arc<dyn DiskIo> = match choice {
        IoEngineChoice::Sync => Arc::new(SyncIo::new()),
        IoEngineChoice::Uring => Arc::new(UringIo::new()?),
        IoEngineChoice::Auto => match UringIo::new() {
            Ok(u) => Arc::new(u),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable, falling back to sync IO");
                Arc::new(SyncIo::new())
            }
        },
    };
    tracing::info!(engine = io.name(), requested = %choice, "disk IO engine chosen");
    Ok(io)
}
