//! The `uring` engine: one thread owns an io_uring and turns a stream of
//! requests into batches of submission entries.
//!
//! Callers send an [`Op`] over a channel and await a oneshot. The ring thread
//! drains every request waiting, pushes them all, and enters the kernel once
//! (`submit_and_wait`) to submit the batch and wait for completions; a burst
//! of 64 requests costs one syscall, not 64. While the thread sleeps in the
//! kernel a poll on an eventfd is armed, so a new request wakes it; a flag
//! makes only the first request of a burst pay for that wake-up write.
//!
//! Every buffer stays owned by its [`Op`] in the in-flight table until its
//! completion is reaped, so the kernel never writes into freed memory. Short
//! reads and writes are resubmitted for the remainder; EINTR and EAGAIN are
//! retried. Dropping the last handle closes the channel and wakes the thread,
//! which finishes what is in flight and exits; the drop joins it.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::sync::oneshot;

use super::aligned::AlignedBuf;
use super::sync::punch_hole_blocking;
use super::{DiskIo, IoFuture};

const RING_ENTRIES: u32 = 256;
/// Requests in the kernel at once; one submission slot stays free for the
/// wake-up poll. More requests wait in a backlog inside the thread.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize - 1;
const WAKE_TOKEN: u64 = u64::MAX;
/// Largest length of one read or write entry (the kernel takes a `u32`).
const MAX_CHUNK: usize = 1 << 30;

