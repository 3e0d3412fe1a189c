//! A pipelined connection to one replica daemon.
//!
//! Callers issue requests from any task; each gets a fresh request id, its
//! frame is queued for a writer task that sends queued frames together in one
//! vectored write, and a reader task matches replies to waiters by id, in
//! whatever order they arrive. When the connection breaks, every waiter gets
//! an error at once and every later call fails fast: nothing ever waits on a
//! dead socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use shorthorn_proto::{
    EncodedFrame, FrameReader, FrameWriter, Generation, Hello, LocalCall, LocalService,
    LocalSession, ProtoError, RemoteError, Reply, Request, VolumeInfo, Welcome, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::debug;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to replica {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("replica {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error(
        "replica {addr} is too slow: a request waited {waited:?} for it, while it answered others"
    )]
    TooSlow { addr: String, waited: Duration },
    #[error("connection to replica {addr} is closed: {reason}")]
    Closed { addr: String, reason: String },
    #[error("replica {addr}: {error}")]
    Remote { addr: String, error: RemoteError },
    #[error("replica {addr} sent an unexpected {what}")]
    Unexpected { addr: String, what: String },
}

impl ClientError {
    /// The replica the error is about.
    pub fn addr(&self) -> &str {
        match self {
            ClientError::Connect { addr, .. }
            | ClientError::Timeout { addr, .. }
            | ClientError::TooSlow { addr, .. }
            | ClientError::Closed { addr, .. }
            | ClientError::Remote { addr, .. }
            | ClientError::Unexpected { addr, .. } => addr,
        }
    }

    /// The replica's own error, if that is what this is.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            ClientError::Remote { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// The most IO timeouts one request waits for a replica that keeps
/// answering other requests (see [`PendingCall::wait`]).
pub const SLOW_REPLICA_TIMEOUTS: u32 = 3;

type Waiter = oneshot::Sender<Result<Reply, ClientError>>;
/// A remote call's waiter, and the call's place in the order calls were
/// started ([`Shared::next_order`]).
type Pending = (Waiter, u64);
type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// Replica daemons living in this very process, by the addresses engines
/// name them with. An engine hosted by a replica daemon reaches that
/// daemon's replicas through here, in memory, and every other replica
/// (and everyone else reaching this daemon) over TCP; the requests, the
/// replies and every check the daemon makes are the same either way.
static LOCAL_REPLICAS: Mutex<Vec<(String, Arc<dyn LocalService>)>> = Mutex::new(Vec::new());

/// Makes `addrs` (the daemon's own addresses as engines will write them)
/// resolve to `service` in this process from now on.
pub fn register_local_replica(addrs: &[String], service: Arc<dyn LocalService>) {
    let mut local = LOCAL_REPLICAS.lock().unwrap();
    for addr in addrs {
        local.retain(|(a, _)| a != addr);
        local.push((addr.clone(), service.clone()));
    }
}

fn local_service(addr: &str) -> Option<Arc<dyn LocalService>> {
    LOCAL_REPLICAS
        .lock()
        .unwrap()
        .iter()
        .find(|(a, _)| a == addr)
        .map(|(_, service)| service.clone())
}

struct Shared {
    addr: String,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set once the connection is known dead; holds why.
    closed: Mutex<Option<String>>,
    is_closed: AtomicBool,
    /// When the replica last sent anything ([`clock`]).
    last_answer: AtomicU64,
    /// The TCP socket (a second descriptor of it), to ask the kernel
    /// whether the replica is taking our data; dropped with the connection.
    socket: Mutex<Option<std::os::fd::OwnedFd>>,
    /// Numbers calls in the order they were started, local or remote.
    next_order: AtomicU64,
    /// The highest such number among the calls answered so far: the
    /// replica has received (and answered) a call started after one still
    /// waiting.
    answered_order: AtomicU64,
    /// The other healthy replicas of the volume (see
    /// [`ReplicaClient::set_peers`]); weak, as theirs point back here.
    peers: Mutex<Vec<std::sync::Weak<Shared>>>,
    /// The replica is a daemon in this process: its connection cannot fall
    /// silent while the engine runs, so it is never pinged.
    local: bool,
    /// Asks the volume's pinger to ping every replica now (see
    /// [`ReplicaClient::set_peers`]).
    ping_peers: Mutex<Option<Arc<tokio::sync::Notify>>>,
}

/// Nanoseconds since this process first asked: an instant an atomic holds.
fn clock() -> u64 {
    clock_at(std::time::Instant::now())
}

/// `at` as a [`clock`] reading (0 if before the first).
fn clock_at(at: std::time::Instant) -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    at.saturating_duration_since(*BASE.get_or_init(std::time::Instant::now))
        .as_nanos() as u64
}

impl Shared {
    fn new(addr: &str, closed: bool, local: bool) -> Shared {
        Shared {
            addr: addr.to_string(),
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            is_closed: AtomicBool::new(closed),
            last_answer: AtomicU64::new(clock()),
            socket: Mutex::new(None),
            next_order: AtomicU64::new(1),
            answered_order: AtomicU64::new(0),
            peers: Mutex::new(Vec::new()),
            local,
            ping_peers: Mutex::new(None),
        }
    }

    fn answered(&self) {
        self.last_answer.store(clock(), Ordering::Relaxed);
    }

    /// Notes that the call numbered `order` was answered.
    fn answered_call(&self, order: u64) {
        self.answered_order.fetch_max(order, Ordering::Relaxed);
    }

