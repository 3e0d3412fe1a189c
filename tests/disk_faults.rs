//! A replica whose disk fails (DESIGN.md invariant 2, issue 4 item 6): when
//! one replica daemon's disk returns EIO or ENOSPC on a write, EIO on a read
//! or on fdatasync, the engine drops that replica, names the volume and the
//! replica in its log, and the volume goes on on the other replica with no
//! error to the client and every acknowledged byte readable. With both
//! replicas failing, the client gets EIO and nothing hangs.
//!
//! The faults are injected for real into running daemons: a daemon started
//! with the hidden `--fault-control-file` wraps its disk IO in `FaultyIo`
//! and re-reads that file every 50 ms; a test writes a plan there
//! (`write=eio`, `read=eio`, ...) and waits for the daemon to log it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// What the engine logs when it drops a replica from the healthy set.
const DROPPED: &str = "dropped from the healthy set";
/// What it logs when a replica being rebuilt fails (it was never healthy).
const REBUILD_STOPPED: &str = "rebuild of replica stopped";
/// What a replica daemon logs when its storage fails a request.
const STORAGE_ERROR: &str = "storage error";
const FIO_TIMEOUT: Duration = Duration::from_secs(60);

/// A replica daemon started with a fault-control file.
struct FaultyReplica {
    replica: Replica,
    control: PathBuf,
}

