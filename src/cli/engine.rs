//! `shorthorn engine ...`: one volume's engine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use shorthorn_engine::control::ControlSocket;
use shorthorn_engine::nbd::{NbdListen, NbdServer, NbdServerConfig};
use shorthorn_engine::{Volume, VolumeBackend, VolumeOptions};
use shorthorn_proto::VolumeName;
use tracing::{error, info, warn};

use super::{duration, host};

#[derive(Subcommand)]
pub enum EngineCommand {
    /// Serve a volume over NBD, mirroring every write to its replicas.
    Serve(ServeArgs),
    /// Start a volume's engine inside a replica daemon (one run with
    /// `--engine-control`), usually the one on the node using the volume:
    /// it then reaches that daemon's replica in memory, not over TCP.
    /// Returns once the volume is served; prints its NBD URI.
    Start(StartArgs),
    /// Stop an engine a replica daemon hosts: its clients are answered and
    /// disconnected, the volume flushed.
    Stop(StopArgs),
}

#[derive(Args)]
pub struct StartArgs {
    /// The daemon's engine-control socket (its `--engine-control`).
    #[arg(long, value_name = "PATH")]
    pub daemon: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Args)]
pub struct StopArgs {
    /// The daemon's engine-control socket (its `--engine-control`).
    #[arg(long, value_name = "PATH")]
    pub daemon: PathBuf,
    /// The volume whose engine to stop.
    pub name: VolumeName,
}

#[derive(Args)]
pub struct ServeArgs {
    /// The volume to serve (created beforehand with `shorthorn volume create`).
    pub name: VolumeName,
    /// Replica daemon (HOST:PORT) holding a replica of the volume; give it
    /// once or twice. Reads prefer the first.
    #[arg(long = "replica", value_name = "HOST:PORT", required = true)]
    pub replicas: Vec<String>,
    /// Where to serve NBD: `unix:/path/to.sock` or `HOST:PORT`.
    #[arg(long, value_name = "unix:PATH|HOST:PORT")]
    pub nbd: NbdListen,
    /// A replica that answers nothing for this long while a request waits
    /// on it is dropped from the volume's healthy set, and IO goes on with
    /// the others; one that keeps answering, late (a slow link), is given
    /// up to three times this per request: `5s`, `1500ms`, `1m`; a bare
    /// number is seconds.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration::parse_duration)]
    pub io_timeout: Duration,
    /// `--io-timeout` in milliseconds, as earlier releases spelt it.
    #[arg(long, value_name = "MS", conflicts_with = "io_timeout", value_parser = clap::value_parser!(u64).range(1..))]
    pub io_timeout_ms: Option<u64>,
    /// How long a region must go unwritten before the replicas are told it
    /// is clean. A writer that comes back to a region within this time (a
    /// database committing every few seconds) pays no dirty-map sync (a
    /// disk cache flush on each replica) on its next write; a shorter time
    /// leaves less to compare after an engine crash.
    #[arg(long, value_name = "DURATION", default_value = "10s", env = "SHORTHORN_CLEAN_AFTER", value_parser = duration::parse_duration)]
    pub clean_after: Duration,
    /// Most NBD client connections at once.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
    /// Directory for the engine's control socket (NAME.ctl), which
    /// `shorthorn volume status|add-replica|remove-replica` talk to.
    #[arg(long, default_value = super::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Start even though replicas cannot be reached that the volume lists
    /// as up to date, or, at its first start, any replica named. Only when
    /// they are gone for good: writes only they hold would be lost. (At a
    /// first start there are none yet; they are rebuilt when they answer.)
    #[arg(long)]
    pub allow_missing_replicas: bool,
}