enum Kind {
    Read {
        buf: AlignedBuf,
        done: usize,
        reply: oneshot::Sender<io::Result<AlignedBuf>>,
    },
    Write {
        data: Bytes,
        done: usize,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Sync {
        reply: oneshot::Sender<io::Result<()>>,
    },
    Punch {
        len: u64,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

/// One request. Owns its file and buffer until it completes.
struct Op {
    file: Arc<File>,
    offset: u64,
    kind: Kind,
}

/// What a completion means for its request.
enum Progress {
    /// Not finished: submit the (rest of the) request again.
    Again,
    Done,
    Failed(io::Error),
}

impl Op {
    /// The submission entry for what is left of this request.
    fn entry(&mut self, key: usize) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match &mut self.kind {
            Kind::Read { buf, done, .. } => {
                let n = (buf.len() - *done).min(MAX_CHUNK);
                // SAFETY (of the pointer's use by the kernel): `buf` lives in
                // the in-flight table until this entry's completion is reaped.
                let ptr = buf[*done..].as_mut_ptr();
                opcode::Read::new(fd, ptr, n as u32)
                    .offset(self.offset + *done as u64)
                    .build()
            }
            Kind::Write { data, done, .. } => {
                let n = (data.len() - *done).min(MAX_CHUNK);
                let ptr = data[*done..].as_ptr();
                opcode::Write::new(fd, ptr, n as u32)
                    .offset(self.offset + *done as u64)
                    .build()
            }
            Kind::Sync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Punch { len, .. } => opcode::Fallocate::new(fd, *len)
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
            return Progress::Failed(io::Error::from_raw_os_error(-res));
        }
        let n = res as usize;
        match &mut self.kind {
            Kind::Read { buf, done, .. } => {
                if n == 0 {
                    // End of file: the rest of the zeroed buffer stays zero.
                    return Progress::Done;
                }
                *done += n;
                if *done < buf.len() {
                    Progress::Again
                } else {
                    Progress::Done
                }
            }
            Kind::Write { data, done, .. } => {
                if n == 0 {
                    return Progress::Failed(io::ErrorKind::WriteZero.into());
                }
                *done += n;
                if *done < data.len() {
                    Progress::Again
                } else {
                    Progress::Done
                }
            }
            Kind::Sync { .. } | Kind::Punch { .. } => Progress::Done,
        }
    }

    /// Answers the caller. A caller that stopped waiting is not an error.
    fn finish(self, result: io::Result<()>) {
        match self.kind {
            Kind::Read { buf, reply, .. } => {
                let _ = reply.send(result.map(|()| buf));
            }
            Kind::Write { reply, .. } | Kind::Sync { reply } | Kind::Punch { reply, .. } => {
                let _ = reply.send(result);
            }
        }
    }
}

/// State shared by the handle and the ring thread.
struct Shared {
    /// Written to wake the ring thread; the thread keeps a poll on it armed.
    wake_fd: OwnedFd,
    /// Set by the thread just before it sleeps in the kernel; the first
    /// submitter to clear it pays for the wake-up.
    need_wake: AtomicBool,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. It
        // cannot fail short of the counter overflowing, which needs 2^64
        // wake-ups without a read.
        unsafe {
            libc::write(
                self.wake_fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    fn clear_wake(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; the eventfd is
        // non-blocking, so an empty counter just returns EAGAIN.
        unsafe {
            libc::read(
                self.wake_fd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

pub struct UringIo {
    tx: Option<Sender<Op>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Kernels before 5.6 have no fallocate opcode: punch on the blocking pool.
    fallocate_in_ring: bool,
}

impl UringIo {
    /// Sets up a ring, proves the kernel runs a NOP through it and knows the
    /// opcodes needed, and starts the ring thread.
    pub fn new() -> io::Result<UringIo> {
        let mut ring = IoUring::new(RING_ENTRIES)?;
        probe_nop(&mut ring)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::PollAdd::CODE, "poll_add"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks the {name} opcode"),
                ));
            }
        }
        let fallocate_in_ring = probe.is_supported(opcode::Fallocate::CODE);

        // SAFETY: eventfd returns a new descriptor or -1, checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            wake_fd,
            need_wake: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("shorthorn-uring".into())
            .spawn({
                let shared = shared.clone();
                move || RingThread::new(ring, rx, shared).run()
            })?;
        Ok(UringIo {
            tx: Some(tx),
            shared,
            thread: Some(thread),
            fallocate_in_ring,
        })
    }

    fn submit(&self, op: Op) -> io::Result<()> {
        let tx = self.tx.as_ref().expect("sender lives until drop");
        tx.send(op).map_err(|_| stopped())?;
        // Pairs with the fence in `RingThread::may_sleep`: either the thread
        // sees this request before sleeping, or we see its flag and wake it.
        fence(Ordering::SeqCst);
        if self.shared.need_wake.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
        Ok(())
    }

    fn request<T: Send + 'static>(
        &self,
        file: Arc<File>,
        offset: u64,
        make: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Kind,
    ) -> IoFuture<T> {
        let (reply, rx) = oneshot::channel();
        let op = Op {
            file,
            offset,
            kind: make(reply),
        };
        match self.submit(op) {
            Ok(()) => Box::pin(async move { rx.await.map_err(|_| stopped())? }),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

fn stopped() -> io::Error {
    io::Error::other("the io_uring thread has stopped")
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
        // Closing the channel is the shutdown signal; the wake makes the
        // thread look at it even if it sleeps in the kernel.
        drop(self.tx.take());
        fence(Ordering::SeqCst);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("io_uring thread panicked");
            }
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
        self.request(file, offset, |reply| Kind::Read {
            buf: AlignedBuf::zeroed(len),
            done: 0,
            reply,
        })
    }

    fn write_at(&self, file: Arc<File>, offset: u64, data: Bytes) -> IoFuture<()> {
        if data.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.request(file, offset, |reply| Kind::Write {
            data,
            done: 0,
            reply,
        })
    }

    fn sync_data(&self, file: Arc<File>) -> IoFuture<()> {
        self.request(file, 0, |reply| Kind::Sync { reply })
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
        self.request(file, offset, |reply| Kind::Punch { len, reply })
    }
}

/// The ring thread's state.
struct RingThread {
    ring: IoUring,
    rx: Receiver<Op>,
    shared: Arc<Shared>,
    in_flight: Slab<Op>,
    /// Requests received while `MAX_IN_FLIGHT` were already in the kernel.
    backlog: VecDeque<Op>,
    /// Keys whose entry must be pushed (new requests and resubmissions).
    to_push: Vec<usize>,
    completions: Vec<(u64, i32)>,
    poll_armed: bool,
    closing: bool,
}

impl RingThread {
    fn new(ring: IoUring, rx: Receiver<Op>, shared: Arc<Shared>) -> RingThread {
        RingThread {
            ring,
            rx,
            shared,
            in_flight: Slab::with_capacity(MAX_IN_FLIGHT),
            backlog: VecDeque::new(),
            to_push: Vec::with_capacity(MAX_IN_FLIGHT),
            completions: Vec::with_capacity(RING_ENTRIES as usize * 2),
            poll_armed: false,
            closing: false,
        }
    }

    fn run(mut self) {
        loop {
            self.receive();
            self.admit();
            if self.closing && self.in_flight.is_empty() && self.backlog.is_empty() {
                return;
            }
            let wait = self.may_sleep();
            if wait && !self.poll_armed && !self.closing {
                let poll = opcode::PollAdd::new(
                    types::Fd(self.shared.wake_fd.as_raw_fd()),
                    libc::POLLIN as u32,
                )
                .build()
                .user_data(WAKE_TOKEN);
                self.push(poll);
                self.poll_armed = true;
            }
            if let Err(e) = self.enter(wait) {
                self.fail_all(e);
                return;
            }
            self.shared.need_wake.store(false, Ordering::SeqCst);
            self.reap();
        }
    }

    /// Moves every waiting request into the backlog.
    fn receive(&mut self) {
        while !self.closing {
            match self.rx.try_recv() {
                Ok(op) => self.backlog.push_back(op),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.closing = true,
            }
        }
    }

    /// Gives backlog requests a slot in the kernel, and pushes every entry
    /// that is due (new ones and resubmitted remainders).
    fn admit(&mut self) {
        while self.in_flight.len() < MAX_IN_FLIGHT {
            let Some(op) = self.backlog.pop_front() else {
                break;
            };
            let key = self.in_flight.insert(op);
            self.to_push.push(key);
        }
        let keys = std::mem::take(&mut self.to_push);
        for &key in &keys {
            let entry = self.in_flight[key].entry(key);
            self.push(entry);
        }
        self.to_push = keys;
        self.to_push.clear();
    }

    /// Whether the thread may block in the kernel until a completion. It
    /// announces that it is about to sleep, then looks at the channel once
    /// more, so a request sent meanwhile is never left unseen.
    fn may_sleep(&mut self) -> bool {
        if self.closing || !self.backlog.is_empty() {
            // With a backlog the kernel is full: waiting for a completion is
            // exactly what frees a slot. When closing, only completions matter.
            return true;
        }
        self.shared.need_wake.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        match self.rx.try_recv() {
            Ok(op) => {
                self.backlog.push_back(op);
                self.shared.need_wake.store(false, Ordering::SeqCst);
                self.admit();
                false
            }
            Err(TryRecvError::Empty) => true,
            Err(TryRecvError::Disconnected) => {
                self.closing = true;
                true
            }
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every buffer an entry points to is owned by an `Op` in
            // `in_flight` until that entry's completion is reaped; the poll
            // entry points to no memory.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full (cannot happen with MAX_IN_FLIGHT below the ring size, but
            // cheap to handle): hand what is queued to the kernel.
            let _ = self.ring.submit();
        }
    }

    fn enter(&mut self, wait: bool) -> io::Result<()> {
        let want = usize::from(wait && (!self.in_flight.is_empty() || self.poll_armed));
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn reap(&mut self) {
        self.completions.clear();
        self.completions.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for i in 0..self.completions.len() {
            let (token, res) = self.completions[i];
            if token == WAKE_TOKEN {
                self.poll_armed = false;
                self.shared.clear_wake();
                continue;
            }
            let key = token as usize;
            match self.in_flight[key].on_completion(res) {
                Progress::Again => self.to_push.push(key),
                Progress::Done => self.in_flight.remove(key).finish(Ok(())),
                Progress::Failed(e) => self.in_flight.remove(key).finish(Err(e)),
            }
        }
    }

    /// The ring itself failed: answer every request with the error and stop.
    /// Later requests fail because the channel is gone. Entries may still be
    /// in the kernel, so their buffers and files are leaked, never freed
    /// under it (this is a can't-happen path; a leak beats a use-after-free).
    fn fail_all(&mut self, e: io::Error) {
        tracing::error!(error = %e, "io_uring failed; the uring IO engine stops");
        let err = || io::Error::new(e.kind(), e.to_string());
        for (_, op) in std::mem::take(&mut self.in_flight) {
            let Op { file, kind, .. } = op;
            std::mem::forget(file);
            match kind {
                Kind::Read { buf, reply, .. } => {
                    std::mem::forget(buf);
                    let _ = reply.send(Err(err()));
                }
                Kind::Write { data, reply, .. } => {
                    std::mem::forget(data);
                    let _ = reply.send(Err(err()));
                }
                Kind::Sync { reply } | Kind::Punch { reply, .. } => {
                    let _ = reply.send(Err(err()));
                }
            }
        }
        for op in std::mem::take(&mut self.backlog) {
            op.finish(Err(err()));
        }
    }
}
