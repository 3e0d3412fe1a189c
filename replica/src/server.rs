//! The replica daemon's network side: accepts replica-protocol connections,
//! runs the handshake, and turns each request into a call on the [`Store`].
//!
//! One connection's failure never reaches another: a malformed frame, a bad
//! checksum or a wrong version gets an error answer (when there is anyone to
//! answer) and closes that connection only. The daemon never writes a byte
//! for a request it could not fully decode and verify.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{self, Either, FutureExt};
use shorthorn_proto::inflight;
use shorthorn_proto::{
    EncodedFrame, ErrorCode, FrameReader, FrameWriter, Generation, Hello, LocalCall, LocalFuture,
    LocalService, LocalSession, Opened, ProtoError, RawFrame, RemoteError, Reply, Request,
    VolumeInfo, VolumeName, Welcome, MAX_IO_LEN, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn, Instrument};

use crate::storage::{Replica, StorageError, Store};
use crate::volume_state::{Attached, VolumeState, REGION_SIZE};

/// The volumes' states (membership, dirty map), opened on first use and
/// shared by every connection to the same volume.
#[derive(Default)]
pub struct States {
    open: std::sync::Mutex<std::collections::HashMap<VolumeName, Arc<VolumeState>>>,
}

impl States {
    fn get(&self, replica: &Replica) -> Result<Arc<VolumeState>, RemoteError> {
        let mut open = self.open.lock().unwrap();
        if let Some(s) = open.get(replica.name()) {
            return Ok(s.clone());
        }
        let st = VolumeState::open(replica.dir(), replica.size()).map_err(|e| {
            RemoteError::new(
                ErrorCode::Io,
                format!("volume {}: cannot open its state: {e}", replica.name()),
            )
        })?;
        let st = Arc::new(st);
        open.insert(replica.name().clone(), st.clone());
        Ok(st)
    }

    fn forget(&self, name: &VolumeName) {
        self.open.lock().unwrap().remove(name);
    }
}

/// How the daemon treats its connections.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This daemon's identity in handshakes and logs.
    pub server_id: String,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// Requests one connection may have executing at once; more wait in the
    /// socket (TCP backpressure) rather than in memory.
    pub max_in_flight: usize,
    /// A connection that sends nothing for this long before its handshake
    /// is closed.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            server_id: format!("replica pid {}", std::process::id()),
            max_connections: 1024,
            max_in_flight: 256,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A replica daemon's serving side: the store, the volumes' states and the
/// connection policy, shared by every connection, whether it came over TCP
/// or from an engine hosted in the same process.
pub struct Server {
    store: Arc<Store>,
    states: Arc<States>,
    config: Arc<ServerConfig>,
    conn_ids: AtomicU64,
}