impl FaultyReplica {
    fn start(dir: &Path, io_engine: &str) -> FaultyReplica {
        let addr = format!("127.0.0.1:{}", free_port());
        let control = dir.with_extension("faults");
        let proc = Proc::spawn(
            &format!("replica {addr} (fault injection)"),
            Command::new(BIN)
                .args(["replica", "serve", "--data-dir"])
                .arg(dir)
                .args(["--listen", &addr, "--io-engine", io_engine])
                .arg("--fault-control-file")
                .arg(&control),
            dir.with_extension("log"),
        );
        let mut replica = Replica {
            proc,
            addr: addr.clone(),
            dir: dir.to_path_buf(),
            io_engine: io_engine.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Its own log line, not only the port: a port picked free a moment
        // ago may already answer for another test's daemon.
        while std::net::TcpStream::connect(&addr).is_err()
            || !log_of(&replica.proc).contains("replica daemon serving")
        {
            assert!(
                replica.proc.is_running(),
                "replica daemon exited:\n{}",
                replica.proc.log_text()
            );
            assert!(Instant::now() < deadline, "replica daemon never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = log_of(&replica.proc);
        assert!(
            log.contains("fault injection is enabled"),
            "the daemon must warn that it injects faults:\n{log}"
        );
        FaultyReplica { replica, control }
    }

    /// Puts `plan` in force and waits until the daemon has applied it.
    /// Each call must change the file's text (an unchanged file is not
    /// applied again).
    fn set_faults(&self, plan: &str) {
        let applied = || {
            log_of(&self.replica.proc)
                .matches("fault plan applied")
                .count()
        };
        let before = applied();
        // Written whole and renamed, so the daemon never reads half a plan.
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, plan).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
        wait_until(
            &format!("replica to apply fault plan {plan:?}"),
            Duration::from_secs(10),
            || applied() > before,
        );
    }
}

/// A process's log without colour codes, so fields read as `key=value`.
fn log_of(proc: &Proc) -> String {
    let text = proc.log_text();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters... final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// qemu-io with discards reaching the volume (`-d unmap`; qemu drops them
/// by default).
fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_with(uri, &["-d", "unmap"], cmds)
}

fn qemu_io_ok(uri: &str, cmds: &[&str], what: &str) {
    let (ok, out) = qemu_io(uri, cmds);
    assert!(ok, "{what}: the client saw an error:\n{out}");
}

/// The engine dropped `replica` from `volume`, and its log line names both
/// and says why (`reason`, as the replica reported it).
fn assert_dropped(engine: &Engine, volume: &str, replica: &Replica, reason: &str) {
    let log = log_of(&engine.proc);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(DROPPED) && l.contains(&replica.addr))
        .collect();
    // The first drop is the fault; the engine then retries the replica
    // with backoff, and a disk that still fails drops it again.
    assert!(
        !lines.is_empty(),
        "the engine should drop replica {}, naming it:\n{log}",
        replica.addr
    );
    let line = lines[0];
    assert!(
        line.contains(&format!("volume={volume}")) && line.contains(reason),
        "the drop should name volume {volume} and the cause {reason:?}:\n{line}"
    );
}

fn assert_not_dropped(engine: &Engine, replica: &Replica) {
    let log = log_of(&engine.proc);
    assert!(
        !log.lines()
            .any(|l| l.contains(DROPPED) && l.contains(&replica.addr)),
        "replica {} should still be healthy:\n{log}",
        replica.addr
    );
}

/// The replica daemon logged its storage failure, naming the volume and
/// the error.
fn assert_replica_logged(replica: &Replica, volume: &str, what: &str, error: &str) {
    let log = log_of(&replica.proc);
    let named = format!("volume {volume}: {what}");
    assert!(
        log.lines()
            .any(|l| l.contains(STORAGE_ERROR) && l.contains(&named) && l.contains(error)),
        "replica {} should log {STORAGE_ERROR:?} naming {named:?} and {error:?}:\n{log}",
        replica.addr
    );
    assert!(
        log.contains("injecting disk faults"),
        "the daemon should say it injected a fault:\n{log}"
    );
}

/// Two replica daemons, the first with fault injection (and listed first,
/// so the engine reads from it), one volume on both, and its engine.
struct Setup {
    faulty: FaultyReplica,
    other: Replica,
    engine: Engine,
    // Last, so every process above is stopped before the files go.
    tmp: tempfile::TempDir,
}

fn setup(volume: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let faulty = FaultyReplica::start(&tmp.path().join("r1"), "uring");
    let other = Replica::start(&tmp.path().join("r2"), "sync");
    create_volume(volume, "64MiB", &[&faulty.replica, &other]);
    let engine = Engine::start(tmp.path(), volume, &[&faulty.replica, &other]);
    Setup {
        faulty,
        other,
        engine,
        tmp,
    }
}

#[test]
fn write_eio_mid_run_drops_the_replica_and_fio_sees_nothing() {
    let s = setup("weio");
    // fio writes 16384 blocks; the faulty replica's disk fails from its
    // 2001st write on, while hundreds of writes are in flight.
    s.faulty.set_faults("write=eio after=2000 volume=weio");
    let size = 64u64 << 20;
    let report = Fio::run(
        s.tmp.path(),
        "weio",
        &s.engine.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--verify=crc32c",
            &format!("--size={size}"),
        ],
        FIO_TIMEOUT,
    );
    report.assert_clean();
    assert_eq!(report.io_bytes("write"), size);
    assert_eq!(
        report.io_bytes("read"),
        size,
        "fio should have verified every block it wrote"
    );
    assert_dropped(&s.engine, "weio", &s.faulty.replica, "Input/output error");
    assert_not_dropped(&s.engine, &s.other);
    assert_replica_logged(&s.faulty.replica, "weio", "writing", "Input/output error");
}

