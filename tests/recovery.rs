//! Failures without data loss (DESIGN.md invariants 2-6), with real
//! processes: replica daemons killed and restarted under verified fio
//! load, an engine killed mid-write, a short outage repaired by delta
//! rebuild, a replica added and rebuilt in full while IO runs, and one
//! removed from a running volume and added back.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const STEP: Duration = Duration::from_secs(60);

/// Bytes the running engine of `volume` compared between its replicas
/// when it started.
fn reconcile_compared(dir: &Path, volume: &str) -> u64 {
    status_json(dir, volume)["reconcile"]["bytes_compared"]
        .as_u64()
        .expect("the engine's status has reconcile.bytes_compared")
}

/// `kill -9` one replica daemon, then the other, ten times in all, while
/// fio writes and verifies; each comes back on its own and is rebuilt
/// before the next kill. Every kill lands while fio's writes are reaching
/// the victim; fio sees no error, and the replicas end identical.
#[test]
fn replicas_killed_and_restarted_ten_times_under_fio_lose_nothing() {
    const CYCLES: u64 = 10;
    /// Each cycle writes its own stretch of the volume, where no cycle
    /// wrote before: the victim's allocated bytes then grow only with
    /// fio's writes reaching it.
    const SPAN: u64 = 48 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Replica::start(&tmp.path().join("a"), "uring");
    let mut b = Replica::start(&tmp.path().join("b"), "sync");
    create_volume("loop", "512MiB", &[&a, &b]);
    let engine = Engine::start_with(tmp.path(), "loop", &[&a, &b], &["--io-timeout", "2s"]);
    for cycle in 0..CYCLES {
        let victim = if cycle % 2 == 0 { &mut a } else { &mut b };
        let before = allocated_bytes(&victim.dir);
        let mut fio = Fio::start(
            tmp.path(),
            &format!("loop{cycle}"),
            &engine.uri(),
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                &format!("--offset={}", cycle * SPAN),
                &format!("--size={SPAN}"),
                "--verify=crc32c",
                "--verify_backlog=512",
                &format!("--randseed={}", 1000 + cycle),
            ],
        );
        wait_until(
            &format!("cycle {cycle}: fio's writes to reach {}", victim.addr),
            STEP,
            || {
                assert!(
                    fio.proc.is_running(),
                    "cycle {cycle}: fio ended before the kill:\n{}",
                    fio.proc.log_text()
                );
                allocated_bytes(&victim.dir) >= before + (4 << 20)
            },
        );
        victim.proc.kill9();
        // Still running after the kill, so running when it landed.
        assert!(
            fio.proc.is_running(),
            "cycle {cycle}: fio finished before the kill landed; the job is too small"
        );
        std::thread::sleep(Duration::from_millis(200));
        victim.restart_after_kill9();
        let report = fio.wait(STEP);
        report.assert_clean();
        assert_eq!(report.io_bytes("write"), SPAN, "cycle {cycle}");
        wait_healthy(tmp.path(), "loop", 2);
    }

    let log = engine.proc.log_text();
    let dropped = log_lines(&log, &["dropped from the healthy set"]).len() as u64;
    let rebuilds = log_lines(&log, &["rebuild finished"]);
    eprintln!(
        "{CYCLES} kill -9 cycles under fio: no error; {dropped} drops, {} rebuilds",
        rebuilds.len()
    );
    assert!(
        dropped >= CYCLES,
        "{CYCLES} replicas killed under writes, but only {dropped} dropped:\n{log}"
    );
    assert!(
        rebuilds.len() as u64 >= CYCLES,
        "{CYCLES} replicas killed, but only {} rebuilds finished:\n{log}",
        rebuilds.len()
    );
    // A daemon restarted on its own data is the same replica: it missed
    // only what was written while it was down.
    for line in &rebuilds {
        assert_eq!(log_field(line, "kind"), Some("delta"), "{line}");
    }
    drop(engine);
    assert_identical("loop", &[&a, &b]);
}

