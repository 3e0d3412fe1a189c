//! Command-line front ends. Each module turns one subcommand's typed
//! arguments into calls on the library crates; errors become exit messages
//! here and nowhere else.

pub mod bench;
pub mod dev;
pub mod duration;
pub mod engine;
pub mod engine_ctl;
pub mod host;
pub mod replica;
pub mod size;
pub mod verify;
pub mod volume;

use std::time::Duration;

use anyhow::{bail, Context};
use shorthorn_engine::{ClientError, ReplicaClient};
use shorthorn_proto::{Generation, Reply, Request};
use tracing_subscriber::EnvFilter;

/// Where engines put their control sockets unless told otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/shorthorn";

pub fn init_logging(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("shorthorn: bad --log filter {filter:?} ({e}); using info");
        EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Refuses a replica list that names one daemon twice, as written or once
/// resolved: a "2-replica" volume with both copies on one daemon is one
/// copy, and an engine holding two sessions to one replica fences itself.
pub async fn distinct_replicas(replicas: &[String]) -> anyhow::Result<()> {
    let mut seen: Vec<(&str, Vec<std::net::SocketAddr>)> = Vec::new();
    for addr in replicas {
        // An address that does not resolve fails later, when it is dialled,
        // with that error; here it can only match by its text.
        let resolved: Vec<_> = match tokio::net::lookup_host(addr.as_str()).await {
            Ok(found) => found.collect(),
            Err(_) => Vec::new(),
        };
        for (other, other_resolved) in &seen {
            if *other == addr || resolved.iter().any(|a| other_resolved.contains(a)) {
                bail!(
                    "--replica {addr} and --replica {other} are the same replica daemon; \
                     each replica of a volume must be on its own daemon (its own node)"
                );
            }
        }
        seen.push((addr, resolved));
    }
    Ok(())
}

/// One management call on a replica daemon, over a fresh admin session.
pub async fn admin_call(addr: &str, request: Request, timeout: Duration) -> anyhow::Result<Reply> {
    match admin_try(addr, request, timeout).await? {
        Ok(r) => Ok(r),
        Err(e) => bail!("{e}"),
    }
}

/// [`admin_call`], keeping the daemon's own error for callers that tell
/// its kinds apart; only failing to reach the daemon is an `Err`.
pub async fn admin_try(
    addr: &str,
    request: Request,
    timeout: Duration,
) -> anyhow::Result<Result<Reply, ClientError>> {
    let client = ReplicaClient::connect(addr, "shorthorn cli", "", Generation(0), timeout)
        .await
        .with_context(|| format!("replica daemon {addr}"))?;
    let reply = client.call(request).await;
    client.close("done");
    Ok(reply)
}
