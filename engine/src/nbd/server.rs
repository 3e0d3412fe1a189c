//! The NBD server: accepts connections and runs each one to its end.
//!
//! Owns the listener, the connection limit and shutdown. Each accepted
//! connection gets a task of its own that runs the handshake (bounded in time)
//! and then transmission; a connection that fails or misbehaves ends alone and
//! never takes the server or its neighbours down. On shutdown the server stops
//! accepting, removes its unix socket, lets every connection answer the
//! requests it already has, and returns.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::handshake::{self, ExportInfo, Negotiated};
use super::listen::{Accepted, Listener, NbdListen};
use super::proto;
use super::transmission;
use super::NbdBackend;

/// A client that has not finished the handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to answer their in-flight
/// requests before cutting them off.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How the server presents its one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdServerConfig {
    /// The export's name; clients may also ask for the default export "".
    pub export_name: String,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: only when a flush on one
    /// connection covers writes acknowledged on every other.
    pub multi_conn: bool,
    /// Connections served at once; more are closed as soon as accepted.
    /// 0 means no limit.
    pub max_connections: usize,
}

impl Default for NbdServerConfig {
    fn default() -> Self {
        NbdServerConfig {
            export_name: String::new(),
            multi_conn: false,
            max_connections: 16,
        }
    }
}

impl NbdServerConfig {
    fn transmission_flags(&self) -> u16 {
        let mut flags = proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES;
        if self.multi_conn {
            flags |= proto::TFLAG_CAN_MULTI_CONN;
        }
        flags
    }
}

/// A bound NBD listener, not yet serving. Binding first lets a caller learn
/// the real address (TCP port 0) before clients connect.
pub struct NbdServer {
    listener: Listener,
    bound: NbdListen,
}

impl NbdServer {
    /// Binds `listen`. A unix socket file left by a dead server is replaced;
    /// a live one is refused with `AddrInUse`. Must be called from within a
    /// tokio runtime.
    pub async fn bind(listen: NbdListen) -> io::Result<NbdServer> {
        let (listener, bound) = Listener::bind(&listen).await?;
        Ok(NbdServer { listener, bound })
    }

    /// The address actually bound (with the port the kernel chose).
    pub fn listen_addr(&self) -> &NbdListen {
        &self.bound
    }

    /// The NBD URI clients use to reach `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        self.bound.uri(export)
    }

    /// Serves `backend` until `shutdown` completes, then waits for open
    /// connections to answer what they have in flight and returns. The unix
    /// socket file is removed when this returns (or is dropped).
    pub async fn run(
        self,
        config: NbdServerConfig,
        backend: Arc<dyn NbdBackend>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let NbdServer { listener, bound } = self;
        let shared = Arc::new(Shared {
            export_name: config.export_name.clone(),
            transmission_flags: config.transmission_flags(),
            backend,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let refusing = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
        let next_id = AtomicU64::new(1);
        // The address as --nbd takes it; the engine logs the export's URI.
        tracing::info!(export = %config.export_name, listen = %bound.to_arg(), "NBD server listening");

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    log_panic(done);
                }
                accepted = listener.accept() => {
                    let accepted = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off
                            // instead of spinning, keep the listener.
                            tracing::warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    while let Some(done) = connections.try_join_next() {
                        log_panic(done);
                    }
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    if config.max_connections != 0 && connections.len() >= config.max_connections {
                        tracing::warn!(
                            export = %config.export_name,
                            max = config.max_connections,
                            "NBD connection refused: too many connections"
                        );
                        // Told why, by a handshake of its own; beyond a few
                        // at once (a client retrying in a loop), only closed.
                        if let Ok(permit) = refusing.clone().try_acquire_owned() {
                            let reason = format!(
                                "too many connections to export {:?} (at most {}); close some, \
                                 or start the engine with a larger --max-connections",
                                config.export_name, config.max_connections
                            );
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(
                                    HANDSHAKE_TIMEOUT,
                                    refuse_accepted(accepted, &reason),
                                )
                                .await;
                                drop(permit);
                            });
                        }
                        continue;
                    }
                    let span = tracing::info_span!(
                        "nbd_conn",
                        export = %config.export_name,
                        conn = id,
                        peer = %peer_name(&accepted),
                    );
                    connections.spawn(
                        serve_accepted(accepted, shared.clone(), stop_rx.clone()).instrument(span),
                    );
                }
            }
        }

        tracing::info!(
            export = %config.export_name,
            open = connections.len(),
            "NBD server shutting down"
        );
        // Stop accepting (and remove the socket file) before draining, so new
        // clients fail fast instead of queueing behind a dying server.
        drop(listener);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(done) = connections.join_next().await {
                log_panic(done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                export = %config.export_name,
                left = connections.len(),
                "NBD connections did not finish in time; closing them"
            );
            connections.shutdown().await;
        }
        Ok(())
    }
}