    /// Whether another healthy replica, its connection open, has answered
    /// anything since `since` (a [`clock`] reading): the volume is being
    /// served without this one. None if none has; else whether one of them
    /// is also known alive now (always, without `alive_after`): in this
    /// process, or having answered after that reading too. One that
    /// answered since `since` and then fell silent may be gone, its silence
    /// not noticed yet.
    fn others_serving_since(&self, since: u64, alive_after: Option<u64>) -> Option<bool> {
        let peers = self.peers.lock().unwrap();
        let serving = peers
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|p| !p.is_closed.load(Ordering::Acquire))
            .filter_map(|p| {
                let last = p.last_answer.load(Ordering::Relaxed);
                (last > since).then(|| alive_after.is_none_or(|after| p.local || last > after))
            });
        serving.reduce(|a, b| a || b)
    }

    /// Asks for the other replicas to be pinged now.
    fn ask_peers_to_answer(&self) {
        if let Some(ping) = self.ping_peers.lock().unwrap().as_ref() {
            ping.notify_one();
        }
    }

    /// How long the replica has sent nothing.
    fn quiet_for(&self) -> Duration {
        let last = self.last_answer.load(Ordering::Relaxed);
        Duration::from_nanos(clock().saturating_sub(last))
    }

    /// Whether the replica's node has acknowledged our bytes within the
    /// last `within`, with more on their way to it: it is receiving a
    /// request too large to cross its link in one timeout.
    fn receiving(&self, within: Duration) -> bool {
        use std::os::fd::AsFd;
        self.socket
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|fd| shorthorn_proto::net::receiving(fd.as_fd(), within))
    }

    fn fail_all(&self, reason: String) {
        self.socket.lock().unwrap().take();
        let waiters: Vec<Waiter> = {
            let mut closed = self.closed.lock().unwrap();
            if closed.is_none() {
                *closed = Some(reason.clone());
            }
            self.is_closed.store(true, Ordering::Release);
            self.pending
                .lock()
                .unwrap()
                .drain()
                .map(|(_, (w, _))| w)
                .collect()
        };
        for w in waiters {
            let _ = w.send(Err(ClientError::Closed {
                addr: self.addr.clone(),
                reason: reason.clone(),
            }));
        }
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed {
            addr: self.addr.clone(),
            reason: self
                .closed
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_else(|| "closed".into()),
        }
    }
}

pub struct ReplicaClient {
    shared: Arc<Shared>,
    link: Link,
    timeout: Duration,
    welcome: Welcome,
}

/// How requests reach the replica.
enum Link {
    /// A socket, with a writer task sending queued frames and a reader task
    /// matching replies to waiters.
    Remote {
        tx: mpsc::UnboundedSender<EncodedFrame>,
        next_id: AtomicU64,
        tasks: [JoinHandle<()>; 2],
    },
    /// A daemon in this process: each request is a call.
    Local(Arc<dyn LocalSession>),
}

