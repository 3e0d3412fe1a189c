//! One volume's replication: every write goes to every replica that takes
//! writes (healthy, or being rebuilt) at once, and succeeds only when each
//! healthy one has acknowledged it; reads come from one healthy replica.
//!
//! A replica that errors, disconnects, or answers nothing for the IO timeout
//! (or keeps one request waiting three timeouts while another replica
//! serves, see [`crate::replica_client`]) is marked out at once, and the new membership
//! (who is healthy) is made durable on the remaining replicas before the
//! write that found the failure is acknowledged — so after any crash, the
//! replicas themselves say which of them hold every acknowledged write. Out
//! replicas are brought back by the recovery loop ([`crate::recovery`]).
//! With no healthy replica left, every request fails; none hangs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use futures::future::{join_all, FutureExt};
use shorthorn_proto::{
    ErrorCode, Generation, MemberState, Membership, Reply, Request, VolumeName, MAX_IO_LEN,
};
use tokio::sync::Notify;
use tracing::{error, info, warn};

pub use crate::error::{EngineError, VolumeOptions};
use crate::range_lock::RangeLock;
use crate::replica_client::{ClientError, ReplicaClient};
use crate::slot::Slot;
use crate::tracker::WriteTracker;

/// What `shorthorn volume status` and logs say about one replica.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaState {
    pub addr: String,
    pub id: String,
    pub state: MemberState,
    pub rebuild_total: u64,
    pub rebuild_scanned: u64,
    pub rebuild_copied: u64,
    pub rebuild_rate_mib_s: f64,
    pub last_error: Option<String>,
}

struct MembershipRecord {
    /// The last epoch used, saved or not: never used twice.
    epoch: u64,
    persisted_version: u64,
    /// The last membership some healthy replica took. A replica it lists
    /// as healthy holds every acknowledged write: none is acknowledged
    /// without a replica before a membership marking it out is saved.
    durable: Membership,
}

pub struct Volume {
    pub(crate) name: VolumeName,
    pub(crate) size: u64,
    pub(crate) generation: Generation,
    pub(crate) options: VolumeOptions,
    pub(crate) slots: ArcSwap<Vec<Arc<Slot>>>,
    pub(crate) writes: RangeLock,
    /// Set once a replica reported a newer engine's generation: this engine
    /// has been superseded and must not write anywhere any more.
    fenced: AtomicBool,
    pub(crate) tracker: WriteTracker,
    /// Writes hold it shared while they queue their requests; a clean holds
    /// it exclusively while it queues, so no write slips between.
    pub(crate) gate: std::sync::RwLock<()>,
    /// Bumped whenever a slot's state or the slot list changes.
    version: AtomicU64,
    persisted_version: AtomicU64,
    membership: tokio::sync::Mutex<MembershipRecord>,
    /// Wakes the recovery loop (a replica went out, or was added). Shared
    /// so the loop can wait on it without keeping the volume alive.
    pub(crate) wake: Arc<Notify>,
    /// Asks the pinger to ping every replica now: a request that waited
    /// its limit on a slow replica needs to know whether the other one is
    /// still there ([`ReplicaClient::set_peers`]).
    pub(crate) ping_now: Arc<Notify>,
    pub(crate) stats: RecoveryStats,
    /// Set until the start is finished ([`crate::attach::Starting`]): the
    /// volume is claimed but not served yet, and its membership is not
    /// changed from outside.
    starting: AtomicBool,
    /// Set once the engine is stopping: the recovery loop ends, so no
    /// rebuild starts while the last flush and clean run.
    stopping: AtomicBool,
    /// Held while [`Volume::note_peers`] runs.
    noting_peers: std::sync::Mutex<()>,
}

/// What recovery did, for logs, status and tests.
#[derive(Default)]
pub struct RecoveryStats {
    /// Bytes the start compares between the replicas (the regions where
    /// writes may have been in flight when the last engine stopped).
    pub reconcile_total: AtomicU64,
    /// Of those, compared so far, and copied from one replica to another.
    pub reconcile_compared: AtomicU64,
    pub reconcile_copied: AtomicU64,
}

