//! What a replica remembers about its volume besides the bytes: its own
//! identity, the volume's membership as the engine last wrote it, and the
//! dirty map — which regions may hold writes that not every replica has.
//!
//! The dirty map is what makes recovery cheap. A region is marked dirty,
//! durably, before the first write to it reaches the disk; it is cleared
//! only when the engine says every replica acknowledged every write to it.
//! After an engine crash only dirty regions need comparing; after a replica
//! was out, the healthy replica's dirty regions are exactly what it missed
//! (the engine clears nothing while a member is out).
//!
//! Files, next to the storage's own in `DATA/volumes/<name>/`:
//! `state.json` (replica id and membership; replaced atomically) and
//! `dirty.map` (the bitmap, one bit per [`REGION_SIZE`] bytes).
//!
//! This module never touches volume data.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shorthorn_proto::{Member, MemberState, Membership};

use crate::storage::StorageError;

/// Bytes per dirty region: the backup block size, small enough that a
/// crash with 64 writes in flight compares at most 128 MiB.
pub const REGION_SIZE: u64 = 2 << 20;

const STATE_FILE: &str = "state.json";
const STATE_TMP: &str = "state.json.tmp";
const DIRTY_FILE: &str = "dirty.map";

#[derive(Serialize, Deserialize)]
struct StateFile {
    replica_id: String,
    epoch: u64,
    members: Vec<MemberFile>,
}

#[derive(Serialize, Deserialize)]
struct MemberFile {
    id: String,
    addr: String,
    state: String,
}

pub struct VolumeState {
    dir: PathBuf,
    replica_id: String,
    membership: Mutex<Membership>,
    /// Serialises writers of `state.json`.
    membership_write: tokio::sync::Mutex<()>,
    dirty: DirtyMap,
    /// The newest writing session's number; older sessions may not change
    /// data any more.
    pub sessions: AtomicU64,
    /// Changing IO holds it shared; a new writing session takes it
    /// exclusively once, to wait out the older sessions' IO.
    pub io_gate: tokio::sync::RwLock<()>,
    /// Held while a writing session raises the generation and takes its
    /// session number, so the two go up in the same order: otherwise of two
    /// engines attaching at once, the newer generation could get the older
    /// session number, and each would be refused, one as stale and the
    /// other as replaced.
    pub attaching: tokio::sync::Mutex<()>,
    /// The engines whose writing sessions are open now, by session number:
    /// who they said they are and their generation. A volume with one is
    /// in use and is not deleted.
    engines: Mutex<Vec<(u64, String)>>,
}

/// An open writing session, counted in its volume's state while it lives.
pub struct Attached {
    state: Arc<VolumeState>,
    session: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut engines = self.state.engines.lock().unwrap();
        engines.retain(|(session, _)| *session != self.session);
    }
}

