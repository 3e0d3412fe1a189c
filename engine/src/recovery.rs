//! Bringing replicas back to identical, while the volume serves:
//!
//! - **reconcile**: after an engine crash, compare the healthy replicas
//!   only where a write may have been in flight (their dirty regions) and
//!   copy the differences from one of them;
//! - **rebuild**: a replica that is out (dropped, restarted, or new) gets
//!   live writes again at once, and the rest is copied from a healthy one —
//!   only the regions written since it went out (delta), or everything for
//!   a new replica — comparing hashes first so identical chunks cost no
//!   copy. It joins the healthy set only when done;
//! - **clean**: once every replica is healthy, tell them which regions
//!   every replica acknowledged, so the next crash compares less.
//!
//! A copy holds the volume's range lock for its region, so a live write to
//! the same region is ordered before or after it, never interleaved.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;

use shorthorn_proto::{ErrorCode, MemberState, Reply, Request};
use tracing::{info, warn};

use crate::error::EngineError;
use crate::replica_client::{ClientError, ReplicaClient};
use crate::slot::Slot;
use crate::tracker::{bitmap_of, set_regions, union};
use crate::volume::Volume;

/// Chunk size for hash comparison within a region.
const HASH_CHUNK: u32 = 64 * 1024;
/// How often the recovery loop looks at out replicas and cleans.
const TICK: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Between two tries to bring back a replica last dropped as too slow
/// (see [`Slot::too_slow`]), at least [`MAX_BACKOFF`] and at most this:
/// each try that fails the same way stalls the writes waiting for it for
/// up to three IO timeouts, so a link that cannot carry the volume's writes
/// costs a few per cent of the time rather than half.
const SLOW_MAX_BACKOFF: Duration = Duration::from_secs(120);
/// The shortest and longest wait between two tries to bring `slot` back.
fn backoff_bounds(slot: &Slot) -> (Duration, Duration) {
    if slot.too_slow() {
        (MAX_BACKOFF, SLOW_MAX_BACKOFF)
    } else {
        (Duration::from_millis(500), MAX_BACKOFF)
    }
}

/// Recovery ticks per clean pass.
const CLEAN_EVERY: u32 = 3;
/// Time between two pings of each replica: a replica whose node vanished
/// while the volume was idle (power cut, network gone: its connection
/// stays open, silent) is out within this plus the IO timeout, so `volume
/// status` tells the truth before anyone relies on it, and the next IO
/// does not pay the timeout. A request that has waited its limit on a slow
/// replica asks for pings at once ([`Volume::ping_now`]).
const PING_EVERY: Duration = Duration::from_secs(5);

