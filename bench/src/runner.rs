//! One bench run from start to end: check the tools, set up the targets,
//! prefill them, run every (workload, target) fio job one at a time, read
//! the servers' peak RSS, stop everything, then print and record the tables.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cpu::CpuSnapshot;
use crate::fio::{self, Job, Timing};
use crate::hops::RoundTrips;
use crate::machine::{self, Machine};
use crate::procs::{run_to_end, StopFlag};
use crate::report::{self, Table};
use crate::targets::{remove_leftovers, Lab, LabConfig, TargetKind};
use crate::{source_dir, BenchArgs, Plan};

/// What the measuring part of a run produces.
struct Outcome {
    table: Table,
    /// CPU µs per IO of the servers and of fio, per cell.
    cpu_servers: Table,
    cpu_fio: Table,
    /// The share of all cores busy during each job, whoever used them.
    cpu_busy: Table,
    rss: Vec<(String, Option<u64>)>,
    warnings: Vec<String>,
    /// Per measured job, `target workload` and the share of the machine's
    /// CPU that other processes took while it ran.
    others_cpu: Vec<(String, f64)>,
    /// Each round's socket round trips.
    trips: Vec<RoundTrips>,
}

pub fn run_blocking(args: &BenchArgs, shorthorn_exe: &Path, stop: &StopFlag) -> anyhow::Result<()> {
    let mut plan = Plan::new(args)?;
    let versions = check_tools(&plan, shorthorn_exe)?;
    anyhow::ensure!(
        !plan.dir.exists() || plan.dir.is_dir(),
        "--dir {} is not a directory",
        plan.dir.display()
    );
    std::fs::create_dir_all(&plan.dir)
        .with_context(|| format!("creating {}", plan.dir.display()))?;
    plan.dir = plan.dir.canonicalize()?;
    remove_leftovers(&plan.dir)?;

    let machine = Machine::probe(&plan.dir);
    let revision = machine::git_revision(source_dir());
    let started = machine::utc_now();
    eprintln!(
        "shorthorn bench: {} round(s) of {} workloads × {} targets of {} MiB in {}, ramp {:.1} s + runtime {:.1} s per job",
        plan.rounds,
        plan.workloads.len(),
        plan.targets.len(),
        plan.size_bytes >> 20,
        plan.dir.display(),
        plan.ramp.as_secs_f64(),
        plan.runtime.as_secs_f64(),
    );

    let outcome = measure(&plan, args, shorthorn_exe, stop);
    if args.keep {
        eprintln!("keeping the targets in {} (--keep)", plan.dir.display());
    } else if let Err(e) = remove_leftovers(&plan.dir) {
        eprintln!("could not remove every target file: {e:#}");
    }
    let outcome = outcome?;

    let table = outcome.table.render();
    let goals = report::render_goals(&outcome.table, &outcome.trips, args.engines)
        .map(|g| {
            format!(
                "\n\nshorthorn-2r against its goals (ratios to the raw disk):\n\n{g}\n{}",
                report::GOALS_LEGEND
            )
        })
        .unwrap_or_default();
    let trips = report::describe_trips(&outcome.trips);
    let cpu = report::render_cpu(&outcome.cpu_servers, &outcome.cpu_fio, &outcome.cpu_busy);
    let rss = report::render_rss(&outcome.rss);
    println!(
        "\n{table}\n{}{goals}\n\nCPU time per IO:\n\n{cpu}\n{}\n\nPeak RSS of each server process:\n\n{rss}",
        report::LEGEND,
        report::CPU_LEGEND
    );
    let sharing = others_cpu_summary(&outcome.others_cpu);
    println!("\n{sharing}");
    if let Some(trips) = &trips {
        println!("{trips}");
    }
    for w in &outcome.warnings {
        println!("WARNING: {w}");
    }

    if let Some(path) = &plan.results {
        let mut section = String::new();
        let _ = writeln!(section, "## {started} · shorthorn {revision}\n");
        let _ = writeln!(section, "- command: `{}`", command_line());
        let _ = writeln!(
            section,
            "- machine: {} cores, {} memory, kernel {}; work dir on {}",
            machine.cores, machine.memory, machine.kernel, machine.disk
        );
        let _ = writeln!(
            section,
            "- each target {} MiB, prefilled; per job {:.1} s ramp + {:.1} s measured, one job at a time, \
             {}; {}; replica daemons' IO engine `{}`; engines {}",
            plan.size_bytes >> 20,
            plan.ramp.as_secs_f64(),
            plan.runtime.as_secs_f64(),
            match plan.rounds {
                1 => "one round".to_string(),
                n => format!("{n} rounds (each cell the median)"),
            },
            versions,
            args.io_engine,
            match args.engines {
                crate::EngineMode::Hosted => "hosted in replica daemon 1",
                crate::EngineMode::Process => "in their own processes",
            },
        );
        let _ = writeln!(section, "- {sharing}");
        if let Some(trips) = &trips {
            let _ = writeln!(section, "- {trips}");
        }
        if let Some(note) = &args.note {
            let _ = writeln!(section, "- note: {note}");
        }
        let _ = writeln!(
            section,
            "\n{table}\n{}{goals}\n\nCPU time per IO:\n\n{cpu}\n{}\n\nPeak RSS:\n\n{rss}",
            report::LEGEND,
            report::CPU_LEGEND
        );
        for w in &outcome.warnings {
            let _ = writeln!(section, "**Warning:** {w}\n");
        }
        crate::results_file::add_run(path, &section)?;
        eprintln!("added this run to {}", path.display());
    }
    Ok(())
}

