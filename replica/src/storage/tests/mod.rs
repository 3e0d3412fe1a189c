//! Tests of the storage layer against real files in temporary directories.
//! Every test here runs once per IO engine and way of opening layer files:
//! `sync_io::*` and `uring_io::*` with O_DIRECT files (as a replica daemon
//! runs), `sync_buffered::*` and `uring_buffered::*` on a store whose
//! filesystem refuses O_DIRECT, so the buffered fallback is exercised. The
//! uring variants also cover both runtime flavours: the daemon's default
//! single thread for O_DIRECT, several worker threads for buffered.
//! The uring runs fail, never skip, if io_uring is unavailable.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use shorthorn_proto::VolumeName;

use super::layer::LayerOpener;
use super::{open_io, DiskIo, IoEngineChoice, Replica, Store};

/// Declares one test per engine and file mode for each named
/// `async fn(Disk)` in the invoking module.
macro_rules! for_each_engine {
    ($($test:ident),* $(,)?) => {
        engine_variant!(sync_io, Sync, false,
            [tokio::test(flavor = "multi_thread", worker_threads = 2)]; $($test),*);
        engine_variant!(uring_io, Uring, false,
            [tokio::test(flavor = "current_thread")]; $($test),*);
        engine_variant!(sync_buffered, Sync, true,
            [tokio::test(flavor = "current_thread")]; $($test),*);
        engine_variant!(uring_buffered, Uring, true,
            [tokio::test(flavor = "multi_thread", worker_threads = 2)]; $($test),*);
    };
}

macro_rules! engine_variant {
    ($module:ident, $engine:ident, $buffered:expr, [$attr:meta]; $($test:ident),*) => {
        mod $module {
            $(
                #[$attr]
                async fn $test() {
                    super::$test($crate::storage::tests::Disk::new(
                        $crate::storage::IoEngineChoice::$engine,
                        $buffered,
                    ))
                    .await
                }
            )*
        }
    };
}

mod datapath_tests;
mod store_tests;
mod unaligned_tests;

/// What a test runs on: an IO engine, and how the store opens layer files.
#[derive(Clone)]
pub(crate) struct Disk {
    pub io: Arc<dyn DiskIo>,
    /// As on a filesystem that refuses O_DIRECT: layer files are buffered.
    pub buffered: bool,
}

impl Disk {
    /// With O_DIRECT files the engine is wrapped in [`StrictAlignment`].
    pub fn new(choice: IoEngineChoice, buffered: bool) -> Disk {
        let io = open_io(choice).unwrap_or_else(|e| panic!("IO engine {choice} must start: {e}"));
        assert_eq!(io.name(), choice.to_string());
        let io: Arc<dyn DiskIo> = if buffered {
            io
        } else {
            Arc::new(StrictAlignment(io))
        };
        Disk { io, buffered }
    }

    /// The same file mode over another engine (a wrapper of this one).
    pub fn with_io(&self, io: Arc<dyn DiskIo>) -> Disk {
        Disk {
            io,
            buffered: self.buffered,
        }
    }
}

pub(crate) const MIB: u64 = 1 << 20;

pub(crate) fn name(s: &str) -> VolumeName {
    VolumeName::new(s).unwrap()
}

pub(crate) fn open_store(dir: &Path, disk: &Disk) -> Store {
    if disk.buffered {
        Store::open_with_opener(dir, disk.io.clone(), LayerOpener::refusing_direct()).unwrap()
    } else {
        Store::open(dir, disk.io.clone()).unwrap()
    }
}

/// A fresh store in a temp dir with one volume of `size` bytes.
pub(crate) async fn fresh_volume(
    disk: &Disk,
    size: u64,
) -> (tempfile::TempDir, Store, Arc<Replica>) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), disk);
    let (r, created) = store.create_volume(&name("vol"), size).await.unwrap();
    assert!(created);
    assert_eq!(r.chain.load().head().direct, !disk.buffered);
    assert_eq!(store.direct_io(), !disk.buffered);
    (dir, store, r)
}

/// Deterministic non-zero bytes, different for each seed.
pub(crate) fn pattern(seed: u64, len: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(1..=255u8)).collect()
}

/// What the volume should hold, kept in memory beside it.
pub(crate) struct Model(pub Vec<u8>);

impl Model {
    pub fn new(size: u64) -> Model {
        Model(vec![0; size as usize])
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    pub fn zero(&mut self, offset: u64, len: u64) {
        self.0[offset as usize..(offset + len) as usize].fill(0);
    }
}

/// Reads the whole volume (in unaligned pieces, to cross run boundaries)
/// and compares it with the model, naming the first differing byte.
pub(crate) async fn assert_matches(r: &Replica, model: &Model) {
    let size = r.size();
    let mut off = 0;
    let step = 300_001u64;
    while off < size {
        let len = step.min(size - off);
        let got = r.read(off, len as u32).await.unwrap();
        assert_eq!(got.len() as u64, len);
        let want = &model.0[off as usize..(off + len) as usize];
        if got.as_ref() != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "byte {} differs: read {:#04x}, expected {:#04x} (chain {:?})",
                off + i as u64,
                got[i],
                want[i],
                r.layer_ids()
            );
        }
        off += len;
    }
}

