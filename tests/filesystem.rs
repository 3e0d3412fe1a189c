//! A real kernel filesystem on a 2-replica volume: NBD → nbdfuse → loop
//! device (direct IO, so no page cache over the FUSE file hides the data
//! path) → ext4. mkfs, fill with large random files and many small ones,
//! sync, unmount, `fsck.ext4 -fn` must find it clean, then a fresh engine
//! mounts it again and every file reads back byte-identical. A second test
//! kills a replica daemon (`kill -9`) while a file streams in; the
//! survivor alone must then hold a clean filesystem with every file
//! (DESIGN.md invariants 1-3).
//!
//! Every mount, loop device and process is released whatever happens:
//! [`KernelDisk`] holds the stack so that it drops top-down (mount, loop
//! device, FUSE export, engine), and each test checks that a normal detach
//! really released each layer.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rand::{Rng, RngCore, SeedableRng};

const VOLUME_SIZE: &str = "512MiB";
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// One engine and the kernel block device over it, possibly mounted.
/// Fields drop in declaration order: mount, loop device, FUSE export,
/// engine — each layer is released before the one it sits on.
struct KernelDisk {
    mount: Option<Mount>,
    loop_dev: LoopDevice,
    fuse: FuseExport,
    engine: Engine,
    dir: PathBuf,
    /// The FUSE file as the loop device names it.
    backing: PathBuf,
}

impl KernelDisk {
    fn attach(dir: &Path, volume: &str, replicas: &[&Replica]) -> KernelDisk {
        std::fs::create_dir_all(dir).unwrap();
        let engine = Engine::start(dir, volume, replicas);
        let fuse = FuseExport::new(dir, &engine.socket);
        let backing = fuse.file.canonicalize().unwrap();
        assert!(is_mounted(&fuse.mountpoint), "nbdfuse is not mounted");
        let loop_dev = LoopDevice::attach_direct_io(&fuse.file);
        // What detach() checks is gone must be seen while it is there.
        assert_eq!(
            loop_devices_backed_by(&backing),
            vec![loop_dev.dev.clone()],
            "the loop device is not seen bound to the FUSE file"
        );
        KernelDisk {
            mount: None,
            loop_dev,
            fuse,
            engine,
            dir: dir.to_path_buf(),
            backing,
        }
    }

    fn dev(&self) -> &str {
        &self.loop_dev.dev
    }

    fn mkfs(&self) {
        // Inode tables and journal written now, not by a kernel thread
        // racing the test after mount.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(self.dev()));
    }

    fn mount(&mut self) -> PathBuf {
        assert!(self.mount.is_none(), "already mounted");
        let target = self.dir.join("mnt");
        self.mount = Some(Mount::new(self.dev(), &target));
        assert!(
            is_mounted(&target),
            "{} is not a mount point",
            target.display()
        );
        target
    }

    fn unmount(&mut self) {
        if let Some(mut m) = self.mount.take() {
            m.unmount();
            assert!(
                !is_mounted(&m.target),
                "{} still mounted",
                m.target.display()
            );
        }
    }

