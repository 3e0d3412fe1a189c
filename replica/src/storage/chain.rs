//! [`Chain`]: one immutable view of a replica's layers, and the gate that
//! lets a snapshot wait for the writes in flight on it.
//!
//! A chain never changes once built; a snapshot builds a new one and swaps it
//! in. Writers *enter* the chain they write through (one atomic increment,
//! never a wait) and leave when their IO is done. A snapshot *closes* the
//! old chain, waits until the writers in it have left, freezes the head and
//! swaps in the new chain; writers that find a chain closed wait for the
//! snapshot to finish and try again on the new one. So no write can land in
//! a layer after it was frozen, and writes never wait on each other.
//! Readers need no gate: an old chain stays correct to read from.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use super::layer::Layer;
use super::units::BlockIndex;

pub struct Chain {
    /// Oldest first; the last one is the live head.
    layers: Vec<Arc<Layer>>,
    writers: AtomicUsize,
    closed: AtomicBool,
    drained: Notify,
}

impl Chain {
    pub fn new(layers: Vec<Arc<Layer>>) -> Chain {
        assert!(!layers.is_empty(), "a chain has at least its head");
        Chain {
            layers,
            writers: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            drained: Notify::new(),
        }
    }

    pub fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }

    pub fn head(&self) -> &Arc<Layer> {
        self.layers.last().expect("non-empty chain")
    }

    /// A chain of one layer: reads and writes go straight to the head file.
    pub fn is_single(&self) -> bool {
        self.layers.len() == 1
    }

    /// The newest frozen layer (below the head) that holds `b`.
    pub fn lower_holder(&self, b: BlockIndex) -> Option<&Arc<Layer>> {
        self.layers[..self.layers.len() - 1]
            .iter()
            .rev()
            .find(|l| l.holds(b))
    }

    /// Enters the chain to write through it; `None` if a snapshot closed it.
    pub fn enter(self: Arc<Self>) -> Option<WriteGuard> {
        // SeqCst on both sides (here and in `close`/`drain`): either the
        // snapshot sees this writer counted, or this writer sees `closed`.
        self.writers.fetch_add(1, Ordering::SeqCst);
        let guard = WriteGuard { chain: self };
        if guard.chain.closed.load(Ordering::SeqCst) {
            return None; // dropping the guard leaves again
        }
        Some(guard)
    }

    /// Stops new writers from entering. Call with the replica's metadata
    /// lock held, which writers that find the chain closed wait on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Undoes `close` after a snapshot failed.
    pub fn reopen(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }

    /// Waits until every writer that entered before `close` has left.
    pub async fn drain(&self) {
        loop {
            // Register interest before checking, so a leave in between is
            // not missed.
            let notified = self.drained.notified();
            if self.writers.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Proof that a writer is inside a chain; leaving happens on drop.
pub struct WriteGuard {
    chain: Arc<Chain>,
}

impl Deref for WriteGuard {
    type Target = Chain;
    fn deref(&self) -> &Chain {
        &self.chain
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.chain.writers.fetch_sub(1, Ordering::SeqCst) == 1
            && self.chain.closed.load(Ordering::SeqCst)
        {
            self.chain.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::layer::{FileMode, LayerOpener};
    use crate::storage::units::LayerId;
    use std::time::Duration;

    fn one_layer_chain() -> Arc<Chain> {
        let dir = tempfile::tempdir().unwrap();
        let opener = LayerOpener::new(FileMode::Direct);
        let created = opener.create(dir.path(), LayerId(1), 4096).unwrap();
        Arc::new(Chain::new(vec![Arc::new(Layer {
            id: LayerId(1),
            file: Arc::new(created.file),
            direct: created.direct,
            map: None,
        })]))
    }

    #[tokio::test]
    async fn drain_waits_for_writers_and_close_refuses_new_ones() {
        let chain = one_layer_chain();
        let w1 = chain.clone().enter().unwrap();
        let w2 = chain.clone().enter().unwrap();
        chain.close();
        assert!(chain.clone().enter().is_none());
        let drained = tokio::spawn({
            let chain = chain.clone();
            async move { chain.drain().await }
        });
        drop(w1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!drained.is_finished(), "one writer is still inside");
        drop(w2);
        tokio::time::timeout(Duration::from_secs(5), drained)
            .await
            .expect("drain ends once the writers left")
            .unwrap();
        chain.reopen();
        assert!(chain.clone().enter().is_some());
    }
}
