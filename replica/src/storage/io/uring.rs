//! The `uring` engine: an io_uring driven from the async runtime itself.
//!
//! There is no thread of its own. A request's future, when first polled,
//! locks the ring (a `Mutex` no one else holds on the default single-thread
//! runtime), pushes its submission entry and, if it is the first of a batch,
//! kicks the driver task. The kick queues the driver behind every task
//! already runnable, so those push their entries first: a burst of 64
//! requests costs one `io_uring_enter`. Completions wake the driver through
//! the ring's own descriptor, which polls readable while completions wait
//! and is watched by tokio's reactor ([`AsyncFd`]); it reaps them and wakes
//! each request's task, on the same thread, with no channel, oneshot or
//! eventfd in between. An IO at queue depth 1 costs two syscalls here: one
//! `io_uring_enter` and the reactor's wait.
//!
//! Entering the kernel never waits for IO: with O_DIRECT files a read or
//! write is issued to the device right there and completes later; whatever
//! would block (buffered writes, fsync, allocating writes) the kernel hands
//! to its own workers. So the driver may run on the reactor (STYLE.md
//! habit 7 is about waiting, and nothing here waits).
//!
//! Every buffer and file stays owned by its [`Op`] in the ring's table until
//! its completion is reaped, whatever happens to the future: a future
//! dropped early marks its op abandoned, and the op is freed when the kernel
//! is done with it. Short reads and writes are resubmitted for the rest;
//! EINTR and EAGAIN are retried. At most [`MAX_IN_FLIGHT`] requests are in
//! the kernel; more wait in a backlog. Dropping the last [`UringIo`] lets the
//! driver finish what is in flight and exit; if the runtime itself goes away
//! with IO in the kernel, dropping the ring waits for that IO first.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::aligned::AlignedBuf;
use super::sync::punch_hole_blocking;
use super::{DiskIo, IoFuture};

const RING_ENTRIES: u32 = 256;
/// Requests in the kernel at once. Each has at most one entry in the
/// submission queue, so pushing never finds the queue full.
pub(super) const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize;
/// Largest length of one read or write entry (the kernel takes a `u32`).
const MAX_CHUNK: usize = 1 << 30;

enum Kind {
    Read { buf: AlignedBuf, done: usize },
    Write { data: Bytes, done: usize },
    Sync,
    Punch { len: u64 },
}

enum Stage {
    /// In the backlog, waiting for a slot in the kernel.
    Waiting,
    /// Its entry is in the submission queue or the kernel.
    InKernel,
    Finished(io::Result<()>),
}

/// One request. Owns its file and buffer until it completes.
struct Op {
    file: Arc<File>,
    offset: u64,
    kind: Kind,
    stage: Stage,
    waker: Option<Waker>,
    /// Its future is gone: free the op once the kernel is done with it.
    abandoned: bool,
}

/// What a completion means for its request.
enum Progress {
    /// Not finished: submit the (rest of the) request again.
    Again,
    Done(io::Result<()>),
}

impl Op {
    /// The submission entry for what is left of this request.
    fn entry(&mut self, key: usize) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match &mut self.kind {
            Kind::Read { buf, done } => {
                let n = (buf.len() - *done).min(MAX_CHUNK);
                // SAFETY (of the pointer's use by the kernel): `buf` lives in
                // the ring's table until this entry's completion is reaped.
                let ptr = buf[*done..].as_mut_ptr();
                opcode::Read::new(fd, ptr, n as u32)
                    .offset(self.offset + *done as u64)
                    .build()
            }
            Kind::Write { data, done } => {
                let n = (data.len() - *done).min(MAX_CHUNK);
                let ptr = data[*done..].as_ptr();
                opcode::Write::new(fd, ptr, n as u32)
                    .offset(self.offset + *done as u64)
                    .build()
            }
            Kind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Punch { len } => opcode::Fallocate::new(fd, *len)
                .offset(self.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        entry.user_data(key as u64)
    }

    fn on_completion(&mut self, res: i32) -> Progress {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return Progress::Again;
        }
        if res < 0 {
            return Progress::Done(Err(io::Error::from_raw_os_error(-res)));
        }
        let n = res as usize;
        let (done, len) = match &mut self.kind {
            Kind::Read { buf, done } => {
                if n == 0 {
                    // End of file: the rest of the zeroed buffer stays zero.
                    return Progress::Done(Ok(()));
                }
                (done, buf.len())
            }
            Kind::Write { data, done } => {
                if n == 0 {
                    return Progress::Done(Err(io::ErrorKind::WriteZero.into()));
                }
                (done, data.len())
            }
            Kind::Sync | Kind::Punch { .. } => return Progress::Done(Ok(())),
        };
        *done += n;
        if *done < len {
            Progress::Again
        } else {
            Progress::Done(Ok(()))
        }
    }
}