impl Server {
    pub fn new(store: Arc<Store>, config: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            store,
            states: Arc::new(States::default()),
            config: Arc::new(config),
            conn_ids: AtomicU64::new(1),
        })
    }

    /// Serves TCP connections until `shutdown` resolves, then stops
    /// accepting and returns. Connections already open finish their
    /// in-flight requests on their own.
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "too many connections; closing the new one");
                continue;
            };
            if let Err(e) = stream
                .set_nodelay(true)
                .and_then(|()| shorthorn_proto::net::keep_alive(&stream))
            {
                debug!(%peer, error = %e, "cannot set the socket's options; closing");
                continue;
            }
            let (rd, wr) = stream.into_split();
            self.spawn_connection(
                FrameReader::new(rd),
                FrameWriter::new(wr),
                peer.to_string(),
                permit,
            );
        }
    }

    /// This daemon as the engines hosted in its process reach it: sessions
    /// opened with the same hello, fencing and checks as a TCP connection,
    /// whose requests run as calls inside the engine's own task, with no
    /// frames, socket or channel between the engine and the replica.
    pub fn local_service(self: &Arc<Self>) -> Arc<dyn LocalService> {
        Arc::new(InProcess(self.clone()))
    }

    /// A session just opened, ready to serve requests.
    fn conn(&self, session: Session) -> Conn {
        Conn {
            session: Arc::new(session),
            store: self.store.clone(),
            states: self.states.clone(),
        }
    }

    fn spawn_connection<R, W>(
        self: &Arc<Self>,
        reader: FrameReader<R>,
        writer: FrameWriter<W>,
        peer: String,
        permit: OwnedSemaphorePermit,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self.conn_ids.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id = conn, peer = %peer);
        let server = self.clone();
        tokio::spawn(
            async move {
                if let Err(e) = server.handle_connection(reader, writer, &peer).await {
                    debug!(error = %e, "connection ended with an error");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Serves until `shutdown` resolves, then stops accepting and returns.
/// Connections already open finish their in-flight requests on their own.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    Server::new(store, config).serve(listener, shutdown).await
}

/// What a connection is allowed to do, fixed by its handshake.
enum Session {
    /// Management calls only.
    Admin,
    /// Bound to one volume; IO allowed while the replica's generation still
    /// equals the session's.
    Volume {
        replica: Arc<Replica>,
        state: Arc<VolumeState>,
        generation: Generation,
        /// This session's number among the volume's writing sessions.
        session: u64,
        /// A writing session counts as an engine using the volume while it
        /// is open (dropped with the connection or local session).
        _attached: Option<Attached>,
    },
}

impl Session {
    fn state(&self) -> Option<&Arc<VolumeState>> {
        match self {
            Session::Volume { state, .. } => Some(state),
            Session::Admin => None,
        }
    }

    /// Whether no newer writing session has opened on this volume since.
    fn is_newest(&self) -> bool {
        match self {
            Session::Volume {
                state,
                session: mine,
                ..
            } => state.sessions.load(std::sync::atomic::Ordering::Acquire) == *mine,
            Session::Admin => false,
        }
    }
}

impl Server {
    async fn handle_connection<R, W>(
        &self,
        mut reader: FrameReader<R>,
        mut writer: FrameWriter<W>,
        peer: &str,
    ) -> Result<(), ProtoError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (store, states, config) = (&self.store, &self.states, &self.config);

        let first = match tokio::time::timeout(config.handshake_timeout, reader.read_frame()).await
        {
            Err(_) => {
                debug!("no handshake in time");
                return Ok(());
            }
            Ok(r) => r,
        };
        let first = match first {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                answer_and_close(&mut writer, 0, &e).await;
                return Err(e);
            }
        };
        let opened = match hello_of(&first) {
            Ok(hello) => open_session(hello, store, states, config).await,
            Err(e) => Err(e),
        };
        let (session, welcome) = match opened {
            Ok(ok) => ok,
            Err(err) => {
                warn!(%peer, error = %err, "handshake refused");
                let _ = writer
                    .write_frame(&Reply::Error(err).encode(first.id))
                    .await;
                let _ = writer.shutdown().await;
                return Ok(());
            }
        };
        writer
            .write_frame(&Reply::Welcome(welcome).encode(first.id))
            .await?;
        let conn = self.conn(session);

        let (tx, rx) = mpsc::unbounded_channel::<Answer>();
        let write_task = tokio::spawn(write_replies(writer, rx));
        // The requests run side by side in one task, not a task each (see
        // `inflight`); each answer holds its permit until it is written.
        let (start, started) = mpsc::unbounded_channel();
        let run_task = tokio::spawn(inflight::run_started(started, tx.clone()));
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));

        let result = loop {
            let frame = match reader.read_frame().await {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(()),
                Err(e) => {
                    warn!(error = %e, "closing connection on a bad frame");
                    let id = match &e {
                        ProtoError::Checksum { id, .. } => *id,
                        _ => 0,
                    };
                    let _ = tx.send(Answer::unbound(error_frame(id, &e)));
                    break Err(e);
                }
            };
            let request = match Request::decode(&frame) {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, id = frame.id, "closing connection on an undecodable request");
                    let _ = tx.send(Answer::unbound(error_frame(frame.id, &e)));
                    break Err(e);
                }
            };
            let reply = conn.begin(request);
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closes");
            let id = frame.id;
            let answer = reply.map(move |reply| Answer {
                frame: reply.encode(id),
                _permit: Some(permit),
            });
            if start.send(answer).is_err() {
                // The runner is gone (a request panicked): nothing would
                // run or answer this connection's requests any more, so
                // end it, and the engine knows at once. A mark the request
                // left in the dirty map only costs its region a compare.
                warn!(id, "closing connection: its requests can no longer run");
                break Ok(());
            }
        };
        // Let every executing request answer, then close the socket.
        drop(start);
        let _ = run_task.await;
        drop(tx);
        let _ = write_task.await;
        result
    }
}