impl Volume {
    pub(crate) fn new(
        name: VolumeName,
        size: u64,
        generation: Generation,
        options: VolumeOptions,
        slots: Vec<Arc<Slot>>,
        epoch: u64,
        region_size: u64,
    ) -> Volume {
        Volume {
            name,
            size,
            generation,
            options,
            slots: ArcSwap::from_pointee(slots),
            writes: RangeLock::new(),
            fenced: AtomicBool::new(false),
            tracker: WriteTracker::new(size, region_size),
            gate: std::sync::RwLock::new(()),
            version: AtomicU64::new(1),
            persisted_version: AtomicU64::new(0),
            membership: tokio::sync::Mutex::new(MembershipRecord {
                epoch,
                persisted_version: 0,
                durable: Membership::default(),
            }),
            wake: Arc::new(Notify::new()),
            ping_now: Arc::new(Notify::new()),
            stats: RecoveryStats::default(),
            starting: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            noting_peers: std::sync::Mutex::new(()),
        }
    }

    /// True until the start has made the replicas identical: the volume
    /// is claimed, not served yet.
    pub fn is_starting(&self) -> bool {
        self.starting.load(Ordering::Acquire)
    }

    pub(crate) fn started(&self) {
        self.starting.store(false, Ordering::Release);
    }

    /// The engine is stopping (its clients are gone): replicas that are
    /// out stay out, the recovery loop ends, and a rebuild under way ends
    /// after the region copies it has in flight.
    pub fn stop_recovery(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn name(&self) -> &VolumeName {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn stats(&self) -> &RecoveryStats {
        &self.stats
    }

    pub fn replica_states(&self) -> Vec<ReplicaState> {
        self.slots
            .load()
            .iter()
            .map(|s| {
                let p = &s.progress;
                let copied = p.copied.load(Ordering::Relaxed);
                let scanned = p.scanned.load(Ordering::Relaxed);
                let secs = p.seconds();
                ReplicaState {
                    addr: s.addr.clone(),
                    id: s.id(),
                    state: s.state(),
                    rebuild_total: p.total.load(Ordering::Relaxed),
                    rebuild_scanned: scanned,
                    rebuild_copied: copied,
                    rebuild_rate_mib_s: if secs > 0.0 {
                        scanned as f64 / secs / (1 << 20) as f64
                    } else {
                        0.0
                    },
                    last_error: p.last.lock().unwrap().clone(),
                }
            })
            .collect()
    }

    pub fn healthy_count(&self) -> usize {
        self.slots
            .load()
            .iter()
            .filter(|s| s.state() == MemberState::Healthy)
            .count()
    }

    /// A flush on any connection covers writes acknowledged on every other:
    /// all IO of the volume passes through this engine.
    pub fn can_multi_conn(&self) -> bool {
        true
    }

    /// Notes that the replicas' states changed: the membership is saved
    /// again before the next write is acknowledged.
    pub(crate) fn bump_version(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
        self.note_peers();
    }

    /// Tells every replica's client which other replicas are healthy now:
    /// a request gives up a replica as too slow only while another serves
    /// the volume ([`ReplicaClient::set_peers`]). Called whenever a
    /// replica's state or client changes, one caller at a time, so the last
    /// change is the one every client ends up with.
    pub(crate) fn note_peers(&self) {
        let _in_turn = self.noting_peers.lock().unwrap();
        let slots = self.slots.load();
        let healthy: Vec<(&Arc<Slot>, Arc<ReplicaClient>)> = slots
            .iter()
            .filter(|s| s.state() == MemberState::Healthy)
            .filter_map(|s| s.client().map(|c| (s, c)))
            .collect();
        for s in slots.iter() {
            if let Some(c) = s.client() {
                let peers: Vec<&ReplicaClient> = healthy
                    .iter()
                    .filter(|(h, _)| !Arc::ptr_eq(h, s))
                    .map(|(_, c)| &**c)
                    .collect();
                c.set_peers(&peers, &self.ping_now);
            }
        }
    }

    /// Handles a replica's failure: a stale-generation answer fences the
    /// whole engine, anything else marks that replica out.
    pub(crate) fn fail(&self, slot: &Slot, why: &ClientError) {
        let stale = why
            .remote()
            .is_some_and(|e| e.code == ErrorCode::StaleGeneration);
        if stale && !self.fenced.swap(true, Ordering::AcqRel) {
            error!(
                volume = %self.name, replica = %slot.addr, error = %why, generation = %self.generation,
                "a newer engine has taken this volume over; this engine stops all IO"
            );
            for s in self.slots.load().iter() {
                if let Some(c) = s.client() {
                    c.close("superseded by a newer engine");
                }
            }
        }
        if matches!(why, ClientError::TooSlow { .. }) {
            slot.set_too_slow(true);
        }
        self.mark_out(slot, &why.to_string());
    }

    pub(crate) fn mark_out(&self, slot: &Slot, why: &str) {
        let before = slot.set_state(MemberState::Out);
        if before != MemberState::Out {
            // The first reason is the one to show: requests still in flight
            // then fail only because their connection was closed here.
            *slot.progress.last.lock().unwrap() = Some(why.to_string());
            if let Some(c) = slot.client() {
                c.close("marked out");
            }
            self.bump_version();
            let left = self.healthy_count();
            if before == MemberState::Rebuilding {
                // Never in the healthy set, and retried with backoff: a
                // warning, not the error of losing a healthy replica.
                warn!(
                    volume = %self.name, replica = %slot.addr, error = %why, healthy_left = left,
                    "rebuild of replica stopped; it is tried again later"
                );
            } else {
                error!(
                    volume = %self.name, replica = %slot.addr, error = %why, healthy_left = left,
                    was = before.as_str(),
                    "replica dropped from the healthy set; it will be rebuilt when it answers again"
                );
            }
            self.wake.notify_one();
        }
    }

    pub(crate) fn check_fenced(&self) -> Result<(), EngineError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(EngineError::Superseded {
                volume: self.name.to_string(),
            });
        }
        Ok(())
    }