/// An engine killed in the middle of writes: the next one makes the
/// replicas identical before serving, comparing only where writes may have
/// been in flight, and everything flushed before the kill is there.
#[test]
fn engine_killed_mid_write_is_reconciled_cheaply() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("crash", "1GiB", &[&a, &b]);
    let mut engine = Engine::start(tmp.path(), "crash", &[&a, &b]);
    qemu_io_ok(&engine.uri(), &["write -P 0x5a 512M 8M", "flush"]);
    // Let the engine clean the regions it just wrote (it waits until a
    // region has been idle for about a second).
    std::thread::sleep(Duration::from_millis(2500));
    let fio = Fio::start(
        tmp.path(),
        "crash",
        &engine.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--time_based",
            "--runtime=30",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    engine.proc.kill9();
    drop(fio);

    let engine = Engine::start(tmp.path(), "crash", &[&a, &b]);
    let s = status_json(tmp.path(), "crash");
    let compared = s["reconcile"]["bytes_compared"].as_u64().unwrap();
    let copied = s["reconcile"]["bytes_copied"].as_u64().unwrap();
    eprintln!("reconciliation compared {compared} bytes, copied {copied}, of a 1 GiB volume");
    assert!(
        compared > 0,
        "nothing was compared after a crash mid-write: {s:#}"
    );
    assert!(
        compared <= 32 << 20,
        "reconciliation compared {compared} bytes; only the 16 MiB being written could differ"
    );
    qemu_io_ok(&engine.uri(), &["read -P 0x5a 512M 8M"]);
    drop(engine);
    assert_identical("crash", &[&a, &b]);
}

/// One request to the engine control socket of `volume` in `dir`, and
/// its answer; `None` while nothing answers there.
fn control_request(dir: &Path, volume: &str, req: &serde_json::Value) -> Option<serde_json::Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(dir.join(format!("{volume}.ctl"))).ok()?;
    writeln!(s, "{req}").ok()?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// An engine starting after a crash answers on its control socket while
