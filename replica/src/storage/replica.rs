//! [`Replica`]: one volume's copy on this node — its metadata, its layer
//! chain, and the operations that change them (generation, snapshot).
//! The data path (read, write, zeroing, flush) lives in `datapath.rs`.
//!
//! Metadata changes are serialized by one async mutex that also guards the
//! in-memory copy of `meta.json`; the data path never takes it except to
//! wait out a snapshot.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use shorthorn_proto::{Generation, VolumeName};
use tokio::sync::Mutex;

use super::block_map::BlockMap;
use super::chain::{Chain, WriteGuard};
use super::error::StorageError;
use super::io::DiskIo;
use super::layer::{self, Layer, LayerOpener};
use super::meta::{sync_dir, Meta};
use super::units::{LayerId, BLOCK_SIZE};

/// Stripes of the partial-block lock: two writes covering only part of one
/// block that must read the rest of it first (read-modify-write under
/// O_DIRECT, copy-up from a snapshot) take turns; everything else runs
/// freely.
const PARTIAL_BLOCK_STRIPES: usize = 64;

/// The largest step a generation may take at once.
pub const MAX_GENERATION_STEP: u64 = 1 << 32;

pub struct Replica {
    pub(super) name: VolumeName,
    pub(super) size: u64,
    pub(super) dir: PathBuf,
    pub(super) io: Arc<dyn DiskIo>,
    /// Opens the files of new heads (snapshots) as the store's were.
    opener: Arc<LayerOpener>,
    generation: AtomicU64,
    pub(super) chain: ArcSwap<Chain>,
    /// The last `meta.json` written. Held while metadata or the chain change.
    meta: Mutex<Meta>,
    /// Held by a write while it reads and rewrites a block it covers only
    /// in part; indexed by block number modulo the stripe count.
    pub(super) partial_block: Box<[Mutex<()>]>,
    deleted: AtomicBool,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("generation", &self.generation())
            .field("layers", &self.layer_ids())
            .finish()
    }
}

/// Writes the files of a new, empty replica into `dir` (which must exist and
/// be empty) and makes them durable. Blocking.
pub(super) fn initialize(
    dir: &Path,
    name: &VolumeName,
    size: u64,
    opener: &LayerOpener,
) -> Result<(), StorageError> {
    let meta = Meta::new(name.as_str(), size);
    for id in meta.layer_ids() {
        opener.create(dir, id, size)?;
    }
    meta.store(dir)
}

