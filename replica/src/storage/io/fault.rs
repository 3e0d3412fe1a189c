//! Disk-fault injection (STYLE.md habit 8): [`FaultyIo`] wraps any
//! [`DiskIo`] and makes chosen operations fail with EIO or ENOSPC, as a
//! shared [`FaultControl`] says at run time.
//!
//! Unit tests install it directly; a replica daemon installs it only when
//! started with the hidden `--fault-control-file`, and then a
//! [`FaultFileWatcher`] thread turns that file's text into the plan (see
//! [`FaultPlan::parse`] for the format). Without the flag there is no
//! wrapper at all, so production IO pays nothing; with it and no faults
//! planned, each operation pays one atomic pointer load.
//!
//! An injected fault fails the operation *before* it reaches the inner
//! engine: it never changes a byte on disk, so what a test reads back is
//! exactly what was acknowledged. The error carries the real errno, so
//! everything above sees what a failing disk would give it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use shorthorn_proto::VolumeName;

use super::{AlignedBuf, DiskIo, IoFuture};
use crate::storage::store::VOLUMES_DIR;

/// The kinds of operation a plan can fail, one per [`DiskIo`] method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    /// fdatasync (FLUSH, FUA).
    Sync,
    /// Hole punching (TRIM, WRITE_ZEROES).
    Punch,
    /// Saving a volume's membership (`state.json`), which goes through the
    /// filesystem rather than [`DiskIo`]; not part of `all`.
    Membership,
}

impl OpKind {
    /// The disk IO operations (what `all` fails).
    pub const ALL: [OpKind; 4] = [OpKind::Read, OpKind::Write, OpKind::Sync, OpKind::Punch];
    /// Every kind a plan can name.
    const EVERY: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Sync,
        OpKind::Punch,
        OpKind::Membership,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Sync => "sync",
            OpKind::Punch => "punch",
            OpKind::Membership => "membership",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The error an injected fault returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Errno {
    /// A failing disk.
    Eio,
    /// A full disk.
    Enospc,
}

impl Errno {
    pub fn raw(self) -> i32 {
        match self {
            Errno::Eio => libc::EIO,
            Errno::Enospc => libc::ENOSPC,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Errno::Eio => "eio",
            Errno::Enospc => "enospc",
        }
    }

    /// The error a real syscall would have returned.
    pub fn error(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.raw())
    }

    fn parse(s: &str) -> Option<Errno> {
        match s.to_ascii_lowercase().as_str() {
            "eio" => Some(Errno::Eio),
            "enospc" => Some(Errno::Enospc),
            _ => None,
        }
    }
}

/// What to fail: per kind of operation the errno (or nothing), optionally
/// only on files under one directory, optionally only after some more
/// operations that would fail have succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    errors: [Option<Errno>; 5],
    under: Option<PathBuf>,
    after: u64,
}

impl FaultPlan {
    /// No faults.
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    /// Operations of `kind` fail with `errno`.
    pub fn fail(mut self, kind: OpKind, errno: Errno) -> FaultPlan {
        self.errors[kind.index()] = Some(errno);
        self
    }