/// it compares the replicas: `volume status` says it is starting and how
/// far it is, and replicas cannot be added or removed until it serves.
/// Replica b is frozen (SIGSTOP) as soon as the control socket answers, so
/// the comparison cannot end while the test looks; once b goes on, the
/// engine serves the acknowledged bytes.
#[test]
fn a_starting_engine_says_how_far_its_comparison_is() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("slow", "1GiB", &[&a, &b]);
    let mut engine = Engine::start_with(tmp.path(), "slow", &[&a, &b], &["--clean-after", "60s"]);
    qemu_io_ok(&engine.uri(), &["write -P 0x6b 0 256M", "flush"]);
    engine.proc.kill9();

    // The crashed engine's socket file stays behind and answers nothing.
    let status = serde_json::json!({"op": "status"});
    assert!(control_request(tmp.path(), "slow", &status).is_none());
    let mut engine = Engine::spawn(tmp.path(), "slow", &[&a, &b], &["--io-timeout", "60s"]);
    let deadline = Instant::now() + STEP;
    while control_request(tmp.path(), "slow", &status).is_none() {
        assert!(
            engine.proc.is_running(),
            "engine exited:\n{}",
            engine.proc.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "the starting engine's control socket never answered"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    b.proc.signal(nix::sys::signal::Signal::SIGSTOP);

    let s = status_json(tmp.path(), "slow");
    let r = &s["reconcile"];
    assert_eq!(s["starting"], true, "{s:#}");
    assert_eq!(
        r["bytes_total"],
        256u64 << 20,
        "the 256 MiB written are to be compared: {s:#}"
    );
    assert!(
        r["bytes_compared"].as_u64().unwrap() < 256 << 20,
        "b is frozen, yet the comparison ended: {s:#}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&engine.socket).is_err(),
        "the engine serves NBD before the replicas are compared"
    );
    let text = shorthorn(&[
        "volume",
        "status",
        "slow",
        "--run-dir",
        tmp.path().to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("starting: comparing the replicas") && text.contains("of 256 MiB compared"),
        "{text}"
    );
    let refused = control_request(
        tmp.path(),
        "slow",
        &serde_json::json!({"op": "remove-replica", "addr": b.addr}),
    )
    .expect("the starting engine answers");
    assert_eq!(refused["ok"], false, "{refused:#}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("still starting"),
        "{refused:#}"
    );

    b.proc.signal(nix::sys::signal::Signal::SIGCONT);
    engine.wait_serving(STEP);
    let s = status_json(tmp.path(), "slow");
    assert_eq!(s["starting"], false, "{s:#}");
    assert_eq!(s["healthy"], 2, "{s:#}");
    assert_eq!(s["reconcile"]["bytes_compared"], 256u64 << 20, "{s:#}");
    qemu_io_ok(&engine.uri(), &["read -P 0x6b 0 256M"]);
    drop(engine);
    assert_identical("slow", &[&a, &b]);
}

/// `--clean-after` is how long a written region stays dirty: inside it an
/// engine crash costs a compare of the region, after it nothing. The first
/// engine keeps regions dirty for 30 s, so the crash 2.5 s after its write
/// must compare what it wrote; the next cleans after 0.6 s (the tests'
/// setting), so a crash 2.5 s after its write compares nothing.
#[test]
fn clean_after_decides_what_an_engine_crash_compares() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("window", "64MiB", &[&a, &b]);
    let crash_after_writing = |engine: &mut Engine, at: &str| {
        qemu_io_ok(&engine.uri(), &[&format!("write -P 0x3c {at} 8M"), "flush"]);
        std::thread::sleep(Duration::from_millis(2500));
        engine.proc.kill9();
    };
    let compared = || reconcile_compared(tmp.path(), "window");

    let mut slow = Engine::start_with(tmp.path(), "window", &[&a, &b], &["--clean-after", "30s"]);
    crash_after_writing(&mut slow, "0");
    let mut quick = Engine::start(tmp.path(), "window", &[&a, &b]);
    let kept_dirty = compared();
    assert!(
        kept_dirty >= 8 << 20,
        "the regions written 2.5 s before the crash were cleaned despite \
         --clean-after 30s: {kept_dirty} bytes compared"
    );

    crash_after_writing(&mut quick, "32M");
    let engine = Engine::start(tmp.path(), "window", &[&a, &b]);
    assert_eq!(
        compared(),
        0,
        "regions idle for 2.5 s under --clean-after 600ms were still dirty"
    );
    qemu_io_ok(&engine.uri(), &["read -P 0x3c 0 8M", "read -P 0x3c 32M 8M"]);
    drop(engine);
    assert_identical("window", &[&a, &b]);
}

/// A replica down for a short while copies back only about what it
/// missed, not the volume.
#[test]
fn short_outage_is_repaired_by_delta_rebuild() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start(&tmp.path().join("a"), "auto");
    let mut b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("delta", "256MiB", &[&a, &b]);
    let engine = Engine::start(tmp.path(), "delta", &[&a, &b]);
    qemu_io_ok(&engine.uri(), &["write -P 0x11 0 256M", "flush"]);
    std::thread::sleep(Duration::from_millis(2500));

    b.proc.kill9();
    let outage: [(u64, u64); 4] = [
        (1 << 20, 1 << 20),
        (50 << 20, 512 << 10),
        (101 << 20, 2 << 20),
        (200 << 20, 512 << 10),
    ];
    let written: u64 = outage.iter().map(|(_, l)| l).sum();
    let cmds: Vec<String> = outage
        .iter()
        .map(|(o, l)| format!("write -P 0x22 {o} {l}"))
        .chain(["flush".to_string()])
        .collect();
    qemu_io_ok(
        &engine.uri(),
        &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let restarted = Instant::now();
    b.restart_after_kill9();
    wait_healthy(tmp.path(), "delta", 2);
    let r = replica_status(tmp.path(), "delta", &b.addr);
    let copied = r["rebuild"]["bytes_copied"].as_u64().unwrap();
    let compared = r["rebuild"]["bytes_scanned"].as_u64().unwrap();
    eprintln!(
        "delta rebuild: {copied} bytes copied, {compared} compared, for {written} written \
         during the outage (back in {:?})",
        restarted.elapsed()
    );
    assert!(copied >= written, "the rebuild copied less than was missed");
    assert!(
        copied <= 2 * written && compared <= 8 * written,
        "a short outage cost {copied} bytes copied / {compared} compared for {written} written"
    );
    drop(engine);
    assert_identical("delta", &[&a, &b]);
}

/// `volume add-replica` brings a new replica in while fio writes; it is
/// rebuilt in full, joins, and ends identical.
#[test]
fn added_replica_is_rebuilt_online_and_joins() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("grow", "256MiB", &[&a]);
    let engine = Engine::start(tmp.path(), "grow", &[&a]);
    qemu_io_ok(&engine.uri(), &["write -P 0x33 0 200M", "flush"]);
    let fio = Fio::start(
        tmp.path(),
        "grow",
        &engine.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=64M",
            "--offset=192M",
            "--verify=crc32c",
            "--verify_backlog=256",
        ],
    );
    add_replica(tmp.path(), "grow", &b.addr);
    wait_healthy(tmp.path(), "grow", 2);
    fio.wait(STEP).assert_clean();
    let r = replica_status(tmp.path(), "grow", &b.addr);
    eprintln!(
        "full rebuild of a 256 MiB volume: {} bytes copied at {} MiB/s",
        r["rebuild"]["bytes_copied"], r["rebuild"]["mib_per_s"]
    );
    // Everything the new replica lacked was copied, except what fio's live
    // writes (which reach it too) had already rewritten.
    assert!(r["rebuild"]["bytes_copied"].as_u64().unwrap() >= 190 << 20);
    // The human view names the replica and its state.
    let out = shorthorn(&[
        "volume",
        "status",
        "grow",
        "--run-dir",
        tmp.path().to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&b.addr) && text.contains("healthy"), "{text}");

    // The same daemon again under another name: refused, by its replica
    // id, and the volume goes on serving from both (holding one replica
    // twice, the engine would supersede its own session and stop IO).
    let alias = b.addr.replace("127.0.0.1", "localhost");
    let out = shorthorn(&[
        "volume",
        "add-replica",
        "grow",
        "--replica",
        &alias,
        "--run-dir",
        tmp.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "adding {alias} again succeeded");
    assert!(
        err.contains(&format!("already in this volume as {}", b.addr)),
        "{err}"
    );
    qemu_io_ok(&engine.uri(), &["read -P 0x33 0 64M", "write -P 0x44 0 1M"]);
    assert_eq!(
        status_json(tmp.path(), "grow")["healthy"].as_u64(),
        Some(2),
        "the volume lost a replica"
    );

    // A daemon holding a volume of the same name and size that was used
    // on its own (another history, someone's data): refused, not
    // overwritten by a rebuild.
    let c = Replica::start(&tmp.path().join("c"), "auto");
    let apart = tmp.path().join("apart");
    std::fs::create_dir(&apart).unwrap();
    create_volume("grow", "256MiB", &[&c]);
    let mut alone = Engine::start(&apart, "grow", &[&c]);
    qemu_io_ok(&alone.uri(), &["write -P 0x5c 0 1M", "flush"]);
    common::bad_input::stop(&mut alone);
    let out = shorthorn(&[
        "volume",
        "add-replica",
        "grow",
        "--replica",
        &c.addr,
        "--run-dir",
        tmp.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "adding {} succeeded", c.addr);
    assert!(err.contains("used apart from this one"), "{err}");
    let alone = Engine::start(&apart, "grow", &[&c]);
    qemu_io_ok(&alone.uri(), &["read -P 0x5c 0 1M"]);
    drop(alone);

    drop(engine);
    assert_identical("grow", &[&a, &b]);
}

/// `shorthorn volume remove-replica NAME --replica ADDR --run-dir DIR`.
fn remove_replica(dir: &Path, volume: &str, addr: &str) -> std::process::Output {
    shorthorn(&[
        "volume",
        "remove-replica",
        volume,
        "--replica",
        addr,
        "--run-dir",
        dir.to_str().unwrap(),
    ])
}

/// `volume remove-replica` takes a replica out of a running volume: the
/// volume goes on serving from the other, writes stop reaching the removed
/// one, and the last healthy replica cannot be removed. Added back, the
/// replica is rebuilt and ends identical.
#[test]
fn removed_replica_leaves_the_volume_serving_and_can_be_added_back() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("shrink", "64MiB", &[&a, &b]);
    let engine = Engine::start(tmp.path(), "shrink", &[&a, &b]);
    qemu_io_ok(&engine.uri(), &["write -P 0x44 0 16M", "flush"]);
    wait_healthy(tmp.path(), "shrink", 2);

    let out = remove_replica(tmp.path(), "shrink", &b.addr);
    assert!(
        out.status.success(),
        "remove-replica failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status_json(tmp.path(), "shrink");
    let addrs: Vec<&str> = s["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("no replicas in {s:#}"))
        .iter()
        .filter_map(|r| r["addr"].as_str())
        .collect();
    assert_eq!(addrs, [a.addr.as_str()], "{s:#}");
    assert_eq!(s["healthy"].as_u64(), Some(1), "{s:#}");

    // The volume serves from `a` alone; `b` no longer gets the writes.
    let b_before = allocated_bytes(&b.dir);
    qemu_io_ok(
        &engine.uri(),
        &[
            "write -P 0x55 16M 16M",
            "flush",
            "read -P 0x44 0 16M",
            "read -P 0x55 16M 16M",
        ],
    );
    let b_grew = allocated_bytes(&b.dir).saturating_sub(b_before);
    assert!(
        b_grew < 4 << 20,
        "the removed replica grew by {b_grew} bytes when 16 MiB were written"
    );

    let out = remove_replica(tmp.path(), "shrink", &a.addr);
    assert!(
        !out.status.success(),
        "the last healthy replica was removed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("last healthy replica"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_io_ok(&engine.uri(), &["read -P 0x44 0 16M"]);

    add_replica(tmp.path(), "shrink", &b.addr);
    wait_healthy(tmp.path(), "shrink", 2);
    assert_eq!(
        replica_status(tmp.path(), "shrink", &b.addr)["state"],
        "healthy"
    );
    qemu_io_ok(
        &engine.uri(),
        &["read -P 0x44 0 16M", "read -P 0x55 16M 16M"],
    );
    drop(engine);
    assert_identical("shrink", &[&a, &b]);
}

/// Two replica daemons holding `volume`, written with 0x61 over its first
/// MiB by an engine that then stopped cleanly.
fn two_replicas_written(tmp: &Path, volume: &str) -> (Replica, Replica, Engine) {
    let a = Replica::start(&tmp.join("a"), "auto");
    let b = Replica::start(&tmp.join("b"), "auto");
    create_volume(volume, "16MiB", &[&a, &b]);
    let engine = Engine::start(tmp, volume, &[&a, &b]);
    qemu_io_ok(&engine.uri(), &["write -P 0x61 0 1M", "flush"]);
    (a, b, engine)
}

/// Deletes `volume` on `r`'s daemon and creates it again, empty: a new
/// replica at the old address.
fn recreate(volume: &str, r: &Replica) {
    let delete = shorthorn(&["volume", "delete", volume, "--replica", &r.addr]);
    assert!(
        delete.status.success(),
        "{}",
        String::from_utf8_lossy(&delete.stderr)
    );
    create_volume(volume, "16MiB", &[r]);
}

/// Starts an engine for `volume` on `replicas` (with `extra` flags),
/// expects it to refuse, and returns what it said.
fn refused_start(tmp: &Path, volume: &str, replicas: &[&Replica], extra: &[&str]) -> String {
    let nbd = format!("unix:{}", tmp.join("refused.sock").display());
    let mut args = vec!["engine", "serve", volume, "--nbd", &nbd];
    for r in replicas {
        args.extend(["--replica", r.addr.as_str()]);
    }
    args.extend(extra);
    let out = shorthorn_within(Duration::from_secs(30), &args);
    assert!(!out.status.success(), "the engine started with {extra:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An engine does not start without a replica the membership lists as up
/// to date, and says why it is missing: left off the command line, not
/// answering, or deleted and created again (another replica id). Each
/// could hold writes the others lack.
#[test]
fn an_engine_refuses_to_start_without_an_up_to_date_replica_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, mut b, mut engine) = two_replicas_written(tmp.path(), "kept");
    common::bad_input::stop(&mut engine);
    let start = |replicas: &[&Replica]| refused_start(tmp.path(), "kept", replicas, &[]);
    let says = |err: &str, want: &str| {
        assert!(err.contains(want), "did not say {want:?}:\n{err}");
        assert!(err.contains("--allow-missing-replicas"), "{err}");
    };
    says(
        &start(&[&a]),
        &format!("{} is not named with --replica", b.addr),
    );
    b.proc.kill9();
    says(&start(&[&a, &b]), &format!("{} cannot be reached", b.addr));
    b.restart_after_kill9();
    recreate("kept", &b);
    says(&start(&[&a, &b]), "deleted and created again");

    // The replica that was kept still holds the data, and once the
    // operator says so the new one is rebuilt from it.
    let engine = Engine::start_with(tmp.path(), "kept", &[&a, &b], &["--allow-missing-replicas"]);
    qemu_io_ok(&engine.uri(), &["read -P 0x61 0 1M"]);
    wait_healthy(tmp.path(), "kept", 2);
    drop(engine);
    assert_identical("kept", &[&a, &b]);
}

/// Two replicas each served without the other (the operator's override
/// on both sides) hold writes the other lacks: an engine named with both
/// refuses, flag or not, rather than rebuild one over the other. Each keeps
/// its own data, and the way out the refusal gives works: keep one, delete
/// and create the other again, name both.
#[test]
fn replicas_served_apart_are_never_merged_at_a_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, mut b, mut engine) = two_replicas_written(tmp.path(), "apart");
    // b's daemon dies; the engine drops it and goes on with a alone.
    b.proc.kill9();
    qemu_io_ok(&engine.uri(), &["write -P 0x0a 0 1M", "flush"]);
    common::bad_input::stop(&mut engine);
    b.restart_after_kill9();
    // Then b is started alone, a written off by the operator's override.
    let mut engine = Engine::start_alone(tmp.path(), "apart", &b);
    qemu_io_ok(&engine.uri(), &["write -P 0x0b 0 1M", "flush"]);
    common::bad_input::stop(&mut engine);

    // `volume inspect` shows each side's membership and the same verdict,
    // with no engine and nothing changed.
    let inspect = |replicas: &[&Replica]| {
        let mut args = vec!["volume", "inspect", "apart"];
        for r in replicas {
            args.extend(["--replica", r.addr.as_str()]);
        }
        let out = shorthorn(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text)
    };
    let (code, text) = inspect(&[&a, &b]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("would refuse") && text.contains("served apart"),
        "{text}"
    );
    for r in [&a, &b] {
        let row = text.lines().find(|l| l.starts_with(&r.addr));
        assert!(row.is_some_and(|l| l.contains(" healthy")), "{text}");
    }
    for extra in [&[][..], &["--allow-missing-replicas"][..]] {
        let err = refused_start(tmp.path(), "apart", &[&a, &b], extra);
        assert!(err.contains("served apart"), "{err}");
        assert!(err.contains(&a.addr) && err.contains(&b.addr), "{err}");
    }
    // Neither was touched, and each starts alone without the override.
    for (r, pattern) in [(&a, "0x0a"), (&b, "0x0b")] {
        let mut engine = Engine::start(tmp.path(), "apart", &[r]);
        qemu_io_ok(&engine.uri(), &[&format!("read -P {pattern} 0 1M")]);
        common::bad_input::stop(&mut engine);
    }

    // Keep a: b is deleted and created again. a's membership still lists
    // b's old replica (out) at the same address; the new one takes its
    // place, once, and is rebuilt from a.
    recreate("apart", &b);
    let (code, text) = inspect(&[&a, &b]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "would serve from {}, and rebuild {} (in full)",
            a.addr, b.addr
        )),
        "{text}"
    );
    let mut engine = Engine::start(tmp.path(), "apart", &[&a, &b]);
    qemu_io_ok(&engine.uri(), &["read -P 0x0a 0 1M"]);
    wait_healthy(tmp.path(), "apart", 2);
    qemu_io_ok(&engine.uri(), &["write -P 0x0c 1M 1M", "flush"]);
    common::bad_input::stop(&mut engine);
    assert_identical("apart", &[&a, &b]);
}