/// A session being served, over TCP or in process.
struct Conn {
    session: Arc<Session>,
    store: Arc<Store>,
    states: Arc<States>,
}

impl Conn {
    /// Does at once what must follow the order requests arrive in, then
    /// returns the rest of the request to run. A write's range is marked in
    /// the dirty map here, and a clean is applied here, so a clean can never
    /// undo the mark of a write sent after it.
    fn begin(&self, request: Request) -> impl Future<Output = Reply> + Send + 'static {
        let state = self.session.state();
        let (ticket, answered) = match (&request, state) {
            (Request::MarkClean { bitmap }, Some(state)) => {
                // The gate is held across the check and the clear: a newer
                // session takes its number before it waits for the gate, so
                // either this sees the number (or the waiting session) and
                // refuses, or that session waits until the clear is done.
                let gate = state.io_gate.try_read();
                let reply = match io_replica(&self.session, false) {
                    Ok(replica) if gate.is_err() || !self.session.is_newest() => {
                        Reply::Error(replaced(replica))
                    }
                    Ok(replica) => {
                        state.dirty().clear(bitmap);
                        // Written (not synced) once the regions' data is
                        // flushed: a daemon killed later keeps them; only a
                        // power cut loses them, which costs one extra
                        // compare, never data.
                        let (state, replica) = (state.clone(), replica.clone());
                        tokio::spawn(async move {
                            if let Err(e) = state.dirty().releasing_clears(replica.flush()).await {
                                warn!(volume = %replica.name(), error = %e, "flushing before writing dirty-map clears failed; the regions stay dirty on disk")
                            }
                            if let Err(e) = state.dirty().sync_clears().await {
                                warn!(volume = %replica.name(), error = %e, "writing dirty-map clears failed");
                            }
                        });
                        Reply::Done
                    }
                    Err(e) => Reply::Error(e),
                };
                drop(gate);
                (None, Some(reply))
            }
            (request, Some(state)) => match write_range(request) {
                Some((offset, len)) => (state.dirty().mark(offset, len), None),
                None => (None, None),
            },
            _ => (None, None),
        };
        if let Some(reply) = answered {
            return Either::Left(future::ready(reply));
        }
        // Every IO request's future is moved into its connection's running
        // set (or a box): the IO path's future is kept small, and the other
        // requests, rare and with much larger futures, wait in a box.
        let session = self.session.clone();
        let executed = if is_io(&request) {
            Either::Left(execute_data(request, ticket, session))
        } else {
            let (store, states) = (self.store.clone(), self.states.clone());
            Either::Right(Box::pin(async move {
                execute(request, ticket, session, &store, &states).await
            }))
        };
        Either::Right(executed.map(|executed| executed.unwrap_or_else(Reply::Error)))
    }
}

/// The daemon as its hosted engines see it ([`Server::local_service`]).
struct InProcess(Arc<Server>);

impl LocalService for InProcess {
    fn hello(&self, hello: Hello) -> LocalFuture<Opened> {
        let server = self.0.clone();
        let conn = server.conn_ids.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id = conn, peer = %"in-process");
        Box::pin(
            async move {
                let (session, welcome) =
                    open_session(hello, &server.store, &server.states, &server.config)
                        .await
                        .inspect_err(|err| warn!(error = %err, "handshake refused"))?;
                Ok((
                    welcome,
                    Arc::new(server.conn(session)) as Arc<dyn LocalSession>,
                ))
            }
            .instrument(span),
        )
    }
}

impl LocalSession for Conn {
    fn start(&self, request: Request) -> LocalCall {
        LocalCall::new(self.begin(request))
    }
}

fn error_frame(id: u64, e: &ProtoError) -> EncodedFrame {
    Reply::Error(RemoteError::new(e.code(), e.to_string())).encode(id)
}

async fn answer_and_close<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    id: u64,
    e: &ProtoError,
) {
    let _ = writer.write_frame(&error_frame(id, e)).await;
    let _ = writer.shutdown().await;
}