    /// Only operations on files under `dir` fail. The directory is
    /// canonicalized when it exists, since it is compared with the path the
    /// kernel reports for each file.
    pub fn under(mut self, dir: impl AsRef<Path>) -> FaultPlan {
        let dir = dir.as_ref();
        self.under = Some(dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()));
        self
    }

    /// The first `n` operations that would fail succeed instead.
    pub fn after(mut self, n: u64) -> FaultPlan {
        self.after = n;
        self
    }

    pub fn errno(&self, kind: OpKind) -> Option<Errno> {
        self.errors[kind.index()]
    }

    /// True when the plan fails nothing.
    pub fn is_empty(&self) -> bool {
        self.errors.iter().all(Option::is_none)
    }

    /// Parses the text of a fault-control file, resolving volume names
    /// against the daemon's `data_dir`.
    ///
    /// Words separated by spaces or newlines; `#` starts a comment; empty
    /// text means no faults:
    ///
    /// ```text
    /// write=eio            # OP=ERRNO, OP: read write sync punch membership all; ERRNO: eio enospc
    /// sync=enospc
    /// volume=v1            # only the files of volume v1 (default: every volume)
    /// after=100            # let 100 more matching operations succeed first
    /// ```
    pub fn parse(text: &str, data_dir: &Path) -> Result<FaultPlan, String> {
        let mut plan = FaultPlan::new();
        let words = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(str::split_whitespace);
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return Err(format!("{word:?} is not KEY=VALUE"));
            };
            let errno = || {
                Errno::parse(value)
                    .ok_or_else(|| format!("{word:?}: unknown error {value:?} (eio or enospc)"))
            };
            match key {
                "read" => plan = plan.fail(OpKind::Read, errno()?),
                "write" => plan = plan.fail(OpKind::Write, errno()?),
                "sync" => plan = plan.fail(OpKind::Sync, errno()?),
                "punch" => plan = plan.fail(OpKind::Punch, errno()?),
                "membership" => plan = plan.fail(OpKind::Membership, errno()?),
                "all" => {
                    let e = errno()?;
                    for kind in OpKind::ALL {
                        plan = plan.fail(kind, e);
                    }
                }
                "volume" => {
                    let name = VolumeName::new(value).map_err(|e| format!("{word:?}: {e}"))?;
                    let base = data_dir
                        .canonicalize()
                        .unwrap_or_else(|_| data_dir.to_path_buf());
                    plan = plan.under(base.join(VOLUMES_DIR).join(name.as_str()));
                }
                "after" => {
                    let n = value
                        .parse()
                        .map_err(|_| format!("{word:?}: not a count"))?;
                    plan = plan.after(n);
                }
                _ => {
                    return Err(format!(
                    "{word:?}: unknown key {key:?} (read, write, sync, punch, membership, all, \
                     volume, after)"
                ))
                }
            }
        }
        Ok(plan)
    }
}

impl std::fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut sep = "";
        for kind in OpKind::EVERY {
            if let Some(e) = self.errno(kind) {
                write!(f, "{sep}{}={}", kind.name(), e.name())?;
                sep = " ";
            }
        }
        if let Some(dir) = &self.under {
            write!(f, " under={}", dir.display())?;
        }
        if self.after > 0 {
            write!(f, " after={}", self.after)?;
        }
        Ok(())
    }
}

/// A plan in force, with its own countdown: setting a plan again restarts
/// `after`.
struct Active {
    plan: FaultPlan,
    passes_left: AtomicU64,
    announced: AtomicBool,
}

/// The switch board shared by [`FaultyIo`]s and whoever drives them.
#[derive(Default)]
pub struct FaultControl {
    active: ArcSwapOption<Active>,
    injected: AtomicU64,
}

impl FaultControl {
    pub fn new() -> Arc<FaultControl> {
        Arc::new(FaultControl::default())
    }

    /// Puts `plan` in force from the next operation on (an empty plan
    /// clears every fault).
    pub fn set(&self, plan: FaultPlan) {
        let active = (!plan.is_empty()).then(|| {
            Arc::new(Active {
                passes_left: AtomicU64::new(plan.after),
                plan,
                announced: AtomicBool::new(false),
            })
        });
        self.active.store(active);
    }

    pub fn clear(&self) {
        self.active.store(None);
    }

    /// The plan in force.
    pub fn plan(&self) -> FaultPlan {
        self.active
            .load()
            .as_ref()
            .map(|a| a.plan.clone())
            .unwrap_or_default()
    }

    /// Faults injected so far, over every plan.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The error to fail this operation with, if the plan says so.
    fn check(&self, kind: OpKind, file: &File) -> Option<std::io::Error> {
        self.check_at(kind, || file_path(file))
    }