/// Every replica of a running volume drops at once (both daemons
/// restarted together, or a one-replica volume's only daemon): the last
/// saved membership still lists them as healthy, so they hold every
/// acknowledged write, and when they answer again the engine serves from
/// them with no rebuild to wait for (there is nothing to rebuild from),
/// then brings the rest up to date from them. Before, the engine saved a
/// membership with no healthy replica, and no start ever worked again.
#[test]
fn a_volume_whose_replicas_all_restart_serves_again() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Replica::start(&tmp.path().join("a"), "auto");
    let mut b = Replica::start(&tmp.path().join("b"), "auto");
    let mut c = Replica::start(&tmp.path().join("c"), "auto");
    create_volume("both", "16MiB", &[&a, &b]);
    create_volume("one", "16MiB", &[&c]);
    let mut both = Engine::start(tmp.path(), "both", &[&a, &b]);
    let mut one = Engine::start(tmp.path(), "one", &[&c]);
    qemu_io_ok(&both.uri(), &["write -P 0x71 0 4M", "flush"]);
    qemu_io_ok(&one.uri(), &["write -P 0x73 0 4M", "flush"]);
    for r in [&mut a, &mut b, &mut c] {
        r.proc.kill9();
    }
    wait_healthy(tmp.path(), "both", 0);
    wait_healthy(tmp.path(), "one", 0);
    for r in [&mut a, &mut b, &mut c] {
        r.restart_after_kill9();
    }
    wait_healthy(tmp.path(), "both", 2);
    wait_healthy(tmp.path(), "one", 1);
    qemu_io_ok(
        &both.uri(),
        &["read -P 0x71 0 4M", "write -P 0x72 4M 1M", "flush"],
    );
    qemu_io_ok(
        &one.uri(),
        &["read -P 0x73 0 4M", "write -P 0x74 4M 1M", "flush"],
    );
    common::bad_input::stop(&mut both);
    common::bad_input::stop(&mut one);
    assert_identical("both", &[&a, &b]);

    // And the next engines start as after any stop.
    let mut both = Engine::start(tmp.path(), "both", &[&a, &b]);
    qemu_io_ok(&both.uri(), &["read -P 0x72 4M 1M"]);
    let mut one = Engine::start(tmp.path(), "one", &[&c]);
    qemu_io_ok(&one.uri(), &["read -P 0x74 4M 1M"]);
    common::bad_input::stop(&mut both);
    common::bad_input::stop(&mut one);
}

