//! `shorthorn-bench`: the bench harness as a program of its own, for when
//! the `shorthorn bench` subcommand is not at hand. It drives an already
//! built `shorthorn` binary (by default the one next to this program, as
//! `cargo build --release` leaves them).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use shorthorn_bench::BenchArgs;

#[derive(Parser)]
#[command(
    name = "shorthorn-bench",
    about = "Benchmark shorthorn volumes against the raw disk and nbdkit with real fio"
)]
struct Cli {
    /// The `shorthorn` program to run replica daemons and engines with
    /// [default: `shorthorn` next to this program].
    #[arg(long)]
    shorthorn: Option<PathBuf>,
    #[command(flatten)]
    bench: BenchArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|rt| {
            let exe = match cli.shorthorn {
                Some(p) => p,
                None => sibling_shorthorn()?,
            };
            rt.block_on(shorthorn_bench::run(cli.bench, exe))
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shorthorn-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn sibling_shorthorn() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding this program's path")?;
    let exe = me.with_file_name("shorthorn");
    anyhow::ensure!(
        exe.is_file(),
        "no shorthorn program at {}: build it (cargo build --release) or pass --shorthorn PATH",
        exe.display()
    );
    Ok(exe)
}
