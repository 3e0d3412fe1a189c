//! `shorthorn engine ...`: one volume's engine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use shorthorn_engine::nbd::{NbdListen, NbdServer, NbdServerConfig};
use shorthorn_engine::{Volume, VolumeBackend, VolumeOptions};
use shorthorn_proto::VolumeName;
use tracing::{error, info};

#[derive(Subcommand)]
pub enum EngineCommand {
    /// Serve a volume over NBD, mirroring every write to its replicas.
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// The volume to serve (created beforehand with `shorthorn volume create`).
    pub name: VolumeName,
    /// Replica daemon (HOST:PORT) holding a replica of the volume; give it
    /// once or twice. Reads prefer the first.
    #[arg(long = "replica", required = true)]
    pub replicas: Vec<String>,
    /// Where to serve NBD: `unix:/path/to.sock` or `HOST:PORT`.
    #[arg(long)]
    pub nbd: NbdListen,
    /// A replica that does not answer within this is dropped from the
    /// volume's healthy set (IO goes on with the others).
    #[arg(long, default_value_t = 5_000)]
    pub io_timeout_ms: u64,
    /// Most NBD client connections at once.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
    /// Directory for the engine's control socket (NAME.ctl), which
    /// `shorthorn volume status|add-replica|remove-replica` talk to.
    #[arg(long, default_value = super::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Start even though replicas the volume lists as up to date cannot be
    /// reached. Only when they are gone for good: writes only they hold
    /// would be lost.
    #[arg(long)]
    pub allow_missing_replicas: bool,
}

pub async fn run(command: EngineCommand) -> anyhow::Result<()> {
    match command {
        EngineCommand::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=2).contains(&args.replicas.len()),
        "a volume has 1 or 2 replicas; {} given",
        args.replicas.len()
    );
    let options = VolumeOptions {
        io_timeout: Duration::from_millis(args.io_timeout_ms),
        client_id: VolumeOptions::unique_client_id(args.name.as_str()),
        allow_missing_replicas: args.allow_missing_replicas,
    };
    let volume = Volume::open(args.name.clone(), &args.replicas, &options)
        .await
        .with_context(|| format!("attaching volume {}", args.name))?;
    let server = NbdServer::bind(args.nbd.clone())
        .await
        .with_context(|| format!("listening for NBD on {}", args.nbd))?;
    info!(
        volume = %args.name, uri = %server.uri(args.name.as_str()), generation = %volume.generation(),
        "engine serving"
    );
    let config = NbdServerConfig {
        export_name: args.name.to_string(),
        multi_conn: volume.can_multi_conn(),
        max_connections: args.max_connections,
    };
    let backend = Arc::new(VolumeBackend::new(volume.clone()));
    let control_path = args.run_dir.join(format!("{}.ctl", args.name));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let control = tokio::spawn(shorthorn_engine::control::serve(
        control_path.clone(),
        volume.clone(),
        stopped(stop_rx.clone()),
    ));
    tokio::spawn(async move {
        super::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    info!(volume = %args.name, control = %control_path.display(), "control socket ready");
    server
        .run(config, backend, stopped(stop_rx))
        .await
        .context("serving NBD")?;
    match control.await {
        Ok(Err(e)) => error!(error = %e, "control socket failed"),
        Err(e) => error!(error = %e, "control socket task failed"),
        Ok(Ok(())) => {}
    }
    info!(volume = %args.name, "stopping: flushing the volume");
    if let Err(e) = volume.flush().await {
        error!(volume = %args.name, error = %e, "final flush failed");
    }
    Ok(())
}