/// The ring and every request it knows, behind [`Shared::state`].
struct State {
    ring: IoUring,
    ops: Slab<Op>,
    /// Requests whose entry is in the submission queue or the kernel.
    in_kernel: usize,
    /// Keys of requests waiting for `in_kernel` to drop below the limit.
    backlog: VecDeque<usize>,
    /// A submit is due: the driver was kicked or is about to submit anyway.
    /// Pushers kick only when this is false, so a burst kicks once.
    submit_due: bool,
    driver_running: bool,
    /// Every [`UringIo`] handle is gone: the driver exits once `ops` is empty.
    closing: bool,
    /// The ring failed; every request fails with this from now on.
    broken: Option<(io::ErrorKind, String)>,
    /// Scratch for reaping, kept to avoid an allocation per batch.
    completions: Vec<(u64, i32)>,
}

impl State {
    /// Pushes the entry for what is left of request `key`.
    fn push(&mut self, key: usize) {
        let entry = self.ops[key].entry(key);
        loop {
            // SAFETY: every buffer an entry points to is owned by an `Op` in
            // `ops` until that entry's completion is reaped (see `reap` and
            // `Drop for State`).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full: cannot happen with at most one entry per request in the
            // kernel, but cheap to handle.
            let _ = self.ring.submit();
        }
    }

    /// Gives waiting requests the slots in the kernel that are free.
    fn admit(&mut self) {
        while self.in_kernel < MAX_IN_FLIGHT {
            let Some(key) = self.backlog.pop_front() else {
                return;
            };
            if self.ops[key].abandoned {
                self.ops.remove(key);
                continue;
            }
            self.ops[key].stage = Stage::InKernel;
            self.in_kernel += 1;
            self.push(key);
        }
    }

    /// Takes every completion the kernel posted: finished requests keep
    /// their result until their future collects it (their waker goes into
    /// `wake`), unfinished ones are pushed again.
    fn reap(&mut self, wake: &mut Vec<Waker>) {
        let mut completions = std::mem::take(&mut self.completions);
        completions.clear();
        completions.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(token, res) in &completions {
            let key = token as usize;
            let op = &mut self.ops[key];
            match op.on_completion(res) {
                Progress::Again => self.push(key),
                Progress::Done(result) => {
                    self.in_kernel -= 1;
                    if op.abandoned {
                        self.ops.remove(key);
                    } else {
                        op.stage = Stage::Finished(result);
                        wake.extend(op.waker.take());
                    }
                }
            }
        }
        self.completions = completions;
        self.admit();
    }