impl ReplicaClient {
    /// Connects and says hello. `volume` empty opens an admin session;
    /// `generation` zero opens a look-only volume session.
    pub async fn connect(
        addr: &str,
        client: &str,
        volume: &str,
        generation: Generation,
        timeout: Duration,
    ) -> Result<ReplicaClient, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            client: client.to_string(),
            volume: volume.to_string(),
            generation,
        };
        let service = local_service(addr);
        let shared = Arc::new(Shared::new(addr, false, service.is_some()));
        let refused = |error| ClientError::Remote {
            addr: addr.to_string(),
            error,
        };
        if let Some(service) = service {
            let (welcome, session) = tokio::time::timeout(timeout, service.hello(hello))
                .await
                .map_err(|_| connect_err(format!("no handshake answer within {timeout:?}")))?
                .map_err(refused)?;
            return Ok(ReplicaClient {
                shared,
                link: Link::Local(session),
                timeout,
                welcome,
            });
        }

        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(format!("no answer within {timeout:?}")))?
            .map_err(|e| connect_err(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| connect_err(e.to_string()))?;
        // Without it, only answers count as signs of life.
        *shared.socket.lock().unwrap() =
            std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned().ok();
        let (rd, wr) = stream.into_split();
        let mut reader: FrameReader<BoxRead> = FrameReader::new(Box::new(rd));
        let mut writer: FrameWriter<BoxWrite> = FrameWriter::new(Box::new(wr));
        let handshake = async {
            writer.write_frame(&Request::Hello(hello).encode(0)).await?;
            match reader.read_frame().await? {
                Some(frame) => Reply::decode(&frame),
                None => Err(ProtoError::Truncated),
            }
        };
        let reply = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| connect_err(format!("no handshake answer within {timeout:?}")))?
            .map_err(|e| connect_err(e.to_string()))?;
        let welcome = match reply {
            Reply::Welcome(w) => w,
            Reply::Error(error) => return Err(refused(error)),
            other => {
                return Err(connect_err(format!(
                    "unexpected handshake answer {other:?}"
                )))
            }
        };

        // The welcome counts: the replica has answered.
        shared.answered();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader_task = tokio::spawn(read_replies(reader, shared.clone()));
        let writer_task = tokio::spawn(write_requests(writer, rx, shared.clone()));
        Ok(ReplicaClient {
            shared,
            link: Link::Remote {
                tx,
                next_id: AtomicU64::new(1),
                tasks: [reader_task, writer_task],
            },
            timeout,
            welcome,
        })
    }

    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The bound volume as the replica described it in its welcome.
    pub fn volume(&self) -> Option<&VolumeInfo> {
        self.welcome.volume.as_ref()
    }

    /// Whether the replica is in this process (a hosted engine's own
    /// daemon), reached by calls rather than a socket.
    pub fn is_local(&self) -> bool {
        matches!(self.link, Link::Local(_))
    }

    pub fn is_closed(&self) -> bool {
        self.shared.is_closed.load(Ordering::Acquire)
    }

    /// Sends one request and waits for its reply, at most the IO timeout.
    /// A replica's error answer comes back as [`ClientError::Remote`].
    pub async fn call(&self, request: Request) -> Result<Reply, ClientError> {
        self.start(request).wait().await
    }

    /// Queues one request now (synchronously: requests started one after
    /// another go out on the wire in that order) and returns the reply to
    /// wait for. Ordering matters to the dirty map: a clean queued before a
    /// write must reach the replica before it.
    pub fn start(&self, request: Request) -> PendingCall {
        if self.is_closed() {
            return PendingCall::failed(self.shared.closed_error());
        }
        let order = self.shared.next_order.fetch_add(1, Ordering::Relaxed);
        let (tx, next_id) = match &self.link {
            Link::Local(session) => {
                return PendingCall {
                    state: Ok(Waiting::Local(session.start(request))),
                    shared: self.shared.clone(),
                    timeout: self.timeout,
                    queued: Queued::now(order),
                }
            }
            Link::Remote { tx, next_id, .. } => (tx, next_id),
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let (wtx, wrx) = oneshot::channel();
        self.shared.pending.lock().unwrap().insert(id, (wtx, order));
        // Checked again after registering, so a close racing with this call
        // either drained our waiter or is seen here.
        if self.is_closed() || tx.send(request.encode(id)).is_err() {
            self.shared.pending.lock().unwrap().remove(&id);
            return PendingCall::failed(self.shared.closed_error());
        }
        PendingCall {
            state: Ok(Waiting::Remote(id, wrx)),
            shared: self.shared.clone(),
            timeout: self.timeout,
            queued: Queued::now(order),
        }
    }

    /// Like [`call`](Self::call), expecting [`Reply::Done`].
    pub async fn call_done(&self, request: Request) -> Result<(), ClientError> {
        self.start(request).done().await
    }

    pub fn unexpected(&self, reply: &Reply) -> ClientError {
        unexpected(&self.shared.addr, reply)
    }

    /// The volume's other healthy replicas. A request that waits
    /// [`SLOW_REPLICA_TIMEOUTS`] timeouts for this replica while one of them
    /// answered gives it up as too slow: the volume goes on at their speed.
    /// With none serving, giving up would only turn a slow write into a
    /// failed one, so the request waits as long as the replica works
    /// through what came before it (see [`PendingCall::wait`]). The
    /// other one counts as serving only while it still answers: past its
    /// limit, a request asks through `ping` for every replica to be pinged,
    /// and gives this one up once the other has answered (or at once if
    /// the other is a daemon in this process).
    pub fn set_peers(&self, peers: &[&ReplicaClient], ping: &Arc<tokio::sync::Notify>) {
        *self.shared.peers.lock().unwrap() =
            peers.iter().map(|c| Arc::downgrade(&c.shared)).collect();
        *self.shared.ping_peers.lock().unwrap() = Some(ping.clone());
    }

    /// Closes the connection now: later calls fail at once, and so do
    /// calls in flight on a socket. Calls in flight to a daemon in this
    /// process finish first (their IO is already under way here).
    pub fn close(&self, reason: &str) {
        self.shared.fail_all(reason.to_string());
        self.abort_tasks();
    }

    fn abort_tasks(&self) {
        if let Link::Remote { tasks, .. } = &self.link {
            for t in tasks {
                t.abort();
            }
        }
    }
}

/// A reply that is not the kind the request calls for.
fn unexpected(addr: &str, reply: &Reply) -> ClientError {
    ClientError::Unexpected {
        addr: addr.to_string(),
        what: format!("{reply:?}").chars().take(120).collect(),
    }
}

/// A request on its way, waiting for its reply.
pub struct PendingCall {
    state: Result<Waiting, ClientError>,
    shared: Arc<Shared>,
    timeout: Duration,
    /// When it was started, and its place among its client's calls.
    queued: Queued,
}

enum Waiting {
    /// Sent with this id; the reader task answers through the channel.
    Remote(u64, oneshot::Receiver<Result<Reply, ClientError>>),
    /// Running in this process.
    Local(LocalCall),
}

impl PendingCall {
    fn failed(e: ClientError) -> PendingCall {
        PendingCall {
            state: Err(e),
            shared: Arc::new(Shared::new("", true, false)),
            timeout: Duration::ZERO,
            queued: Queued::now(0),
        }
    }

    /// The reply, or an error once the replica has been silent for the IO
    /// timeout since this wait began (not counting time this process was
    /// not running: see [`within`]). A replica that answered other
    /// requests within the last timeout, or whose node is still taking in
    /// the bytes of a large request, is slow, not gone
    /// (a slow link, a busy disk; its answers come in order of its work, and
    /// ours may be behind megabytes of others): the request waits on, but
    /// at most [`SLOW_REPLICA_TIMEOUTS`] timeouts after it was queued if
    /// another healthy replica answered meanwhile and still answers then
    /// ([`ReplicaClient::set_peers`]: it is pinged at once to find out).
    /// With none, it waits as long as the replica works through what came
    /// before it, and at most [`SLOW_REPLICA_TIMEOUTS`] timeouts after the
    /// replica first answered a request started after it (then it is stuck
    /// at the replica, not behind the link). So a
    /// replica behind a slow link stays in the volume, which is then as
    /// slow as that link, instead of being dropped and rebuilt over and
    /// over; a replica that falls silent is still given up one timeout
    /// after its last answer. A replica's error answer comes back as
    /// [`ClientError::Remote`].
    ///
    /// Not an async fn, whose arguments its future would hold twice: every
    /// write waits through this.
    pub fn wait(self) -> impl std::future::Future<Output = Result<Reply, ClientError>> + Send {
        let PendingCall {
            state,
            shared,
            timeout,
            queued,
        } = self;
        async move {
            let reply = match state? {
                Waiting::Local(call) => {
                    let reply = within(call, timeout, &shared, queued).await?;
                    shared.answered();
                    shared.answered_call(queued.order);
                    reply
                }
                Waiting::Remote(id, wrx) => match within(wrx, timeout, &shared, queued).await {
                    Ok(Ok(result)) => result?,
                    Ok(Err(_)) => return Err(shared.closed_error()),
                    Err(e) => {
                        shared.pending.lock().unwrap().remove(&id);
                        return Err(e);
                    }
                },
            };
            match reply {
                Reply::Error(error) => Err(ClientError::Remote {
                    addr: shared.addr.clone(),
                    error,
                }),
                reply => Ok(reply),
            }
        }
    }

