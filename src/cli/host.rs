//! Engines hosted inside a replica daemon.
//!
//! A volume's engine can run in its own process (`engine serve`) or inside
//! the replica daemon of the node that uses the volume (`engine start
//! --daemon`). Hosted, it reaches that daemon's replica in memory instead of
//! over loopback TCP: on small machines each process hop costs a wake-up
//! and several syscalls per IO, so this is the fast path. Its requests to
//! that replica are calls into the daemon's serving code, run in the
//! engine's own task; the handshake, fencing, dirty map and recovery are the
//! same code either way (checksums only guard bytes that cross a socket).
//!
//! The daemon takes requests on a unix socket, one JSON line each:
//! `{"op":"start","argv":[...]}` (the arguments of `engine serve`),
//! `{"op":"stop","name":"v"}`, `{"op":"list"}`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use clap::Parser;
use serde_json::{json, Value};
use shorthorn_engine::control::JsonSocket;
use shorthorn_proto::VolumeName;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn, Instrument};

use super::engine::{run_engine, ServeArgs};

/// `engine serve`'s arguments, parsed the same way inside the daemon.
#[derive(Parser)]
#[command(name = "engine start", no_binary_name = true)]
struct HostedArgs {
    #[command(flatten)]
    serve: ServeArgs,
}

struct Hosted {
    uri: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A volume's place in the host: taken before its engine starts and given
/// back only once it has stopped, so two requests for one volume can never
/// run two engines (the second would fence the first).
enum Entry {
    Starting,
    Running(Hosted),
    Stopping,
}

/// The engines one daemon runs.
#[derive(Default)]
pub struct EngineHost {
    engines: Mutex<HashMap<VolumeName, Entry>>,
}

impl EngineHost {
    /// Starts an engine and returns its NBD URI once clients can connect.
    pub async fn start(&self, args: ServeArgs) -> anyhow::Result<String> {
        let name = args.name.clone();
        {
            let mut engines = self.engines.lock().unwrap();
            // Engines that stopped on their own (fenced, failed) leave.
            reap(&mut engines);
            match engines.get(&name) {
                None => {}
                Some(Entry::Stopping) => {
                    anyhow::bail!("the engine of volume {name} in this daemon is still stopping")
                }
                Some(_) => anyhow::bail!("volume {name} already has an engine in this daemon"),
            }
            engines.insert(name.clone(), Entry::Starting);
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let span = tracing::info_span!("engine", volume = %name);
        let task = tokio::spawn(
            async move {
                let stop = async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                };
                let result = run_engine(args, |uri| drop(ready_tx.send(uri)), stop).await;
                if let Err(e) = &result {
                    error!(error = format!("{e:#}"), "hosted engine stopped");
                }
                result
            }
            .instrument(span),
        );
        match ready_rx.await {
            Ok(uri) => {
                info!(volume = %name, %uri, "hosted engine started");
                let hosted = Hosted {
                    uri: uri.clone(),
                    stop: stop_tx,
                    task,
                };
                self.engines
                    .lock()
                    .unwrap()
                    .insert(name, Entry::Running(hosted));
                Ok(uri)
            }
            // The engine ended before serving: its error says why.
            Err(_) => {
                let result = task.await;
                self.engines.lock().unwrap().remove(&name);
                match result {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => anyhow::bail!("engine for {name} stopped before serving"),
                    Err(e) => anyhow::bail!("engine for {name} failed: {e}"),
                }
            }
        }
    }

    /// Stops a volume's engine: its clients are answered and disconnected,
    /// then the volume is flushed.
    pub async fn stop(&self, name: &VolumeName) -> anyhow::Result<()> {
        let hosted = {
            let mut engines = self.engines.lock().unwrap();
            match engines.remove(name) {
                Some(Entry::Running(hosted)) => {
                    engines.insert(name.clone(), Entry::Stopping);
                    hosted
                }
                Some(other) => {
                    let what = match other {
                        Entry::Starting => "still starting",
                        _ => "already stopping",
                    };
                    engines.insert(name.clone(), other);
                    anyhow::bail!("the engine of volume {name} in this daemon is {what}");
                }
                None => anyhow::bail!("no engine for volume {name} in this daemon"),
            }
        };
        let _ = hosted.stop.send(true);
        let result = hosted.task.await;
        self.engines.lock().unwrap().remove(name);
        match result {
            Ok(r) => r,
            Err(e) => anyhow::bail!("engine for {name} failed: {e}"),
        }
    }

