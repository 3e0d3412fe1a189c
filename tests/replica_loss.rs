//! Losing replicas while IO runs (DESIGN.md invariant 2): a replica that
//! stops answering is dropped within the IO timeout and IO carries on with
//! no error; with no replica left, IO fails with EIO and never hangs.
//!
//! A replica daemon is stalled for real with SIGSTOP: its sockets stay open
//! and simply go quiet, the way a wedged disk or a hung node looks.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// A replica whose node goes silent while the volume is idle (its
/// connection stays open: a power cut, a network gone) is marked out
/// within the engine's ping interval (5 s) plus the IO timeout, with no IO
/// at all, so `volume status` does not call it healthy for hours; once it
/// answers again it is rebuilt and joins.
#[test]
fn a_replica_gone_silent_while_idle_is_noticed_without_io() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "uring");
    let r2 = Replica::start(&tmp.path().join("r2"), "sync");
    create_volume("quiet", "64MiB", &[&r1, &r2]);
    let engine = Engine::start_with(tmp.path(), "quiet", &[&r1, &r2], &["--io-timeout", "1s"]);
    qemu_io_ok(&engine.uri(), &["write -P 0x33 0 4M", "flush"]);
    wait_healthy(tmp.path(), "quiet", 2);
    // Past the clean of the regions just written (they go clean after
    // 0.6 s here), the last request the engine would send unasked.
    std::thread::sleep(Duration::from_millis(2500));

    r2.proc.signal(Signal::SIGSTOP);
    let stalled = Instant::now();
    wait_healthy_within(tmp.path(), "quiet", 1, Duration::from_secs(20));
    let noticed = stalled.elapsed();
    r2.proc.signal(Signal::SIGCONT);
    eprintln!("a silent replica of an idle volume was marked out after {noticed:?}");
    let r = replica_status(tmp.path(), "quiet", &r2.addr);
    assert!(
        r["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("did not answer")),
        "{r:#}"
    );
    wait_healthy(tmp.path(), "quiet", 2);
    qemu_io_ok(&engine.uri(), &["read -P 0x33 0 4M"]);
    drop(engine);
    assert_identical("quiet", &[&r1, &r2]);
}

#[test]
fn stalled_replica_is_dropped_and_io_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "uring");
    let r2 = Replica::start(&tmp.path().join("r2"), "sync");
    create_volume("stall", "64MiB", &[&r1, &r2]);
    let engine = Engine::start_with(tmp.path(), "stall", &[&r1, &r2], &["--io-timeout", "1s"]);

    let (ok, out) = qemu_io(&engine.uri(), &["write -P 0x11 0 4M", "flush"]);
    assert!(ok, "{out}");

    r1.proc.signal(Signal::SIGSTOP);
    let started = Instant::now();
    // Writes and a flush while the preferred (read) replica is wedged: the
    // engine must drop it after the 1 s timeout and finish on the other.
    let (ok, out) = qemu_io(
        &engine.uri(),
        &[
            "write -P 0x22 1M 2M",
            "flush",
            "read -P 0x22 1M 2M",
            "read -P 0x11 0 1M",
        ],
    );
    let took = started.elapsed();
    r1.proc.signal(Signal::SIGCONT);
    assert!(ok, "IO failed while one replica was stalled:\n{out}");
    assert!(
        took < Duration::from_secs(10),
        "IO with a stalled replica took {took:?}; the IO timeout is 1 s"
    );

    // The dropped replica, awake again, must not serve reads: it missed
    // the 0x22 write.
    let (ok, out) = qemu_io(&engine.uri(), &["read -P 0x22 1M 2M"]);
    assert!(
        ok,
        "a read came from the replica that missed writes:\n{out}"
    );
    let log = engine.proc.log_text();
    assert!(
        log.contains("dropped from the healthy set") && log.contains(&r1.addr),
        "the engine should log which replica it dropped:\n{log}"
    );
}

#[test]
fn no_replica_left_fails_with_eio_and_never_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "auto");
    let r2 = Replica::start(&tmp.path().join("r2"), "auto");
    create_volume("gone", "64MiB", &[&r1, &r2]);
    let engine = Engine::start_with(tmp.path(), "gone", &[&r1, &r2], &["--io-timeout", "1s"]);
    let (ok, out) = qemu_io(&engine.uri(), &["write -P 0x33 0 1M"]);
    assert!(ok, "{out}");

    r1.proc.signal(Signal::SIGSTOP);
    r2.proc.signal(Signal::SIGSTOP);
    let started = Instant::now();
    let (ok, out) = qemu_io(&engine.uri(), &["write -P 0x44 0 64k"]);
    let took = started.elapsed();
    assert!(!ok, "a write with no replica left must fail, got:\n{out}");
    assert!(
        out.contains("Input/output error"),
        "the failure should be EIO:\n{out}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the failing write took {took:?}"
    );

    // Later requests fail at once: nothing waits on dead replicas.
    let started = Instant::now();
    let (ok, out) = qemu_io(&engine.uri(), &["read 0 4k", "flush"]);
    r1.proc.signal(Signal::SIGCONT);
    r2.proc.signal(Signal::SIGCONT);
    assert!(!ok, "a read with no replica left must fail:\n{out}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // They answer again and still hold every acknowledged write: the same
    // engine serves from them (the failed write may or may not have
    // landed; the bytes after it were acknowledged).
    wait_healthy(tmp.path(), "gone", 2);
    let (ok, out) = qemu_io(&engine.uri(), &["read -P 0x33 64k 960k"]);
    assert!(ok, "{out}");
}

#[test]
fn killed_replica_is_dropped_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r1 = Replica::start(&tmp.path().join("r1"), "auto");
    let r2 = Replica::start(&tmp.path().join("r2"), "auto");
    create_volume("killed", "64MiB", &[&r1, &r2]);
    // A long timeout: a closed socket must be noticed without waiting on it.
    let engine = Engine::start_with(tmp.path(), "killed", &[&r1, &r2], &["--io-timeout", "60s"]);
    let (ok, out) = qemu_io(&engine.uri(), &["write -P 0x55 0 2M"]);
    assert!(ok, "{out}");
    r1.proc.kill9();
    let started = Instant::now();
    let (ok, out) = qemu_io(
        &engine.uri(),
        &[
            "write -P 0x66 0 1M",
            "flush",
            "read -P 0x66 0 1M",
            "read -P 0x55 1M 1M",
        ],
    );
    assert!(ok, "IO failed after one replica was killed:\n{out}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