    /// Hands the submission queue to the kernel. Returns whether it must be
    /// tried again (the kernel was busy); a real failure breaks the ring.
    fn submit(&mut self, wake: &mut Vec<Waker>) -> bool {
        if self.ring.submission().is_empty() {
            return false;
        }
        match self.ring.submit() {
            Ok(_) => !self.ring.submission().is_empty(),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) =>
            {
                true
            }
            Err(e) => {
                self.break_ring(e, wake);
                false
            }
        }
    }

    /// The ring failed: every request fails with `e`. Entries may still be
    /// in the kernel, so their buffers are leaked, never freed under it (a
    /// can't-happen path; a leak beats a use-after-free). Their files may
    /// close: the kernel holds its own reference while it uses one.
    fn break_ring(&mut self, e: io::Error, wake: &mut Vec<Waker>) {
        tracing::error!(error = %e, "io_uring failed; the uring IO engine stops");
        let err = || io::Error::new(e.kind(), e.to_string());
        self.broken = Some((e.kind(), e.to_string()));
        self.backlog.clear();
        self.in_kernel = 0;
        let mut gone = Vec::new();
        for (key, op) in self.ops.iter_mut() {
            if let Stage::InKernel = op.stage {
                std::mem::forget(std::mem::replace(&mut op.kind, Kind::Sync));
            }
            if !matches!(op.stage, Stage::Finished(_)) {
                op.stage = Stage::Finished(Err(err()));
                wake.extend(op.waker.take());
            }
            if op.abandoned {
                gone.push(key);
            }
        }
        for key in gone {
            self.ops.remove(key);
        }
    }

    fn refusal(&self) -> Option<io::Error> {
        if let Some((kind, msg)) = &self.broken {
            return Some(io::Error::new(*kind, msg.clone()));
        }
        if self.closing && !self.driver_running {
            return Some(io::Error::other("the io_uring engine has stopped"));
        }
        None
    }
}

impl Drop for State {
    /// Runs only when nothing can drive the ring any more (the runtime went
    /// away with IO in flight): waits for the kernel to finish with every
    /// buffer before the table frees them.
    fn drop(&mut self) {
        let mut wake = Vec::new();
        // Never submitted: nothing to wait for.
        self.backlog.clear();
        while self.in_kernel > 0 && self.broken.is_none() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => self.break_ring(e, &mut wake),
            }
            self.reap(&mut wake);
        }
    }
}

/// State shared by the handles, the request futures and the driver task.
struct Shared {
    state: Mutex<State>,
    /// Wakes the driver to submit, or to notice `closing`.
    kick: Notify,
    /// The ring's descriptor (owned by the ring in `state`, which lives as
    /// long as this): readable while completions wait to be reaped.
    ring_fd: RawFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the ring
        // and table are still consistent, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct UringIo {
    shared: Arc<Shared>,
    /// Kernels before 5.6 have no fallocate opcode: punch on the blocking pool.
    fallocate_in_ring: bool,
}

impl UringIo {
    /// Sets up a ring and proves the kernel runs a NOP through it and knows
    /// the opcodes needed. The driver task starts with the first request,
    /// in the runtime that polls it, so this works outside a runtime too.
    pub fn new() -> io::Result<UringIo> {
        let mut ring = IoUring::new(RING_ENTRIES)?;
        probe_nop(&mut ring)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Fsync::CODE, "fsync"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks the {name} opcode"),
                ));
            }
        }
        let fallocate_in_ring = probe.is_supported(opcode::Fallocate::CODE);

        let ring_fd = ring.as_raw_fd();
        let state = State {
            ring,
            ops: Slab::with_capacity(MAX_IN_FLIGHT),
            in_kernel: 0,
            backlog: VecDeque::new(),
            submit_due: false,
            driver_running: false,
            closing: false,
            broken: None,
            completions: Vec::with_capacity(2 * RING_ENTRIES as usize),
        };
        Ok(UringIo {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                kick: Notify::new(),
                ring_fd,
            }),
            fallocate_in_ring,
        })
    }

    fn request<T: Send + 'static>(
        &self,
        file: Arc<File>,
        offset: u64,
        kind: Kind,
        output: fn(Kind) -> T,
    ) -> IoFuture<T> {
        Box::pin(OpFuture {
            shared: self.shared.clone(),
            step: Step::New(Op {
                file,
                offset,
                kind,
                stage: Stage::Waiting,
                waker: None,
                abandoned: false,
            }),
            output,
        })
    }

    /// Requests known to the ring (in the kernel, waiting, or finished and
    /// not yet collected).
    #[cfg(test)]
    pub(super) fn ops_known(&self) -> usize {
        self.shared.lock().ops.len()
    }

    /// Tells whether the ring still exists after this handle is gone.
    #[cfg(test)]
    pub(super) fn liveness(&self) -> RingLiveness {
        RingLiveness(Arc::downgrade(&self.shared))
    }
}