    /// `fsck.ext4 -fn`: a full check that changes nothing; exit 0 is clean.
    fn assert_fsck_clean(&self) {
        assert!(self.mount.is_none(), "fsck of a mounted filesystem");
        let out = Command::new("fsck.ext4")
            .args(["-f", "-n"])
            .arg(self.dev())
            .output()
            .expect("run fsck.ext4");
        assert!(
            out.status.success(),
            "fsck.ext4 -fn {} found problems ({}):\n{}{}",
            self.dev(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Releases the stack top-down and checks each layer really is gone;
    /// the engine must stop cleanly on SIGTERM.
    fn detach(mut self) {
        self.unmount();
        let KernelDisk {
            mount,
            loop_dev,
            fuse,
            mut engine,
            backing,
            ..
        } = self;
        drop(mount);
        drop(loop_dev);
        let left = loop_devices_backed_by(&backing);
        assert!(left.is_empty(), "loop devices still attached: {left:?}");
        let fuse_mountpoint = fuse.mountpoint.clone();
        drop(fuse);
        assert!(
            !is_mounted(&fuse_mountpoint),
            "nbdfuse still mounted at {}",
            fuse_mountpoint.display()
        );
        let status = sigterm_and_wait(&mut engine.proc, STOP_TIMEOUT);
        assert!(
            status.success(),
            "engine exited with {status}:\n{}",
            engine.proc.log_text()
        );
    }
}

/// A file the test writes: its content is a function of (seed, len).
struct Expected {
    rel: PathBuf,
    seed: u64,
    len: usize,
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

/// A few MiB of random data in large files, and many small files (0 to
/// 20 KiB: inline, single-block and multi-block) across directories.
/// `round` picks a disjoint set of names and contents.
fn file_set(round: u64) -> Vec<Expected> {
    let mut files = vec![
        Expected {
            rel: format!("big-{round}/eight-mib.bin").into(),
            seed: round * 1_000_000 + 1,
            len: 8 << 20,
        },
        Expected {
            // Not a whole number of blocks.
            rel: format!("big-{round}/three-mib-and-a-bit.bin").into(),
            seed: round * 1_000_000 + 2,
            len: (3 << 20) + 4097,
        },
    ];
    let mut sizes = rand::rngs::StdRng::seed_from_u64(round);
    for i in 0..600u64 {
        files.push(Expected {
            rel: format!("small-{round}/d{:02}/f{i:03}", i % 24).into(),
            seed: round * 1_000_000 + 100 + i,
            len: sizes.gen_range(0..=20 << 10),
        });
    }
    files
}

fn write_files(root: &Path, files: &[Expected]) {
    for f in files {
        let path = root.join(&f.rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&content(f.seed, f.len)).unwrap();
    }
}

/// `sync -f`: syncfs(2) of the filesystem at `root`, which (unlike plain
/// `sync`) fails if any writeback failed.
fn sync(root: &Path) {
    run(Command::new("sync").arg("-f").arg(root));
}

fn assert_files_intact(root: &Path, files: &[Expected]) {
    for f in files {
        let path = root.join(&f.rel);
        let got =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {} back: {e}", path.display()));
        assert_eq!(
            got.len(),
            f.len,
            "{} has {} bytes, wrote {}",
            f.rel.display(),
            got.len(),
            f.len
        );
        assert!(
            got == content(f.seed, f.len),
            "{} does not read back what was written",
            f.rel.display()
        );
    }
}

/// Unmounts, checks and detaches; then a fresh engine on `replicas` (no
/// cache of the first stack left anywhere) must show a clean filesystem
/// holding every file.
fn check_after_detach(
    tmp: &Path,
    mut disk: KernelDisk,
    volume: &str,
    replicas: &[&Replica],
    files: &[Expected],
) {
    disk.unmount();
    disk.assert_fsck_clean();
    disk.detach();

    let mut again = KernelDisk::attach(&tmp.join("again"), volume, replicas);
    again.assert_fsck_clean();
    let root = again.mount();
    assert_files_intact(&root, files);
    again.detach();
}

#[test]
fn ext4_is_clean_and_reads_back_after_unmount_and_a_fresh_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let uring = Replica::start(&tmp.path().join("uring"), "uring");
    let sync_io = Replica::start(&tmp.path().join("sync"), "sync");
    create_volume("fs", VOLUME_SIZE, &[&uring, &sync_io]);

    let mut disk = KernelDisk::attach(&tmp.path().join("first"), "fs", &[&uring, &sync_io]);
    disk.mkfs();
    let root = disk.mount();
    let files = file_set(1);
    write_files(&root, &files);
    sync(&root);
    // Read back through the mount first (mostly the page cache)...
    assert_files_intact(&root, &files);
    // ...then from the replicas, through a new engine.
    check_after_detach(tmp.path(), disk, "fs", &[&uring, &sync_io], &files);
}

/// Writes `len` bytes of `content(seed, len)` to `path` a MiB at a time,
/// each MiB pushed to the device (fdatasync) before the next.
fn stream_with_fdatasync(path: &Path, seed: u64, len: usize) -> std::io::Result<()> {
    let data = content(seed, len);
    let mut file = std::fs::File::create(path)?;
    for chunk in data.chunks(1 << 20) {
        file.write_all(chunk)?;
        file.sync_data()?;
    }
    Ok(())
}

#[test]
fn ext4_keeps_every_file_when_a_replica_is_killed_mid_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mut uring = Replica::start(&tmp.path().join("uring"), "uring");
    let sync_io = Replica::start(&tmp.path().join("sync"), "sync");
    create_volume("fskill", VOLUME_SIZE, &[&uring, &sync_io]);

    let mut disk = KernelDisk::attach(&tmp.path().join("first"), "fskill", &[&uring, &sync_io]);
    disk.mkfs();
    let root = disk.mount();
    let before = file_set(1);
    write_files(&root, &before);
    sync(&root);

    // The replica reads are served from dies while a file streams in with
    // an fdatasync per MiB; the filesystem goes on with one replica and
    // must not notice.
    let stream = Expected {
        rel: "stream.bin".into(),
        seed: 77,
        len: 64 << 20,
    };
    let writer = {
        let (path, seed, len) = (root.join(&stream.rel), stream.seed, stream.len);
        std::thread::spawn(move || stream_with_fdatasync(&path, seed, len))
    };
    let landed = allocated_bytes(&uring.dir);
    wait_until(
        "the streamed file to reach the replica",
        Duration::from_secs(30),
        || {
            assert!(
                !writer.is_finished(),
                "the streaming write ended before the replica was killed"
            );
            allocated_bytes(&uring.dir) >= landed + (8 << 20)
        },
    );
    uring.proc.kill9();
    let in_flight = !writer.is_finished();
    writer
        .join()
        .unwrap()
        .expect("writing and fdatasync-ing through the replica's death");
    assert!(
        in_flight,
        "the streaming write ended before the replica was killed"
    );

    // More writes with one replica: new files, and some older ones
    // rewritten.
    let after = file_set(2);
    write_files(&root, &after);
    let rewritten: Vec<Expected> = before
        .iter()
        .step_by(7)
        .map(|f| Expected {
            rel: f.rel.clone(),
            seed: f.seed + 500_000,
            len: f.len,
        })
        .collect();
    write_files(&root, &rewritten);
    sync(&root);
    assert!(
        disk.engine.proc.is_running(),
        "the engine died with the replica:\n{}",
        disk.engine.proc.log_text()
    );

    let mut expected: Vec<Expected> = before
        .into_iter()
        .filter(|f| !rewritten.iter().any(|r| r.rel == f.rel))
        .collect();
    expected.extend(after);
    expected.extend(rewritten);
    expected.push(stream);
    // The survivor alone holds a clean filesystem with every file.
    check_after_detach(tmp.path(), disk, "fskill", &[&sync_io], &expected);
}
