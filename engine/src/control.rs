//! The engine's control socket: how `shorthorn volume status`,
//! `add-replica` and `remove-replica` reach a running engine.
//!
//! A unix socket next to the engine (only local users with access to the
//! run directory can use it). One JSON request per connection, one JSON
//! line back: `{"op":"status"}`, `{"op":"add-replica","addr":"H:P"}`,
//! `{"op":"remove-replica","addr":"H:P"}`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tracing::{debug, warn};

use crate::volume::Volume;

/// A volume's control socket, bound and not yet answering.
pub struct ControlSocket(JsonSocket);

impl ControlSocket {
    /// Binds at `path`. Call it once the volume is claimed
    /// ([`Volume::claim`](crate::Volume::claim)): the newest engine for a
    /// volume takes the socket over (an older one still running has been
    /// fenced by this one's claim, so the status people want is this
    /// engine's), and one that lost the race must not.
    pub fn bind(path: &Path) -> std::io::Result<ControlSocket> {
        // Only a socket is taken over; a file given by mistake is left alone.
        if crate::nbd::socket_file_at(path)? {
            std::fs::remove_file(path)?;
        }
        JsonSocket::bind(path).map(ControlSocket)
    }

    /// Answers until `shutdown` resolves; removes the socket file afterwards.
    pub async fn serve(
        self,
        volume: Arc<Volume>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.0
            .serve(shutdown, move |req| {
                let volume = volume.clone();
                async move { handle(&volume, &req).await }
            })
            .await
    }
}

/// A unix socket taking one JSON request per connection and answering one
/// JSON line. Its file is removed when it is dropped, unless someone
/// replaced it meanwhile.
pub struct JsonSocket {
    listener: UnixListener,
    _cleanup: RemoveOnDrop,
}

impl JsonSocket {
    /// Binds at `path` (creating its directory); fails if the file exists:
    /// the caller decides whether to take a socket file over.
    pub fn bind(path: &Path) -> std::io::Result<JsonSocket> {
        if let Some(dir) = path.parent() {
            if dir.exists() && !dir.is_dir() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", dir.display()),
                ));
            }
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(path)?;
        Ok(JsonSocket {
            listener,
            _cleanup: RemoveOnDrop::new(path.to_path_buf()),
        })
    }

    /// Binds at `path`, first removing a socket file there that nobody
    /// answers on (left by a process that died). Refuses when someone still
    /// answers, and when the path is anything but a socket: a file given by
    /// mistake is never deleted.
    pub fn take_over(path: &Path) -> std::io::Result<JsonSocket> {
        crate::nbd::remove_stale_socket(path)?;
        JsonSocket::bind(path)
    }

    /// Answers requests with `handle` until `shutdown` resolves.
    pub async fn serve<H, F>(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        handle: H,
    ) -> std::io::Result<()>
    where
        H: Fn(Value) -> F + Clone + Send + 'static,
        F: std::future::Future<Output = Value> + Send + 'static,
    {
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => { warn!(error = %e, "control socket accept failed"); continue; }
                },
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut line = String::new();
                let mut rd = BufReader::new(rd.take(64 * 1024));
                if rd.read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match serde_json::from_str::<Value>(&line) {
                    Ok(req) => handle(req).await,
                    Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
                };
                let mut out = answer.to_string();
                out.push('\n');
                if let Err(e) = wr.write_all(out.as_bytes()).await {
                    debug!(error = %e, "control client went away");
                }
            });
        }
    }
}

use tokio::io::AsyncReadExt;

async fn handle(volume: &Arc<Volume>, req: &Value) -> Value {
    let addr = req.get("addr").and_then(Value::as_str).unwrap_or("");
    let op = req.get("op").and_then(Value::as_str);
    if volume.is_starting() && matches!(op, Some("add-replica" | "remove-replica")) {
        return json!({
            "ok": false,
            "error": "the engine is still starting (comparing its replicas where writes may have \
                      been in flight when the last engine stopped); try again once it serves, \
                      `shorthorn volume status` says how far it is",
        });
    }
    match op {
        Some("status") => status(volume),
        Some("add-replica") if !addr.is_empty() => match volume.add_replica(addr).await {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Some("remove-replica") if !addr.is_empty() => match volume.remove_replica(addr).await {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        _ => {
            json!({"ok": false, "error": "unknown request; ops are status, add-replica, remove-replica"})
        }
    }
}

pub fn status(volume: &Volume) -> Value {
    let replicas: Vec<Value> = volume
        .replica_states()
        .into_iter()
        .map(|r| {
            json!({
                "addr": r.addr,
                "id": r.id,
                "state": r.state.as_str(),
                "rebuild": {
                    "bytes_total": r.rebuild_total,
                    "bytes_scanned": r.rebuild_scanned,
                    "bytes_copied": r.rebuild_copied,
                    "mib_per_s": (r.rebuild_rate_mib_s * 10.0).round() / 10.0,
                },
                "last_error": r.last_error,
            })
        })
        .collect();
    json!({
        "ok": true,
        "volume": volume.name().as_str(),
        "size": volume.size(),
        "generation": volume.generation().0,
        "healthy": volume.healthy_count(),
        "replicas": replicas,
        "starting": volume.is_starting(),
        "reconcile": {
            "bytes_total": volume.stats().reconcile_total.load(Ordering::Relaxed),
            "bytes_compared": volume.stats().reconcile_compared.load(Ordering::Relaxed),
            "bytes_copied": volume.stats().reconcile_copied.load(Ordering::Relaxed),
        },
    })
}

/// Sends one request to an engine's control socket and returns its answer.
pub async fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    let mut s = tokio::net::UnixStream::connect(path).await?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).await?;
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).await?;
    serde_json::from_str(&out).map_err(std::io::Error::other)
}

/// Removes the socket file when its server stops, unless a newer engine
/// has replaced it with its own meanwhile.
struct RemoveOnDrop {
    path: PathBuf,
    inode: Option<u64>,
}

impl RemoveOnDrop {
    fn new(path: PathBuf) -> RemoveOnDrop {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&path).ok().map(|m| m.ino());
        RemoveOnDrop { path, inode }
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&self.path).ok().map(|m| m.ino());
        if now.is_some() && now == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