    /// Like [`wait`](Self::wait), expecting [`Reply::Done`].
    ///
    /// Not an async fn: every write waits through this, and mapping the
    /// wait keeps its future no larger than the wait's own.
    pub fn done(self) -> impl std::future::Future<Output = Result<(), ClientError>> + Send {
        let shared = self.shared.clone();
        self.wait().map(move |reply| match reply? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&shared.addr, &other)),
        })
    }
}

/// A gap longer than this between two ticks of the process's clock
/// ([`Stalls`]) means the process was not running: a suspended laptop, a
/// paused VM, SIGSTOP.
const STALL: Duration = Duration::from_millis(500);
const STALL_TICK: Duration = Duration::from_millis(100);

/// When this process last ran, and when its last stall (see [`STALL`])
/// ended: a timer that fires after such a stall says nothing about the
/// replica, whose answer may be waiting unread in a socket. Kept by a
/// thread of its own, so it sees the whole process stop, whatever runtime
/// the engine runs on.
struct Stalls {
    last_tick: std::time::Instant,
    last_stall_end: Option<std::time::Instant>,
}

static STALLS: Mutex<Option<Stalls>> = Mutex::new(None);

/// Starts, once per process, the thread that notices stalls.
fn watch_stalls() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        *STALLS.lock().unwrap() = Some(Stalls {
            last_tick: std::time::Instant::now(),
            last_stall_end: None,
        });
        let spawned = std::thread::Builder::new()
            .name("stall-watch".into())
            .spawn(|| loop {
                std::thread::sleep(STALL_TICK);
                let now = std::time::Instant::now();
                let mut guard = STALLS.lock().unwrap();
                let Some(s) = guard.as_mut() else { return };
                if now.saturating_duration_since(s.last_tick) > STALL {
                    s.last_stall_end = Some(now);
                }
                s.last_tick = now;
            });
        if spawned.is_err() {
            // Without it no stall is ever seen: timeouts count as before.
            *STALLS.lock().unwrap() = None;
        }
    });
}

/// Whether this process stalled at some point after `since`, or is only
/// now running again after one.
fn stalled_since(since: std::time::Instant) -> bool {
    let now = std::time::Instant::now();
    STALLS.lock().unwrap().as_ref().is_some_and(|s| {
        now.saturating_duration_since(s.last_tick) > STALL
            || s.last_stall_end.is_some_and(|end| end > since)
    })
}

/// When a call was started, and its place in the order of its client's
/// calls.
#[derive(Clone, Copy)]
struct Queued {
    at: std::time::Instant,
    order: u64,
}

impl Queued {
    fn now(order: u64) -> Queued {
        Queued {
            at: std::time::Instant::now(),
            order,
        }
    }
}

/// `fut`, a request to the replica of `shared` started at `queued`, for
/// as long as the replica seems alive: until it has answered nothing for
/// `timeout` (at least `timeout` from now) and is not receiving a large
/// request either (its node acknowledging our bytes), or has kept the
/// request waiting [`SLOW_REPLICA_TIMEOUTS`] timeouts while answering
/// others. Those timeouts count from when the request was queued if
/// another healthy replica answered since (this one is too slow for the
/// volume; given up only once that one has answered after the timeouts
/// ran out too, or is in this process: proof that it is still there to
/// serve), and otherwise only from when this replica first answered a
/// request started after it (this one is stuck at the replica). A deadline
/// that passes while this process was stalled gives the replica a whole
/// new start, counted from now: otherwise a laptop waking from suspend,
/// or a VM resumed, would drop every replica (their answers unread) and
/// fail the IO in flight with EIO.
#[allow(clippy::manual_async_fn)] // see the comment in its body
fn within<'a, F: std::future::Future + Unpin + 'a>(
    mut fut: F,
    timeout: Duration,
    shared: &'a Shared,
    queued: Queued,
) -> impl std::future::Future<Output = Result<F::Output, ClientError>> + 'a {
    // An async block, not an async fn, so its future holds the arguments
    // once: every call waits through this.
    async move {
        watch_stalls();
        let limit = timeout * SLOW_REPLICA_TIMEOUTS;
        // When the wait began, moved past any stall of this process.
        let mut since = queued.at;
        // When the replica was first seen past this request.
        let mut passed: Option<std::time::Instant> = None;
        let mut wait = timeout;
        loop {
            let started = std::time::Instant::now();
            if let Ok(out) = tokio::time::timeout(wait, &mut fut).await {
                return Ok(out);
            }
            let now = std::time::Instant::now();
            if stalled_since(started) {
                debug!("a deadline passed while this process was stalled; waiting again");
                since = now;
                passed = passed.and(Some(now));
                wait = timeout;
                continue;
            }
            let quiet = shared.quiet_for();
            // Silent, unless it is still receiving a large request: then it is
            // looked at again in half a timeout.
            let next = if quiet < timeout {
                timeout - quiet
            } else if shared.receiving(timeout) {
                timeout / 2
            } else {
                let addr = shared.addr.clone();
                return Err(ClientError::Timeout { addr, timeout });
            };
            if passed.is_none() && shared.answered_order.load(Ordering::Relaxed) > queued.order {
                passed = Some(now);
            }
            // Too slow beside another replica: one that answered since this
            // request was queued and, once the limit has passed, after that
            // too. One silent since may be gone unnoticed (nothing of its own
            // in flight), and giving this replica up would then leave the
            // volume none. So it is pinged at once (asked again at every
            // look: the asks fold into one); until it answers, or is dropped
            // for its silence, this one is judged as if alone and looked at
            // every eighth of a timeout.
            let queued_at = clock_at(queued.at);
            let over = since + limit;
            let alive_after = (now >= over).then(|| clock_at(over));
            let serving = shared.others_serving_since(queued_at, alive_after);
            let beside = serving == Some(true);
            let recheck = if serving == Some(false) {
                shared.ask_peers_to_answer();
                timeout / 8
            } else {
                Duration::MAX
            };
            let counting_from = if beside {
                since
            } else if let Some(passed) = passed {
                passed.max(since)
            } else {
                // Alone, and working through what came before this request.
                wait = next.min(recheck);
                continue;
            };
            let counted = now.saturating_duration_since(counting_from);
            if counted >= limit {
                let addr = shared.addr.clone();
                let waited = now.saturating_duration_since(since);
                return Err(ClientError::TooSlow { addr, waited });
            }
            wait = next.min(limit - counted).min(recheck);
        }
    }
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        // The second descriptor would keep the socket open after the
        // connection's tasks end (calls still waiting hold `shared`).
        self.shared.socket.lock().unwrap().take();
        self.abort_tasks();
    }
}

