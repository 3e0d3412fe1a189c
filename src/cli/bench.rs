//! `shorthorn bench`: the benchmark harness of the `bench/` crate, run with
//! this very program serving the replica daemons and engines it measures.

use anyhow::Context;

pub use shorthorn_bench::BenchArgs;

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    shorthorn_bench::run(args, exe).await
}