pub async fn run(command: EngineCommand) -> anyhow::Result<()> {
    match command {
        EngineCommand::Serve(args) => serve(args).await,
        EngineCommand::Start(args) => {
            let argv = args.serve.to_argv();
            let answer = host::request(&args.daemon, &json!({"op": "start", "argv": argv}))
                .await
                .with_context(|| format!("starting the engine of {}", args.serve.name))?;
            println!("{}", answer["uri"].as_str().unwrap_or_default());
            Ok(())
        }
        EngineCommand::Stop(args) => {
            host::request(
                &args.daemon,
                &json!({"op": "stop", "name": args.name.as_str()}),
            )
            .await
            .with_context(|| format!("stopping the engine of {}", args.name))?;
            println!("stopped the engine of {}; the volume is flushed", args.name);
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    run_engine(args, |_| {}, super::shutdown_signal()).await
}

impl ServeArgs {
    /// The replica IO timeout, from whichever spelling was given.
    pub fn io_timeout(&self) -> Duration {
        self.io_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(self.io_timeout)
    }

    /// The command line that gives back these arguments: how `engine start`
    /// hands them to a replica daemon, which parses them as `engine serve`
    /// would.
    pub fn to_argv(&self) -> Vec<String> {
        // Paths made absolute: the daemon does not share our directory.
        let absolute = |p: &std::path::Path| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        let nbd = match &self.nbd {
            NbdListen::Unix(path) => format!("unix:{}", absolute(path)),
            tcp => tcp.to_arg(),
        };
        let mut argv = vec![self.name.to_string()];
        for r in &self.replicas {
            argv.extend(["--replica".to_string(), r.clone()]);
        }
        argv.extend([
            "--nbd".to_string(),
            nbd,
            "--io-timeout".to_string(),
            duration::to_arg(self.io_timeout()),
            "--clean-after".to_string(),
            duration::to_arg(self.clean_after),
            "--max-connections".to_string(),
            self.max_connections.to_string(),
            "--run-dir".to_string(),
            absolute(&self.run_dir),
        ]);
        if self.allow_missing_replicas {
            argv.push("--allow-missing-replicas".to_string());
        }
        argv
    }
}

/// Longest path a unix socket can be bound at: `sun_path` holds 108 bytes,
/// the last one a NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Refuses a socket path that could never be bound: too long, below
/// something that is not a directory, or naming a file that is not a
/// socket (which binding would have to delete).
fn check_socket_path(path: &std::path::Path, what: &str) -> anyhow::Result<()> {
    let len = path.as_os_str().len();
    anyhow::ensure!(
        len <= MAX_SOCKET_PATH,
        "{what} would be {} ({len} bytes); a unix socket path can be at most \
         {MAX_SOCKET_PATH} bytes long",
        path.display()
    );
    if let Some(dir) = path.parent().filter(|d| d.exists()) {
        anyhow::ensure!(
            dir.is_dir(),
            "{what} would be {}, but {} is not a directory",
            path.display(),
            dir.display()
        );
    }
    shorthorn_engine::nbd::socket_file_at(path)
        .with_context(|| format!("{what} would be {}; it is left alone", path.display()))?;
    Ok(())
}

/// Runs one volume's engine until `stop` resolves: attaches the volume,
/// serves it over NBD and on its control socket, then flushes it. `ready`
/// gets the NBD URI once clients can connect. The same code runs an engine
/// in its own process (`engine serve`) and inside a replica daemon.
pub async fn run_engine(
    args: ServeArgs,
    ready: impl FnOnce(String),
    stop: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=2).contains(&args.replicas.len()),
        "a volume has 1 or 2 replicas; {} given",
        args.replicas.len()
    );
    super::distinct_replicas(&args.replicas).await?;
    // Found out before the replicas are touched: attaching fences the
    // volume's previous engine, so this one must not fail after it for a
    // socket it could never have made.
    let control_path = args.run_dir.join(format!("{}.ctl", args.name));
    check_socket_path(&control_path, "the control socket (--run-dir)")?;
    if let NbdListen::Unix(path) = &args.nbd {
        check_socket_path(path, "the NBD socket (--nbd)")?;
    }
    std::fs::create_dir_all(&args.run_dir).with_context(|| {
        format!(
            "creating --run-dir {} for the engine's control socket",
            args.run_dir.display()
        )
    })?;
    let options = VolumeOptions {
        io_timeout: args.io_timeout(),
        clean_after: args.clean_after,
        client_id: VolumeOptions::unique_client_id(args.name.as_str()),
        allow_missing_replicas: args.allow_missing_replicas,
    };
    let starting = Volume::claim(args.name.clone(), &args.replicas, &options)
        .await
        .with_context(|| format!("attaching volume {}", args.name))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Bound before the start compares the replicas, which after a crash
    // can take a while: `volume status` says how far it is.
    let control = ControlSocket::bind(&control_path).with_context(|| {
        format!(
            "creating the engine's control socket {} (choose another place with --run-dir)",
            control_path.display()
        )
    })?;
    let control = tokio::spawn(control.serve(starting.volume().clone(), stopped(stop_rx.clone())));
    info!(volume = %args.name, control = %control_path.display(), "control socket ready");
    tokio::pin!(stop);
    let finished = tokio::select! {
        r = starting.finish() => Some(r),
        _ = &mut stop => None,
    };
    let volume = match finished {
        Some(Ok(volume)) => volume,
        Some(Err(e)) => {
            stop_control(&stop_tx, control).await;
            return Err(e).with_context(|| format!("attaching volume {}", args.name));
        }
        None => {
            // Nothing was served; the regions not compared yet stay marked
            // on the replicas, so the next start compares them.
            info!(volume = %args.name, "stopped while starting; the next start compares the replicas again");
            stop_control(&stop_tx, control).await;
            return Ok(());
        }
    };
    let server = match NbdServer::bind(args.nbd.clone()).await {
        Ok(server) => server,
        Err(e) => {
            stop_control(&stop_tx, control).await;
            return Err(e).with_context(|| format!("listening for NBD on {}", args.nbd));
        }
    };
    let uri = server.uri(args.name.as_str());
    info!(
        volume = %args.name, uri = %uri, generation = %volume.generation(),
        "engine serving"
    );
    let config = NbdServerConfig {
        export_name: args.name.to_string(),
        multi_conn: volume.can_multi_conn(),
        max_connections: args.max_connections,
    };
    let backend = Arc::new(VolumeBackend::new(volume.clone()));
    ready(uri);
    let serving = server.run(config, backend, stopped(stop_rx));
    tokio::pin!(serving);
    let served = tokio::select! {
        r = &mut serving => r,
        _ = &mut stop => {
            let _ = stop_tx.send(true);
            serving.await
        }
    };
    stop_control(&stop_tx, control).await;
    served.context("serving NBD")?;
    info!(volume = %args.name, "stopping: flushing the volume");
    volume.stop_recovery();
    match volume.flush().await {
        Ok(()) => volume.clean_at_stop().await,
        Err(e) => error!(volume = %args.name, error = %e, "final flush failed"),
    }
    release(volume, &args.name).await;
    Ok(())
}

/// Tells the control socket to stop and waits until it has (its file is
/// gone then).
async fn stop_control(
    stop_tx: &tokio::sync::watch::Sender<bool>,
    control: tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let _ = stop_tx.send(true);
    match control.await {
        Ok(Err(e)) => error!(error = %e, "control socket failed"),
        Err(e) => error!(error = %e, "control socket task failed"),
        Ok(Ok(())) => {}
    }
}

/// Lets go of the volume and waits, for a while, until no task holds it
/// any more: its sessions with the replicas close with it, so once a
/// stop has returned, the replicas no longer count this engine as using
/// the volume (which `volume delete` checks). Work that is still busy
/// (a rebuild step) may hold it longer; the stop then says so and
/// returns anyway.
async fn release(volume: Arc<Volume>, name: &VolumeName) {
    let weak = Arc::downgrade(&volume);
    drop(volume);
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    while weak.strong_count() > 0 {
        if tokio::time::Instant::now() >= deadline {
            warn!(volume = %name, "the volume is still busy (a rebuild step?); it is let go when that ends");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long a stopping engine waits for its last tasks to let go.
const RELEASE_WAIT: Duration = Duration::from_secs(10);
