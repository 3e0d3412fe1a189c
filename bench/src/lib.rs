//! `shorthorn bench`: measures shorthorn volumes with real fio against the
//! raw disk and nbdkit's file plugin, in one run on one machine, and reports
//! every figure as a ratio to the raw disk (issue 3; DESIGN.md "Measuring").
//!
//! The harness starts every server it measures as its own child process and
//! stops all of them on the way out, including on error and Ctrl-C. It never
//! runs two fio jobs at once, and never touches files in its work directory
//! other than the ones it creates.

mod cpu;
mod fio;
mod hops;
mod machine;
mod procs;
mod report;
mod results_file;
mod runner;
mod targets;
mod workload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

pub use targets::TargetKind;
pub use workload::Workload;

/// Options of `shorthorn bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Work directory for the targets, sockets and logs; the raw-disk file,
    /// nbdkit's file and the replica data all live here, on one filesystem.
    #[arg(long, default_value = "./shorthorn-data/bench")]
    pub dir: PathBuf,
    /// Size of each target, e.g. 1GiB: a whole number of MiB, at least 16
    /// MiB [default: 1GiB, 256MiB with --quick].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Seconds each fio job runs before it starts measuring [default: 5,
    /// 0.5 with --quick].
    #[arg(long)]
    pub ramp_time_s: Option<f64>,
    /// Seconds each fio job measures, at least 0.5 [default: 20, 2 with
    /// --quick].
    #[arg(long)]
    pub runtime_s: Option<f64>,
    /// A couple of seconds per job on small targets, to check the harness
    /// works (CI); prints the table without writing the results file.
    #[arg(long)]
    pub quick: bool,
    /// Times to run the whole set of jobs, 1 to 20. Every round runs each
    /// workload on every target (raw first in round 1, a different target
    /// first in each later round); each cell is then the median over the
    /// rounds and shows its lowest and highest per-round ratio. On a shared
    /// or virtual machine, where one job can be a third faster than the
    /// same job a minute later, 3 rounds give figures that hold.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Workloads to run, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workloads: Vec<Workload>,
    /// Targets to measure, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub targets: Vec<TargetKind>,
    /// Markdown file the run is added to, newest first [default:
    /// bench/RESULTS.md for a full run (every target and workload, no
    /// --quick); otherwise the table is only printed].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Only print the table, even for a full run.
    #[arg(long, conflicts_with = "results")]
    pub no_results: bool,
    /// A note kept with the run in the results file, e.g. what else was
    /// running on the machine.
    #[arg(long)]
    pub note: Option<String>,
    /// Keep the target files and replica data after the run (they are
    /// deleted otherwise; logs and fio reports are always kept).
    #[arg(long)]
    pub keep: bool,
    /// Disk IO engine of the replica daemons: auto, uring or sync.
    #[arg(long, default_value = "auto")]
    pub io_engine: String,
    /// Where the shorthorn volumes' engines run: `hosted` inside replica
    /// daemon 1 (`engine start --daemon`, how a node runs the engine of a
    /// volume it uses; the local replica is reached in memory) or
    /// `process`, each in its own `engine serve` process.
    #[arg(long, value_enum, default_value = "hosted")]
    pub engines: EngineMode,
}

/// Where the bench runs the shorthorn volumes' engines.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineMode {
    /// Inside replica daemon 1, which holds one replica of each volume.
    Hosted,
    /// Each in its own process.
    Process,
}

