//! `shorthorn replica ...`: the replica daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use shorthorn_engine::replica_client::register_local_replica;
use shorthorn_replica::server::{Server, ServerConfig};
use shorthorn_replica::storage::io::fault::{FaultControl, FaultyIo};
use shorthorn_replica::storage::store::{DataDirLock, DEFAULT_OVER_PROVISIONING};
use shorthorn_replica::storage::{open_io, DiskIo, IoEngineChoice, Store};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::host::{self, EngineHost};

#[derive(Subcommand)]
pub enum ReplicaCommand {
    /// Serve every replica kept in a data directory (one daemon per node).
    Serve(ServeArgs),
    /// Compare a volume's replicas byte for byte, read-only (exit 0 when
    /// identical, 1 when they differ, 2 when they cannot be compared).
    /// Stop the volume's engine first: while it writes, a write in flight
    /// has reached one replica a moment before the other.
    Verify(super::verify::VerifyArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Directory holding this node's replicas (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address to listen on for engines and management calls.
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:7700")]
    pub listen: String,
    /// Disk IO engine: `uring` (io_uring), `sync` (pread/pwrite on a thread
    /// pool), or `auto` (io_uring when the kernel allows it).
    #[arg(long, value_name = "auto|uring|sync", default_value = "auto")]
    pub io_engine: IoEngineChoice,
    /// Most connections served at once; more are closed at once.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Also host volume engines, started and stopped through a control
    /// socket at this path (`shorthorn engine start --daemon PATH ...`).
    /// A hosted engine reaches this daemon's replicas in memory instead of
    /// over TCP: the fastest place for the engine of a volume used on this
    /// node.
    #[arg(long, value_name = "PATH")]
    pub engine_control: Option<PathBuf>,
    /// Another address engines use for this daemon (the node's IP and port,
    /// a DNS name), so engines hosted here know it is their own daemon and
    /// reach it in memory; repeatable. `--listen` and its loopback forms
    /// are known already.
    #[arg(long = "advertise", value_name = "HOST:PORT")]
    pub advertise: Vec<String>,
    /// How much the volumes here may claim together, in percent of the
    /// filesystem under the data directory. Volumes are thin (sparse
    /// files), so more than 100 promises space the disk may not have:
    /// writes then fail once it is really full. 0: no limit.
    #[arg(long, value_name = "PERCENT", default_value_t = DEFAULT_OVER_PROVISIONING)]
    pub over_provisioning: u32,
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
    // Held until the daemon exits: no second daemon serves this directory.
    let _claimed = DataDirLock::claim(&args.data_dir)?;
    let io = open_io(args.io_engine).with_context(|| match args.io_engine {
        IoEngineChoice::Uring => "starting the uring IO engine: this kernel (or a seccomp \
                 profile around this process) refuses io_uring; use --io-engine auto or sync"
            .to_string(),
        other => format!("starting the {other} IO engine"),
    })?;
    let io_name = io.name();
    let faults = args
        .fault_control_file
        .as_ref()
        .map(|_| FaultControl::new());
    let io: Arc<dyn DiskIo> = match &faults {
        Some(control) => {
            shorthorn_replica::storage::io::fault::install_membership_faults(control.clone());
            Arc::new(FaultyIo::new(io, control.clone()))
        }
        None => io,
    };
    let mut store = Store::open(&args.data_dir, io)
        .with_context(|| format!("opening data directory {}", args.data_dir.display()))?;
    store.set_over_provisioning(args.over_provisioning);
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
    let config = ServerConfig {
        server_id: format!("replica {addr} pid {}", std::process::id()),
        max_connections: args.max_connections,
        ..ServerConfig::default()
    };
    let store = Arc::new(store);
    let server = Server::new(store.clone(), config);
    let host = Arc::new(EngineHost::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let control = match &args.engine_control {
        Some(path) => {
            register_local_replica(
                &own_addresses(&args.listen, addr, &args.advertise),
                server.local_service(),
            );
            // Bound before anyone is told the daemon is up.
            let socket = host::bind_control(path)
                .with_context(|| format!("engine-control socket {}", path.display()))?;
            let serving = tokio::spawn(host::serve_control(
                socket,
                host.clone(),
                stopped(stop_rx.clone()),
            ));
            info!(control = %path.display(), "hosting engines");
            Some(serving)
        }
        None => None,
    };
    info!(
        %addr, data_dir = %args.data_dir.display(), io_engine = io_name,
        volumes = store.list().len(),
        "replica daemon serving"
    );
    let shutdown = {
        let host = host.clone();
        async move {
            super::shutdown_signal().await;
            // Engines first: their last flush goes to these replicas.
            host.stop_all().await;
            let _ = stop_tx.send(true);
        }
    };
    server.serve(listener, shutdown).await?;
    if let Some(control) = control {
        match control.await {
            Ok(Err(e)) => tracing::error!(error = %e, "engine-control socket failed"),
            Err(e) => tracing::error!(error = %e, "engine-control task failed"),
            Ok(Ok(())) => {}
        }
    }
    info!("stopping: flushing every volume");
    for replica in store.list() {
        if let Err(e) = replica.flush().await {
            tracing::error!(volume = %replica.name(), error = %e, "flush at shutdown failed");
        }
    }
    Ok(())
}

/// The addresses engines may use for this daemon: as given to `--listen`,
/// as bound, the loopback forms of a loopback or wildcard listen, and those
/// given to `--advertise`.
fn own_addresses(listen: &str, bound: std::net::SocketAddr, advertise: &[String]) -> Vec<String> {
    let port = bound.port();
    let mut addrs = vec![listen.to_string(), bound.to_string()];
    if bound.ip().is_unspecified() || bound.ip().is_loopback() {
        addrs.push(format!("localhost:{port}"));
    }
    if bound.ip().is_unspecified() {
        addrs.extend([format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
    }
    addrs.extend(advertise.iter().cloned());
    addrs.sort();
    addrs.dedup();
    addrs
}

#[cfg(test)]
mod tests {
    use super::own_addresses;

    #[test]
    fn a_daemon_knows_its_own_addresses() {
        let wildcard = own_addresses("0.0.0.0:7700", "0.0.0.0:7700".parse().unwrap(), &[]);
        for a in [
            "0.0.0.0:7700",
            "127.0.0.1:7700",
            "localhost:7700",
            "[::1]:7700",
        ] {
            assert!(wildcard.contains(&a.to_string()), "{a} in {wildcard:?}");
        }
        let loopback = own_addresses("127.0.0.1:0", "127.0.0.1:41234".parse().unwrap(), &[]);
        assert!(loopback.contains(&"127.0.0.1:41234".to_string()));
        assert!(loopback.contains(&"localhost:41234".to_string()));
        let node = own_addresses(
            "10.0.0.5:7700",
            "10.0.0.5:7700".parse().unwrap(),
            &["pi-3.lan:7700".to_string()],
        );
        assert_eq!(node, ["10.0.0.5:7700", "pi-3.lan:7700"]);
    }
}