/// A reply ready to go out, holding the connection's in-flight permit of its
/// request (if it had one) until it is written: what bounds the memory of
/// a connection whose peer stops reading.
struct Answer {
    frame: EncodedFrame,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Answer {
    /// An answer to no request the connection took in (a frame it refused).
    fn unbound(frame: EncodedFrame) -> Answer {
        Answer {
            frame,
            _permit: None,
        }
    }

    fn frame(&self) -> &EncodedFrame {
        &self.frame
    }
}

/// Sends replies as they complete, many per syscall when they pile up.
async fn write_replies<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Answer>,
) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        if let Err(e) = writer.write_frames(batch.iter().map(Answer::frame)).await {
            debug!(error = %e, "reply write failed");
            return;
        }
        batch.clear();
    }
    let _ = writer.shutdown().await;
}

/// The byte range a request may change, if it changes any.
fn write_range(request: &Request) -> Option<(u64, u64)> {
    match request {
        Request::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
        Request::Trim { offset, len } | Request::WriteZeroes { offset, len, .. } => {
            Some((*offset, *len))
        }
        _ => None,
    }
}

/// A connection's first frame, which must be a hello.
fn hello_of(frame: &RawFrame) -> Result<Hello, RemoteError> {
    match Request::decode(frame) {
        Ok(Request::Hello(h)) => Ok(h),
        Ok(other) => Err(RemoteError::new(
            ErrorCode::NotBound,
            format!("expected a hello first, got {}", other.name()),
        )),
        Err(e) => Err(RemoteError::new(e.code(), e.to_string())),
    }
}

/// Accepts or refuses a hello: the session it opens and the welcome.
async fn open_session(
    hello: Hello,
    store: &Store,
    states: &States,
    config: &ServerConfig,
) -> Result<(Session, Welcome), RemoteError> {
    let Hello {
        version,
        client,
        volume,
        generation,
    } = hello;
    if version != PROTOCOL_VERSION {
        return Err(RemoteError::new(
            ErrorCode::VersionMismatch,
            format!("client speaks protocol {version}, this replica speaks {PROTOCOL_VERSION}"),
        ));
    }
    let welcome = |volume| Welcome {
        version: PROTOCOL_VERSION,
        server: config.server_id.clone(),
        volume,
    };
    if volume.is_empty() {
        debug!(%client, "admin session");
        return Ok((Session::Admin, welcome(None)));
    }
    let name = parse_name(&volume)?;
    let replica = store.get(&name).map_err(storage_error)?;
    let state = states.get(&replica)?;
    let mut session = 0;
    let mut attached = None;
    if generation.0 > 0 {
        let _in_order = state.attaching.lock().await;
        replica
            .set_generation(generation, &client)
            .await
            .map_err(storage_error)?;
        // One writing session per volume: this one supersedes any older
        // (a dead engine's, or this engine's before it reconnected), and
        // waits for the older sessions' IO in progress to finish, so none
        // of it can land after this session starts repairing the replica.
        session = state
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        drop(state.io_gate.write().await);
        attached = Some(state.attach(session, format!("{client} at {generation}")));
        info!(volume = %name, %generation, %client, session, "engine attached");
    }
    let info = volume_info(&replica);
    Ok((
        Session::Volume {
            replica,
            state,
            generation,
            session,
            _attached: attached,
        },
        welcome(Some(info)),
    ))
}