impl Replica {
    /// Opens the replica in `dir`, learning every layer's map from its file
    /// when the chain has more than one layer. Blocking.
    pub(super) fn open(
        dir: PathBuf,
        name: VolumeName,
        io: Arc<dyn DiskIo>,
        opener: Arc<LayerOpener>,
    ) -> Result<Replica, StorageError> {
        let meta = Meta::load(&dir, name.as_str())?;
        let ids = meta.layer_ids();
        remove_orphan_layers(&dir, &ids);
        let single = ids.len() == 1;
        let mut layers = Vec::with_capacity(ids.len());
        for id in ids {
            let opened = opener.open(&dir, id, meta.size)?;
            let map = if single {
                None
            } else {
                let map = layer::scan_map(&opened.file, meta.size).map_err(|e| {
                    StorageError::io(format!("mapping {} of {}", id, dir.display()), e)
                })?;
                Some(Arc::new(map))
            };
            layers.push(Arc::new(Layer {
                id,
                file: Arc::new(opened.file),
                direct: opened.direct,
                map,
            }));
        }
        tracing::debug!(volume = %name, layers = layers.len(), size = meta.size, "replica opened");
        Ok(Replica {
            name,
            size: meta.size,
            dir,
            io,
            opener,
            generation: AtomicU64::new(meta.generation),
            chain: ArcSwap::from_pointee(Chain::new(layers)),
            meta: Mutex::new(meta),
            partial_block: (0..PARTIAL_BLOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            deleted: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &VolumeName {
        &self.name
    }

    /// The replica's directory (`DATA/volumes/<name>`), where the daemon
    /// also keeps the volume's membership and dirty-region files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Size in bytes; a multiple of 4096.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::SeqCst))
    }

    /// The layer chain, oldest (first snapshot) to newest (the live head).
    pub fn layer_ids(&self) -> Vec<LayerId> {
        self.chain.load().layers().iter().map(|l| l.id).collect()
    }

    /// Claims generation `g` for the engine `owner`, durably before
    /// returning. An older generation is refused. The current one is
    /// accepted only from the engine that claimed it (a reconnect), so two
    /// engines that both picked "highest seen + 1" cannot both attach.
    pub async fn set_generation(&self, g: Generation, owner: &str) -> Result<(), StorageError> {
        self.check_live()?;
        let mut meta = self.meta.lock().await;
        let current = Generation(meta.generation);
        if g < current {
            return Err(StorageError::StaleGeneration {
                current,
                requested: g,
            });
        }
        if g == current {
            if meta.owner == owner {
                return Ok(());
            }
            return Err(StorageError::GenerationTaken {
                generation: g,
                owner: meta.owner.clone(),
            });
        }
        // A sane engine asks for one more than it saw. A wild jump (a bug,
        // or a hostile client) would otherwise lock every later engine out.
        if g.0 - current.0 > MAX_GENERATION_STEP {
            return Err(StorageError::Invalid(format!(
                "generation {g} jumps too far past the replica's {current}"
            )));
        }
        let mut next = meta.clone();
        next.generation = g.0;
        next.owner = owner.to_string();
        self.store_meta(&next).await?;
        *meta = next;
        self.generation.store(g.0, Ordering::SeqCst);
        tracing::info!(volume = %self.name, generation = %g, %owner, "generation claimed");
        Ok(())
    }

    /// Freezes the head as a snapshot and starts a new, empty head. Returns
    /// the id of the frozen layer (the snapshot). Writes in flight finish in
    /// the old head first; writes arriving meanwhile wait and go to the new
    /// one.
    pub async fn snapshot(&self) -> Result<LayerId, StorageError> {
        self.check_live()?;
        let mut meta = self.meta.lock().await;
        let old = self.chain.load_full();
        old.close();
        match self.snapshot_locked(&mut meta, &old).await {
            Ok(id) => Ok(id),
            Err(e) => {
                old.reopen();
                Err(e)
            }
        }
    }

    async fn snapshot_locked(&self, meta: &mut Meta, old: &Chain) -> Result<LayerId, StorageError> {
        old.drain().await;
        let head = old.head().clone();
        // Flush only ever syncs the live head, so the head is made durable
        // here, before it stops being the head.
        self.io
            .sync_data(head.file.clone())
            .await
            .map_err(|e| self.io_error(format!("syncing {} before a snapshot", head.id), e))?;
        let frozen_map = match &head.map {
            Some(map) => map.clone(),
            None => {
                let file = head.file.clone();
                let size = self.size;
                let map = blocking(move || {
                    layer::scan_map(&file, size)
                        .map_err(|e| StorageError::io("mapping the head to freeze it", e))
                })
                .await?;
                Arc::new(map)
            }
        };
        let new_id = head.id.next();
        let created = {
            let dir = self.dir.clone();
            let size = self.size;
            let opener = self.opener.clone();
            blocking(move || {
                let f = opener.create(&dir, new_id, size)?;
                sync_dir(&dir)?;
                Ok(f)
            })
            .await?
        };
        let mut next = meta.clone();
        next.layers.push(new_id.0);
        next.head = new_id.0;
        // On failure the new file stays: meta.json may already name it (the
        // rename can succeed before the directory sync fails). If it does not,
        // the next open removes the file as an orphan; if it does, the old head
        // simply becomes a snapshot at the next open, its data still visible.
        self.store_meta(&next).await?;
        *meta = next;

        let mut layers: Vec<Arc<Layer>> = old.layers()[..old.layers().len() - 1].to_vec();
        layers.push(Arc::new(Layer {
            id: head.id,
            file: head.file.clone(),
            direct: head.direct,
            map: Some(frozen_map),
        }));
        layers.push(Arc::new(Layer {
            id: new_id,
            file: Arc::new(created.file),
            direct: created.direct,
            map: Some(Arc::new(BlockMap::new(self.size / BLOCK_SIZE))),
        }));
        self.chain.store(Arc::new(Chain::new(layers)));
        tracing::info!(volume = %self.name, snapshot = head.id.0, head = new_id.0, "snapshot taken");
        Ok(head.id)
    }

    /// Enters the current chain to write through it, waiting out a snapshot
    /// that is swapping the head.
    pub(super) async fn enter(&self) -> Result<WriteGuard, StorageError> {
        loop {
            self.check_live()?;
            if let Some(guard) = self.chain.load_full().enter() {
                return Ok(guard);
            }
            // Closed chains are only seen while a snapshot holds this lock;
            // once it is free the chain was swapped (or reopened).
            drop(self.meta.lock().await);
        }
    }

    pub(super) fn check_live(&self) -> Result<(), StorageError> {
        if self.deleted.load(Ordering::SeqCst) {
            return Err(StorageError::Deleted(self.name.to_string()));
        }
        Ok(())
    }

    pub(super) fn set_deleted(&self, deleted: bool) {
        self.deleted.store(deleted, Ordering::SeqCst);
    }

    pub(super) fn io_error(&self, what: impl std::fmt::Display, e: std::io::Error) -> StorageError {
        StorageError::io(format!("volume {}: {what}", self.name), e)
    }

    async fn store_meta(&self, meta: &Meta) -> Result<(), StorageError> {
        let meta = meta.clone();
        let dir = self.dir.clone();
        blocking(move || meta.store(&dir)).await
    }

    /// The block map of each layer as runs of blocks (`None`: no map).
    #[cfg(test)]
    pub(super) fn layer_maps(&self) -> Vec<(LayerId, Option<Vec<super::units::BlockRange>>)> {
        self.chain
            .load()
            .layers()
            .iter()
            .map(|l| (l.id, l.map.as_ref().map(|m| m.runs())))
            .collect()
    }
}

/// Runs blocking filesystem work off the reactor.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::io("blocking task", std::io::Error::other(e.to_string())))?
}

/// Removes layer files newer than the head: a snapshot that crashed after
/// creating its file but before `meta.json` named it.
fn remove_orphan_layers(dir: &Path, chain: &[LayerId]) {
    let head = *chain.last().expect("validated chain");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("layer-"))
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if id > head.0 {
            tracing::warn!(path = %entry.path().display(), "removing layer file of an unfinished snapshot");
            let _ = std::fs::remove_file(entry.path());
        } else if !chain.contains(&LayerId(id)) {
            tracing::warn!(path = %entry.path().display(), "layer file not in the chain; leaving it");
        }
    }
}