#[test]
fn write_enospc_drops_the_replica_of_that_volume_only() {
    let tmp = tempfile::tempdir().unwrap();
    let faulty = FaultyReplica::start(&tmp.path().join("r1"), "sync");
    let other = Replica::start(&tmp.path().join("r2"), "uring");
    let both = [&faulty.replica, &other];
    create_volume("full", "64MiB", &both);
    create_volume("spare", "64MiB", &both);
    let full = Engine::start(tmp.path(), "full", &both);
    let spare = Engine::start(tmp.path(), "spare", &both);
    qemu_io_ok(
        &full.uri(),
        &["write -P 0x11 0 4M", "flush"],
        "full, before",
    );
    qemu_io_ok(&spare.uri(), &["write -P 0x21 0 1M"], "spare, before");

    // Only the files of volume `full` are on a full disk.
    faulty.set_faults("write=enospc volume=full");
    qemu_io_ok(
        &full.uri(),
        &[
            "write -P 0x22 1M 2M",
            "write -P 0x33 8M 1M",
            "flush",
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 2M",
            "read -P 0x11 3M 1M",
            "read -P 0x33 8M 1M",
        ],
        "full, with its first replica out of space",
    );
    assert_dropped(&full, "full", &faulty.replica, "no space left on device");
    assert_not_dropped(&full, &other);
    assert_replica_logged(
        &faulty.replica,
        "full",
        "writing",
        "no space left on device",
    );

    // The other volume on the same daemon keeps both replicas; its reads
    // come from the faulty daemon (listed first), which holds the new write.
    qemu_io_ok(
        &spare.uri(),
        &[
            "write -P 0x23 1M 1M",
            "flush",
            "read -P 0x21 0 1M",
            "read -P 0x23 1M 1M",
        ],
        "spare, next to a full volume",
    );
    assert_not_dropped(&spare, &faulty.replica);
    assert_not_dropped(&spare, &other);
}

#[test]
fn read_eio_on_the_read_replica_is_served_by_the_other() {
    let s = setup("reio");
    qemu_io_ok(
        &s.engine.uri(),
        &["write -P 0x44 0 4M", "flush", "read -P 0x44 0 4M"],
        "before",
    );
    assert_not_dropped(&s.engine, &s.faulty.replica);

    s.faulty.set_faults("read=eio");
    qemu_io_ok(
        &s.engine.uri(),
        &[
            "read -P 0x44 0 4M",
            "write -P 0x55 1M 1M",
            "flush",
            "read -P 0x44 0 1M",
            "read -P 0x55 1M 1M",
            "read -P 0x44 2M 2M",
        ],
        "reads with the read replica's disk failing",
    );
    assert_dropped(&s.engine, "reio", &s.faulty.replica, "Input/output error");
    assert_not_dropped(&s.engine, &s.other);
    assert_replica_logged(&s.faulty.replica, "reio", "reading", "Input/output error");
}

#[test]
fn sync_eio_on_flush_drops_the_replica() {
    let s = setup("seio");
    qemu_io_ok(&s.engine.uri(), &["write -P 0x66 0 2M"], "before");

    s.faulty.set_faults("sync=eio");
    qemu_io_ok(
        &s.engine.uri(),
        &[
            "write -P 0x77 2M 1M",
            "flush",
            "read -P 0x66 0 2M",
            "read -P 0x77 2M 1M",
        ],
        "a flush with one replica's fdatasync failing",
    );
    assert_dropped(&s.engine, "seio", &s.faulty.replica, "Input/output error");
    assert_not_dropped(&s.engine, &s.other);
    assert_replica_logged(&s.faulty.replica, "seio", "syncing", "Input/output error");
}

#[test]
fn sync_eio_on_fua_write_drops_the_replica() {
    let s = setup("feio");
    qemu_io_ok(&s.engine.uri(), &["write -P 0x66 0 2M"], "before");

    s.faulty.set_faults("sync=eio");
    qemu_io_ok(
        &s.engine.uri(),
        &[
            "write -f -P 0x88 1M 64k",
            "read -P 0x66 0 1M",
            "read -P 0x88 1M 64k",
        ],
        "a FUA write with one replica's fdatasync failing",
    );
    assert_dropped(&s.engine, "feio", &s.faulty.replica, "Input/output error");
    assert_not_dropped(&s.engine, &s.other);
}

