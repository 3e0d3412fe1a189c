//! Sessions with a replica daemon in this very process.
//!
//! An engine hosted by a replica daemon reaches that daemon's replicas
//! through a [`LocalService`]: the same hello, requests and replies as on a
//! connection, and the same handshake, fencing and checks on the daemon's
//! side, but handed over as values in a function call. Nothing is encoded
//! or checksummed (no byte leaves the process), and no task, channel or
//! socket sits between an engine's request and the replica's disk IO: the
//! request runs inside the engine's own task.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::error::RemoteError;
use crate::message::{Hello, Reply, Request, Welcome};

/// What a local session hands back: a boxed future the caller drives.
pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An accepted hello: the welcome, and the session it opened.
pub type Opened = Result<(Welcome, Arc<dyn LocalSession>), RemoteError>;

/// A replica daemon serving this process's engines in memory.
pub trait LocalService: Send + Sync {
    /// Opens a session, exactly as a connection's hello would (a volume
    /// and generation bind it; an empty volume name is an admin session).
    fn hello(&self, hello: Hello) -> LocalFuture<Opened>;
}

/// One open session with an in-process replica daemon.
pub trait LocalSession: Send + Sync {
    /// Starts one request. What the daemon does for a connection's requests
    /// in the order they arrive (marking and cleaning its dirty map) is done
    /// before this returns, so requests started one after another are
    /// ordered as they would be on the wire. The future does the rest and
    /// yields the reply, a refusal being [`Reply::Error`].
    fn start(&self, request: Request) -> LocalCall;
}

/// A started request of a local session. Like a request already sent on a
/// socket, it runs to its end whatever its caller does: dropped before it
/// finished (the caller timed out or went away), the rest of it is handed
/// to a task of its own, so no write stops half-done and no dirty-map mark
/// is left without its write.
pub struct LocalCall(Option<LocalFuture<Reply>>);

impl LocalCall {
    pub fn new(fut: impl Future<Output = Reply> + Send + 'static) -> LocalCall {
        LocalCall(Some(Box::pin(fut)))
    }
}

impl Future for LocalCall {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let fut = self
            .0
            .as_mut()
            .expect("a local call polled after it answered");
        let reply = std::task::ready!(fut.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(reply)
    }
}

impl Drop for LocalCall {
    fn drop(&mut self) {
        if let Some(rest) = self.0.take() {
            // Outside a runtime (the process is ending) there is nowhere to
            // run it; the daemon's state is going away with the process.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(rest);
            }
        }
    }
}