impl VolumeState {
    /// Loads the state of the volume in `dir`, creating it on first use.
    /// Blocking (small files).
    pub fn open(dir: &Path, volume_size: u64) -> std::io::Result<VolumeState> {
        let (replica_id, membership) = match std::fs::read(dir.join(STATE_FILE)) {
            Ok(raw) => {
                let f: StateFile = serde_json::from_slice(&raw).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", dir.join(STATE_FILE).display()),
                    )
                })?;
                let members = f
                    .members
                    .into_iter()
                    .map(|m| Member {
                        id: m.id,
                        addr: m.addr,
                        state: match m.state.as_str() {
                            "healthy" => MemberState::Healthy,
                            "rebuilding" => MemberState::Rebuilding,
                            _ => MemberState::Out,
                        },
                    })
                    .collect();
                (
                    f.replica_id,
                    Membership {
                        epoch: f.epoch,
                        members,
                    },
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = new_replica_id();
                write_state(dir, &id, &Membership::default())?;
                (id, Membership::default())
            }
            Err(e) => return Err(e),
        };
        let dirty = DirtyMap::open(&dir.join(DIRTY_FILE), volume_size)?;
        Ok(VolumeState {
            dir: dir.to_path_buf(),
            replica_id,
            membership: Mutex::new(membership),
            membership_write: tokio::sync::Mutex::new(()),
            dirty,
            sessions: AtomicU64::new(0),
            io_gate: tokio::sync::RwLock::new(()),
            attaching: tokio::sync::Mutex::new(()),
            engines: Mutex::new(Vec::new()),
        })
    }

    /// Counts writing session `session` of `engine` (its client name and
    /// generation, for messages) as open until the guard is dropped.
    pub fn attach(self: &Arc<Self>, session: u64, engine: String) -> Attached {
        self.engines.lock().unwrap().push((session, engine));
        Attached {
            state: self.clone(),
            session,
        }
    }

    /// The engine using this volume: the newest writing session's, while
    /// it is open. Older sessions, superseded, can no longer write.
    pub fn engine(&self) -> Option<String> {
        let newest = self.sessions.load(Ordering::Acquire);
        let engines = self.engines.lock().unwrap();
        let (_, engine) = engines.iter().find(|(session, _)| *session == newest)?;
        Some(engine.clone())
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    pub fn membership(&self) -> Membership {
        self.membership.lock().unwrap().clone()
    }

    /// Replaces the membership, durably. Only a higher epoch is accepted,
    /// so a delayed update can never roll it back.
    pub async fn set_membership(self: &Arc<Self>, m: Membership) -> Result<(), StorageError> {
        let _w = self.membership_write.lock().await;
        let current = self.membership.lock().unwrap().epoch;
        if m.epoch <= current {
            return Err(StorageError::Invalid(format!(
                "membership epoch {} is not newer than the replica's {current}",
                m.epoch
            )));
        }
        let this = self.clone();
        let m2 = m.clone();
        tokio::task::spawn_blocking(move || write_state(&this.dir, &this.replica_id, &m2))
            .await
            .map_err(|e| StorageError::io("saving membership", std::io::Error::other(e)))?
            .map_err(|e| StorageError::io("saving membership", e))?;
        *self.membership.lock().unwrap() = m;
        Ok(())
    }

    pub fn dirty(&self) -> &DirtyMap {
        &self.dirty
    }
}

fn new_replica_id() -> String {
    let mut b = [0u8; 8];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ std::process::id() as u64).to_le_bytes();
    }
    format!("r-{:016x}", u64::from_le_bytes(b))
}