#[test]
fn punch_eio_on_trim_drops_the_replica() {
    let s = setup("peio");
    qemu_io_ok(&s.engine.uri(), &["write -P 0x99 0 2M", "flush"], "before");

    s.faulty.set_faults("punch=eio");
    qemu_io_ok(
        &s.engine.uri(),
        &["discard 0 1M", "read -P 0 0 1M", "read -P 0x99 1M 1M"],
        "a discard with one replica's hole punching failing",
    );
    assert_dropped(&s.engine, "peio", &s.faulty.replica, "Input/output error");
    assert_not_dropped(&s.engine, &s.other);
    assert_replica_logged(&s.faulty.replica, "peio", "punching", "Input/output error");
}

#[test]
fn both_replicas_failing_writes_give_eio_and_never_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = FaultyReplica::start(&tmp.path().join("r1"), "uring");
    let r2 = FaultyReplica::start(&tmp.path().join("r2"), "sync");
    let both = [&r1.replica, &r2.replica];
    create_volume("dead", "64MiB", &both);
    let mut engine = Engine::start(tmp.path(), "dead", &both);
    qemu_io_ok(
        &engine.uri(),
        &["write -P 0x11 0 1M", "flush"],
        "both healthy",
    );

    r1.set_faults("write=eio");
    r2.set_faults("write=enospc");
    let started = Instant::now();
    let (ok, out) = qemu_io(&engine.uri(), &["write -P 0x22 0 64k"]);
    let took = started.elapsed();
    assert!(!ok, "a write no replica could store must fail, got:\n{out}");
    assert!(
        out.contains("Input/output error"),
        "the client should get EIO:\n{out}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the failing write took {took:?}"
    );
    assert_dropped(&engine, "dead", &r1.replica, "Input/output error");
    assert_dropped(&engine, "dead", &r2.replica, "no space left on device");

    // Nothing waits on them: a read answers at once (they still hold
    // every acknowledged write, so once one answers again it may serve
    // it), and writes keep failing while their disks do.
    let started = Instant::now();
    qemu_io(&engine.uri(), &["read 0 4k"]);
    let (ok, out) = qemu_io(&engine.uri(), &["write -P 0x22 0 64k"]);
    assert!(!ok, "a write no replica could store must fail, got:\n{out}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        engine.proc.is_running(),
        "the engine must keep running:\n{}",
        log_of(&engine.proc)
    );

    // Their disks recover: the volume serves again, from the same engine,
    // with every acknowledged byte (the failed writes changed none).
    r1.set_faults("");
    r2.set_faults("");
    wait_healthy(tmp.path(), "dead", 2);
    qemu_io_ok(
        &engine.uri(),
        &["read -P 0x11 0 1M", "write -P 0x33 0 64k", "flush"],
        "after the disks recovered",
    );
    common::bad_input::stop(&mut engine);
    assert_identical("dead", &both);
}

/// A full rebuild cut short (here by the new replica's disk failing its
/// first copies) starts again in full: the replica lacks data that no
/// dirty map records, so a delta retry would copy nothing and call it
/// healthy. The volume's data is idle and clean before the replica is
/// added, which is when a delta copies least.
#[test]
fn an_interrupted_full_rebuild_starts_again_in_full() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start(&tmp.path().join("a"), "auto");
    let b = FaultyReplica::start(&tmp.path().join("b"), "auto");
    create_volume("grow", "32MiB", &[&a]);
    let engine = Engine::start_with(tmp.path(), "grow", &[&a], &["--clean-after", "1s"]);
    qemu_io_ok(&engine.uri(), &["write -P 0x5a 0 32M", "flush"], "filling");
    std::thread::sleep(Duration::from_secs(3));

    b.set_faults("write=eio volume=grow");
    create_volume("grow", "32MiB", &[&b.replica]);
    add_replica(tmp.path(), "grow", &b.replica.addr);
    wait_until("the new replica's rebuild to stop", FIO_TIMEOUT, || {
        log_of(&engine.proc)
            .lines()
            .any(|l| l.contains(REBUILD_STOPPED) && l.contains(&b.replica.addr))
    });
    b.set_faults("");
    wait_healthy(tmp.path(), "grow", 2);
    let log = log_of(&engine.proc);
    let rebuilds: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rebuild started") && l.contains(&b.replica.addr))
        .collect();
    assert!(
        rebuilds.len() >= 2 && rebuilds.iter().all(|l| l.contains("kind=\"full\"")),
        "every rebuild of the new replica should be full:\n{}",
        rebuilds.join("\n")
    );
    drop(engine);
    assert_identical("grow", &[&a, &b.replica]);
}

