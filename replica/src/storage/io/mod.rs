//! The one boundary between the replica and its disk: [`DiskIo`].
//!
//! Two engines implement it: `uring` (one thread driving an io_uring, many
//! requests per syscall) and `sync` (pread/pwrite on tokio's blocking pool).
//! [`open_io`] picks one at start-up; nothing above this module knows which
//! runs. No implementation may block the async reactor: every syscall happens
//! on a thread of its own.
//!
//! The trait is object-safe and takes owned buffers and `Arc<File>`s, so a
//! wrapper (fault injection, metrics) can sit in front of either engine.

pub mod fault;
mod sync;
mod uring;

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

pub use sync::SyncIo;
pub use uring::UringIo;

pub type IoFuture<T> = Pin<Box<dyn Future<Output = std::io::Result<T>> + Send>>;

/// Positioned disk IO on open files. Futures must be polled inside a tokio
/// runtime. A future that is dropped early may still complete its IO.
pub trait DiskIo: Send + Sync + 'static {
    /// `"uring"` or `"sync"`.
    fn name(&self) -> &'static str;
    /// Reads `len` bytes at `offset`. Bytes past the end of the file read as
    /// zeros: the buffer returned is always `len` long.
    fn read_at(&self, file: Arc<File>, offset: u64, len: usize) -> IoFuture<BytesMut>;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn choice_parses_and_prints() {
        for c in [
            IoEngineChoice::Auto,
            IoEngineChoice::Uring,
            IoEngineChoice::Sync,
        ] {
            assert_eq!(c.to_string().parse::<IoEngineChoice>(), Ok(c));
        }
        assert!("libaio".parse::<IoEngineChoice>().is_err());
    }

    async fn engine_basics(io: Arc<dyn DiskIo>) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let file = Arc::new(file);

        // Many writes in flight at once, then read them back.
        let writes = (0..100u64).map(|i| {
            io.write_at(
                file.clone(),
                i * 5000 + 3,
                Bytes::from(vec![(i % 251) as u8 + 1; 5000]),
            )
        });
        futures::future::try_join_all(writes).await.unwrap();
        io.sync_data(file.clone()).await.unwrap();
        for i in (0..100u64).step_by(7) {
            let got = io.read_at(file.clone(), i * 5000 + 3, 5000).await.unwrap();
            assert!(got.iter().all(|&b| b == (i % 251) as u8 + 1), "block {i}");
        }
        // Past the end of the file: zero-filled, full length.
        let tail = io.read_at(file.clone(), (1 << 20) - 10, 100).await.unwrap();
        assert_eq!(tail.len(), 100);
        assert!(tail[10..].iter().all(|&b| b == 0));
        // A punched hole reads zeros, and the size stays.
        io.punch_hole(file.clone(), 8192, 8192).await.unwrap();
        let hole = io.read_at(file.clone(), 8192, 8192).await.unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        assert_eq!(file.metadata().unwrap().len(), 1 << 20);
        let mut raw = [0u8; 1];
        file.read_at(&mut raw, 8191).unwrap();
        assert_eq!(raw[0], 2);
        // Zero-length operations are fine.
        assert!(io.read_at(file.clone(), 0, 0).await.unwrap().is_empty());
        io.write_at(file.clone(), 0, Bytes::new()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_engine_basics() {
        let io = open_io(IoEngineChoice::Sync).unwrap();
        assert_eq!(io.name(), "sync");
        engine_basics(io).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_basics() {
        let io = open_io(IoEngineChoice::Uring).expect("io_uring must work on this machine");
        assert_eq!(io.name(), "uring");
        engine_basics(io).await;
    }

    #[test]
    fn uring_drop_finishes_requests_in_flight() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let io = UringIo::new().unwrap();
        // More than the ring holds, so some wait in the thread's backlog.
        let futs: Vec<_> = (0..600u64)
            .map(|i| io.write_at(file.clone(), i * 4096, Bytes::from(vec![1u8; 4096])))
            .collect();
        // Dropping the last handle joins the thread once all 600 are done.
        drop(io);
        futures::executor::block_on(futures::future::try_join_all(futs)).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 600 * 4096);
    }
}