/// Sets up the targets, runs every job, and stops the servers again
/// (whether or not the jobs succeeded) before returning.
fn measure(
    plan: &Plan,
    args: &BenchArgs,
    shorthorn_exe: &Path,
    stop: &StopFlag,
) -> anyhow::Result<Outcome> {
    eprintln!("starting the targets' servers...");
    let mut lab = Lab::start(
        &LabConfig {
            dir: &plan.dir,
            kinds: &plan.targets,
            size_bytes: plan.size_bytes,
            shorthorn_exe,
            io_engine: &args.io_engine,
            engines: args.engines,
        },
        stop,
    )?;

    for (i, (kind, target)) in lab.targets.iter().enumerate() {
        eprint!(
            "[prefill {}/{}] {}: writing {} MiB ... ",
            i + 1,
            lab.targets.len(),
            kind.name(),
            plan.size_bytes >> 20
        );
        let job = Job {
            name: "prefill",
            target,
            size_bytes: plan.size_bytes,
            shape: fio::PREFILL,
            timing: None,
        };
        let r = run_fio(&lab, &job, *kind, Duration::from_secs(3600), stop)?;
        eprintln!("{:.0} MiB/s", r.write.bw_bytes as f64 / (1 << 20) as f64);
    }

    let mut table = Table::new(&plan.workloads, &plan.targets);
    let mut cpu_servers = Table::new(&plan.workloads, &plan.targets);
    let mut cpu_fio = Table::new(&plan.workloads, &plan.targets);
    let mut cpu_busy = Table::new(&plan.workloads, &plan.targets);
    let per_round = plan
        .workloads
        .iter()
        .map(|&w| lab.targets.iter().filter(|(k, _)| k.runs(w)).count())
        .sum::<usize>();
    let total = per_round * plan.rounds as usize;
    let timing = Timing {
        ramp: plan.ramp,
        runtime: plan.runtime,
    };
    let timeout = plan.ramp + plan.runtime + Duration::from_secs(60);
    let mut n = 0;
    let mut others_cpu = Vec::new();
    let mut trips = Vec::new();
    for round in 0..plan.rounds as usize {
        let round_name = if plan.rounds > 1 {
            format!("round {}/{}: ", round + 1, plan.rounds)
        } else {
            String::new()
        };
        stop.check()?;
        let t = RoundTrips::measure(TRIPS_TIME).context("timing socket round trips")?;
        eprintln!(
            "{round_name}socket round trips: unix {:.1} µs, TCP {:.1} µs",
            t.unix_us, t.tcp_us
        );
        trips.push(t);
        // Each round starts with a different target, so none is always the
        // first job after a change of workload.
        let mut order: Vec<_> = lab.targets.iter().collect();
        let first = round % order.len().max(1);
        order.rotate_left(first);
        for &workload in &plan.workloads {
            for (kind, target) in order.iter().copied().filter(|(k, _)| k.runs(workload)) {
                n += 1;
                eprint!(
                    "[{n}/{total}] {round_name}{} {} ... ",
                    kind.name(),
                    workload.name()
                );
                let job = Job {
                    name: workload.name(),
                    target,
                    size_bytes: plan.size_bytes,
                    shape: workload.shape(),
                    timing: Some(timing),
                };
                let before = CpuSnapshot::take(&lab.server_pids());
                let r = run_fio(&lab, &job, *kind, timeout, stop)?;
                let after = CpuSnapshot::take(&lab.server_pids());
                let span = before.zip(after);
                let others = span.map(|(b, a)| b.others_share_since(&a));
                if let Some((b, a)) = span {
                    cpu_busy.add(workload, *kind, b.busy_share_since(&a));
                    if let Some(cpu) = b.per_io_since(&a, r.read.iops + r.write.iops) {
                        cpu_servers.add(workload, *kind, cpu.servers_us);
                        cpu_fio.add(workload, *kind, cpu.fio_us);
                    }
                }
                if let Some(share) = others {
                    others_cpu.push((format!("{} {}", kind.name(), workload.name()), share));
                }
                let Some(figure) = workload
                    .figure(&r)
                    .map(|f| workload.per_copy(f, target.copies()))
                else {
                    bail!(
                        "fio did no {} IO on {}; see its report in {}",
                        workload.name(),
                        kind.name(),
                        lab.logs.display()
                    );
                };
                table.add(workload, *kind, figure);
                let ratio = (*kind != TargetKind::Raw)
                    .then(|| table.round_ratio(workload, *kind, round))
                    .flatten()
                    .map(|r| format!(" ({} of raw)", report::format_ratio(r)))
                    .unwrap_or_default();
                let others = others
                    .map(|s| format!("; others took {:.0}% of the CPU", s * 100.0))
                    .unwrap_or_default();
                eprintln!(
                    "{}{ratio}{others}",
                    report::format_figure(workload.metric(), figure)
                );
            }
        }
    }

    // Read before stopping: VmHWM is gone with the process.
    lab.check_running()?;
    let rss = lab.peak_rss();
    let warnings = lab.warnings();
    eprintln!("stopping the servers...");
    lab.stop();
    Ok(Outcome {
        table,
        cpu_servers,
        cpu_fio,
        cpu_busy,
        rss,
        warnings,
        others_cpu,
        trips,
    })
}