/// How many clean passes a region must go without a write before it is
/// cleaned, for it to have been idle at least `clean_after`: a write lands
/// anywhere between two passes, so one pass more than the window holds.
fn clean_min_idle_passes(clean_after: Duration) -> u32 {
    let pass = TICK * CLEAN_EVERY;
    let passes = clean_after.as_nanos().div_ceil(pass.as_nanos());
    u32::try_from(passes).unwrap_or(u32::MAX - 1) + 1
}
/// Regions a rebuild compares and copies at once.
const REBUILD_PARALLEL: usize = 4;
/// How often a long comparison at start says how far it is.
const RECONCILE_PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Volume {
    /// Makes every healthy replica identical over `dirty` (a region bitmap).
    pub(crate) async fn reconcile(&self, dirty: &[u8]) -> Result<(), EngineError> {
        let healthy: Vec<(Arc<Slot>, Arc<ReplicaClient>)> = self
            .slots
            .load()
            .iter()
            .filter(|s| s.state() == MemberState::Healthy)
            .filter_map(|s| s.client().map(|c| (s.clone(), c)))
            .collect();
        let regions: Vec<u64> = set_regions(dirty)
            .filter(|r| *r < self.tracker.regions())
            .collect();
        if healthy.len() < 2 || regions.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let region_size = self.tracker.region_size();
        self.stats
            .reconcile_total
            .store(regions.len() as u64 * region_size, Ordering::Relaxed);
        info!(
            volume = %self.name, regions = regions.len(),
            bytes = regions.len() as u64 * region_size,
            "comparing the replicas where writes may have been in flight; serving once done"
        );
        let mut said = started;
        let (source, others) = healthy.split_first().expect("two or more");
        let mut copied = 0u64;
        for (done, &r) in regions.iter().enumerate() {
            if said.elapsed() >= RECONCILE_PROGRESS_EVERY {
                said = Instant::now();
                info!(
                    volume = %self.name, regions_done = done, regions = regions.len(),
                    bytes_copied = copied, "still comparing"
                );
            }
            for target in others {
                match self.sync_region(r, source, target).await {
                    Ok(n) => {
                        copied += n;
                        self.stats.reconcile_copied.fetch_add(n, Ordering::Relaxed);
                    }
                    Err((bad, e)) => {
                        self.fail(&bad, &e);
                        self.check_fenced()?;
                    }
                }
            }
            self.stats
                .reconcile_compared
                .fetch_add(region_size, Ordering::Relaxed);
        }
        let compared = regions.len() as u64 * region_size;
        info!(
            volume = %self.name, regions = regions.len(), bytes_compared = compared,
            bytes_copied = copied, volume_size = self.size, ms = started.elapsed().as_millis() as u64,
            "reconciled the replicas where writes may have been in flight"
        );
        // Identical now: if everyone is healthy those regions are clean.
        self.clean(|| Some(dirty.to_vec())).await;
        self.ensure_membership().await
    }

    fn all_healthy(&self) -> bool {
        self.slots
            .load()
            .iter()
            .all(|s| s.state() == MemberState::Healthy && s.client().is_some())
    }

    /// Compares one region of `target` with `source` and copies the chunks
    /// that differ. Holds the region's write lock throughout. Returns the
    /// bytes copied, or which side failed.
    async fn sync_region(
        &self,
        region: u64,
        (src_slot, src): &(Arc<Slot>, Arc<ReplicaClient>),
        (dst_slot, dst): &(Arc<Slot>, Arc<ReplicaClient>),
    ) -> Result<u64, (Arc<Slot>, ClientError)> {
        let rs = self.tracker.region_size();
        let offset = region * rs;
        let len = rs.min(self.size - offset);
        let _lock = self.writes.lock(offset, offset + len).await;
        let hashes = Request::Hashes {
            offset,
            len,
            chunk: HASH_CHUNK,
        };
        let (a, b) = futures::join!(src.call(hashes.clone()), dst.call(hashes));
        let a = hash_list(a, src).map_err(|e| (src_slot.clone(), e))?;
        let b = hash_list(b, dst).map_err(|e| (dst_slot.clone(), e))?;
        // Every differing chunk at once: reads from the source in
        // parallel, then writes to the target in parallel.
        let differing: Vec<(u64, u32)> = a
            .iter()
            .zip(b.iter())
            .enumerate()
            .filter(|(_, (ha, hb))| ha != hb)
            .map(|(i, _)| {
                let o = offset + i as u64 * HASH_CHUNK as u64;
                (o, (offset + len - o).min(HASH_CHUNK as u64) as u32)
            })
            .collect();
        let reads = join_all(
            differing
                .iter()
                .map(|&(o, n)| src.call(Request::Read { offset: o, len: n })),
        )
        .await;
        let mut writes = Vec::with_capacity(reads.len());
        for (&(o, _), r) in differing.iter().zip(reads) {
            let data = match r {
                Ok(Reply::Data(d)) => d,
                Ok(other) => return Err((src_slot.clone(), src.unexpected(&other))),
                Err(e) => return Err((src_slot.clone(), e)),
            };
            writes.push(dst.call_done(Request::Write {
                offset: o,
                fua: false,
                data,
            }));
        }
        for w in join_all(writes).await {
            w.map_err(|e| (dst_slot.clone(), e))?;
        }
        let copied = differing.iter().map(|&(_, n)| n as u64).sum();
        Ok(copied)
    }

    /// Tells every replica that the regions `pick` returns (run under the
    /// gate, so no write to them can be queued in between) are clean. Only
    /// when every member is healthy: while one is out, the dirty regions
    /// are exactly what it will need.
    async fn clean(&self, pick: impl FnOnce() -> Option<Vec<u8>>) {
        if !self.all_healthy() {
            return;
        }
        let calls: Vec<_> = {
            let _no_writes_between = self.gate.write().unwrap();
            let Some(bitmap) = pick() else {
                return;
            };
            // Asked again after the pick: a write that failed on a replica
            // marks it out before its regions stop counting as in flight
            // (`fan_out`), so a region picked as idle whose write someone
            // missed is caught here, on any thread.
            if !self.all_healthy() {
                self.tracker.retouch(&bitmap);
                return;
            }
            let bitmap = bytes::Bytes::from(bitmap);
            self.slots
                .load()
                .iter()
                .filter_map(|s| s.client().map(|c| (s.clone(), c)))
                .map(|(s, c)| {
                    let call = c.start(Request::MarkClean {
                        bitmap: bitmap.clone(),
                    });
                    (s, call)
                })
                .collect()
        };
        for (slot, call) in calls {
            if let Err(e) = call.done().await {
                self.fail(&slot, &e);
            }
        }
    }

    /// Cleans the regions written since the last clean that have nothing
    /// in flight and have been idle for a while.
    async fn clean_idle_regions(&self) {
        self.clean(|| {
            self.tracker.tick();
            self.tracker
                .take_cleanable(clean_min_idle_passes(self.options.clean_after))
        })
        .await
    }

    /// Cleans every region written since the last clean, at once: for an
    /// engine that is stopping, after its last flush, with no IO left in
    /// flight. The next start then has nothing to compare.
    pub async fn clean_at_stop(&self) {
        self.clean(|| self.tracker.take_cleanable(0)).await
    }

    /// Starts the loop that cleans, retries out replicas with backoff and
    /// rebuilds them, one at a time, until the volume is dropped.
    pub(crate) fn spawn_recovery(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        let wake = self.wake.clone();
        drop(self);
        tokio::spawn(async move {
            let mut next_try: std::collections::HashMap<String, (Instant, Duration)> =
                Default::default();
            let mut ticks: u32 = 0;
            loop {
                // Waits holding no reference: a stopped engine's volume (and
                // its sessions with the replicas) goes at once, not a tick
                // later.
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
                let Some(v) = weak.upgrade() else { return };
                if v.check_fenced().is_err() || v.is_stopping() {
                    return;
                }
                ticks = ticks.wrapping_add(1);
                // A replica whose daemon went away while the volume was idle
                // is out now, not at the next write.
                for slot in v.slots.load().iter() {
                    if slot.takes_writes() && slot.client().is_some_and(|c| c.is_closed()) {
                        v.mark_out(slot, "its connection closed");
                    }
                }
                if ticks.is_multiple_of(CLEAN_EVERY) {
                    v.clean_idle_regions().await;
                }
                let out: Vec<Arc<Slot>> = v
                    .slots
                    .load()
                    .iter()
                    .filter(|s| s.state() == MemberState::Out)
                    .cloned()
                    .collect();
                for slot in out {
                    if v.is_stopping() {
                        return;
                    }
                    let now = Instant::now();
                    let (floor, cap) = backoff_bounds(&slot);
                    // Dropped as too slow, it is not tried again at once.
                    let first = (if slot.too_slow() { now + floor } else { now }, floor);
                    let (at, backoff) = *next_try.entry(slot.addr.clone()).or_insert(first);
                    if now < at {
                        continue;
                    }
                    match v.clone().bring_back(&slot).await {
                        Ok(()) => {
                            next_try.remove(&slot.addr);
                        }
                        Err(e) => {
                            *slot.progress.last.lock().unwrap() = Some(e.clone());
                            let backoff = (backoff * 2).clamp(floor, cap);
                            next_try.insert(slot.addr.clone(), (Instant::now() + backoff, backoff));
                            tracing::debug!(volume = %v.name, replica = %slot.addr, error = %e, ?backoff, "replica not back yet");
                        }
                    }
                }
            }
        });
    }

    /// Starts the task that pings every replica taking writes, every
    /// [`PING_EVERY`] and whenever asked ([`Volume::ping_now`]), until the
    /// volume is dropped or fenced: from the start's comparison until the
    /// engine lets the volume go. It runs apart from the recovery loop,
    /// which a rebuild or a clean waiting on a slow replica can hold up for
    /// long.
    pub(crate) fn spawn_pinger(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        let asked = self.ping_now.clone();
        drop(self);
        tokio::spawn(async move {
            let mut pings: std::collections::HashMap<String, tokio::task::JoinHandle<()>> =
                Default::default();
            loop {
                // Waits holding no reference, like the recovery loop.
                tokio::select! {
                    _ = asked.notified() => {}
                    _ = tokio::time::sleep(PING_EVERY) => {}
                }
                let Some(v) = weak.upgrade() else { return };
                if v.check_fenced().is_err() {
                    return;
                }
                pings.retain(|_, ping| !ping.is_finished());
                for slot in v.slots.load().iter() {
                    if slot.takes_writes() && !pings.contains_key(&slot.addr) {
                        if let Some(ping) = Volume::ping(&v, slot) {
                            pings.insert(slot.addr.clone(), ping);
                        }
                    }
                }
            }
        });
    }

    /// Pings `slot`'s replica over its connection, in a task of its own;
    /// one that does not answer within the IO timeout is marked out, as
    /// for any request. None for a replica in this process (it cannot go
    /// silent without the engine) or without a connection.
    fn ping(volume: &Arc<Volume>, slot: &Arc<Slot>) -> Option<tokio::task::JoinHandle<()>> {
        let client = slot.client().filter(|c| !c.is_local())?;
        let (weak, slot) = (Arc::downgrade(volume), slot.clone());
        // The wait holds the call, not the client: a ping in flight never
        // keeps a connection open after the engine has let the volume go
        // (the replica would still count it attached, and refuse to delete
        // the volume).
        let call = client.start(Request::Ping);
        let client = Arc::downgrade(&client);
        Some(tokio::spawn(async move {
            let answer = call.wait().await;
            let Some(v) = weak.upgrade() else { return };
            let Some(client) = client.upgrade() else {
                return;
            };
            // Only if the slot still uses this connection: a replica
            // reconnected meanwhile has answered on its new one.
            let current = slot.client().is_some_and(|c| Arc::ptr_eq(&c, &client));
            match answer {
                Ok(Reply::Pong) => {}
                Ok(other) if current => v.mark_out(&slot, &client.unexpected(&other).to_string()),
                Err(e) if current => v.fail(&slot, &e),
                _ => {}
            }
        }))
    }

    /// Reconnects an out replica, rebuilds it and makes it healthy.
    async fn bring_back(self: Arc<Self>, slot: &Arc<Slot>) -> Result<(), String> {
        let client = match ReplicaClient::connect(
            &slot.addr,
            &self.options.client_id,
            self.name.as_str(),
            self.generation,
            self.options.io_timeout,
        )
        .await
        {
            Ok(client) => client,
            Err(e) => {
                // Refused for its generation: a newer engine has claimed
                // the volume meanwhile. fail() says so and stops all IO.
                if e.remote()
                    .is_some_and(|r| r.code == ErrorCode::StaleGeneration)
                {
                    self.fail(slot, &e);
                }
                return Err(e.to_string());
            }
        };
        if client.volume().map(|v| v.size) != Some(self.size) {
            return Err(format!(
                "replica {} has the volume at another size; refusing to rebuild it",
                slot.addr
            ));
        }
        let state = match client.call(Request::GetState).await {
            Ok(Reply::State(s)) => s,
            Ok(other) => return Err(client.unexpected(&other).to_string()),
            Err(e) => return Err(e.to_string()),
        };
        // A membership newer than any this engine has used was saved by
        // an engine this one never heard of: that replica may hold writes
        // no replica here has. Rebuilding it would overwrite them.
        let ours = self.membership_epoch().await;
        if state.membership.epoch > ours {
            return Err(format!(
                "replica {} holds a newer membership (epoch {}) than this engine's ({ours}): it \
                 may hold writes no replica here has, so it is not rebuilt over. Stop this \
                 engine and look with `shorthorn volume inspect`",
                slot.addr, state.membership.epoch
            ));
        }
        let known = slot.id();
        let delta = !known.is_empty() && known == state.replica_id && !slot.full_rebuild_pending();
        if !known.is_empty() && known != state.replica_id {
            warn!(volume = %self.name, replica = %slot.addr, was = %known, now = %state.replica_id,
                "a different replica answers at this address; rebuilding it in full");
        }
        slot.set_id(&state.replica_id);
        let client = Arc::new(client);
        if delta
            && self
                .readmit(slot, &client)
                .await
                .map_err(|e| e.to_string())?
        {
            *slot.progress.last.lock().unwrap() = None;
            return Ok(());
        }
        if !delta {
            slot.set_full_rebuild_pending(true);
        }

        // Live writes reach it from here on; nothing reads from it yet.
        {
            let _g = self.gate.write().unwrap();
            slot.set_client(Some(client.clone()));
            slot.set_state(MemberState::Rebuilding);
        }
        self.bump_version();
        if let Err(e) = self.ensure_membership().await {
            // No healthy replica took it (none may be left): out again, and
            // retried, rather than left rebuilding with no rebuild running.
            self.mark_out(slot, &e.to_string());
            return Err(e.to_string());
        }

        let result = self.rebuild(slot, &client, delta, &state.dirty).await;
        *slot.progress.finished.lock().unwrap() = Some(Instant::now());
        match result {
            Ok(()) => self.promote(slot).await,
            Err(e) => {
                if e.addr() != slot.addr
                    && e.remote().map(|r| r.code) != Some(ErrorCode::StaleGeneration)
                {
                    // The source failed (and is out already): the
                    // rebuilt replica did nothing wrong.
                    self.mark_out(slot, &format!("its rebuild source failed: {e}"));
                } else {
                    self.fail(slot, &e);
                }
                // Why it is out: a write may have failed it first.
                Err(slot
                    .progress
                    .last
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_else(|| e.to_string()))
            }
        }
    }

    /// Makes a rebuilt replica healthy. It counts as healthy only once a
    /// replica that is healthy now has saved a membership listing it so:
    /// otherwise a source that missed its promotion and then dropped out
    /// would still see itself as the only up-to-date replica, start alone
    /// later and serve data older than writes acknowledged since.
    async fn promote(&self, slot: &Arc<Slot>) -> Result<(), String> {
        slot.set_promoting(true);
        self.bump_version();
        let saved = self.ensure_membership().await;
        slot.set_promoting(false);
        if let Err(e) = saved {
            self.mark_out(
                slot,
                &format!("its promotion to healthy was not saved: {e}"),
            );
            return Err(e.to_string());
        }
        if !slot.transition(MemberState::Rebuilding, MemberState::Healthy) {
            return Err("replica failed during its rebuild".into());
        }
        self.note_peers();
        slot.set_full_rebuild_pending(false);
        slot.set_too_slow(false);
        *slot.progress.last.lock().unwrap() = None;
        Ok(())
    }

    async fn rebuild(
        &self,
        slot: &Arc<Slot>,
        client: &Arc<ReplicaClient>,
        delta: bool,
        target_dirty: &[u8],
    ) -> Result<(), ClientError> {
        let Some(source) = self
            .slots
            .load()
            .iter()
            .filter(|s| s.state() == MemberState::Healthy)
            .find_map(|s| s.client().map(|c| (s.clone(), c)))
        else {
            return Err(ClientError::Closed {
                addr: slot.addr.clone(),
                reason: "no healthy replica to rebuild from".into(),
            });
        };
        let regions: Vec<u64> = if delta {
            let src_dirty = match source.1.call(Request::GetState).await? {
                Reply::State(s) => s.dirty,
                other => return Err(source.1.unexpected(&other)),
            };
            set_regions(&union(&src_dirty, target_dirty))
                .filter(|r| *r < self.tracker.regions())
                .collect()
        } else {
            (0..self.tracker.regions()).collect()
        };
        let rebuilt = bitmap_of(&regions);
        let rs = self.tracker.region_size();
        let p = &slot.progress;
        p.total.store(regions.len() as u64 * rs, Ordering::Relaxed);
        p.scanned.store(0, Ordering::Relaxed);
        p.copied.store(0, Ordering::Relaxed);
        *p.started.lock().unwrap() = Some(Instant::now());
        *p.finished.lock().unwrap() = None;
        info!(
            volume = %self.name, replica = %slot.addr, kind = if delta { "delta" } else { "full" },
            regions = regions.len(), bytes = regions.len() as u64 * rs,
            "rebuild started"
        );
        let started = Instant::now();
        let target = (slot.clone(), client.clone());
        // A few regions at a time: each holds only its own range lock, so
        // live writes elsewhere go on, and the disks see a queue.
        let mut copies = futures::stream::iter(regions)
            .map(|r| {
                let (source, target) = (&source, &target);
                async move { self.sync_region(r, source, target).await }
            })
            .buffer_unordered(REBUILD_PARALLEL);
        while let Some(result) = copies.next().await {
            if self.is_stopping() {
                // The next engine rebuilds it (it is not healthy in the
                // saved membership); this one's stop does not wait.
                return Err(ClientError::Closed {
                    addr: slot.addr.clone(),
                    reason: "the engine is stopping".into(),
                });
            }
            if slot.state() != MemberState::Rebuilding {
                // Dropped by a live write or a membership save; say why.
                let why = slot.progress.last.lock().unwrap().clone();
                return Err(ClientError::Closed {
                    addr: slot.addr.clone(),
                    reason: match why {
                        Some(why) => format!("dropped during rebuild: {why}"),
                        None => "dropped during rebuild".into(),
                    },
                });
            }
            match result {
                Ok(n) => {
                    p.copied.fetch_add(n, Ordering::Relaxed);
                    p.scanned.fetch_add(rs, Ordering::Relaxed);
                }
                Err((bad, e)) if Arc::ptr_eq(&bad, slot) => return Err(e),
                Err((bad, e)) => {
                    self.fail(&bad, &e);
                    return Err(e);
                }
            }
        }
        drop(copies);
        client.call_done(Request::Flush).await?;
        // The copies marked their regions dirty on the rebuilt replica, and
        // the source's may be dirty from the writes it missed. Counted as
        // written, they are cleaned on every replica once idle, like a
        // client's writes: otherwise the next engine start would compare
        // them all again (after a full rebuild, the whole volume).
        self.tracker.retouch(&rebuilt);
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        let scanned = p.scanned.load(Ordering::Relaxed);
        info!(
            volume = %self.name, replica = %slot.addr, kind = if delta { "delta" } else { "full" },
            bytes_compared = scanned, bytes_copied = p.copied.load(Ordering::Relaxed),
            seconds = format!("{secs:.2}"), mib_per_s = format!("{:.1}", scanned as f64 / secs / 1048576.0),
            "rebuild finished"
        );
        Ok(())
    }

    /// Adds a replica (its volume already created on its daemon) and starts
    /// rebuilding it in full.
    pub async fn add_replica(self: &Arc<Self>, addr: &str) -> Result<(), EngineError> {
        if self.slots.load().iter().any(|s| s.addr == addr) {
            return Err(EngineError::Membership {
                volume: self.name.to_string(),
                detail: format!("{addr} is already a replica of this volume"),
            });
        }
        // The same daemon may go by another name (localhost, a DNS name):
        // its replica id tells. A volume holding one replica twice would
        // open two writing sessions on it, each superseding the other.
        if let Ok(seen) = crate::attach::look(
            addr,
            &self.options.client_id,
            self.name.as_str(),
            self.options.io_timeout,
        )
        .await
        {
            let id = &seen.state.replica_id;
            let slots = self.slots.load();
            if let Some(same) = slots.iter().find(|s| s.id() == *id) {
                return Err(EngineError::Membership {
                    volume: self.name.to_string(),
                    detail: format!(
                        "{addr} is the replica daemon already in this volume as {}; if it has \
                         moved to {addr}, remove the old address first (`shorthorn volume \
                         remove-replica {} --replica {}`), then add it again",
                        same.addr, self.name, same.addr
                    ),
                });
            }
            // A replica that has served writes in a history of its own
            // (its membership names none of ours) holds someone's data:
            // the full rebuild would overwrite it. One that was ours
            // before (removed, now added back) names us, and a new one
            // has no membership yet.
            let theirs = &seen.state.membership;
            let ours = |m: &shorthorn_proto::Member| slots.iter().any(|s| s.id() == m.id);
            if theirs.epoch > 0 && !theirs.members.iter().any(ours) {
                return Err(EngineError::Membership {
                    volume: self.name.to_string(),
                    detail: format!(
                        "{addr} already holds a volume named {} that was used apart from this \
                         one (its membership, epoch {}, names none of this volume's replicas); \
                         adding it would overwrite that data. Delete it there first \
                         (`shorthorn volume delete {} --replica {addr}`) if it is not needed",
                        self.name, theirs.epoch, self.name
                    ),
                });
            }
        }
        let slot = Arc::new(Slot::new(addr, "", MemberState::Out));
        let mut next: Vec<Arc<Slot>> = self.slots.load().iter().cloned().collect();
        next.push(slot);
        self.slots.store(Arc::new(next));
        self.bump_version();
        self.ensure_membership().await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Removes a replica from the volume. The last healthy one cannot go.
    pub async fn remove_replica(&self, addr: &str) -> Result<(), EngineError> {
        let slots = self.slots.load_full();
        let Some(slot) = slots.iter().find(|s| s.addr == addr) else {
            return Err(EngineError::Membership {
                volume: self.name.to_string(),
                detail: format!("{addr} is not a replica of this volume"),
            });
        };
        let healthy_left = slots
            .iter()
            .filter(|s| s.addr != addr && s.state() == MemberState::Healthy)
            .count();
        if healthy_left == 0 {
            return Err(EngineError::Membership {
                volume: self.name.to_string(),
                detail: format!(
                    "{addr} is the last healthy replica; add and rebuild another first"
                ),
            });
        }
        {
            let _g = self.gate.write().unwrap();
            slot.set_state(MemberState::Out);
            slot.set_client(None);
            let next: Vec<Arc<Slot>> = slots.iter().filter(|s| s.addr != addr).cloned().collect();
            self.slots.store(Arc::new(next));
        }
        self.bump_version();
        self.ensure_membership().await
    }
}

fn hash_list(r: Result<Reply, ClientError>, c: &ReplicaClient) -> Result<Vec<u64>, ClientError> {
    match r? {
        Reply::Hashes(h) => Ok(h),
        other => Err(c.unexpected(&other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_cleaned_only_after_the_whole_window() {
        let pass = TICK * CLEAN_EVERY;
        for window_ms in [1, 599, 600, 601, 1000, 10_000, 30_000] {
            let window = Duration::from_millis(window_ms);
            let n = clean_min_idle_passes(window);
            // Written just before a pass, cleaned `n` passes on: the
            // shortest idle time a cleaned region can have had.
            let shortest = pass * (n - 1);
            assert!(
                shortest >= window,
                "{window:?}: cleaned after {n} passes, maybe only {shortest:?} idle"
            );
            assert!(
                shortest < window + pass,
                "{window:?}: {n} passes waits a whole pass longer than needed"
            );
        }
        assert_eq!(
            clean_min_idle_passes(pass),
            2,
            "as before the window was an option"
        );
        assert_eq!(clean_min_idle_passes(Duration::MAX), u32::MAX);
    }
}