/// Runs the bench with `shorthorn_exe` as the program that serves replica
/// daemons and engines. Ctrl-C or SIGTERM stops it cleanly: every process it
/// started is stopped and its target files are removed before it returns.
pub async fn run(args: BenchArgs, shorthorn_exe: PathBuf) -> anyhow::Result<()> {
    let stop = procs::StopFlag::default();
    let flag = stop.clone();
    let mut work =
        tokio::task::spawn_blocking(move || runner::run_blocking(&args, &shorthorn_exe, &flag));
    tokio::select! {
        done = &mut work => return done?,
        _ = stop_signal() => {}
    }
    eprintln!("\ninterrupted: stopping every process the bench started...");
    stop.set();
    work.await?
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Everything a run will do, with the defaults filled in and checked.
#[derive(Clone, Debug)]
struct Plan {
    dir: PathBuf,
    size_bytes: u64,
    ramp: Duration,
    runtime: Duration,
    rounds: u32,
    workloads: Vec<Workload>,
    targets: Vec<TargetKind>,
    /// Where the run is recorded, if anywhere.
    results: Option<PathBuf>,
}

/// The source checkout this harness was built from (the results file and
/// the git revision are found there).
fn source_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl Plan {
    fn new(args: &BenchArgs) -> anyhow::Result<Plan> {
        let size_bytes = args
            .size
            .unwrap_or(if args.quick { 256 << 20 } else { 1 << 30 });
        if size_bytes < 16 << 20 || !size_bytes.is_multiple_of(1 << 20) {
            bail!("--size must be a whole number of MiB, at least 16 MiB");
        }
        let seconds = |v: Option<f64>, normal: f64, quick: f64, what: &str| {
            let s = v.unwrap_or(if args.quick { quick } else { normal });
            if !(0.0..=86_400.0).contains(&s) {
                bail!("{what} must be between 0 and 86400 seconds");
            }
            Ok(Duration::from_secs_f64(s))
        };
        let ramp = seconds(args.ramp_time_s, 5.0, 0.5, "--ramp-time-s")?;
        let runtime = seconds(args.runtime_s, 20.0, 2.0, "--runtime-s")?;
        if runtime < Duration::from_millis(500) {
            bail!("--runtime-s must be at least 0.5");
        }
        // Canonical order whatever the command line's order, without repeats.
        let chosen = |all: &[Workload], picked: &[Workload]| -> Vec<Workload> {
            all.iter()
                .copied()
                .filter(|w| picked.is_empty() || picked.contains(w))
                .collect()
        };
        let workloads = chosen(&Workload::ALL, &args.workloads);
        let targets: Vec<TargetKind> = TargetKind::ALL
            .into_iter()
            .filter(|t| args.targets.is_empty() || args.targets.contains(t))
            .collect();
        let full = !args.quick
            && workloads.len() == Workload::ALL.len()
            && targets.len() == TargetKind::ALL.len();
        let results = match (&args.results, args.no_results) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => None,
            (None, false) if full && source_dir().is_dir() => Some(source_dir().join("RESULTS.md")),
            (None, false) => None,
        };
        Ok(Plan {
            dir: args.dir.clone(),
            size_bytes,
            ramp,
            runtime,
            rounds: args.rounds,
            workloads,
            targets,
            results,
        })
    }
}

/// Parses a size: a number of bytes, or with a binary suffix (`K`/`KiB`,
/// `M`/`MiB`, `G`/`GiB`, `T`/`TiB`), e.g. `256MiB`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 256MiB or 1GiB)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "Ki" | "KiB" => 10,
        "M" | "Mi" | "MiB" => 20,
        "G" | "Gi" | "GiB" => 30,
        "T" | "Ti" | "TiB" => 40,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: size too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn plan(args: &[&str]) -> anyhow::Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))?;
        Plan::new(&cli.bench)
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("GiB").is_err());
    }

    #[test]
    fn a_full_run_measures_everything_and_is_recorded() {
        let p = plan(&[]).unwrap();
        assert_eq!(p.workloads, Workload::ALL);
        assert_eq!(p.targets, TargetKind::ALL);
        assert_eq!(p.size_bytes, 1 << 30);
        assert_eq!(
            (p.ramp, p.runtime),
            (Duration::from_secs(5), Duration::from_secs(20))
        );
        assert_eq!(p.rounds, 1);
        assert!(p.results.unwrap().ends_with("bench/RESULTS.md"));
        assert!(plan(&["--no-results"]).unwrap().results.is_none());
        // More rounds are still a full run, recorded like one.
        let p = plan(&["--rounds", "3"]).unwrap();
        assert_eq!(p.rounds, 3);
        assert!(p.results.is_some());
    }

    #[test]
    fn quick_and_partial_runs_only_print() {
        let p = plan(&["--quick"]).unwrap();
        assert_eq!(p.runtime, Duration::from_secs(2));
        assert_eq!(p.size_bytes, 256 << 20);
        assert!(p.results.is_none());
        let p = plan(&["--targets", "shorthorn-2r,raw", "--workloads=randwrite-lat"]).unwrap();
        // Column order is fixed, whatever the command line's order.
        assert_eq!(p.targets, [TargetKind::Raw, TargetKind::Shorthorn2r]);
        assert_eq!(p.workloads, [Workload::RandwriteLat]);
        assert!(p.results.is_none());
        let p = plan(&["--quick", "--results", "/tmp/quick.md"]).unwrap();
        assert_eq!(p.results.unwrap(), Path::new("/tmp/quick.md"));
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(plan(&["--size", "100KiB"]).is_err());
        assert!(plan(&["--runtime-s", "0"]).is_err());
        assert!(plan(&["--targets", "ceph"]).is_err());
        assert!(plan(&["--results", "x.md", "--no-results"]).is_err());
        assert!(plan(&["--rounds", "0"]).is_err());
        assert!(plan(&["--rounds", "21"]).is_err());
    }
}
