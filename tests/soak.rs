//! A long soak, not part of the normal suite: fio writes and verifies a
//! two-replica volume round after round while replica daemons and the
//! engine fail at random moments (kill -9, a freeze shorter or longer than
//! the IO timeout, both replicas at once, an engine crash, an engine stop).
//! After every round both replicas must be healthy again within two
//! minutes; every few rounds, and at the end, everything fio wrote in a
//! round that finished cleanly is read back and verified; at the end the
//! replicas must be byte-identical. It runs twice: with the engine in a
//! process of its own, and hosted in replica daemon a (as on a node that
//! uses the volume and holds one of its replicas), where killing that
//! daemon kills the engine too.
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

/// Reads back every stripe whose last writes finished cleanly.
fn check_all(dir: &Path, uri: &str, written: &[Option<u64>], round: u64) {
    for (stripe, seed) in written.iter().enumerate() {
        let Some(seed) = *seed else { continue };
        let mut job = job(stripe as u64, seed);
        job.push("--verify_only".into());
        let report = Fio::run(
            dir,
            &format!("check{round}-{stripe}"),
            uri,
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

/// Where the volume's engine runs.
#[derive(Clone, Copy, PartialEq)]
enum Placement {
    /// `engine serve`, a process of its own.
    Process,
    /// `engine start --daemon` in replica daemon a, as on a node that uses
    /// the volume and holds one of its replicas: when that daemon dies,
    /// the engine dies with it.
    Hosted,
}

enum Running {
    Process(Engine),
    Hosted(HostedEngine),
}

/// Two replica daemons (a, b) and the volume's engine.
struct Cluster<'a> {
    dir: &'a Path,
    placement: Placement,
    replicas: [Replica; 2],
    engine: Running,
}

impl<'a> Cluster<'a> {
    fn start(dir: &'a Path, placement: Placement) -> Cluster<'a> {
        let a = match placement {
            Placement::Process => Replica::start(&dir.join("a"), "uring"),
            Placement::Hosted => Replica::start_hosting(&dir.join("a"), "uring"),
        };
        let replicas = [a, Replica::start(&dir.join("b"), "sync")];
        let size = format!("{}MiB", (STRIPES * STRIPE) >> 20);
        create_volume(VOLUME, &size, &[&replicas[0], &replicas[1]]);
        let engine = Cluster::start_engine(dir, placement, &replicas);
        Cluster {
            dir,
            placement,
            replicas,
            engine,
        }
    }

    fn start_engine(dir: &Path, placement: Placement, replicas: &[Replica; 2]) -> Running {
        let both = [&replicas[0], &replicas[1]];
        let flags = ["--io-timeout", IO_TIMEOUT];
        match placement {
            Placement::Process => Running::Process(Engine::start_with(dir, VOLUME, &both, &flags)),
            Placement::Hosted => Running::Hosted(HostedEngine::start_with(
                &replicas[0],
                dir,
                VOLUME,
                &both,
                &flags,
            )),
        }
    }

    fn restart_engine(&mut self) {
        self.engine = Cluster::start_engine(self.dir, self.placement, &self.replicas);
    }

    fn uri(&self) -> String {
        match &self.engine {
            Running::Process(e) => e.uri(),
            Running::Hosted(e) => e.uri(),
        }
    }

    /// Whether replica daemon `which` also runs the engine.
    fn hosts_engine(&self, which: usize) -> bool {
        self.placement == Placement::Hosted && which == 0
    }

    /// kill -9 of the daemons `which`, and new ones after `down`.
    /// Returns whether the engine went too (and was started again).
    fn kill_replicas(&mut self, which: &[usize], down: Duration) -> bool {
        let engine_too = which.iter().any(|&w| self.hosts_engine(w));
        if let (true, Running::Hosted(e)) = (engine_too, &mut self.engine) {
            e.forget();
        }
        for &w in which {
            self.replicas[w].proc.kill9();
        }
        std::thread::sleep(down);
        for &w in which {
            match self.hosts_engine(w) {
                true => self.replicas[w].restart_hosting_after_kill9(),
                false => self.replicas[w].restart_after_kill9(),
            }
        }
        if engine_too {
            self.restart_engine();
        }
        engine_too
    }

    /// kill -9 of the engine (of its daemon, when hosted); a new one.
    fn kill_engine(&mut self) {
        match &mut self.engine {
            Running::Process(e) => {
                e.proc.kill9();
                self.restart_engine();
            }
            Running::Hosted(_) => {
                self.kill_replicas(&[0], Duration::ZERO);
            }
        }
    }

    /// A clean stop of the engine.
    fn stop_engine(&mut self) {
        match &mut self.engine {
            Running::Process(e) => {
                sigterm_and_wait(&mut e.proc, STEP);
            }
            Running::Hosted(e) => e.stop_ok(),
        }
    }
}

#[test]
#[ignore = "a long soak: run with --ignored (SHORTHORN_SOAK_SECS, SHORTHORN_SOAK_SEED)"]
fn two_replicas_survive_random_failures_under_verified_writes() {
    soak(Placement::Process);
}

#[test]
#[ignore = "a long soak: run with --ignored (SHORTHORN_SOAK_SECS, SHORTHORN_SOAK_SEED)"]
fn a_hosted_engine_and_its_replicas_survive_random_failures_under_verified_writes() {
    soak(Placement::Hosted);
}

fn soak(placement: Placement) {
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
    let mut cluster = Cluster::start(dir, placement);

    // Per stripe, the seed of the last round that wrote it cleanly; None
    // where a round was cut short (its data is a mix of two rounds).
    let mut written: Vec<Option<u64>> = vec![None; STRIPES as usize];
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut round = 0;
    let mut under_io_count = 0;
    // How long fio ran (its job's runtime) in the last round no fault cut
    // short. Faults land at a random moment within it, so that most hit
    // while fio writes however fast this machine's disk and engine are.
    let mut fio_ran = Duration::from_millis(900);
    while Instant::now() < deadline {
        let stripe = round % STRIPES;
        // fio takes a seed below 2^63.
        let job_seed = seed.wrapping_add(round) >> 1;
        let fault = Fault::pick(&mut rng);
        let mut fio = Fio::start(
            dir,
            &format!("round{round}"),
            &cluster.uri(),
            &as_args(&job(stripe, job_seed)),
        );
        let latest = 100 + (fio_ran.as_millis() as u64).max(100);
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..latest)));
        let under_io = fio.proc.is_running();
        under_io_count += u64::from(under_io);
        eprintln!("round {round}: stripe {stripe}, {fault:?}, under IO: {under_io}");
        let engine_went = match fault {
            Fault::KillReplica { which, down } => cluster.kill_replicas(&[which], down),
            Fault::FreezeReplica { which, frozen } => {
                cluster.replicas[which].proc.signal(Signal::SIGSTOP);
                std::thread::sleep(frozen);
                cluster.replicas[which].proc.signal(Signal::SIGCONT);
                false
            }
            Fault::KillBothReplicas { down } => cluster.kill_replicas(&[0, 1], down),
            Fault::KillEngine => {
                cluster.kill_engine();
                true
            }
            Fault::StopEngine => {
                cluster.stop_engine();
                cluster.restart_engine();
                true
            }
        };
        // fio never hangs: with a replica gone it goes on, with the engine
        // gone it fails at once.
        let report = fio.wait(STEP);
        if (engine_went || fault.fails_io()) && under_io {
            written[stripe as usize] = None;
        } else {
            report.assert_clean();
            assert_eq!(report.io_bytes("write"), STRIPE, "round {round}");
            written[stripe as usize] = Some(job_seed);
            if let Some(ms) = report.jobs()[0]["job_runtime"].as_u64() {
                fio_ran = Duration::from_millis(ms);
            }
        }
        wait_healthy_within(dir, VOLUME, 2, STEP);
        round += 1;
        if round % CHECK_EVERY == 0 {
            check_all(dir, &cluster.uri(), &written, round);
        }
    }

    check_all(dir, &cluster.uri(), &written, round);
    cluster.stop_engine();
    assert_identical(VOLUME, &[&cluster.replicas[0], &cluster.replicas[1]]);
    eprintln!(
        "soak: {round} rounds in {secs} s ({under_io_count} faults while fio wrote), no data \
         lost, replicas identical (SHORTHORN_SOAK_SEED={seed})"
    );
    assert!(
        under_io_count * 2 >= round,
        "only {under_io_count} of {round} faults landed while fio wrote"
    );
}
