//! A long soak, not part of the normal suite: fio writes and verifies a
//! two-replica volume round after round while replica daemons and the
//! engine fail at random moments (kill -9, a freeze shorter or longer than
//! the IO timeout, both replicas at once, an engine crash, an engine stop).
//! After every round both replicas must be healthy again within two
//! minutes; every few rounds, and at the end, everything fio wrote in a
//! round that finished cleanly is read back and verified; at the end the
//! replicas must be byte-identical.
//!
//! ```sh
//! SHORTHORN_SOAK_SECS=1800 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! `SHORTHORN_SOAK_SECS` is how long to go on (600 unless set);
//! `SHORTHORN_SOAK_SEED` replays the fault sequence of an earlier run (each
//! run prints its seed first).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOLUME: &str = "soak";
/// The volume is cut into stripes; each round rewrites one, in turn.
const STRIPES: u64 = 8;
const STRIPE: u64 = 64 << 20;
const IO_TIMEOUT: &str = "2s";
const STEP: Duration = Duration::from_secs(120);
/// Rounds between two read-back checks of every stripe.
const CHECK_EVERY: u64 = 5;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// kill -9 one replica daemon; it starts again after a pause.
    KillReplica { which: usize, down: Duration },
    /// SIGSTOP one replica daemon, SIGCONT after `frozen` (shorter or
    /// longer than the IO timeout).
    FreezeReplica { which: usize, frozen: Duration },
    /// kill -9 both replica daemons; they start again after a pause.
    KillBothReplicas { down: Duration },
    /// kill -9 the engine; a new one starts.
    KillEngine,
    /// SIGTERM the engine; a new one starts.
    StopEngine,
}

impl Fault {
    fn pick(rng: &mut StdRng) -> Fault {
        let which = rng.gen_range(0..2);
        match rng.gen_range(0..10) {
            0..=2 => Fault::KillReplica {
                which,
                down: Duration::from_millis(rng.gen_range(0..2000)),
            },
            3..=5 => Fault::FreezeReplica {
                which,
                frozen: Duration::from_millis(rng.gen_range(300..5000)),
            },
            6 => Fault::KillBothReplicas {
                down: Duration::from_millis(rng.gen_range(0..2000)),
            },
            7..=8 => Fault::KillEngine,
            _ => Fault::StopEngine,
        }
    }

    /// Whether fio may see errors: the engine went away, or every replica
    /// did at once (IO fails with EIO then, by design).
    fn fails_io(self) -> bool {
        matches!(
            self,
            Fault::KillBothReplicas { .. } | Fault::KillEngine | Fault::StopEngine
        )
    }
}

/// fio's options for one round's writes to `stripe` (or, with
/// `--verify_only` added, for reading them back): random writes of mixed
/// sizes, each block verified, the layout and data fixed by `seed`.
fn job(stripe: u64, seed: u64) -> Vec<String> {
    [
        "--rw=randwrite".to_string(),
        "--bsrange=4k-64k".to_string(),
        "--iodepth=16".to_string(),
        format!("--offset={}", stripe * STRIPE),
        format!("--size={STRIPE}"),
        "--verify=crc32c".to_string(),
        format!("--randseed={seed}"),
    ]
    .into()
}

fn start_engine(dir: &Path, replicas: &[&Replica]) -> Engine {
    Engine::start_with(dir, VOLUME, replicas, &["--io-timeout", IO_TIMEOUT])
}

/// Reads back every stripe whose last writes finished cleanly.
fn check_all(dir: &Path, engine: &Engine, written: &[Option<u64>], round: u64) {
    for (stripe, seed) in written.iter().enumerate() {
        let Some(seed) = *seed else { continue };
        let mut job = job(stripe as u64, seed);
        job.push("--verify_only".into());
        let report = Fio::run(
            dir,
            &format!("check{round}-{stripe}"),
            &engine.uri(),
            &as_args(&job),
            STEP,
        );
        report.assert_clean();
        assert_eq!(
            report.io_bytes("read"),
            STRIPE,
            "round {round}: stripe {stripe} (seed {seed}) was not read back whole"
        );
    }
}