    /// [`check`](Self::check) for an operation on whatever is at the path
    /// `path` returns (asked only if the plan is limited to a directory).
    fn check_at(&self, kind: OpKind, path: impl FnOnce() -> PathBuf) -> Option<std::io::Error> {
        let guard = self.active.load();
        let active = guard.as_ref()?;
        let errno = active.plan.errno(kind)?;
        if let Some(dir) = &active.plan.under {
            if !path().starts_with(dir) {
                return None;
            }
        }
        let passed = active
            .passes_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if passed {
            return None;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        if !active.announced.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                op = kind.name(),
                error = errno.name(),
                "injecting disk faults"
            );
        } else {
            tracing::debug!(
                op = kind.name(),
                error = errno.name(),
                "disk fault injected"
            );
        }
        Some(errno.error())
    }
}

/// The path the kernel holds for an open file (readlink of its
/// `/proc/self/fd` entry: a cheap call into procfs, never a disk wait).
fn file_path(file: &File) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap_or_default()
}

/// The fault control that membership saves consult, in a daemon started
/// with fault injection (they do not go through [`DiskIo`]).
static MEMBERSHIP_FAULTS: std::sync::OnceLock<Arc<FaultControl>> = std::sync::OnceLock::new();

/// Lets `control`'s plan fail membership saves too (`membership=...`).
pub fn install_membership_faults(control: Arc<FaultControl>) {
    let _ = MEMBERSHIP_FAULTS.set(control);
}

/// The error a membership save in the volume directory `dir` must fail
/// with, if fault injection is on and its plan says so.
pub(crate) fn membership_fault(dir: &Path) -> Option<std::io::Error> {
    MEMBERSHIP_FAULTS.get()?.check_at(OpKind::Membership, || {
        dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
    })
}

/// A [`DiskIo`] that fails what its [`FaultControl`] says and passes
/// everything else to the engine it wraps. It reports the inner engine's
/// name: the daemon still runs `uring` or `sync`.
pub struct FaultyIo {
    inner: Arc<dyn DiskIo>,
    control: Arc<FaultControl>,
}

impl FaultyIo {
    pub fn new(inner: Arc<dyn DiskIo>, control: Arc<FaultControl>) -> FaultyIo {
        FaultyIo { inner, control }
    }

    pub fn control(&self) -> &Arc<FaultControl> {
        &self.control
    }
}

fn failed<T: Send + 'static>(e: std::io::Error) -> IoFuture<T> {
    Box::pin(std::future::ready(Err(e)))
}

impl DiskIo for FaultyIo {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn read_at(&self, file: Arc<File>, offset: u64, len: usize) -> IoFuture<AlignedBuf> {
        match self.control.check(OpKind::Read, &file) {
            Some(e) => failed(e),
            None => self.inner.read_at(file, offset, len),
        }
    }

    fn write_at(&self, file: Arc<File>, offset: u64, data: Bytes) -> IoFuture<()> {
        match self.control.check(OpKind::Write, &file) {
            Some(e) => failed(e),
            None => self.inner.write_at(file, offset, data),
        }
    }

    fn sync_data(&self, file: Arc<File>) -> IoFuture<()> {
        match self.control.check(OpKind::Sync, &file) {
            Some(e) => failed(e),
            None => self.inner.sync_data(file),
        }
    }

    fn punch_hole(&self, file: Arc<File>, offset: u64, len: u64) -> IoFuture<()> {
        match self.control.check(OpKind::Punch, &file) {
            Some(e) => failed(e),
            None => self.inner.punch_hole(file, offset, len),
        }
    }
}