    pub(crate) fn no_healthy(&self) -> EngineError {
        EngineError::NoHealthyReplica {
            volume: self.name.to_string(),
        }
    }

    /// Makes the replicas' membership match the slots, if anything changed
    /// since it was last written: a higher epoch, written to every replica
    /// that takes writes. Replicas that fail it are marked out, and it goes
    /// again; it fails only when no healthy replica took it.
    pub(crate) async fn ensure_membership(&self) -> Result<(), EngineError> {
        loop {
            let wanted = self.version.load(Ordering::Acquire);
            if self.persisted_version.load(Ordering::Acquire) >= wanted {
                return Ok(());
            }
            let mut rec = self.membership.lock().await;
            if rec.persisted_version >= wanted {
                continue;
            }
            let slots = self.slots.load_full();
            let members: Vec<_> = slots.iter().map(|s| s.member()).collect();
            if !members.iter().any(|m| m.state == MemberState::Healthy) {
                // No replica could serve from such a membership, and saved
                // it would leave none to start from. The last ones healthy
                // stay so, durably, and serve again when they answer.
                return Err(self.no_healthy());
            }
            let m = Membership {
                epoch: rec.epoch + 1,
                members,
            };
            // Used up whatever happens next: a replica that took this epoch
            // must never be sent it again with other contents.
            rec.epoch = m.epoch;
            // By what each replica is now, not what the membership says:
            // one being promoted is listed healthy but counts only once a
            // replica that is healthy has taken the membership saying so.
            let mut healthy = Vec::new();
            let mut rebuilding = Vec::new();
            for slot in slots.iter() {
                if let (true, Some(c)) = (slot.takes_writes(), slot.client()) {
                    match slot.state() {
                        MemberState::Healthy => healthy.push((slot.clone(), c)),
                        _ => rebuilding.push((slot.clone(), c)),
                    }
                }
            }
            // Healthy replicas first: one being rebuilt never holds a
            // membership newer than every healthy replica's.
            let mut took = self.send_membership(&m, &healthy).await;
            self.check_fenced()?;
            if took.is_empty() {
                return Err(self.no_healthy());
            }
            rec.durable = m.clone();
            took.extend(self.send_membership(&m, &rebuilding).await);
            self.check_fenced()?;
            rec.persisted_version = wanted;
            self.persisted_version.fetch_max(wanted, Ordering::AcqRel);
            info!(
                volume = %self.name, epoch = m.epoch,
                members = %m.members.iter().map(|x| format!("{}={}", x.addr, x.state.as_str())).collect::<Vec<_>>().join(","),
                saved_on = %took.join(","),
                "membership saved on the replicas"
            );
        }
    }