async fn read_replies(mut reader: FrameReader<BoxRead>, shared: Arc<Shared>) {
    let reason = loop {
        let frame = match reader.read_frame().await {
            Ok(Some(f)) => {
                shared.answered();
                f
            }
            Ok(None) => break "replica closed the connection".to_string(),
            Err(e) => break format!("receive failed: {e}"),
        };
        let reply = match Reply::decode(&frame) {
            Ok(r) => r,
            Err(e) => break format!("undecodable reply: {e}"),
        };
        let waiter = shared.pending.lock().unwrap().remove(&frame.id);
        match waiter {
            Some((w, order)) => {
                shared.answered_call(order);
                let _ = w.send(Ok(reply));
            }
            // A reply to a request that timed out: nobody waits any more.
            None if frame.id != 0 => debug!(id = frame.id, "late reply dropped"),
            // Id 0 is the replica speaking about the connection itself
            // (it is about to close it).
            None => {
                if let Reply::Error(e) = reply {
                    break format!("replica closed the connection: {e}");
                }
            }
        }
    };
    debug!(addr = %shared.addr, %reason, "replica connection ended");
    shared.fail_all(reason);
}

async fn write_requests(
    mut writer: FrameWriter<BoxWrite>,
    mut rx: mpsc::UnboundedReceiver<EncodedFrame>,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        if let Err(e) = writer.write_frames(&batch).await {
            shared.fail_all(format!("send failed: {e}"));
            return;
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    //! The client against a fake replica on a loopback socket that holds
    //! every request until all of them are in, then answers them last
    //! first: only a client that pipelines and matches replies by id passes.

    use super::*;
    use bytes::Bytes;
    use tokio::net::TcpListener;

    const CALLS: u64 = 32;
    /// A whole test, fake replica included, must finish within this.
    const LIMIT: Duration = Duration::from_secs(20);

    /// The `i`th request of a test: mostly reads, each of its own offset,
    /// with a ping now and then.
    fn request(i: u64) -> Request {
        if i % 4 == 3 {
            Request::Ping
        } else {
            Request::Read {
                offset: i * 4096,
                len: 512,
            }
        }
    }

    /// What the fake replica answers a read at `offset`: bytes naming it.
    fn data_at(offset: u64) -> Bytes {
        Bytes::from(offset.to_le_bytes().repeat(64))
    }

    /// The reply `request(i)` must get.
    fn reply_to(i: u64) -> Reply {
        match request(i) {
            Request::Read { offset, .. } => Reply::Data(data_at(offset)),
            _ => Reply::Pong,
        }
    }

    /// A fake replica: welcomes one client, reads `n` requests without
    /// answering any, answers them in reverse order of arrival, then waits
    /// for the client to hang up. Returns the requests as they arrived.
    async fn reversing_replica(listener: TcpListener, n: u64) -> Vec<(u64, Request)> {
        let (stream, _) = listener.accept().await.unwrap();
        let (rd, wr) = stream.into_split();
        let mut reader = FrameReader::new(rd);
        let mut writer = FrameWriter::new(wr);
        let hello = reader.read_frame().await.unwrap().expect("no hello");
        assert!(matches!(Request::decode(&hello), Ok(Request::Hello(_))));
        let welcome = Reply::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            server: "fake replica".into(),
            volume: None,
        });
        writer.write_frame(&welcome.encode(hello.id)).await.unwrap();

        let mut arrived = Vec::new();
        while (arrived.len() as u64) < n {
            let frame = reader
                .read_frame()
                .await
                .unwrap()
                .expect("the client hung up with requests unsent");
            arrived.push((frame.id, Request::decode(&frame).unwrap()));
        }
        for (id, request) in arrived.iter().rev() {
            let reply = match request {
                Request::Read { offset, .. } => Reply::Data(data_at(*offset)),
                Request::Ping => Reply::Pong,
                other => panic!("the fake replica does not expect {other:?}"),
            };
            writer.write_frame(&reply.encode(*id)).await.unwrap();
        }
        // Nothing more may come: no retry, no duplicate.
        match reader.read_frame().await {
            Ok(None) => {}
            other => panic!("after its last reply the client sent {other:?}"),
        }
        arrived
    }

    async fn fake_and_client() -> (JoinHandle<Vec<(u64, Request)>>, ReplicaClient) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = tokio::spawn(reversing_replica(listener, CALLS));
        let client = ReplicaClient::connect(&addr, "test", "v", Generation(1), LIMIT)
            .await
            .unwrap();
        (fake, client)
    }

    /// Every request id on the wire is distinct.
    fn assert_ids_distinct(arrived: &[(u64, Request)]) {
        let mut ids: Vec<u64> = arrived.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), arrived.len(), "request ids reused: {arrived:?}");
    }

    /// Requests started one after another from one task go out in that
    /// order, all before any reply, and each pending call resolves to its
    /// own reply although they come back in reverse.
    #[tokio::test]
    async fn started_calls_go_out_in_order_and_take_their_own_replies() {
        tokio::time::timeout(LIMIT, async {
            let (fake, client) = fake_and_client().await;
            let pending: Vec<PendingCall> = (0..CALLS).map(|i| client.start(request(i))).collect();
            for (i, call) in (0..CALLS).zip(pending) {
                assert_eq!(call.wait().await.unwrap(), reply_to(i), "call {i}");
            }
            drop(client);
            let arrived = fake.await.unwrap();
            let sent: Vec<Request> = arrived.iter().map(|(_, r)| r.clone()).collect();
            let started: Vec<Request> = (0..CALLS).map(request).collect();
            assert_eq!(sent, started, "requests went out in another order");
            assert_ids_distinct(&arrived);
        })
        .await
        .expect("the pipelined calls hung");
    }

    /// Callers in tasks of their own, all waiting at once: each gets the
    /// reply to its own request.
    #[tokio::test]
    async fn concurrent_callers_each_get_their_own_reply() {
        tokio::time::timeout(LIMIT, async {
            let (fake, client) = fake_and_client().await;
            let client = Arc::new(client);
            let callers: Vec<_> = (0..CALLS)
                .map(|i| {
                    let client = client.clone();
                    tokio::spawn(async move { (i, client.call(request(i)).await) })
                })
                .collect();
            for caller in callers {
                let (i, got) = caller.await.unwrap();
                assert_eq!(got.unwrap(), reply_to(i), "caller {i}");
            }
            drop(client);
            let arrived = fake.await.unwrap();
            assert_ids_distinct(&arrived);
            let mut sent: Vec<String> = arrived.iter().map(|(_, r)| format!("{r:?}")).collect();
            let mut asked: Vec<String> = (0..CALLS).map(|i| format!("{:?}", request(i))).collect();
            sent.sort();
            asked.sort();
            assert_eq!(
                sent, asked,
                "the requests on the wire are not the ones asked"
            );
        })
        .await
        .expect("the concurrent calls hung");
    }

    /// A fake replica's start: accepts one client and answers its hello.
    async fn welcome_one_client(
        listener: TcpListener,
    ) -> (
        FrameReader<tokio::net::tcp::OwnedReadHalf>,
        FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    ) {
        let (stream, _) = listener.accept().await.unwrap();
        let (rd, wr) = stream.into_split();
        let mut reader = FrameReader::new(rd);
        let mut writer = FrameWriter::new(wr);
        let hello = reader.read_frame().await.unwrap().expect("no hello");
        let welcome = Reply::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            server: "fake replica".into(),
            volume: None,
        });
        writer.write_frame(&welcome.encode(hello.id)).await.unwrap();
        (reader, writer)
    }

    /// A fake replica that welcomes one client, then answers its pings at
    /// once and holds every other request unanswered, until it hangs up.
    async fn ping_only_replica(listener: TcpListener) {
        let (mut reader, mut writer) = welcome_one_client(listener).await;
        while let Ok(Some(frame)) = reader.read_frame().await {
            if let Ok(Request::Ping) = Request::decode(&frame) {
                writer
                    .write_frame(&Reply::Pong.encode(frame.id))
                    .await
                    .unwrap();
            }
        }
    }

    /// With `serving`, gives `client` a healthy peer replica that answers
    /// something every 50 ms from now until `until` has passed; without,
    /// the client's replica is its volume's only healthy one.
    fn peer_serving(client: &ReplicaClient, serving: bool, until: Duration) {
        if serving {
            peer_answering(client, &[(Duration::ZERO, until)]);
        }
    }

    /// Gives `client` a healthy peer replica (on another node) that answers
    /// something every 50 ms within each of `windows` (from, until; counted
    /// from now) and is silent between and after them. It stays in the
    /// volume's healthy set for the test's [`LIMIT`].
    fn peer_answering(client: &ReplicaClient, windows: &[(Duration, Duration)]) {
        let peer = Arc::new(Shared::new("peer", false, false));
        client
            .shared
            .peers
            .lock()
            .unwrap()
            .push(Arc::downgrade(&peer));
        let started = std::time::Instant::now();
        let windows = windows.to_vec();
        tokio::spawn(async move {
            while started.elapsed() < LIMIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let at = started.elapsed();
                if windows
                    .iter()
                    .any(|&(from, until)| at >= from && at < until)
                {
                    peer.answered();
                }
            }
        });
    }

    /// Starts a read the fake never answers while another task pings it
    /// every 50 ms for `pinging` (answered at once); returns how the read
    /// ended and after how long. `serving`: another healthy replica serves
    /// the volume meanwhile ([`peer_serving`]).
    async fn held_read_while_pinging(
        timeout: Duration,
        pinging: Duration,
        serving: bool,
    ) -> (Result<Reply, ClientError>, Duration) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = tokio::spawn(ping_only_replica(listener));
        let client = ReplicaClient::connect(&addr, "test", "v", Generation(1), timeout)
            .await
            .unwrap();
        peer_serving(&client, serving, LIMIT);
        let client = Arc::new(client);
        let started = std::time::Instant::now();
        let read = client.start(Request::Read {
            offset: 0,
            len: 512,
        });
        let pinger = {
            let client = client.clone();
            tokio::spawn(async move {
                while started.elapsed() < pinging {
                    client.call(Request::Ping).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let result = read.wait().await;
        let took = started.elapsed();
        pinger.await.unwrap();
        drop(client);
        fake.await.unwrap();
        (result, took)
    }

    const T: Duration = Duration::from_millis(400);

    /// `result` gave the replica up as too slow, between `limit` and a
    /// timeout after it.
    fn assert_too_slow_after<R: std::fmt::Debug>(
        result: &Result<R, ClientError>,
        took: Duration,
        limit: Duration,
    ) {
        assert!(
            matches!(result, Err(ClientError::TooSlow { .. })),
            "{result:?}"
        );
        assert!(took >= limit && took < limit + T, "gave up after {took:?}");
    }

    /// A fake replica with a small receive buffer that welcomes one client,
    /// then reads its first request 64 KiB at a time with `pause` between
    /// reads, stopping for good after `stop_after` bytes if given, and
    /// answers it Done once it is whole.
    async fn slow_reading_replica(
        listener: TcpListener,
        pause: Duration,
        stop_after: Option<usize>,
    ) {
        use tokio::io::AsyncReadExt;
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 4096];
        let mut got = 0usize;
        let mut hello = Vec::new();
        // The hello fits in the first read; the welcome goes back at once.
        let n = stream.read(&mut head).await.unwrap();
        hello.extend_from_slice(&head[..n]);
        let mut reader = FrameReader::new(&hello[..]);
        let frame = reader.read_frame().await.unwrap().expect("no hello");
        let welcome = Reply::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            server: "fake replica".into(),
            volume: None,
        });
        let (rd, wr) = stream.into_split();
        let mut writer = FrameWriter::new(wr);
        writer.write_frame(&welcome.encode(frame.id)).await.unwrap();
        let mut rd = rd;
        let mut chunk = vec![0u8; 64 << 10];
        let mut request = Vec::new();
        loop {
            if stop_after.is_some_and(|limit| got >= limit) {
                // Stops reading, connection open: its window closes.
                tokio::time::sleep(LIMIT).await;
                return;
            }
            let n = rd.read(&mut chunk).await.unwrap();
            if n == 0 {
                return;
            }
            got += n;
            request.extend_from_slice(&chunk[..n]);
            let mut whole = FrameReader::new(&request[..]);
            if let Ok(Some(frame)) = whole.read_frame().await {
                writer
                    .write_frame(&Reply::Done.encode(frame.id))
                    .await
                    .unwrap();
                // The client hangs up when done.
                let _ = rd.read(&mut chunk).await;
                return;
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Sends one 4 MiB write to a [`slow_reading_replica`]; how it ended
    /// and after how long.
    async fn large_write_to_slow_reader(
        pause: Duration,
        stop_after: Option<usize>,
    ) -> (Result<(), ClientError>, Duration) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 << 10).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = tokio::spawn(slow_reading_replica(listener, pause, stop_after));
        let client = ReplicaClient::connect(&addr, "test", "v", Generation(1), T)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let write = Request::Write {
            offset: 0,
            fua: false,
            data: Bytes::from(vec![7u8; 4 << 20]),
        };
        let result = client.start(write).done().await;
        let took = started.elapsed();
        drop(client);
        fake.abort();
        (result, took)
    }

    /// A replica that stops taking a request in the middle (its process
    /// stopped; the connection open, its window closed) is given up like a
    /// silent one, about a timeout later: its node acknowledged bytes, but
    /// none are on their way any more. (A slow link, where bytes are on
    /// their way and acknowledged as they arrive, needs a real link: see
    /// tests/partition.rs.)
    #[tokio::test]
    async fn a_replica_that_stops_taking_a_request_is_given_up() {
        let (result, took) =
            large_write_to_slow_reader(Duration::from_millis(20), Some(1 << 20)).await;
        assert!(
            matches!(result, Err(ClientError::Timeout { .. })),
            "after {took:?}: {result:?}"
        );
        assert!(took < T * SLOW_REPLICA_TIMEOUTS, "gave up after {took:?}");
    }

    /// A replica that answers nothing is given up one IO timeout after
    /// the request.
    #[tokio::test]
    async fn a_silent_replica_is_given_up_after_one_timeout() {
        let (result, took) = held_read_while_pinging(T, Duration::ZERO, false).await;
        assert!(
            matches!(result, Err(ClientError::Timeout { .. })),
            "{result:?}"
        );
        assert!(took >= T && took < 2 * T, "gave up after {took:?}");
    }

    /// A replica that answers other requests is slow, not gone: the
    /// request waits until the replica has been silent for a whole IO
    /// timeout (here: pings answered for 600 ms, then none).
    #[tokio::test]
    async fn a_replica_answering_others_is_waited_for_until_it_falls_silent() {
        let pinging = Duration::from_millis(600);
        let (result, took) = held_read_while_pinging(T, pinging, true).await;
        assert!(
            matches!(result, Err(ClientError::Timeout { .. })),
            "{result:?}"
        );
        // The last ping went out at most 50 ms before pinging ended.
        assert!(
            took >= pinging + T - Duration::from_millis(50),
            "gave up after {took:?}, while the replica answered until {pinging:?}"
        );
    }

    /// However busy the replica keeps answering others, one request waits
    /// at most SLOW_REPLICA_TIMEOUTS IO timeouts, then fails as too slow.
    #[tokio::test]
    async fn a_request_waits_at_most_three_timeouts_for_a_slow_replica() {
        let (result, took) = held_read_while_pinging(T, 6 * T, true).await;
        assert_too_slow_after(&result, took, T * SLOW_REPLICA_TIMEOUTS);
    }

    /// A replica left alone (no other healthy replica serving) that answers
    /// requests started after this one, and not this one, has this one
    /// stuck: it is given up three timeouts after the replica was first
    /// seen past it (at the first look, one timeout in), not kept forever.
    #[tokio::test]
    async fn alone_a_request_the_replica_has_passed_waits_three_timeouts_more() {
        let (result, took) = held_read_while_pinging(T, 8 * T, false).await;
        assert_too_slow_after(&result, took, T * (SLOW_REPLICA_TIMEOUTS + 1));
    }

    /// A fake replica that welcomes one client, then answers its requests
    /// one at a time, in the order they came, `gap` apart: a replica behind
    /// a slow link, where each request waits for all those before it.
    async fn in_order_replica(listener: TcpListener, gap: Duration) {
        let (mut reader, mut writer) = welcome_one_client(listener).await;
        while let Ok(Some(frame)) = reader.read_frame().await {
            tokio::time::sleep(gap).await;
            let reply = match Request::decode(&frame) {
                Ok(Request::Read { len, .. }) => Reply::Data(Bytes::from(vec![0; len as usize])),
                _ => Reply::Pong,
            };
            if writer.write_frame(&reply.encode(frame.id)).await.is_err() {
                return;
            }
        }
    }

    /// Starts 15 pings, then a read, to an [`in_order_replica`] answering
    /// one every half timeout: the read's answer comes after 8 timeouts,
    /// with the replica answering all along. A peer replica answers within
    /// `peer_windows` ([`peer_answering`]); none if empty. How it ended,
    /// when, and whether the peers were asked to answer (pinged).
    async fn read_behind_a_backlog(
        peer_windows: &[(Duration, Duration)],
    ) -> (Result<Reply, ClientError>, Duration, bool) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = tokio::spawn(in_order_replica(listener, T / 2));
        let client = ReplicaClient::connect(&addr, "test", "v", Generation(1), T)
            .await
            .unwrap();
        if !peer_windows.is_empty() {
            peer_answering(&client, peer_windows);
        }
        let ping = Arc::new(tokio::sync::Notify::new());
        *client.shared.ping_peers.lock().unwrap() = Some(ping.clone());
        let started = std::time::Instant::now();
        let backlog: Vec<PendingCall> = (0..15).map(|_| client.start(Request::Ping)).collect();
        let read = client.start(Request::Read {
            offset: 0,
            len: 512,
        });
        let result = read.wait().await;
        let took = started.elapsed();
        drop(backlog);
        drop(client);
        fake.abort();
        let asked = tokio::time::timeout(Duration::ZERO, ping.notified())
            .await
            .is_ok();
        (result, took, asked)
    }

    /// The volume's only healthy replica, behind a link that makes every
    /// request wait for all those before it, is waited for however long
    /// that takes while it answers: dropping it would only turn slow IO
    /// into failed IO.
    #[tokio::test]
    async fn alone_a_replica_working_through_a_backlog_is_waited_for() {
        let (result, took, _) = read_behind_a_backlog(&[]).await;
        assert!(matches!(result, Ok(Reply::Data(_))), "{result:?}");
        assert!(took >= 7 * T, "answered after {took:?}: no backlog");
    }

    /// The same replica while another healthy replica serves the volume is
    /// too slow for it: given up three timeouts after the request.
    #[tokio::test]
    async fn a_replica_working_through_a_backlog_is_too_slow_beside_a_serving_one() {
        let (result, took, _) = read_behind_a_backlog(&[(Duration::ZERO, LIMIT)]).await;
        assert_too_slow_after(&result, took, T * SLOW_REPLICA_TIMEOUTS);
    }

    /// The same, but the serving replica falls silent before the request
    /// has waited three timeouts (its node lost power, say, with nothing
    /// of its own in flight): it may be gone, its silence not noticed yet,
    /// and giving up the slow one would leave the volume no replica. The
    /// slow one is waited for as if alone, and answers.
    #[tokio::test]
    async fn a_slow_replica_is_kept_while_the_one_serving_beside_it_is_silent() {
        let (result, took, asked) = read_behind_a_backlog(&[(Duration::ZERO, 2 * T)]).await;
        assert!(matches!(result, Ok(Reply::Data(_))), "{result:?}");
        assert!(took >= 7 * T, "answered after {took:?}: no backlog");
        assert!(asked, "the silent replica was not pinged to find out");
    }

    /// A serving replica that was only quiet (nothing to answer until its
    /// next ping) and answers again proves itself alive: the slow one is
    /// then given up as too slow within an eighth of a timeout.
    #[tokio::test]
    async fn a_slow_replica_is_too_slow_once_the_quiet_one_beside_it_answers_again() {
        let windows = [(Duration::ZERO, 2 * T), (5 * T, LIMIT)];
        let (result, took, _) = read_behind_a_backlog(&windows).await;
        assert_too_slow_after(&result, took, 5 * T);
    }
}