/// Polls a fault-control file and puts its plan in force whenever its text
/// changes. A missing file means no faults; text that does not parse is
/// logged and leaves the plan as it was. Stops (and joins its thread) on
/// drop.
pub struct FaultFileWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FaultControl {
    /// Reads `path` once now (so a plan written before start-up holds from
    /// the first request), then every `every` on a thread of its own.
    /// `volume=` names resolve under `data_dir`.
    pub fn watch_file(
        self: &Arc<Self>,
        path: PathBuf,
        data_dir: PathBuf,
        every: Duration,
    ) -> std::io::Result<FaultFileWatcher> {
        let mut last = None;
        self.poll_file(&path, &data_dir, &mut last);
        let stop = Arc::new(AtomicBool::new(false));
        let control = self.clone();
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fault-control".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    std::thread::sleep(every);
                    control.poll_file(&path, &data_dir, &mut last);
                }
            })?;
        Ok(FaultFileWatcher {
            stop,
            thread: Some(thread),
        })
    }

    fn poll_file(&self, path: &Path, data_dir: &Path, last: &mut Option<String>) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the fault-control file");
                return;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        match FaultPlan::parse(&text, data_dir) {
            Ok(plan) => {
                tracing::warn!(file = %path.display(), %plan, "fault plan applied");
                self.set(plan);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "fault-control file not understood; plan unchanged");
            }
        }
        *last = Some(text);
    }
}