async fn execute(
    request: Request,
    ticket: Option<u64>,
    owned: Arc<Session>,
    store: &Store,
    states: &States,
) -> Result<Reply, RemoteError> {
    let session = &*owned;
    match request {
        Request::Hello(_) => Err(RemoteError::new(
            ErrorCode::Invalid,
            "this connection has already said hello",
        )),
        Request::Ping => Ok(Reply::Pong),
        Request::CreateVolume { name, size } => {
            let name = parse_name(&name)?;
            let (replica, created) = store
                .create_volume(&name, size)
                .await
                .map_err(storage_error)?;
            if created {
                info!(volume = %name, size, "volume created");
            }
            Ok(Reply::Created {
                info: volume_info(&replica),
                created,
            })
        }
        Request::DeleteVolume { name } => {
            let name = parse_name(&name)?;
            let replica = store.get(&name).map_err(storage_error)?;
            // Held so no engine attaches between the check and the delete.
            let state = states.get(&replica)?;
            let _in_order = state.attaching.lock().await;
            if let Some(engine) = state.engine() {
                return Err(RemoteError::new(
                    ErrorCode::Busy,
                    format!(
                        "volume {name} is in use by engine {engine}; stop that engine \
                         (`shorthorn engine stop`, or end its process) before deleting the volume"
                    ),
                ));
            }
            drop(replica);
            store.delete_volume(&name).await.map_err(storage_error)?;
            states.forget(&name);
            info!(volume = %name, "volume deleted");
            Ok(Reply::Done)
        }
        Request::ListVolumes => Ok(Reply::Volumes(
            store.list().iter().map(|r| volume_info(r)).collect(),
        )),
        Request::GetVolume { name } => {
            let name = parse_name(&name)?;
            let replica = store.get(&name).map_err(storage_error)?;
            Ok(Reply::Volume(volume_info(&replica)))
        }
        Request::GetState => {
            let (_, state) = volume_of(session)?;
            Ok(Reply::State(shorthorn_proto::ReplicaState {
                replica_id: state.replica_id().to_string(),
                membership: state.membership(),
                region_size: REGION_SIZE,
                dirty: state.dirty().to_bytes(),
            }))
        }
        Request::SetMembership(m) => {
            io_replica(session, false)?;
            // Like a write: an engine whose session was replaced while its
            // call was on the way must not change who is up to date.
            let _gate = newest_session(session).await?;
            let (replica, state) = volume_of(session)?;
            let epoch = m.epoch;
            state.set_membership(m).await.map_err(storage_error)?;
            info!(volume = %replica.name(), epoch, "membership updated");
            Ok(Reply::Done)
        }
        Request::Hashes { offset, len, chunk } => {
            let replica = io_replica(session, true)?;
            hashes(replica, offset, len, chunk).await
        }
        io => execute_data(io, ticket, owned.clone()).await,
    }
}

/// Whether [`execute_data`] serves this request: reads, writes and the
/// other requests on the volume's data.
fn is_io(request: &Request) -> bool {
    matches!(
        request,
        Request::Read { .. }
            | Request::Write { .. }
            | Request::Flush
            | Request::Trim { .. }
            | Request::WriteZeroes { .. }
    )
}

/// A request on the volume's data, under the volume's IO gate and with its
/// regions marked dirty first (`ticket`).
async fn execute_data(
    io: Request,
    ticket: Option<u64>,
    session: Arc<Session>,
) -> Result<Reply, RemoteError> {
    let session = &*session;
    let read_only = matches!(io, Request::Read { .. });
    let replica = io_replica(session, read_only)?;
    // Held for the IO's duration: a newer session waits for it.
    let _gate = match read_only {
        false => Some(newest_session(session).await?),
        true => None,
    };
    if let (Some(t), Some(state)) = (ticket, session.state()) {
        state
            .dirty()
            .persist(t)
            .await
            .map_err(|e| RemoteError::new(ErrorCode::Io, format!("saving the dirty map: {e}")))?;
    }
    match (&io, session.state()) {
        (Request::Flush, Some(state)) => Box::pin(flush_and_clear(io, replica, state)).await,
        _ => execute_io(io, replica).await,
    }
}

/// A flush, after which the regions cleared before it may reach the dirty
/// map's file. Boxed by its caller: it is rare beside writes, and its future
/// is as large as the rest of a write's.
async fn flush_and_clear(
    flush: Request,
    replica: &Replica,
    state: &VolumeState,
) -> Result<Reply, RemoteError> {
    let reply = state
        .dirty()
        .releasing_clears(execute_io(flush, replica))
        .await?;
    let _ = state.dirty().sync_clears().await;
    Ok(reply)
}

/// For a request that changes the replica: holds the volume's IO gate
/// shared and checks that this is still the volume's newest writing
/// session. A newer session waits for the gate when it opens, so once it
/// is open nothing from an older one lands.
async fn newest_session(
    session: &Session,
) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, RemoteError> {
    let (replica, state) = volume_of(session)?;
    let gate = state.io_gate.read().await;
    if !session.is_newest() {
        return Err(replaced(replica));
    }
    Ok(gate)
}

fn replaced(replica: &Replica) -> RemoteError {
    RemoteError::new(
        ErrorCode::StaleGeneration,
        format!(
            "volume {}: a newer session has replaced this one",
            replica.name()
        ),
    )
}

