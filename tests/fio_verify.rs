//! fio, through its own `nbd` engine, writes a 2-replica volume at queue
//! depth 32 and verifies every block it wrote (crc32c headers): no IO error,
//! no verify failure, and each replica alone then passes the same verify
//! (DESIGN.md invariants 1 and 3). Then the same with one replica daemon
//! killed (`kill -9`) in the middle of the run: the client sees nothing
//! (invariant 2), and the survivor alone holds every byte the volume served
//! (invariant 3).
//!
//! One replica runs io_uring and the other plain pread/pwrite, so both disk
//! IO engines carry every test.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const VOLUME_SIZE: &str = "256MiB";
/// fio covers the whole volume, so every block is written and verified.
const FIO_SIZE: u64 = 256 << 20;
const FIO_TIMEOUT: Duration = Duration::from_secs(50);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// What the engine logs when it drops a replica from the healthy set.
const DROPPED: &str = "dropped from the healthy set";

/// Runs `job` against `uri` and asserts fio saw no error of any kind and
/// read back (verified) the whole volume.
fn run_clean(dir: &Path, name: &str, uri: &str, job: &[String]) -> FioReport {
    let report = Fio::run(dir, name, uri, &as_args(job), FIO_TIMEOUT);
    report.assert_clean();
    assert_eq!(
        report.io_bytes("read"),
        FIO_SIZE,
        "fio {name} did not read back (verify) the whole volume"
    );
    report
}

/// fio's `--verify_only` replays `job`'s writes (same seed, so the same
/// offsets and block sizes) as reads through an engine on `replica` alone,
/// and checks every block's header and crc32c.
fn verify_on_replica_alone(dir: &Path, volume: &str, replica: &Replica, job: &[String]) {
    let mut engine = Engine::start_alone(dir, volume, replica);
    // verify_only with a backlog verifies only the last backlog batch.
    let mut replay: Vec<String> = job
        .iter()
        .filter(|a| !a.starts_with("--verify_backlog"))
        .cloned()
        .collect();
    replay.push("--verify_only".into());
    let name = format!("{volume}-verify-on-{}", replica.io_engine);
    run_clean(dir, &name, &engine.uri(), &replay);
    sigterm_and_wait(&mut engine.proc, STOP_TIMEOUT);
}

fn dropped_lines<'a>(log: &'a str, replica: &Replica) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(DROPPED) && l.contains(&replica.addr))
        .collect()
}

fn write_and_verify(volume: &str, block_size: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let uring = Replica::start(&tmp.path().join("uring"), "uring");
    let sync = Replica::start(&tmp.path().join("sync"), "sync");
    create_volume(volume, VOLUME_SIZE, &[&uring, &sync]);
    let job = verified_random_writes(block_size, FIO_SIZE, extra);

    let mut engine = Engine::start(tmp.path(), volume, &[&uring, &sync]);
    let report = run_clean(tmp.path(), volume, &engine.uri(), &job);
    assert_eq!(report.io_bytes("write"), FIO_SIZE);
    assert!(engine.proc.is_running(), "the engine died under fio");
    let status = sigterm_and_wait(&mut engine.proc, STOP_TIMEOUT);
    assert!(status.success(), "engine exited with {status}");
    // With no fault, both replicas stayed in the healthy set, so both must
    // hold every block fio wrote.
    let log = engine.proc.log_text();
    for r in [&uring, &sync] {
        assert!(
            dropped_lines(&log, r).is_empty(),
            "replica {} ({}) was dropped in a run without faults:\n{log}",
            r.addr,
            r.io_engine
        );
    }
    for r in [&uring, &sync] {
        verify_on_replica_alone(tmp.path(), volume, r, &job);
    }
}

#[test]
fn random_4k_writes_verify_at_qd32() {
    write_and_verify("fio4k", "--bs=4k", &[]);
}