/// One replica drops, the volume goes on with the other, then that one
/// drops too; the first comes back first. It missed writes, so it must
/// wait, out, for the second (not sit "rebuilding" with no rebuild, as it
/// did); once the second is back the volume serves from it and rebuilds
/// the first.
#[test]
fn replicas_back_in_the_wrong_order_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Replica::start(&tmp.path().join("a"), "auto");
    let mut b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("order", "16MiB", &[&a, &b]);
    let engine = Engine::start(tmp.path(), "order", &[&a, &b]);
    qemu_io_ok(&engine.uri(), &["write -P 0x11 0 8M", "flush"]);
    a.proc.kill9();
    qemu_io_ok(&engine.uri(), &["write -P 0x22 8M 4M", "flush"]);
    b.proc.kill9();
    wait_healthy(tmp.path(), "order", 0);
    a.restart_after_kill9();
    // a missed the second write: it must not serve, and waits for b.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        healthy(tmp.path(), "order"),
        0,
        "{:#}",
        status_json(tmp.path(), "order")
    );
    let ar = replica_status(tmp.path(), "order", &a.addr);
    assert_eq!(ar["state"], "out", "{ar:#}");
    b.restart_after_kill9();
    wait_healthy(tmp.path(), "order", 2);
    qemu_io_ok(&engine.uri(), &["read -P 0x11 0 8M", "read -P 0x22 8M 4M"]);
    drop(engine);
    assert_identical("order", &[&a, &b]);
}