fn volume_of(session: &Session) -> Result<(&Replica, &Arc<VolumeState>), RemoteError> {
    match session {
        Session::Volume { replica, state, .. } => Ok((replica, state)),
        Session::Admin => Err(RemoteError::new(
            ErrorCode::NotBound,
            "this needs a volume session; say hello with a volume first",
        )),
    }
}

async fn hashes(
    replica: &Replica,
    offset: u64,
    len: u64,
    chunk: u32,
) -> Result<Reply, RemoteError> {
    if chunk == 0 || chunk > MAX_IO_LEN || len.div_ceil(chunk as u64) > shorthorn_proto::MAX_HASHES
    {
        return Err(RemoteError::new(
            ErrorCode::Invalid,
            format!("cannot hash {len} bytes in chunks of {chunk}"),
        ));
    }
    let end = offset.checked_add(len).filter(|&e| e <= replica.size());
    let Some(end) = end else {
        return Err(RemoteError::new(
            ErrorCode::OutOfRange,
            format!(
                "[{offset}, +{len}) is past the end ({} bytes)",
                replica.size()
            ),
        ));
    };
    let mut out = Vec::with_capacity(len.div_ceil(chunk as u64) as usize);
    let mut at = offset;
    while at < end {
        let n = (end - at).min(chunk as u64) as u32;
        let data = replica.read(at, n).await.map_err(storage_error)?;
        out.push(xxhash_rust::xxh3::xxh3_64(&data));
        at += n as u64;
    }
    Ok(Reply::Hashes(out))
}

/// The session's replica, if it may do this IO right now. A look-only
/// session (generation 0) may read — checkers compare replicas that way
/// without fencing the engine — but never change a byte.
fn io_replica(session: &Session, read_only: bool) -> Result<&Arc<Replica>, RemoteError> {
    let Session::Volume {
        replica,
        generation,
        ..
    } = session
    else {
        return Err(RemoteError::new(
            ErrorCode::NotBound,
            "IO on an admin session; say hello with a volume first",
        ));
    };
    if generation.0 == 0 {
        if read_only {
            return Ok(replica);
        }
        return Err(RemoteError::new(
            ErrorCode::NotBound,
            "this session only looks (generation 0); changing data needs a generation",
        ));
    }
    let current = replica.generation();
    if current != *generation {
        return Err(RemoteError::new(
            ErrorCode::StaleGeneration,
            format!(
                "volume {} is now at {current}, this engine holds {generation}",
                replica.name()
            ),
        ));
    }
    Ok(replica)
}

async fn execute_io(request: Request, replica: &Replica) -> Result<Reply, RemoteError> {
    let reply = match request {
        Request::Read { offset, len } => {
            if len > MAX_IO_LEN {
                return Err(RemoteError::new(
                    ErrorCode::Invalid,
                    format!("read of {len} bytes exceeds the maximum of {MAX_IO_LEN}"),
                ));
            }
            Reply::Data(replica.read(offset, len).await.map_err(storage_error)?)
        }
        Request::Write { offset, fua, data } => {
            replica
                .write(offset, data, fua)
                .await
                .map_err(storage_error)?;
            Reply::Done
        }
        Request::Flush => {
            replica.flush().await.map_err(storage_error)?;
            Reply::Done
        }
        Request::Trim { offset, len } => {
            replica.trim(offset, len).await.map_err(storage_error)?;
            Reply::Done
        }
        Request::WriteZeroes { offset, len, fua } => {
            replica
                .write_zeroes(offset, len, fua)
                .await
                .map_err(storage_error)?;
            Reply::Done
        }
        other => {
            return Err(RemoteError::new(
                ErrorCode::Unsupported,
                format!("{} is not an IO request", other.name()),
            ))
        }
    };
    Ok(reply)
}

fn parse_name(name: &str) -> Result<VolumeName, RemoteError> {
    VolumeName::new(name).map_err(|e| RemoteError::new(ErrorCode::InvalidName, e.to_string()))
}

fn storage_error(e: StorageError) -> RemoteError {
    if matches!(e.code(), ErrorCode::Io | ErrorCode::NoSpace) {
        warn!(error = %e, "storage error");
    }
    RemoteError::new(e.code(), e.to_string())
}