/// How long each kind of socket round trip is timed, once per round.
const TRIPS_TIME: Duration = Duration::from_millis(500);

/// Runs one fio job alone and parses its JSON report.
fn run_fio(
    lab: &Lab,
    job: &Job,
    kind: TargetKind,
    timeout: Duration,
    stop: &StopFlag,
) -> anyhow::Result<fio::FioResult> {
    // Write back what earlier jobs left dirty in the page cache, so that
    // writeback does not land in this job's measurement.
    nix::unistd::sync();
    let stem = format!("fio-{}-{}", kind.name(), job.name);
    let output = lab.logs.join(format!("{stem}.json"));
    let _ = std::fs::remove_file(&output);
    run_to_end(
        &format!("fio {} on {}", job.name, kind.name()),
        &mut job.command(&output),
        lab.logs.join(format!("{stem}.log")),
        timeout,
        stop,
    )?;
    stop.check()?;
    let text = std::fs::read_to_string(&output)
        .with_context(|| format!("reading fio's report {}", output.display()))?;
    fio::parse(&text).with_context(|| format!("fio's report {}", output.display()))
}

/// Checks that the programs the run needs are there; returns their
/// versions for the record.
fn check_tools(plan: &Plan, shorthorn_exe: &Path) -> anyhow::Result<String> {
    const HINT: &str = "install the test tools with .ci/install-deps";
    let fio = machine::tool_version("fio").with_context(|| format!("fio not found; {HINT}"))?;
    let mut versions = vec![fio];
    let nbd = plan.targets.iter().any(|t| *t != TargetKind::Raw);
    if nbd {
        let ok = std::process::Command::new("fio")
            .arg("--enghelp=nbd")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            bail!("this fio has no nbd engine (it needs fio built with libnbd); {HINT}");
        }
    }
    if plan.targets.contains(&TargetKind::NbdkitFile) {
        let v =
            machine::tool_version("nbdkit").with_context(|| format!("nbdkit not found; {HINT}"))?;
        versions.push(v);
    }
    let shorthorn = plan
        .targets
        .iter()
        .any(|t| matches!(t, TargetKind::Shorthorn1r | TargetKind::Shorthorn2r));
    if shorthorn && !shorthorn_exe.is_file() {
        bail!("no shorthorn program at {}", shorthorn_exe.display());
    }
    Ok(versions.join(", "))
}

/// This process's command line, with the program's directory left out
/// (`shorthorn bench ...`).
fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        if let Some(name) = Path::new(first.as_str()).file_name() {
            *first = name.to_string_lossy().into_owned();
        }
    }
    machine::shell_line(&args)
}

/// One line on how much other processes disturbed the jobs.
fn others_cpu_summary(per_job: &[(String, f64)]) -> String {
    let Some((worst_job, worst)) = per_job.iter().max_by(|a, b| a.1.total_cmp(&b.1)) else {
        return "CPU taken by other processes during the jobs: not measured".into();
    };
    let mean = per_job.iter().map(|(_, s)| s).sum::<f64>() / per_job.len() as f64;
    let shared = per_job.iter().filter(|(_, s)| *s > SHARED).count();
    format!(
        "CPU taken by other processes during the fio jobs: {:.0}% on average, {:.0}% at worst \
         ({worst_job}); {shared} of {} jobs shared the machine (over {:.0}%)",
        mean * 100.0,
        worst * 100.0,
        per_job.len(),
        SHARED * 100.0
    )
}

/// Above this share of the CPU taken by others, a job did not have the
/// machine to itself.
const SHARED: f64 = 0.10;