/// A rebuilt replica counts as healthy only once a replica that is healthy
/// has saved the membership saying so. Here the source's disk refuses that
/// save: before, the rebuilt replica went on alone, while the source's own
/// record still showed it as the only up-to-date one, so a later start
/// with the rebuilt replica down served the source's older data. Now the
/// volume stops (EIO) until the source can save again, and nothing
/// acknowledged is lost.
#[test]
fn a_rebuilt_replica_is_healthy_only_once_its_source_has_saved_so() {
    let tmp = tempfile::tempdir().unwrap();
    let a = FaultyReplica::start(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("promo", "16MiB", &[&a.replica]);
    let engine = Engine::start(tmp.path(), "promo", &[&a.replica]);
    qemu_io_ok(&engine.uri(), &["write -P 0x41 0 16M", "flush"], "filling");

    // The source saves the memberships that add the replica and start its
    // rebuild, then its disk refuses the next one: the promotion.
    a.set_faults("membership=enospc after=2 volume=promo");
    add_replica(tmp.path(), "promo", &b.addr);
    wait_until("the source to drop out", FIO_TIMEOUT, || {
        log_of(&engine.proc)
            .lines()
            .any(|l| l.contains(DROPPED) && l.contains(&a.replica.addr))
    });
    let (ok, out) = qemu_io(&engine.uri(), &["write -P 0x42 0 1M"]);
    assert!(
        !ok,
        "a write was acknowledged by the rebuilt replica alone, whose promotion the \
         source never saved:\n{out}"
    );

    a.set_faults("");
    wait_healthy(tmp.path(), "promo", 2);
    qemu_io_ok(
        &engine.uri(),
        &["read -P 0x41 1M 15M", "write -P 0x43 0 1M", "flush"],
        "after the source's disk recovered",
    );
    drop(engine);
    assert_identical("promo", &[&a.replica, &b]);
}

/// The source of a rebuild fails (its disk refuses reads) while it copies
/// to a new replica: the source is dropped for its own error, and the new
/// replica's rebuild stops saying its source failed, not blamed with the
/// source's error. Once the source's disk recovers it serves again and the
/// new replica is rebuilt and joins.
#[test]
fn a_failing_rebuild_source_is_blamed_not_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let a = FaultyReplica::start(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("blame", "16MiB", &[&a.replica]);
    let engine = Engine::start(tmp.path(), "blame", &[&a.replica]);
    qemu_io_ok(&engine.uri(), &["write -P 0x51 0 16M", "flush"], "filling");

    a.set_faults("read=eio volume=blame");
    add_replica(tmp.path(), "blame", &b.addr);
    wait_until("the new replica's rebuild to stop", FIO_TIMEOUT, || {
        log_of(&engine.proc)
            .lines()
            .any(|l| l.contains(REBUILD_STOPPED) && l.contains(&b.addr))
    });
    let log = log_of(&engine.proc);
    let stopped = log
        .lines()
        .find(|l| l.contains(REBUILD_STOPPED) && l.contains(&b.addr))
        .unwrap();
    assert!(
        stopped.contains("its rebuild source failed"),
        "the new replica is blamed for its source's failure:\n{stopped}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(DROPPED) && l.contains(&a.replica.addr)),
        "the failing source was not dropped:\n{log}"
    );

    a.set_faults("");
    wait_healthy(tmp.path(), "blame", 2);
    qemu_io_ok(
        &engine.uri(),
        &["read -P 0x51 0 16M"],
        "after the source recovered",
    );
    drop(engine);
    assert_identical("blame", &[&a.replica, &b]);
}