fn volume_info(replica: &Replica) -> VolumeInfo {
    VolumeInfo {
        name: replica.name().to_string(),
        size: replica.size(),
        generation: replica.generation(),
    }
}

#[cfg(test)]
mod tests {
    //! The in-process sessions hosted engines use: the same fencing, dirty
    //! map and data as a connection, with requests as calls.

    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::storage::{open_io, IoEngineChoice};

    const SIZE: u64 = 4 * REGION_SIZE;

    async fn daemon(dir: &std::path::Path) -> Arc<dyn LocalService> {
        let io = open_io(IoEngineChoice::Auto).unwrap();
        let store = Arc::new(Store::open(dir, io).unwrap());
        store
            .create_volume(&VolumeName::new("vol").unwrap(), SIZE)
            .await
            .unwrap();
        Server::new(store, ServerConfig::default()).local_service()
    }

    async fn session(service: &Arc<dyn LocalService>, generation: u64) -> Arc<dyn LocalSession> {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            client: format!("test engine {generation}"),
            volume: "vol".into(),
            generation: Generation(generation),
        };
        let (welcome, session) = service.hello(hello).await.unwrap();
        assert_eq!(welcome.volume.unwrap().generation, Generation(generation));
        session
    }

    fn write(offset: u64, byte: u8) -> Request {
        Request::Write {
            offset,
            fua: false,
            data: Bytes::from(vec![byte; 4096]),
        }
    }

    async fn read(session: &Arc<dyn LocalSession>, offset: u64) -> Bytes {
        match session.start(Request::Read { offset, len: 4096 }).await {
            Reply::Data(d) => d,
            other => panic!("read answered {other:?}"),
        }
    }

    async fn dirty_regions(session: &Arc<dyn LocalSession>) -> Vec<u64> {
        let Reply::State(st) = session.start(Request::GetState).await else {
            panic!("no state")
        };
        (0..SIZE / REGION_SIZE)
            .filter(|r| st.dirty[(r / 8) as usize] & (1 << (r % 8)) != 0)
            .collect()
    }

    #[tokio::test]
    async fn a_local_session_writes_reads_and_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let service = daemon(dir.path()).await;
        let s = session(&service, 1).await;
        assert_eq!(s.start(write(REGION_SIZE, 0xab)).await, Reply::Done);
        assert_eq!(s.start(Request::Flush).await, Reply::Done);
        assert_eq!(&read(&s, REGION_SIZE).await[..], &[0xab; 4096][..]);
        assert_eq!(&read(&s, 0).await[..], &[0u8; 4096][..]);
    }

    #[tokio::test]
    async fn a_hello_with_an_unknown_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let service = daemon(dir.path()).await;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            client: "test".into(),
            volume: "nope".into(),
            generation: Generation(1),
        };
        let Err(e) = service.hello(hello).await else {
            panic!("an unknown volume was accepted");
        };
        assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    }

    #[tokio::test]
    async fn an_older_local_session_is_fenced_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let service = daemon(dir.path()).await;
        let old = session(&service, 1).await;
        assert_eq!(old.start(write(0, 1)).await, Reply::Done);
        let new = session(&service, 2).await;
        match old.start(write(0, 9)).await {
            Reply::Error(e) => assert_eq!(e.code, ErrorCode::StaleGeneration, "{e}"),
            other => panic!("the fenced session's write answered {other:?}"),
        }
        assert_eq!(&read(&new, 0).await[..], &[1u8; 4096][..]);
    }

    #[tokio::test]
    async fn a_write_is_marked_dirty_when_started_not_when_first_polled() {
        let dir = tempfile::tempdir().unwrap();
        let service = daemon(dir.path()).await;
        let s = session(&service, 1).await;
        let pending = s.start(write(2 * REGION_SIZE, 5));
        // Asked after the write was started but answered before it ran.
        assert_eq!(dirty_regions(&s).await, vec![2]);
        assert_eq!(pending.await, Reply::Done);
    }

    #[tokio::test]
    async fn a_started_write_lands_even_if_its_caller_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let service = daemon(dir.path()).await;
        let s = session(&service, 1).await;
        drop(s.start(write(3 * REGION_SIZE, 7)));
        let landed = async {
            while read(&s, 3 * REGION_SIZE).await[0] != 7 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), landed)
            .await
            .expect("the dropped write never ran");
    }
}