#[cfg(test)]
pub(super) struct RingLiveness(std::sync::Weak<Shared>);

#[cfg(test)]
impl RingLiveness {
    pub(super) fn is_alive(&self) -> bool {
        self.0.strong_count() != 0
    }
}

fn probe_nop(ring: &mut IoUring) -> io::Result<()> {
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("io_uring submission queue full at setup"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("io_uring NOP did not complete"))?;
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(())
}

impl Drop for UringIo {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closing = true;
        let running = st.driver_running;
        drop(st);
        if running {
            self.shared.kick.notify_one();
        }
    }
}

impl DiskIo for UringIo {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn read_at(&self, file: Arc<File>, offset: u64, len: usize) -> IoFuture<AlignedBuf> {
        if len == 0 {
            return Box::pin(std::future::ready(Ok(AlignedBuf::zeroed(0))));
        }
        let buf = AlignedBuf::zeroed(len);
        self.request(
            file,
            offset,
            Kind::Read { buf, done: 0 },
            |kind| match kind {
                Kind::Read { buf, .. } => buf,
                _ => unreachable!("a read's kind stays a read"),
            },
        )
    }

    fn write_at(&self, file: Arc<File>, offset: u64, data: Bytes) -> IoFuture<()> {
        if data.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.request(file, offset, Kind::Write { data, done: 0 }, drop)
    }

    fn sync_data(&self, file: Arc<File>) -> IoFuture<()> {
        self.request(file, 0, Kind::Sync, drop)
    }

    fn punch_hole(&self, file: Arc<File>, offset: u64, len: u64) -> IoFuture<()> {
        if len == 0 {
            return Box::pin(std::future::ready(Ok(())));
        }
        if !self.fallocate_in_ring {
            return Box::pin(async move {
                tokio::task::spawn_blocking(move || punch_hole_blocking(&file, offset, len))
                    .await
                    .map_err(|e| io::Error::other(format!("blocking punch failed: {e}")))?
            });
        }
        self.request(file, offset, Kind::Punch { len }, drop)
    }
}

enum Step {
    /// Not polled yet: nothing reached the ring.
    New(Op),
    /// In the ring's table under this key.
    Queued(usize),
    Done,
}

/// The future of one request. Its op enters the ring at the first poll.
struct OpFuture<T> {
    shared: Arc<Shared>,
    step: Step,
    /// Turns a finished op's kind into the caller's result (a read's buffer).
    output: fn(Kind) -> T,
}

impl<T> Future for OpFuture<T> {
    type Output = io::Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let this = self.get_mut();
        match std::mem::replace(&mut this.step, Step::Done) {
            Step::New(op) => this.enter(op, cx),
            Step::Queued(key) => {
                let mut st = this.shared.lock();
                let op = &mut st.ops[key];
                if let Stage::Finished(_) = op.stage {
                    let op = st.ops.remove(key);
                    let last = st.closing && st.ops.is_empty();
                    drop(st);
                    if last {
                        // The driver waits for this to exit.
                        this.shared.kick.notify_one();
                    }
                    let Stage::Finished(result) = op.stage else {
                        unreachable!()
                    };
                    return Poll::Ready(result.map(|()| (this.output)(op.kind)));
                }
                if !op.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    op.waker = Some(cx.waker().clone());
                }
                this.step = Step::Queued(key);
                Poll::Pending
            }
            Step::Done => panic!("io_uring request polled after it completed"),
        }
    }
}