/// Wraps an engine and, while armed, holds every write until released: lets
/// a test put a write "in flight" for as long as it likes. (Also proves the
/// trait can be wrapped, as the fault-injecting engine will.)
pub(crate) struct HeldWrites {
    inner: Arc<dyn DiskIo>,
    armed: std::sync::atomic::AtomicBool,
    gate: Arc<tokio::sync::Semaphore>,
    /// Notified each time a write starts waiting at the gate.
    pub entered: Arc<tokio::sync::Notify>,
}

impl HeldWrites {
    pub fn new(inner: Arc<dyn DiskIo>) -> Arc<HeldWrites> {
        Arc::new(HeldWrites {
            inner,
            armed: false.into(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            entered: Arc::new(tokio::sync::Notify::new()),
        })
    }

    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
        self.gate
            .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }
}

impl DiskIo for HeldWrites {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn read_at(
        &self,
        file: Arc<std::fs::File>,
        offset: u64,
        len: usize,
    ) -> super::IoFuture<super::AlignedBuf> {
        self.inner.read_at(file, offset, len)
    }

    fn write_at(&self, file: Arc<std::fs::File>, offset: u64, data: Bytes) -> super::IoFuture<()> {
        if !self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            return self.inner.write_at(file, offset, data);
        }
        let gate = self.gate.clone();
        let entered = self.entered.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            entered.notify_one();
            gate.acquire().await.expect("gate open").forget();
            // Only now: the inner engine may start the write as soon as it is
            // called.
            inner.write_at(file, offset, data).await
        })
    }

    fn sync_data(&self, file: Arc<std::fs::File>) -> super::IoFuture<()> {
        self.inner.sync_data(file)
    }

    fn punch_hole(&self, file: Arc<std::fs::File>, offset: u64, len: u64) -> super::IoFuture<()> {
        self.inner.punch_hole(file, offset, len)
    }
}

/// Wraps an engine and remembers which files were fdatasync'ed, in order
/// (as `(device, inode)`): what proves FLUSH and FUA reach stable storage
/// on the file that holds the data, not merely that they return.
pub(crate) struct SyncLog {
    inner: Arc<dyn DiskIo>,
    synced: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl SyncLog {
    pub fn new(inner: Arc<dyn DiskIo>) -> Arc<SyncLog> {
        Arc::new(SyncLog {
            inner,
            synced: Default::default(),
        })
    }

    /// The files synced so far.
    pub fn synced(&self) -> Vec<(u64, u64)> {
        self.synced.lock().unwrap().clone()
    }
}

/// A file's `(device, inode)`.
pub(crate) fn file_id(file: &std::fs::File) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().unwrap();
    (m.dev(), m.ino())
}

impl DiskIo for SyncLog {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn read_at(
        &self,
        file: Arc<std::fs::File>,
        offset: u64,
        len: usize,
    ) -> super::IoFuture<super::AlignedBuf> {
        self.inner.read_at(file, offset, len)
    }

    fn write_at(&self, file: Arc<std::fs::File>, offset: u64, data: Bytes) -> super::IoFuture<()> {
        self.inner.write_at(file, offset, data)
    }

    fn sync_data(&self, file: Arc<std::fs::File>) -> super::IoFuture<()> {
        self.synced.lock().unwrap().push(file_id(&file));
        self.inner.sync_data(file)
    }

    fn punch_hole(&self, file: Arc<std::fs::File>, offset: u64, len: u64) -> super::IoFuture<()> {
        self.inner.punch_hole(file, offset, len)
    }
}

/// Refuses, with EINVAL, any IO not aligned to 4 KiB in offset, length and
/// memory. The kernel is laxer (512-byte sectors suffice on most disks, and
/// ext4 quietly serves unaligned O_DIRECT through the page cache), so this
/// is what proves the data path only ever sends whole, aligned blocks to
/// O_DIRECT files.
pub(crate) struct StrictAlignment(pub Arc<dyn DiskIo>);

fn misaligned<T: Send + 'static>(what: &str, offset: u64, len: usize) -> super::IoFuture<T> {
    let e = std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("unaligned O_DIRECT {what}: {len} bytes at {offset}"),
    );
    Box::pin(std::future::ready(Err(e)))
}

impl DiskIo for StrictAlignment {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn read_at(
        &self,
        file: Arc<std::fs::File>,
        offset: u64,
        len: usize,
    ) -> super::IoFuture<super::AlignedBuf> {
        let a = super::io::IO_ALIGN;
        if !offset.is_multiple_of(a as u64) || !len.is_multiple_of(a) {
            return misaligned("read", offset, len);
        }
        self.0.read_at(file, offset, len)
    }

    fn write_at(&self, file: Arc<std::fs::File>, offset: u64, data: Bytes) -> super::IoFuture<()> {
        let a = super::io::IO_ALIGN;
        if !offset.is_multiple_of(a as u64) || !super::io::aligned::is_aligned(&data) {
            return misaligned("write", offset, data.len());
        }
        self.0.write_at(file, offset, data)
    }

    fn sync_data(&self, file: Arc<std::fs::File>) -> super::IoFuture<()> {
        self.0.sync_data(file)
    }

    fn punch_hole(&self, file: Arc<std::fs::File>, offset: u64, len: u64) -> super::IoFuture<()> {
        let a = super::io::IO_ALIGN as u64;
        if !offset.is_multiple_of(a) || !len.is_multiple_of(a) {
            return misaligned("punch", offset, len as usize);
        }
        self.0.punch_hole(file, offset, len)
    }
}