#[test]
fn random_mixed_size_writes_verify_at_qd32() {
    // Block sizes 4k..128k, with a FLUSH every 64 writes among them.
    write_and_verify("fiomixed", "--bsrange=4k-128k", &["--fsync=64"]);
}

/// Kills one replica daemon (`kill -9`) while fio writes and verifies at
/// queue depth 32. `kill_first` kills the first replica given to the engine
/// (the one reads are served from), otherwise the second.
fn kill_a_replica_mid_run(volume: &str, kill_first: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let mut first = Replica::start(&tmp.path().join("uring"), "uring");
    let mut second = Replica::start(&tmp.path().join("sync"), "sync");
    create_volume(volume, VOLUME_SIZE, &[&first, &second]);
    // Verify as it goes (every 1024 writes), so reads are in flight too
    // when the replica dies.
    let job = verified_random_writes("--bs=4k", FIO_SIZE, &["--verify_backlog=1024"]);

    let mut engine = Engine::start(tmp.path(), volume, &[&first, &second]);
    let mut fio = Fio::start(tmp.path(), volume, &engine.uri(), &as_args(&job));
    let (victim, survivor) = if kill_first {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };

    // Kill once fio's writes are visibly landing on the victim, a quarter
    // of the way through: the rest of the run happens with one replica.
    let started = Instant::now();
    wait_until(
        "fio's writes to reach the victim replica",
        Duration::from_secs(30),
        || {
            assert!(
                fio.proc.is_running(),
                "fio ended before the replica was killed:\n{}",
                fio.proc.log_text()
            );
            allocated_bytes(&victim.dir) >= FIO_SIZE / 4
        },
    );
    victim.proc.kill9();
    let killed_at = started.elapsed();
    assert!(
        fio.proc.is_running(),
        "fio finished before the replica was killed; the job is too small to test anything"
    );

    let report = fio.wait(FIO_TIMEOUT);
    eprintln!(
        "replica {} ({}) killed {killed_at:?} into the fio run",
        victim.addr, victim.io_engine
    );
    report.assert_wrote_and_verified(FIO_SIZE);
    assert!(
        engine.proc.is_running(),
        "the engine died when a replica did:\n{}",
        engine.proc.log_text()
    );
    let log = engine.proc.log_text();
    assert!(
        !dropped_lines(&log, victim).is_empty(),
        "the engine never dropped the killed replica {}:\n{log}",
        victim.addr
    );
    assert!(
        dropped_lines(&log, survivor).is_empty(),
        "the engine dropped the surviving replica {} too:\n{log}",
        survivor.addr
    );

    // What the volume serves now...
    let served = tmp.path().join("served.img");
    run(Command::new("nbdcopy").arg(engine.uri()).arg(&served));
    let status = sigterm_and_wait(&mut engine.proc, STOP_TIMEOUT);
    assert!(status.success(), "engine exited with {status}");
    drop(engine);
    // ...is exactly what the survivor serves alone,
    let mut alone = Engine::start(tmp.path(), volume, &[survivor]);
    let from_survivor = tmp.path().join("survivor.img");
    run(Command::new("nbdcopy").arg(alone.uri()).arg(&from_survivor));
    sigterm_and_wait(&mut alone.proc, STOP_TIMEOUT);
    assert_eq!(
        std::fs::metadata(&from_survivor).unwrap().len(),
        FIO_SIZE,
        "the survivor's copy has the wrong size"
    );
    assert!(
        files_equal(&served, &from_survivor),
        "the surviving replica {} ({}) alone serves other bytes than the volume did",
        survivor.addr,
        survivor.io_engine
    );
    // ...and every block in it passes fio's verify.
    verify_on_replica_alone(tmp.path(), volume, survivor, &job);
}

#[test]
fn kill9_of_the_reading_replica_mid_fio_loses_nothing() {
    kill_a_replica_mid_run("killreader", true);
}

#[test]
fn kill9_of_the_other_replica_mid_fio_loses_nothing() {
    kill_a_replica_mid_run("killmirror", false);
}
