//! Tests of the NBD server through real sockets: raw bytes for bad input and
//! protocol corners (`raw`), and the real clients installed on the machine
//! (`clients`). The in-memory backend here is test-only.

mod clients;
mod raw;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use super::{NbdBackend, NbdError, NbdListen, NbdServer, NbdServerConfig};

/// Which requests a [`MemBackend`] holds back until the test releases them.
#[derive(Clone)]
enum Hold {
    Nothing,
    Everything,
    ReadsAt(u64),
}

struct MemInner {
    data: Mutex<Vec<u8>>,
    /// Backend calls made (the server must make none for refused requests).
    calls: AtomicUsize,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    flushes: AtomicUsize,
    hold: Mutex<Hold>,
    release: Arc<Semaphore>,
}

/// A volume in memory. Clones share the same bytes.
#[derive(Clone)]
pub(crate) struct MemBackend(Arc<MemInner>);

impl MemBackend {
    pub(crate) fn new(size: usize) -> Self {
        MemBackend(Arc::new(MemInner {
            data: Mutex::new(vec![0; size]),
            calls: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            max_inflight: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            hold: Mutex::new(Hold::Nothing),
            release: Arc::new(Semaphore::new(0)),
        }))
    }

    /// A backend filled with a recognisable pattern.
    pub(crate) fn patterned(size: usize) -> Self {
        let b = Self::new(size);
        for (i, byte) in b.0.data.lock().unwrap().iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        b
    }

    pub(crate) fn snapshot(&self) -> Vec<u8> {
        self.0.data.lock().unwrap().clone()
    }

    pub(crate) fn calls(&self) -> usize {
        self.0.calls.load(Ordering::SeqCst)
    }

    pub(crate) fn max_inflight(&self) -> usize {
        self.0.max_inflight.load(Ordering::SeqCst)
    }

    pub(crate) fn flushes(&self) -> usize {
        self.0.flushes.load(Ordering::SeqCst)
    }

    fn set_hold(&self, hold: Hold) {
        *self.0.hold.lock().unwrap() = hold;
    }

    /// Lets `n` held requests complete.
    pub(crate) fn release(&self, n: usize) {
        self.0.release.add_permits(n);
    }

    pub(crate) fn arc(&self) -> Arc<dyn NbdBackend> {
        Arc::new(self.clone())
    }

    /// Runs `op` on the bytes, after waiting for a release when held.
    fn op<T: Send + 'static>(
        &self,
        read_at: Option<u64>,
        op: impl FnOnce(&mut Vec<u8>) -> T + Send + 'static,
    ) -> BoxFuture<'static, T> {
        let inner = self.0.clone();
        inner.calls.fetch_add(1, Ordering::SeqCst);
        let held = match *inner.hold.lock().unwrap() {
            Hold::Nothing => false,
            Hold::Everything => true,
            Hold::ReadsAt(at) => read_at == Some(at),
        };
        async move {
            let now = inner.inflight.fetch_add(1, Ordering::SeqCst) + 1;
            inner.max_inflight.fetch_max(now, Ordering::SeqCst);
            if held {
                inner.release.acquire().await.unwrap().forget();
            } else {
                // Let other requests overtake, as a real volume would.
                tokio::task::yield_now().await;
            }
            let out = op(&mut inner.data.lock().unwrap());
            inner.inflight.fetch_sub(1, Ordering::SeqCst);
            out
        }
        .boxed()
    }
}

impl NbdBackend for MemBackend {
    fn size(&self) -> u64 {
        self.0.data.lock().unwrap().len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<Bytes, NbdError>> {
        self.op(Some(offset), move |d| {
            let start = offset as usize;
            Ok(Bytes::copy_from_slice(&d[start..start + len as usize]))
        })
    }

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        _fua: bool,
    ) -> BoxFuture<'static, Result<(), NbdError>> {
        self.op(None, move |d| {
            let start = offset as usize;
            d[start..start + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), NbdError>> {
        self.0.flushes.fetch_add(1, Ordering::SeqCst);
        self.op(None, |_| Ok(()))
    }

    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<(), NbdError>> {
        // Trimmed ranges read back as zeroes here; the protocol allows any
        // contents, zeroes make the tests' expectations simple.
        self.write_zeroes(offset, len, false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
    ) -> BoxFuture<'static, Result<(), NbdError>> {
        self.op(None, move |d| {
            let start = offset as usize;
            d[start..start + len as usize].fill(0);
            Ok(())
        })
    }
}

/// Where a test server listens.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Unix,
    Tcp,
}

/// A server running in the test's runtime; shut down when dropped.
pub(crate) struct TestServer {
    pub(crate) listen: NbdListen,
    pub(crate) export: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub(crate) async fn start(kind: Kind, backend: &MemBackend, config: NbdServerConfig) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let listen = match kind {
            Kind::Unix => NbdListen::Unix(dir.path().join("nbd.sock")),
            Kind::Tcp => "127.0.0.1:0".parse().unwrap(),
        };
        let server = NbdServer::bind(listen).await.unwrap();
        let listen = server.listen_addr().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let export = config.export_name.clone();
        let task = tokio::spawn(server.run(config, backend.arc(), async {
            let _ = stopped.await;
        }));
        TestServer {
            listen,
            export,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    pub(crate) async fn start_default(kind: Kind, backend: &MemBackend) -> Self {
        Self::start(kind, backend, config("vol")).await
    }

    pub(crate) fn uri(&self) -> String {
        self.listen.uri(&self.export)
    }

    pub(crate) fn socket_path(&self) -> Option<PathBuf> {
        match &self.listen {
            NbdListen::Unix(p) => Some(p.clone()),
            NbdListen::Tcp(_) => None,
        }
    }

    /// Triggers shutdown and waits (bounded) for the server to return.
    pub(crate) async fn stop(mut self) -> std::io::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server did not stop")
            .expect("server task panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Server logs in test output, filtered by RUST_LOG (e.g.
/// `RUST_LOG=shorthorn_engine::nbd=debug`).
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub(crate) fn config(export: &str) -> NbdServerConfig {
    NbdServerConfig {
        export_name: export.to_string(),
        multi_conn: false,
        max_connections: 16,
    }
}