/// Binds `listen` and serves `backend` on it until `shutdown` completes.
pub async fn serve(
    listen: NbdListen,
    config: NbdServerConfig,
    backend: Arc<dyn NbdBackend>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    NbdServer::bind(listen)
        .await?
        .run(config, backend, shutdown)
        .await
}

/// What every connection of one server shares.
struct Shared {
    export_name: String,
    transmission_flags: u16,
    backend: Arc<dyn NbdBackend>,
}

fn peer_name(accepted: &Accepted) -> String {
    match accepted {
        Accepted::Unix(_) => "unix".to_string(),
        Accepted::Tcp(_, addr) => addr.to_string(),
    }
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "NBD connection task panicked");
        }
    }
}

/// Connections over the limit that are told why at once; more are closed.
const MAX_REFUSING: usize = 4;

/// Tells a connection over the limit why it is refused, then closes it.
async fn refuse_accepted(accepted: Accepted, reason: &str) {
    let refused = match accepted {
        Accepted::Unix(stream) => {
            let (mut r, mut w) = stream.into_split();
            handshake::refuse(&mut r, &mut w, reason).await
        }
        Accepted::Tcp(stream, _) => {
            let (mut r, mut w) = stream.into_split();
            handshake::refuse(&mut r, &mut w, reason).await
        }
    };
    if let Err(e) = refused {
        tracing::debug!(error = %e, "refused NBD client went away");
    }
}

async fn serve_accepted(accepted: Accepted, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    match accepted {
        Accepted::Unix(stream) => {
            let (r, w) = stream.into_split();
            serve_connection(r, w, shared, stop).await;
        }
        Accepted::Tcp(stream, _) => {
            let (r, w) = stream.into_split();
            serve_connection(r, w, shared, stop).await;
        }
    }
}

/// Runs one connection from greeting to close. Everything that can go wrong
/// here is the client's or the socket's problem, so it is logged, not
/// returned.
async fn serve_connection<R, W>(
    reader: R,
    mut writer: W,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut reader = BufReader::with_capacity(transmission::READ_BUFFER, reader);
    let size = shared.backend.size();
    let export = ExportInfo {
        name: shared.export_name.clone(),
        size,
        transmission_flags: shared.transmission_flags,
    };
    tracing::debug!("NBD client connected");

    let negotiated = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => return,
        r = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake::negotiate(&mut reader, &mut writer, &export),
        ) => r,
    };
    match negotiated {
        Ok(Ok(Negotiated::Transmission)) => {}
        Ok(Ok(Negotiated::Aborted)) => {
            tracing::debug!("NBD client ended the handshake");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "NBD handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!("NBD handshake timed out");
            return;
        }
    }

    tracing::info!(size, "NBD client attached");
    let (end, stats) = transmission::run(reader, writer, shared.backend.clone(), size, stop).await;
    match end {
        Ok(end) => tracing::info!(
            ?end,
            requests = stats.requests,
            refused = stats.errors,
            "NBD client detached"
        ),
        Err(e) => tracing::info!(
            error = %e,
            requests = stats.requests,
            refused = stats.errors,
            "NBD connection closed on error"
        ),
    }
}