/// What a rebuild copied, and what was written just before a clean stop,
/// is not compared again at the next start: once the replicas are
/// identical and idle, their dirty maps are cleared (a full rebuild left
/// the whole volume dirty, and the next start read it all again).
#[test]
fn a_rebuild_or_a_clean_stop_leaves_nothing_to_compare_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("mend", "64MiB", &[&a]);
    let compared = || reconcile_compared(tmp.path(), "mend");

    let mut engine = Engine::start(tmp.path(), "mend", &[&a]);
    qemu_io_ok(&engine.uri(), &["write -P 0x71 0 48M", "flush"]);
    // Cleaned before the rebuild starts: what is dirty after it, the
    // rebuild's own copies made so.
    std::thread::sleep(Duration::from_millis(2500));
    add_replica(tmp.path(), "mend", &b.addr);
    wait_healthy(tmp.path(), "mend", 2);
    // Past the tests' clean-after (600 ms): the rebuilt regions are idle.
    std::thread::sleep(Duration::from_millis(2500));
    common::bad_input::stop(&mut engine);
    let mut engine = Engine::start(tmp.path(), "mend", &[&a, &b]);
    assert_eq!(
        compared(),
        0,
        "the start after a full rebuild compared again"
    );

    // Written, flushed and stopped at once, well inside clean-after.
    qemu_io_ok(&engine.uri(), &["write -P 0x72 16M 8M", "flush"]);
    common::bad_input::stop(&mut engine);
    let engine = Engine::start(tmp.path(), "mend", &[&a, &b]);
    assert_eq!(compared(), 0, "the start after a clean stop compared again");
    qemu_io_ok(
        &engine.uri(),
        &[
            "read -P 0x71 0 16M",
            "read -P 0x72 16M 8M",
            "read -P 0x71 24M 24M",
        ],
    );
    drop(engine);
    assert_identical("mend", &[&a, &b]);
}