#[test]
#[ignore = "a long soak: run with --ignored (SHORTHORN_SOAK_SECS, SHORTHORN_SOAK_SEED)"]
fn two_replicas_survive_random_failures_under_verified_writes() {
    let secs: u64 = std::env::var("SHORTHORN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let seed: u64 = std::env::var("SHORTHORN_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("soak: {secs} s, SHORTHORN_SOAK_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut replicas = [
        Replica::start(&dir.join("a"), "uring"),
        Replica::start(&dir.join("b"), "sync"),
    ];
    let size = format!("{}MiB", (STRIPES * STRIPE) >> 20);
    create_volume(VOLUME, &size, &[&replicas[0], &replicas[1]]);
    let mut engine = start_engine(dir, &[&replicas[0], &replicas[1]]);

    // Per stripe, the seed of the last round that wrote it cleanly; None
    // where a round was cut short (its data is a mix of two rounds).
    let mut written: Vec<Option<u64>> = vec![None; STRIPES as usize];
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut round = 0;
    let mut under_io_count = 0;
    while Instant::now() < deadline {
        let stripe = round % STRIPES;
        // fio takes a seed below 2^63.
        let job_seed = seed.wrapping_add(round) >> 1;
        let fault = Fault::pick(&mut rng);
        let mut fio = Fio::start(
            dir,
            &format!("round{round}"),
            &engine.uri(),
            &as_args(&job(stripe, job_seed)),
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..1000)));
        let under_io = fio.proc.is_running();
        under_io_count += u64::from(under_io);
        eprintln!("round {round}: stripe {stripe}, {fault:?}, under IO: {under_io}");
        match fault {
            Fault::KillReplica { which, down } => {
                replicas[which].proc.kill9();
                std::thread::sleep(down);
                replicas[which].restart_after_kill9();
            }
            Fault::FreezeReplica { which, frozen } => {
                replicas[which].proc.signal(Signal::SIGSTOP);
                std::thread::sleep(frozen);
                replicas[which].proc.signal(Signal::SIGCONT);
            }
            Fault::KillBothReplicas { down } => {
                for r in replicas.iter_mut() {
                    r.proc.kill9();
                }
                std::thread::sleep(down);
                for r in replicas.iter_mut() {
                    r.restart_after_kill9();
                }
            }
            Fault::KillEngine => {
                engine.proc.kill9();
                engine = start_engine(dir, &[&replicas[0], &replicas[1]]);
            }
            Fault::StopEngine => {
                sigterm_and_wait(&mut engine.proc, STEP);
                engine = start_engine(dir, &[&replicas[0], &replicas[1]]);
            }
        }
        // fio never hangs: with a replica gone it goes on, with the engine
        // gone it fails at once.
        let report = fio.wait(STEP);
        if fault.fails_io() && under_io {
            written[stripe as usize] = None;
        } else {
            report.assert_clean();
            assert_eq!(report.io_bytes("write"), STRIPE, "round {round}");
            written[stripe as usize] = Some(job_seed);
        }
        wait_healthy_within(dir, VOLUME, 2, STEP);
        round += 1;
        if round % CHECK_EVERY == 0 {
            check_all(dir, &engine, &written, round);
        }
    }

    check_all(dir, &engine, &written, round);
    sigterm_and_wait(&mut engine.proc, STEP);
    assert_identical(VOLUME, &[&replicas[0], &replicas[1]]);
    eprintln!(
        "soak: {round} rounds in {secs} s ({under_io_count} faults while fio wrote), no data \
         lost, replicas identical (SHORTHORN_SOAK_SEED={seed})"
    );
    assert!(
        under_io_count * 2 >= round,
        "only {under_io_count} of {round} faults landed while fio wrote"
    );
}
