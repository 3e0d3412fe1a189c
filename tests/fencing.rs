//! Fencing (DESIGN.md invariant 4): each engine start claims a higher
//! generation; once a newer engine holds a volume, the older one's writes
//! fail — on every replica, including ones the newer engine never reached.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn an_older_engine_cannot_write_once_a_newer_one_started() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "uring");
    let r2 = Replica::start(&tmp.path().join("r2"), "sync");
    create_volume("fenced", "16MiB", &[&r1, &r2]);

    let old = Engine::start(tmp.path(), "fenced", &[&r1, &r2]);
    let (ok, out) = qemu_io(&old.uri(), &["write -P 0x11 0 1M", "flush"]);
    assert!(ok, "{out}");

    let new = Engine::start(tmp.path(), "fenced", &[&r1, &r2]);
    let (ok, out) = qemu_io(&new.uri(), &["write -P 0x22 0 64k"]);
    assert!(ok, "{out}");

    let (ok, out) = qemu_io(&old.uri(), &["write -P 0x33 1M 64k"]);
    assert!(!ok, "the superseded engine's write succeeded:\n{out}");
    let (ok, out) = qemu_io(&old.uri(), &["read 0 4k"]);
    assert!(!ok, "the superseded engine still serves reads:\n{out}");
    assert!(old
        .proc
        .log_text()
        .contains("a newer engine has taken this volume over"));

    // Neither replica holds a byte the old engine sent after the newer
    // engine started.
    let (ok, out) = qemu_io(
        &new.uri(),
        &[
            "read -P 0x22 0 64k",
            "read -P 0x11 64k 960k",
            "read -P 0x00 1M 64k",
        ],
    );
    assert!(ok, "{out}");
    drop(new);
    for only in [&r1, &r2] {
        let check =
            Engine::start_with(tmp.path(), "fenced", &[only], &["--allow-missing-replicas"]);
        let (ok, out) = qemu_io(&check.uri(), &["read -P 0x00 1M 64k"]);
        assert!(ok, "replica {} took a superseded write:\n{out}", only.addr);
    }
}

/// The newer engine is started on one replica only (the operator says the
/// other is gone); the older one, still attached to both, must stop at the
/// first refusal and acknowledge nothing more. When the other replica is
/// added back, it is rebuilt, and whatever the old engine left there is
/// overwritten.
#[test]
fn an_older_engine_stops_even_where_the_newer_one_has_not_reached() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "auto");
    let r2 = Replica::start(&tmp.path().join("r2"), "auto");
    create_volume("split", "16MiB", &[&r1, &r2]);
    let old = Engine::start(tmp.path(), "split", &[&r1, &r2]);
    let (ok, out) = qemu_io(&old.uri(), &["write -P 0x11 0 1M", "flush"]);
    assert!(ok, "{out}");
    let new = Engine::start_with(tmp.path(), "split", &[&r1], &["--allow-missing-replicas"]);
    for cmd in ["write -P 0x33 1M 64k", "write -P 0x44 2M 64k", "flush"] {
        let (ok, out) = qemu_io(&old.uri(), &[cmd]);
        assert!(!ok, "the superseded engine acknowledged {cmd:?}:\n{out}");
    }
    // The operator said the other replica was gone, so it left the
    // volume; added back, it is rebuilt, and afterwards both hold exactly
    // the newer engine's view.
    add_replica(tmp.path(), "split", &r2.addr);
    wait_until(
        "the second replica to be rebuilt",
        Duration::from_secs(30),
        || status_json(tmp.path(), "split")["healthy"].as_u64() == Some(2),
    );
    drop(old);
    let (ok, out) = qemu_io(&new.uri(), &["read -P 0x11 0 1M", "read -P 0x00 1M 64k"]);
    assert!(ok, "{out}");
    drop(new);
    assert_identical("split", &[&r1, &r2]);
}

/// The race, not the aftermath: the old engine is in the middle of writing
/// pattern X over a range at queue depth 32 when the newer engine starts.
/// Once the newer one has written Y over the range, the old one goes on
/// trying (and failing) for a while; then both replicas must hold Y over
/// the whole range — no write of the old engine landed after the newer
/// one started.
#[test]
fn an_older_engine_busy_writing_when_a_newer_one_starts_lands_nothing_after() {
    const RANGE: u64 = 8 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "uring");
    let r2 = Replica::start(&tmp.path().join("r2"), "sync");
    create_volume("race", "64MiB", &[&r1, &r2]);
    let before = [allocated_bytes(&r1.dir), allocated_bytes(&r2.dir)];

    let old = Engine::start(tmp.path(), "race", &[&r1, &r2]);
    // X (0x58) over the range, round and round, until stopped; errors
    // counted, not fatal.
    let mut busy = Fio::start(
        tmp.path(),
        "old",
        &old.uri(),
        &[
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=32",
            &format!("--size={RANGE}"),
            "--buffer_pattern=0x58",
            "--scramble_buffers=0",
            "--time_based",
            "--runtime=120",
        ],
    );
    wait_until(
        "the old engine's writes to cover the range on both replicas",
        Duration::from_secs(30),
        || {
            assert!(
                busy.proc.is_running(),
                "fio ended early:\n{}",
                busy.proc.log_text()
            );
            allocated_bytes(&r1.dir) >= before[0] + RANGE
                && allocated_bytes(&r2.dir) >= before[1] + RANGE
        },
    );

    let new = Engine::start(tmp.path(), "race", &[&r1, &r2]);
    assert!(
        busy.proc.is_running(),
        "fio stopped writing through the old engine before the new one was up:\n{}",
        busy.proc.log_text()
    );
    qemu_io_ok(&new.uri(), &[&format!("write -P 0x59 0 {RANGE}"), "flush"]);

    // The old engine keeps getting writes of X to the range, from fio and
    // from fresh connections, and refuses every one.
    let write_x = format!("write -P 0x58 0 {RANGE}");
    for attempt in 0..5 {
        let (ok, out) = qemu_io(&old.uri(), &[&write_x, "flush"]);
        assert!(
            !ok,
            "the superseded engine acknowledged a write (attempt {attempt}):\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        busy.proc.is_running(),
        "fio stopped trying to write through the old engine:\n{}",
        busy.proc.log_text()
    );
    busy.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let report = busy.wait(Duration::from_secs(30));
    let errors: i64 = report
        .jobs()
        .iter()
        .map(|j| j["total_err"].as_i64().unwrap_or(0))
        .sum();
    eprintln!(
        "the old engine took {} bytes of X before it was superseded, then refused {errors} \
         of fio's writes",
        report.io_bytes("write")
    );
    assert!(
        report.io_bytes("write") >= RANGE,
        "the old engine never wrote the range: {:#}",
        report.json
    );
    assert!(
        errors > 0,
        "fio saw no error from the superseded engine:\n{}",
        report.log
    );
    assert!(old
        .proc
        .log_text()
        .contains("a newer engine has taken this volume over"));
    drop(old);

    qemu_io_ok(&new.uri(), &[&format!("read -P 0x59 0 {RANGE}")]);
    drop(new);
    // What the newer engine read is on both replicas, byte for byte.
    assert_identical("race", &[&r1, &r2]);
}