    /// Stops every running engine (at daemon shutdown, before the replicas
    /// go).
    pub async fn stop_all(&self) {
        let names: Vec<VolumeName> = self
            .engines
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Running(_)))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            info!(volume = %name, "stopping hosted engine");
            if let Err(e) = self.stop(&name).await {
                warn!(volume = %name, error = format!("{e:#}"), "hosted engine stopped with an error");
            }
        }
    }

    fn list(&self) -> Value {
        let mut engines = self.engines.lock().unwrap();
        reap(&mut engines);
        let mut list: Vec<Value> = engines
            .iter()
            .filter_map(|(name, e)| match e {
                Entry::Running(h) => Some(json!({"volume": name.to_string(), "uri": h.uri})),
                _ => None,
            })
            .collect();
        list.sort_by_key(|v| v["volume"].as_str().unwrap_or("").to_string());
        json!({"ok": true, "engines": list})
    }

    async fn handle(&self, req: &Value) -> Value {
        let fail = |e: anyhow::Error| json!({"ok": false, "error": format!("{e:#}")});
        match req["op"].as_str() {
            Some("start") => {
                let argv: Vec<String> = match req["argv"].as_array() {
                    Some(a) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect(),
                    None => return fail(anyhow::anyhow!("start needs \"argv\"")),
                };
                let args = match HostedArgs::try_parse_from(argv) {
                    Ok(a) => a.serve,
                    Err(e) => return fail(anyhow::anyhow!("{}", e.to_string().trim())),
                };
                match self.start(args).await {
                    Ok(uri) => json!({"ok": true, "uri": uri}),
                    Err(e) => fail(e),
                }
            }
            Some("stop") => {
                let name = match req["name"].as_str().map(VolumeName::new) {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return fail(e.into()),
                    None => return fail(anyhow::anyhow!("stop needs \"name\"")),
                };
                match self.stop(&name).await {
                    Ok(()) => json!({"ok": true}),
                    Err(e) => fail(e),
                }
            }
            Some("list") => self.list(),
            _ => fail(anyhow::anyhow!("unknown op; expected start, stop or list")),
        }
    }
}

/// Forgets running engines that stopped on their own (fenced, failed).
fn reap(engines: &mut HashMap<VolumeName, Entry>) {
    engines.retain(|_, e| !matches!(e, Entry::Running(h) if h.task.is_finished()));
}

/// Binds the daemon's engine-control socket at `path`; refuses a socket
/// another live daemon answers on, and a path that is not a socket.
pub fn bind_control(path: &Path) -> std::io::Result<JsonSocket> {
    JsonSocket::take_over(path)
}

/// Serves engine-control requests on `socket` until `shutdown` resolves.
pub async fn serve_control(
    socket: JsonSocket,
    host: Arc<EngineHost>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    socket
        .serve(shutdown, move |req| {
            let host = host.clone();
            async move { host.handle(&req).await }
        })
        .await
}

/// Sends one request to a daemon's engine-control socket; an `ok: false`
/// answer becomes the error.
pub async fn request(path: &Path, req: &Value) -> anyhow::Result<Value> {
    use anyhow::Context;
    let answer = shorthorn_engine::control::request(path, req)
        .await
        .with_context(|| format!("replica daemon engine control {}", path.display()))?;
    if answer["ok"].as_bool() != Some(true) {
        anyhow::bail!(
            "{}",
            answer["error"].as_str().unwrap_or("the daemon refused")
        );
    }
    Ok(answer)
}