fn write_state(dir: &Path, replica_id: &str, m: &Membership) -> std::io::Result<()> {
    if let Some(e) = crate::storage::io::fault::membership_fault(dir) {
        return Err(e);
    }
    let f = StateFile {
        replica_id: replica_id.to_string(),
        epoch: m.epoch,
        members: m
            .members
            .iter()
            .map(|m| MemberFile {
                id: m.id.clone(),
                addr: m.addr.clone(),
                state: m.state.as_str().to_string(),
            })
            .collect(),
    };
    let raw = serde_json::to_vec_pretty(&f).expect("state serialises");
    let tmp = dir.join(STATE_TMP);
    let written = File::create(&tmp).and_then(|mut out| {
        out.write_all(&raw)?;
        out.sync_all()
    });
    if let Err(e) = written {
        // A full disk must not leave a half-written file behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    File::open(dir)?.sync_all()
}

/// The dirty bitmap: in memory for the data path, on disk before it matters.
pub struct DirtyMap {
    words: Box<[AtomicU64]>,
    regions: u64,
    file: Arc<File>,
    /// Bumped by every clean-to-dirty transition.
    marked: AtomicU64,
    /// The `marked` value the file is known to hold, durably.
    persisted: AtomicU64,
    /// Clears not yet written to the file (written with the next persist).
    clears_pending: AtomicBool,
    /// Regions cleared in memory whose data has not reached stable storage
    /// since: the file keeps them dirty until it has. A clean region's
    /// writes were acknowledged, not necessarily flushed; were its clear
    /// durable first, a power cut could drop a write from the disk's cache
    /// and the mark that sends its region to be compared, both at once.
    unflushed: Box<[AtomicU64]>,
    /// Per word of `unflushed`: the number of the last clear in it. A flush
    /// releases a word's clears only if they all came before it began: a
    /// region cleared again during a flush (written, then clean again) may
    /// hold a write that flush did not cover.
    cleared_at: Box<[AtomicU64]>,
    /// The next clear's number. Held while clearing and while releasing,
    /// so the two never interleave.
    next_clear: std::sync::Mutex<u64>,
    /// Serialises writes of the file, so an older picture never lands
    /// after a newer one.
    writer: tokio::sync::Mutex<()>,
}

impl DirtyMap {
    fn open(path: &Path, volume_size: u64) -> std::io::Result<DirtyMap> {
        let regions = volume_size.div_ceil(REGION_SIZE);
        let nwords = regions.div_ceil(64) as usize;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut raw = vec![0u8; nwords * 8];
        let len = file.metadata()?.len();
        let words: Vec<AtomicU64> = if len == raw.len() as u64 {
            file.read_exact_at(&mut raw, 0)?;
            raw.chunks_exact(8)
                .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap())))
                .collect()
        } else if len == 0 {
            (0..nwords).map(|_| AtomicU64::new(0)).collect()
        } else {
            // A map of the wrong size cannot be trusted: everything may be
            // dirty (costs a full compare once, loses nothing).
            tracing::warn!(path = %path.display(), len, "dirty map has the wrong size; treating every region as dirty");
            (0..nwords).map(|_| AtomicU64::new(u64::MAX)).collect()
        };
        let map = DirtyMap {
            words: words.into_boxed_slice(),
            regions,
            file: Arc::new(file),
            marked: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
            clears_pending: AtomicBool::new(false),
            unflushed: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            cleared_at: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            next_clear: std::sync::Mutex::new(1),
            writer: tokio::sync::Mutex::new(()),
        };
        map.trim_tail();
        write_words(&map.file, &map.image())?;
        map.file.sync_data()?;
        Ok(map)
    }

    fn trim_tail(&self) {
        let used = self.regions % 64;
        if used != 0 {
            if let Some(last) = self.words.last() {
                last.fetch_and((1u64 << used) - 1, Ordering::Relaxed);
            }
        }
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Marks the regions under `[offset, offset+len)` dirty in memory, at
    /// once (in request order). Returns a ticket to [`persist`](Self::persist)
    /// before the write may touch the disk, or `None` when every region was
    /// already dirty (the common case: no wait at all).
    pub fn mark(&self, offset: u64, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let first = offset / REGION_SIZE;
        let last = (offset.saturating_add(len) - 1) / REGION_SIZE;
        let last = last.min(self.regions.saturating_sub(1));
        let mut newly = false;
        for r in first..=last {
            let bit = 1u64 << (r % 64);
            let prev = self.words[(r / 64) as usize].fetch_or(bit, Ordering::AcqRel);
            newly |= prev & bit == 0;
        }
        if newly {
            Some(self.marked.fetch_add(1, Ordering::AcqRel) + 1)
        } else if self.persisted.load(Ordering::Acquire) < self.marked.load(Ordering::Acquire) {
            // Another request dirtied the region a moment ago and may not
            // have persisted it yet: wait for that too.
            Some(self.marked.load(Ordering::Acquire))
        } else {
            None
        }
    }

    /// Returns once the file durably holds every mark up to `ticket`.
    pub async fn persist(&self, ticket: u64) -> std::io::Result<()> {
        if self.persisted.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let _w = self.writer.lock().await;
        if self.persisted.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let target = self.marked.load(Ordering::Acquire);
        self.clears_pending.store(false, Ordering::Release);
        let words = self.image();
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            write_words(&file, &words)?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)??;
        self.persisted.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Clears the regions set in `bitmap` (one bit per region, LSB first).
    /// In memory at once; the file catches up with the next persist or
    /// [`sync_clears`](Self::sync_clears) once the data is flushed (see
    /// [`releasing_clears`](Self::releasing_clears)) — a clear lost in a crash only
    /// costs one extra compare.
    pub fn clear(&self, bitmap: &[u8]) {
        let mut next = self.next_clear.lock().unwrap();
        let number = *next;
        *next += 1;
        for (i, byte) in bitmap.iter().enumerate() {
            if *byte == 0 {
                continue;
            }
            let word = i / 8;
            if word >= self.words.len() {
                break;
            }
            let mask = (*byte as u64) << ((i % 8) * 8);
            self.cleared_at[word].store(number, Ordering::Release);
            // Unflushed first: the file's picture never shows the region
            // clean in between.
            self.unflushed[word].fetch_or(mask, Ordering::AcqRel);
            self.words[word].fetch_and(!mask, Ordering::AcqRel);
        }
        self.clears_pending.store(true, Ordering::Release);
    }

    /// Runs `flush`, a flush of the replica's data; when it succeeds, the
    /// clears made before it began may reach the file (with the next
    /// persist or [`sync_clears`](Self::sync_clears)).
    pub async fn releasing_clears<T, E>(
        &self,
        flush: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let ticket = self.flush_ticket();
        let flushed = flush.await;
        if flushed.is_ok() {
            self.data_flushed(ticket);
        }
        flushed
    }

    /// Stands for the clears made so far: taken before a flush begins.
    fn flush_ticket(&self) -> u64 {
        *self.next_clear.lock().unwrap()
    }

    /// A flush that began after `ticket` was taken succeeded: the clears
    /// made before the ticket may reach the file, except in words cleared
    /// again since (those wait for a later flush).
    fn data_flushed(&self, ticket: u64) {
        let _numbering = self.next_clear.lock().unwrap();
        for (w, at) in self.unflushed.iter().zip(self.cleared_at.iter()) {
            if at.load(Ordering::Acquire) < ticket && w.load(Ordering::Acquire) != 0 {
                w.store(0, Ordering::Release);
                self.clears_pending.store(true, Ordering::Release);
            }
        }
    }

    /// Writes pending clears whose data is flushed to the file (not synced:
    /// see [`clear`](Self::clear)).
    pub async fn sync_clears(&self) -> std::io::Result<()> {
        if !self.clears_pending.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let _w = self.writer.lock().await;
        let words = self.image();
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || write_words(&file, &words))
            .await
            .map_err(std::io::Error::other)?
    }

    fn snapshot_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// What the file must hold: the dirty regions, and the cleared ones
    /// whose data is not durable yet.
    fn image(&self) -> Vec<u64> {
        self.words
            .iter()
            .zip(self.unflushed.iter())
            .map(|(w, u)| w.load(Ordering::Acquire) | u.load(Ordering::Acquire))
            .collect()
    }

    /// The bitmap as bytes (one bit per region, LSB first).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in self.snapshot_words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(self.regions.div_ceil(8) as usize);
        Bytes::from(out)
    }

    pub fn dirty_count(&self) -> u64 {
        self.snapshot_words()
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum()
    }
}