impl<T> OpFuture<T> {
    fn enter(&mut self, mut op: Op, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Poll::Ready(Err(io::Error::other(
                "io_uring requests must be polled inside a tokio runtime",
            )));
        };
        op.waker = Some(cx.waker().clone());
        let mut st = self.shared.lock();
        if let Some(e) = st.refusal() {
            return Poll::Ready(Err(e));
        }
        let key = st.ops.insert(op);
        st.backlog.push_back(key);
        st.admit();
        let kick = !std::mem::replace(&mut st.submit_due, true);
        let start = !std::mem::replace(&mut st.driver_running, true);
        drop(st);
        if start {
            let guard = DriverGuard(Some(self.shared.clone()));
            runtime.spawn(drive(self.shared.clone(), guard));
        }
        if kick || start {
            // A new driver needs it too: it sleeps until kicked.
            self.shared.kick.notify_one();
        }
        self.step = Step::Queued(key);
        Poll::Pending
    }
}

impl<T> Drop for OpFuture<T> {
    fn drop(&mut self) {
        let Step::Queued(key) = self.step else {
            return;
        };
        let mut st = self.shared.lock();
        let op = &mut st.ops[key];
        match op.stage {
            // The kernel is done with it: free it now.
            Stage::Finished(_) => {
                st.ops.remove(key);
                if st.closing && st.ops.is_empty() {
                    drop(st);
                    self.shared.kick.notify_one();
                }
            }
            // The kernel may still use its buffer (or the backlog still
            // names it): `reap` or `admit` frees it.
            Stage::InKernel | Stage::Waiting => {
                op.abandoned = true;
                op.waker = None;
            }
        }
    }
}

/// The ring's descriptor as [`AsyncFd`] wants it: holding the [`Shared`]
/// that owns the ring keeps it open for as long as the registration lives.
struct RingFd(Arc<Shared>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ring_fd
    }
}

/// Clears `driver_running` if the driver ends unexpectedly (its runtime
/// dropped it, even before its first poll, or the reactor failed), so the
/// next request starts a new one. A driver that exits on purpose clears it
/// itself, under the same lock that decided to exit, and disarms this.
struct DriverGuard(Option<Arc<Shared>>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.lock().driver_running = false;
        }
    }
}

/// The driver task: submits batches and reaps completions until the engine
/// is closed and nothing is left in the ring.
async fn drive(shared: Arc<Shared>, mut guard: DriverGuard) {
    let mut wake = Vec::new();
    // SAFETY: the descriptor is owned by the `Shared` that `RingFd` holds,
    // so it stays open and the same for the registration's whole life.
    let registered =
        unsafe { AsyncFd::register_with_interest(RingFd(shared.clone()), Interest::READABLE) };
    let events = match registered {
        Ok(fd) => fd,
        Err(e) => {
            let e = io::Error::from(e);
            let mut st = shared.lock();
            st.break_ring(e, &mut wake);
            drop(st);
            wake.drain(..).for_each(Waker::wake);
            return;
        }
    };
    loop {
        // Sleep until the kernel posts a completion or a request kicks.
        tokio::select! {
            biased;
            ready = events.readable() => {
                let Ok(mut ready) = ready else {
                    // The reactor is shutting down; IO still in the kernel
                    // is finished by the next driver, or by `Drop for State`.
                    return;
                };
                // Before reaping: a completion posted from here on raises
                // the descriptor again and is seen on the next turn.
                ready.clear_ready();
            }
            () = shared.kick.notified() => {}
        }
        let mut st = shared.lock();
        st.reap(&mut wake);
        // Every task that ran before this one has pushed its entry: all go
        // in with one syscall. The tasks woken below push theirs later and
        // kick again, which queues this driver behind all of them.
        let again = st.submit(&mut wake);
        st.submit_due = again;
        let exit = st.closing && st.ops.is_empty();
        if exit {
            st.driver_running = false;
        }
        drop(st);
        wake.drain(..).for_each(Waker::wake);
        if exit {
            guard.0 = None;
            return;
        }
        if again {
            shared.kick.notify_one();
        }
    }
}