impl Drop for FaultFileWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{open_io, IoEngineChoice, StorageError, Store};
    use shorthorn_proto::ErrorCode;

    fn engines() -> [Arc<dyn DiskIo>; 2] {
        [
            open_io(IoEngineChoice::Sync).unwrap(),
            open_io(IoEngineChoice::Uring).expect("io_uring must work on this machine"),
        ]
    }

    fn file_in(dir: &Path, name: &str) -> Arc<File> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        Arc::new(f)
    }

    fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
        r.err().map(|e| e.raw_os_error().expect("a real errno"))
    }

    /// Runs one operation of each kind on `file`; the errno each failed
    /// with (`None`: it succeeded).
    async fn each_op(io: &dyn DiskIo, file: &Arc<File>) -> [Option<i32>; 4] {
        [
            errno_of(io.read_at(file.clone(), 0, 4096).await),
            errno_of(
                io.write_at(file.clone(), 0, Bytes::from(vec![7u8; 4096]))
                    .await,
            ),
            errno_of(io.sync_data(file.clone()).await),
            errno_of(io.punch_hole(file.clone(), 8192, 4096).await),
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_free_wrapper_passes_everything_through() {
        for inner in engines() {
            let name = inner.name();
            let io = FaultyIo::new(inner, FaultControl::new());
            assert_eq!(io.name(), name, "the wrapper reports the engine it wraps");
            let dir = tempfile::tempdir().unwrap();
            let file = file_in(dir.path(), "f");
            let writes = (0..64u64)
                .map(|i| io.write_at(file.clone(), i * 5000, Bytes::from(vec![i as u8 + 1; 5000])));
            futures::future::try_join_all(writes).await.unwrap();
            io.sync_data(file.clone()).await.unwrap();
            for i in 0..64u64 {
                let got = io.read_at(file.clone(), i * 5000, 5000).await.unwrap();
                assert!(got.iter().all(|&b| b == i as u8 + 1), "{name}: block {i}");
            }
            io.punch_hole(file.clone(), 0, 5000).await.unwrap();
            let hole = io.read_at(file.clone(), 0, 4096).await.unwrap();
            assert!(hole.iter().all(|&b| b == 0), "{name}");
            assert_eq!(io.control().injected(), 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_each_kind_fails_alone_with_its_errno() {
        const EIO: Option<i32> = Some(libc::EIO);
        const ENOSPC: Option<i32> = Some(libc::ENOSPC);
        for inner in engines() {
            let name = inner.name();
            let control = FaultControl::new();
            let io = FaultyIo::new(inner, control.clone());
            let dir = tempfile::tempdir().unwrap();
            let file = file_in(dir.path(), "f");
            for (i, kind) in OpKind::ALL.into_iter().enumerate() {
                for (errno, want) in [(Errno::Eio, EIO), (Errno::Enospc, ENOSPC)] {
                    control.set(FaultPlan::new().fail(kind, errno));
                    let mut expected = [None; 4];
                    expected[i] = want;
                    assert_eq!(
                        each_op(&io, &file).await,
                        expected,
                        "{name}: {kind:?}={errno:?}"
                    );
                }
            }
            control.set(FaultPlan::parse("all=eio", dir.path()).unwrap());
            assert_eq!(each_op(&io, &file).await, [EIO; 4], "{name}: all");
            control.clear();
            assert_eq!(each_op(&io, &file).await, [None; 4], "{name}: cleared");
            assert_eq!(control.injected(), 8 + 4, "{name}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_write_never_reaches_the_disk() {
        for inner in engines() {
            let control = FaultControl::new();
            let io = FaultyIo::new(inner, control.clone());
            let dir = tempfile::tempdir().unwrap();
            let file = file_in(dir.path(), "f");
            io.write_at(file.clone(), 0, Bytes::from(vec![1u8; 4096]))
                .await
                .unwrap();
            control.set(FaultPlan::new().fail(OpKind::Write, Errno::Eio));
            io.write_at(file.clone(), 0, Bytes::from(vec![2u8; 4096]))
                .await
                .unwrap_err();
            let got = io.read_at(file.clone(), 0, 4096).await.unwrap();
            assert!(got.iter().all(|&b| b == 1), "{}", io.name());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_only_under_the_chosen_directory() {
        for inner in engines() {
            let control = FaultControl::new();
            let io = FaultyIo::new(inner, control.clone());
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("volumes/v1")).unwrap();
            std::fs::create_dir_all(dir.path().join("volumes/v10")).unwrap();
            let inside = file_in(&dir.path().join("volumes/v1"), "layer-1.img");
            // A sibling whose name merely starts the same way is not under it.
            let sibling = file_in(&dir.path().join("volumes/v10"), "layer-1.img");
            let plan = FaultPlan::parse("write=enospc volume=v1", dir.path()).unwrap();
            control.set(plan);
            let data = || Bytes::from(vec![3u8; 512]);
            let e = io.write_at(inside.clone(), 0, data()).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
            io.write_at(sibling.clone(), 0, data()).await.unwrap();
            io.read_at(inside.clone(), 0, 512).await.unwrap();
            assert_eq!(control.injected(), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_after_n_more_successes() {
        for inner in engines() {
            let control = FaultControl::new();
            let io = FaultyIo::new(inner, control.clone());
            let dir = tempfile::tempdir().unwrap();
            let file = file_in(dir.path(), "f");
            control.set(FaultPlan::new().fail(OpKind::Write, Errno::Eio).after(3));
            let mut results = Vec::new();
            for i in 0..6u64 {
                // Reads are not counted: only operations the plan would fail.
                io.read_at(file.clone(), 0, 512).await.unwrap();
                let r = io.write_at(file.clone(), i * 512, Bytes::from(vec![1u8; 512]));
                results.push(r.await.is_ok());
            }
            assert_eq!(results, [true, true, true, false, false, false]);
            // Setting the plan again restarts the countdown.
            control.set(control.plan());
            let r = io.write_at(file.clone(), 0, Bytes::from(vec![1u8; 512]));
            r.await.unwrap();
        }
    }

    #[test]
    fn fault_plan_parses_the_control_file_format() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        assert!(FaultPlan::parse("", dir.path()).unwrap().is_empty());
        assert!(FaultPlan::parse("  # nothing\n\n", dir.path())
            .unwrap()
            .is_empty());
        let plan = FaultPlan::parse(
            "write=ENOSPC volume=v1 # full disk\nsync=eio\nafter=5\n",
            dir.path(),
        )
        .unwrap();
        assert_eq!(
            plan,
            FaultPlan::new()
                .fail(OpKind::Write, Errno::Enospc)
                .fail(OpKind::Sync, Errno::Eio)
                .under(base.join("volumes/v1"))
                .after(5)
        );
        assert_eq!(
            plan.to_string(),
            format!(
                "write=enospc sync=eio under={} after=5",
                base.join("volumes/v1").display()
            )
        );
        assert_eq!(FaultPlan::new().to_string(), "none");
        for bad in [
            "write",
            "write=eperm",
            "fsync=eio",
            "after=-1",
            "volume=../etc",
            "volume=",
        ] {
            assert!(
                FaultPlan::parse(bad, dir.path()).is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn fault_control_file_is_watched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults");
        std::fs::write(&path, "read=eio").unwrap();
        let control = FaultControl::new();
        let watcher = control
            .watch_file(
                path.clone(),
                dir.path().to_path_buf(),
                Duration::from_millis(10),
            )
            .unwrap();
        // Read once before watch_file returns.
        assert_eq!(control.plan().errno(OpKind::Read), Some(Errno::Eio));
        let wait_for = |want: Option<Errno>| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while control.plan().errno(OpKind::Write) != want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "plan never became {want:?}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        std::fs::write(&path, "write=enospc").unwrap();
        wait_for(Some(Errno::Enospc));
        assert_eq!(control.plan().errno(OpKind::Read), None);
        // Nonsense leaves the plan as it was; a missing file clears it.
        std::fs::write(&path, "write=sometimes").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(control.plan().errno(OpKind::Write), Some(Errno::Enospc));
        std::fs::remove_file(&path).unwrap();
        wait_for(None);
        assert!(control.plan().is_empty());
        drop(watcher);
    }

    /// A store over the wrapper: each kind of fault reaches the replica's
    /// caller as a [`StorageError`] with the wire code the engine acts on,
    /// naming the volume.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fault_reaches_the_replica_as_a_storage_error() {
        for inner in engines() {
            let name = inner.name();
            let control = FaultControl::new();
            let io: Arc<dyn DiskIo> = Arc::new(FaultyIo::new(inner, control.clone()));
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), io).unwrap();
            let vol = VolumeName::new("vol").unwrap();
            let (r, _) = store.create_volume(&vol, 1 << 20).await.unwrap();
            let data = || Bytes::from(vec![9u8; 8192]);
            r.write(0, data(), false).await.unwrap();

            let expect = |what: &str, result: Result<(), StorageError>, code: ErrorCode| {
                let e = result.expect_err(what);
                assert_eq!(e.code(), code, "{name}: {what}: {e}");
                assert!(e.to_string().contains("volume vol"), "{name}: {e}");
                match code {
                    ErrorCode::NoSpace => assert!(matches!(e, StorageError::NoSpace { .. })),
                    _ => assert!(matches!(e, StorageError::Io { .. })),
                }
            };
            let set = |text: &str| control.set(FaultPlan::parse(text, dir.path()).unwrap());

            set("write=eio volume=vol");
            expect("write", r.write(0, data(), false).await, ErrorCode::Io);
            set("write=enospc");
            expect("write", r.write(0, data(), false).await, ErrorCode::NoSpace);
            // Zeroing partial blocks writes zeros: a write fault too.
            expect(
                "zero",
                r.write_zeroes(1, 10, false).await,
                ErrorCode::NoSpace,
            );
            set("read=eio");
            expect("read", r.read(0, 4096).await.map(drop), ErrorCode::Io);
            set("sync=eio");
            expect("flush", r.flush().await, ErrorCode::Io);
            expect("fua", r.write(0, data(), true).await, ErrorCode::Io);
            set("punch=enospc");
            expect("trim", r.trim(0, 8192).await, ErrorCode::NoSpace);
            // Faults on another volume's files leave this one alone.
            set("all=eio volume=other");
            r.write(0, data(), true).await.unwrap();
            r.trim(0, 4096).await.unwrap();
            r.flush().await.unwrap();

            control.clear();
            let back = r.read(0, 8192).await.unwrap();
            assert!(back[..4096].iter().all(|&b| b == 0), "{name}: trimmed");
            assert!(back[4096..].iter().all(|&b| b == 9), "{name}");
        }
    }
}