fn write_words(file: &File, words: &[u64]) -> std::io::Result<()> {
    let mut raw = Vec::with_capacity(words.len() * 8);
    for w in words {
        raw.extend_from_slice(&w.to_le_bytes());
    }
    file.write_all_at(&raw, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marks_persist_before_the_write_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * REGION_SIZE + 4096;
        let st = VolumeState::open(dir.path(), size).unwrap();
        let id = st.replica_id().to_string();
        assert_eq!(st.dirty().regions(), 65);
        let t = st
            .dirty()
            .mark(REGION_SIZE - 1, 2)
            .expect("new regions need a persist");
        st.dirty().persist(t).await.unwrap();
        assert_eq!(
            st.dirty().mark(REGION_SIZE, 10),
            None,
            "already dirty and durable"
        );
        if let Some(t) = st.dirty().mark(64 * REGION_SIZE, 4096) {
            st.dirty().persist(t).await.unwrap();
        }
        drop(st);
        let st = VolumeState::open(dir.path(), size).unwrap();
        assert_eq!(st.replica_id(), id, "the replica id is stable");
        let bits = st.dirty().to_bytes();
        assert_eq!(bits[0], 0b11);
        assert_eq!(bits[8], 0b1, "region 64");
        assert_eq!(st.dirty().dirty_count(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clears_reach_the_file_only_after_their_data_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let st = VolumeState::open(dir.path(), 16 * REGION_SIZE).unwrap();
        for r in 0..16 {
            if let Some(t) = st.dirty().mark(r * REGION_SIZE, 1) {
                st.dirty().persist(t).await.unwrap();
            }
        }
        let before_flush = st.dirty().flush_ticket();
        st.dirty().clear(&[0b0000_0101, 0b1000_0000]);
        assert_eq!(st.dirty().dirty_count(), 13);
        // Clears whose data is not flushed never reach the file.
        st.dirty().sync_clears().await.unwrap();
        let reopened = VolumeState::open(dir.path(), 16 * REGION_SIZE).unwrap();
        assert_eq!(reopened.dirty().dirty_count(), 16, "still dirty on disk");
        drop(reopened);
        // A flush that began before the clears does not cover them.
        st.dirty().data_flushed(before_flush);
        st.dirty().sync_clears().await.unwrap();
        let reopened = VolumeState::open(dir.path(), 16 * REGION_SIZE).unwrap();
        assert_eq!(reopened.dirty().dirty_count(), 16);
        drop(reopened);
        // A region written and cleared again while a flush runs: that flush
        // may have missed the write, so the region stays dirty on disk.
        let during = st.dirty().flush_ticket();
        if let Some(t) = st.dirty().mark(0, 1) {
            st.dirty().persist(t).await.unwrap();
        }
        st.dirty().clear(&[0b0000_0001]);
        st.dirty().data_flushed(during);
        st.dirty().sync_clears().await.unwrap();
        let reopened = VolumeState::open(dir.path(), 16 * REGION_SIZE).unwrap();
        assert_eq!(
            reopened.dirty().dirty_count(),
            16,
            "cleared again during the flush"
        );
        drop(reopened);
        // One that began after the clears covers them; a region written
        // again after its clear stays dirty.
        let awaiting = st.dirty().flush_ticket();
        if let Some(t) = st.dirty().mark(2 * REGION_SIZE, 1) {
            st.dirty().persist(t).await.unwrap();
        }
        st.dirty().data_flushed(awaiting);
        st.dirty().sync_clears().await.unwrap();
        drop(st);
        let st = VolumeState::open(dir.path(), 16 * REGION_SIZE).unwrap();
        assert_eq!(st.dirty().dirty_count(), 14);
        assert_eq!(st.dirty().to_bytes()[..], [0b1111_1110, 0b0111_1111]);
    }

    #[tokio::test]
    async fn membership_only_moves_forward() {
        let dir = tempfile::tempdir().unwrap();
        let st = Arc::new(VolumeState::open(dir.path(), REGION_SIZE).unwrap());
        let m = Membership {
            epoch: 3,
            members: vec![Member {
                id: st.replica_id().to_string(),
                addr: "a:1".into(),
                state: MemberState::Healthy,
            }],
        };
        st.set_membership(m.clone()).await.unwrap();
        assert!(st.set_membership(m.clone()).await.is_err());
        let st2 = VolumeState::open(dir.path(), REGION_SIZE).unwrap();
        assert_eq!(st2.membership(), m);
        assert!(!dir.path().join(STATE_TMP).exists());
    }
}
