//! `shorthorn replica ...`: the replica daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use shorthorn_replica::server::{serve, ServerConfig};
use shorthorn_replica::storage::io::fault::{FaultControl, FaultyIo};
use shorthorn_replica::storage::{open_io, DiskIo, IoEngineChoice, Store};
use tokio::net::TcpListener;
use tracing::{info, warn};

#[derive(Subcommand)]
pub enum ReplicaCommand {
    /// Serve every replica kept in a data directory (one daemon per node).
    Serve(ServeArgs),
    /// Compare a volume's replicas byte for byte, read-only (exit 0 when
    /// identical, 1 when they differ, 2 when they cannot be compared).
    Verify(super::verify::VerifyArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Directory holding this node's replicas (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address to listen on for engines and management calls.
    #[arg(long, default_value = "0.0.0.0:7700")]
    pub listen: String,
    /// Disk IO engine: `uring` (io_uring), `sync` (pread/pwrite on a thread
    /// pool), or `auto` (io_uring when the kernel allows it).
    #[arg(long, default_value = "auto")]
    pub io_engine: IoEngineChoice,
    /// Most connections served at once; more are closed at once.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Testing only: inject disk faults as this file says, re-read every
    /// 50 ms (`write=eio`, `read=enospc volume=v1`, ...; empty: none).
    #[arg(long, hide = true)]
    pub fault_control_file: Option<PathBuf>,
}

/// How often a fault-control file is re-read.
const FAULT_POLL: Duration = Duration::from_millis(50);

pub async fn run(command: ReplicaCommand) -> anyhow::Result<()> {
    match command {
        ReplicaCommand::Serve(args) => serve_replicas(args).await,
        ReplicaCommand::Verify(args) => super::verify::run(args).await,
    }
}

async fn serve_replicas(args: ServeArgs) -> anyhow::Result<()> {
    let io = open_io(args.io_engine)
        .with_context(|| format!("starting the {} IO engine", args.io_engine))?;
    let io_name = io.name();
    let faults = args
        .fault_control_file
        .as_ref()
        .map(|_| FaultControl::new());
    let io: Arc<dyn DiskIo> = match &faults {
        Some(control) => Arc::new(FaultyIo::new(io, control.clone())),
        None => io,
    };
    let store = Store::open(&args.data_dir, io)
        .with_context(|| format!("opening data directory {}", args.data_dir.display()))?;
    // Watched only once the store exists, so `volume=` names resolve
    // against the real data directory.
    let _fault_watcher = match (&args.fault_control_file, faults) {
        (Some(path), Some(control)) => {
            warn!(file = %path.display(), "disk fault injection is enabled (testing only)");
            let watcher = control
                .watch_file(path.clone(), args.data_dir.clone(), FAULT_POLL)
                .context("starting the fault-control watcher")?;
            Some(watcher)
        }
        _ => None,
    };
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    info!(
        %addr, data_dir = %args.data_dir.display(), io_engine = io_name,
        volumes = store.list().len(),
        "replica daemon serving"
    );
    let config = ServerConfig {
        server_id: format!("replica {addr} pid {}", std::process::id()),
        max_connections: args.max_connections,
        ..ServerConfig::default()
    };
    let store = Arc::new(store);
    serve(listener, store.clone(), config, super::shutdown_signal()).await?;
    info!("stopping: flushing every volume");
    for replica in store.list() {
        if let Err(e) = replica.flush().await {
            tracing::error!(volume = %replica.name(), error = %e, "flush at shutdown failed");
        }
    }
    Ok(())
}