    /// Sends `m` to `targets` at once; marks out those that fail it and
    /// returns the addresses of those that took it.
    async fn send_membership(
        &self,
        m: &Membership,
        targets: &[(Arc<Slot>, Arc<ReplicaClient>)],
    ) -> Vec<String> {
        let results = join_all(
            targets
                .iter()
                .map(|(_, c)| c.start(Request::SetMembership(m.clone())).done()),
        )
        .await;
        let mut took = Vec::new();
        for ((slot, _), r) in targets.iter().zip(results) {
            match r {
                Ok(()) => took.push(slot.addr.clone()),
                Err(e) => self.fail(slot, &e),
            }
        }
        took
    }

    /// The last membership epoch this engine used.
    pub(crate) async fn membership_epoch(&self) -> u64 {
        self.membership.lock().await.epoch
    }

    /// Lets `slot`, just reconnected through `client`, serve again as it
    /// is, when no replica is healthy now and the last saved membership
    /// lists it as healthy: then it holds every acknowledged write and
    /// there is nothing to rebuild it from (every replica dropped at once,
    /// or a one-replica volume's daemon restarted). Returns whether it did.
    pub(crate) async fn readmit(
        &self,
        slot: &Arc<Slot>,
        client: &Arc<ReplicaClient>,
    ) -> Result<bool, EngineError> {
        {
            let rec = self.membership.lock().await;
            let id = slot.id();
            let listed_healthy = !id.is_empty()
                && rec
                    .durable
                    .member(&id)
                    .is_some_and(|m| m.state == MemberState::Healthy);
            // Under the gate no write is being sent meanwhile; under the
            // record no membership is being saved.
            let _no_writes_between = self.gate.write().unwrap();
            if !listed_healthy || self.healthy_count() > 0 {
                return Ok(false);
            }
            slot.set_client(Some(client.clone()));
            slot.set_state(MemberState::Healthy);
            slot.set_too_slow(false);
            self.bump_version();
        }
        warn!(
            volume = %self.name, replica = %slot.addr,
            "replica answers again and holds every acknowledged write; serving from it"
        );
        self.ensure_membership().await?;
        Ok(true)
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Sends `request` to every replica that takes writes, at once.
    /// Succeeds when every replica still healthy afterwards acknowledged it;
    /// those that failed are marked out, durably, first.
    async fn fan_out(
        &self,
        request: Request,
        range: Option<(u64, u64)>,
    ) -> Result<(), EngineError> {
        self.check_fenced()?;
        let slots = self.slots.load();
        let mut calls = Vec::with_capacity(slots.len());
        {
            let _queued_together = self.gate.read().unwrap();
            if let Some((o, l)) = range {
                self.tracker.begin(o, l);
            }
            for s in slots.iter().filter(|s| s.takes_writes()) {
                if let Some(c) = s.client() {
                    calls.push((s.clone(), c.start(request.clone())));
                }
            }
        }
        // A replica that fails is marked out at once, not when the others
        // answer: the ones left know at once that it no longer serves the
        // volume (see `note_peers`).
        let results = join_all(calls.into_iter().map(|(s, call)| {
            call.done().map(move |r| {
                if let Err(e) = &r {
                    self.fail(&s, e);
                }
                (s, r)
            })
        }))
        .await;
        let healthy_acks = results
            .iter()
            .filter(|(slot, r)| r.is_ok() && slot.state() == MemberState::Healthy)
            .count();
        // Only now, with whoever missed the write marked out, may its
        // regions look idle to the cleaner (`clean` checks health after).
        if let Some((o, l)) = range {
            self.tracker.end(o, l);
        }
        // A write some replica refused as stale must not be acknowledged,
        // even if another took it: a newer engine owns the volume now.
        self.check_fenced()?;
        if healthy_acks == 0 {
            return Err(self.no_healthy());
        }
        // Whoever was dropped must be known to be out, durably, before this
        // write is acknowledged without it.
        if self.version.load(Ordering::Acquire) > self.persisted_version.load(Ordering::Acquire) {
            self.ensure_membership().await?;
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        self.check_range(offset, len as u64)?;
        if len <= MAX_IO_LEN {
            return self.read_chunk(offset, len).await;
        }
        let parts = join_all(chunks(offset, len as u64).map(|(o, l)| self.read_chunk(o, l))).await;
        let mut out = BytesMut::with_capacity(len as usize);
        for part in parts {
            out.extend_from_slice(&part?);
        }
        Ok(out.freeze())
    }

    async fn read_chunk(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        // The first healthy replica in the order the volume was given (the
        // local one first, by convention); on failure, mark it out, go on.
        loop {
            self.check_fenced()?;
            let slots = self.slots.load();
            let Some((slot, client)) = slots
                .iter()
                .filter(|s| s.state() == MemberState::Healthy)
                .find_map(|s| s.client().map(|c| (s.clone(), c)))
            else {
                return Err(self.no_healthy());
            };
            match client.call(Request::Read { offset, len }).await {
                Ok(Reply::Data(data)) if data.len() == len as usize => return Ok(data),
                Ok(other) => self.mark_out(&slot, &client.unexpected(&other).to_string()),
                Err(e) => self.fail(&slot, &e),
            }
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        let _guard = self.writes.lock(offset, offset + len).await;
        if len <= MAX_IO_LEN as u64 {
            return self
                .fan_out(Request::Write { offset, fua, data }, Some((offset, len)))
                .await;
        }
        let results = join_all(chunks(offset, len).map(|(o, l)| {
            let start = (o - offset) as usize;
            let part = data.slice(start..start + l as usize);
            self.fan_out(
                Request::Write {
                    offset: o,
                    fua,
                    data: part,
                },
                Some((o, l as u64)),
            )
        }))
        .await;
        results.into_iter().collect()
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        self.fan_out(Request::Flush, None).await
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.check_range(offset, len)?;
        let _guard = self.writes.lock(offset, offset + len).await;
        self.fan_out(Request::Trim { offset, len }, Some((offset, len)))
            .await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        self.check_range(offset, len)?;
        let _guard = self.writes.lock(offset, offset + len).await;
        self.fan_out(
            Request::WriteZeroes { offset, len, fua },
            Some((offset, len)),
        )
        .await
    }
}

/// Cuts `[offset, offset+len)` into pieces the replica protocol carries.
pub(crate) fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    let step = MAX_IO_LEN as u64;
    (0..len.div_ceil(step)).map(move |i| {
        let o = offset + i * step;
        (o, (len - i * step).min(step) as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_range_exactly() {
        let step = MAX_IO_LEN as u64;
        let v: Vec<_> = chunks(100, 2 * step + 5).collect();
        assert_eq!(
            v,
            vec![
                (100, MAX_IO_LEN),
                (100 + step, MAX_IO_LEN),
                (100 + 2 * step, 5)
            ]
        );
        assert_eq!(chunks(0, 0).count(), 0);
    }
}
