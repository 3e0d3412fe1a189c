//! `shorthorn`: the one binary people run — replica daemons, volume engines,
//! volume management, and `dev`, which starts a whole local setup.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shorthorn",
    version,
    about = "Replicated block storage for small Kubernetes clusters",
    long_about = "Replicated block storage for small Kubernetes clusters.\n\n\
        Every volume is served by an engine (over NBD) that mirrors each write \
        synchronously to one or two replicas, each kept by a replica daemon on a node.\n\n\
        New here? `shorthorn dev` starts two replica daemons and an engine on this \
        machine and prints how to use the volume."
)]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `shorthorn_engine=debug`.
    #[arg(long, global = true, env = "SHORTHORN_LOG", default_value = "info")]
    log: String,

    /// Async worker threads. 1 (the default) runs everything on one
    /// thread, which costs the least CPU per IO on small machines; raise it
    /// for a daemon serving many busy volumes on a many-core node.
    #[arg(long, global = true, env = "SHORTHORN_THREADS", default_value_t = 1)]
    threads: usize,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run or inspect a replica daemon (one per node).
    #[command(subcommand)]
    Replica(cli::replica::ReplicaCommand),
    /// Create, list and delete volumes on replica daemons.
    #[command(subcommand)]
    Volume(cli::volume::VolumeCommand),
    /// Run a volume's engine: serve it over NBD, mirrored to its replicas.
    #[command(subcommand)]
    Engine(cli::engine::EngineCommand),
    /// Start a complete local setup (replica daemons + engine) for trying
    /// shorthorn out, and serve until Ctrl-C.
    Dev(cli::dev::DevArgs),
    /// Measure shorthorn against the raw disk and nbdkit with real fio, and
    /// record the ratios in bench/RESULTS.md.
    Bench(cli::bench::BenchArgs),
}

/// glibc's allocator, told to hand big buffers back. By default it raises
/// its mmap threshold to the largest block ever freed, so after the first
/// 1 MiB write every IO buffer comes from the heap, which then only grows:
/// a replica daemon hosting two engines peaked at ~90 MiB RSS under a
/// bench run. With a fixed 1 MiB threshold, a 1 MiB trim threshold and one
/// arena it peaked at ~35 MiB with the same throughput (bench/RESULTS.md);
/// a Raspberry Pi runs several daemons. The environment's MALLOC_* settings
/// still win, for anyone tuning by hand.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        const MIB: libc::c_int = 1 << 20;
        for (param, name, value) in [
            (libc::M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", MIB),
            (libc::M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", MIB),
            (libc::M_ARENA_MAX, "MALLOC_ARENA_MAX", 1),
        ] {
            if std::env::var_os(name).is_none() {
                // SAFETY: mallopt only sets allocator parameters; called
                // before any other thread exists.
                unsafe { libc::mallopt(param, value) };
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    cli::init_logging(&cli.log);
    let mut builder = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cli.threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shorthorn: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Replica(c) => cli::replica::run(c).await,
            Command::Volume(c) => cli::volume::run(c).await,
            Command::Engine(c) => cli::engine::run(c).await,
            Command::Dev(a) => cli::dev::run(a).await,
            Command::Bench(a) => cli::bench::run(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shorthorn: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
