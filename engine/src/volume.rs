//! One volume's replication: every write goes to every healthy replica at
//! once and succeeds only when each of them has acknowledged it; reads come
//! from one healthy replica.
//!
//! The healthy set only shrinks here. A replica that errors, disconnects or
//! misses the IO timeout is dropped at once and never read from again by
//! this engine (bringing it back needs a rebuild, which this module does not
//! do). With no healthy replica left, every request fails; none hangs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use shorthorn_proto::{ErrorCode, Generation, Reply, Request, VolumeName, MAX_IO_LEN};
use tracing::{error, info, warn};

use crate::range_lock::RangeLock;
use crate::replica_client::{ClientError, ReplicaClient};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("volume {volume}: no healthy replica left")]
    NoHealthyReplica { volume: String },
    #[error("volume {volume}: no replica could be reached: {reasons}")]
    NoReplicaReachable { volume: String, reasons: String },
    #[error("volume {volume}: replicas disagree on the size ({detail})")]
    SizeMismatch { volume: String, detail: String },
    #[error("volume {volume}: replica {replica} does not hold this volume ({reason})")]
    NotOnReplica {
        volume: String,
        replica: String,
        reason: String,
    },
    #[error(
        "volume {volume}: another engine holds it ({reason}); refusing to start a second writer"
    )]
    HeldByAnotherEngine { volume: String, reason: String },
    #[error("volume {volume}: a newer engine has taken it over; this one no longer does IO")]
    Superseded { volume: String },
    #[error("volume {volume}: generation counter exhausted on its replicas")]
    GenerationExhausted { volume: String },
    #[error("request [{offset}, +{len}) is past the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

/// How an engine treats its replicas.
#[derive(Clone, Debug)]
pub struct VolumeOptions {
    /// A replica that does not answer a request within this is dropped.
    pub io_timeout: Duration,
    /// This engine's identity: in the replicas' logs, and as the owner of
    /// the generation it claims. Must be unique per engine start.
    pub client_id: String,
}

impl VolumeOptions {
    /// An identity no other engine start will share: host, pid and a
    /// random tag.
    pub fn unique_client_id(volume: &str) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown-host".into());
        let mut tag = [0u8; 8];
        if getrandom_bytes(&mut tag).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            tag = (t.as_nanos() as u64).to_le_bytes();
        }
        format!(
            "engine {volume} on {host} pid {} #{:016x}",
            std::process::id(),
            u64::from_le_bytes(tag)
        )
    }
}

fn getrandom_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            io_timeout: Duration::from_secs(5),
            client_id: VolumeOptions::unique_client_id("volume"),
        }
    }
}

struct Slot {
    addr: String,
    client: ReplicaClient,
    healthy: AtomicBool,
}

/// What `shorthorn volume status` and logs say about one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaState {
    pub addr: String,
    pub healthy: bool,
}

pub struct Volume {
    name: VolumeName,
    size: u64,
    generation: Generation,
    slots: Vec<Slot>,
    /// Replicas named at start that could not be reached then.
    missing: Vec<String>,
    writes: RangeLock,
    /// Set once a replica reported a newer engine's generation: this engine
    /// has been superseded and must not write anywhere any more, not even to
    /// replicas the newer engine has not reached yet.
    fenced: AtomicBool,
}

impl Volume {
    /// Attaches to the volume's replicas under a new generation, higher than
    /// any of them has seen, so that no older engine can write any more.
    ///
    /// Replicas that cannot be reached are left out (the volume runs
    /// degraded and says so); at least one must answer.
    pub async fn open(
        name: VolumeName,
        addrs: &[String],
        options: &VolumeOptions,
    ) -> Result<Arc<Volume>, EngineError> {
        let timeout = options.io_timeout;
        let client = options.client_id.as_str();
        let mut reasons = Vec::new();

        // Look first (generation 0: no IO, nothing changes on the replica).
        let looks = join_all(addrs.iter().map(|addr| {
            ReplicaClient::connect(addr, client, name.as_str(), Generation(0), timeout)
        }))
        .await;
        let mut seen = Vec::new();
        for (addr, look) in addrs.iter().zip(looks) {
            match look {
                Ok(c) => {
                    let info = c.volume().cloned().expect("volume session has a volume");
                    c.close("look done");
                    seen.push((addr.clone(), info));
                }
                Err(ClientError::Remote { error, .. }) if error.code == ErrorCode::NotFound => {
                    // A configuration error, not an outage: starting
                    // without it would hide the mistake.
                    return Err(EngineError::NotOnReplica {
                        volume: name.to_string(),
                        replica: addr.clone(),
                        reason: error.message,
                    });
                }
                Err(e) => {
                    warn!(volume = %name, replica = %addr, error = %e, "replica unreachable; volume starts without it");
                    reasons.push(e.to_string());
                }
            }
        }
        let Some((_, first)) = seen.first() else {
            return Err(EngineError::NoReplicaReachable {
                volume: name.to_string(),
                reasons: reasons.join("; "),
            });
        };
        let size = first.size;
        if seen.iter().any(|(_, v)| v.size != size) {
            let detail = seen
                .iter()
                .map(|(a, v)| format!("{a}: {}", v.size))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(EngineError::SizeMismatch {
                volume: name.to_string(),
                detail,
            });
        }
        let generation = seen
            .iter()
            .map(|(_, v)| v.generation)
            .max()
            .unwrap_or_default()
            .next()
            .ok_or_else(|| EngineError::GenerationExhausted {
                volume: name.to_string(),
            })?;

        let attached = join_all(seen.iter().map(|(addr, _)| {
            ReplicaClient::connect(addr, client, name.as_str(), generation, timeout)
        }))
        .await;
        let mut slots = Vec::new();
        let mut missing: Vec<String> = addrs
            .iter()
            .filter(|a| !seen.iter().any(|(s, _)| s == *a))
            .cloned()
            .collect();
        for ((addr, _), result) in seen.iter().zip(attached) {
            match result {
                Ok(client) => slots.push(Slot {
                    addr: addr.clone(),
                    client,
                    healthy: AtomicBool::new(true),
                }),
                Err(ClientError::Remote { error, .. })
                    if error.code == ErrorCode::StaleGeneration =>
                {
                    // Another engine claimed the volume between our look
                    // and our attach. Going on with the other replica would
                    // give two writers; stop, and let the others' claim win.
                    return Err(EngineError::HeldByAnotherEngine {
                        volume: name.to_string(),
                        reason: format!("{addr}: {}", error.message),
                    });
                }
                Err(e) => {
                    warn!(volume = %name, replica = %addr, error = %e, "replica refused the attach; volume starts without it");
                    reasons.push(e.to_string());
                    missing.push(addr.clone());
                }
            }
        }
        if slots.is_empty() {
            return Err(EngineError::NoReplicaReachable {
                volume: name.to_string(),
                reasons: reasons.join("; "),
            });
        }
        info!(
            volume = %name, size, %generation,
            healthy = slots.len(), wanted = addrs.len(),
            "volume attached"
        );
        Ok(Arc::new(Volume {
            name,
            size,
            generation,
            slots,
            missing,
            writes: RangeLock::new(),
            fenced: AtomicBool::new(false),
        }))
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

    pub fn replica_states(&self) -> Vec<ReplicaState> {
        let mut states: Vec<ReplicaState> = self
            .slots
            .iter()
            .map(|s| ReplicaState {
                addr: s.addr.clone(),
                healthy: s.healthy.load(Ordering::Acquire),
            })
            .collect();
        states.extend(self.missing.iter().map(|a| ReplicaState {
            addr: a.clone(),
            healthy: false,
        }));
        states
    }

    pub fn healthy_count(&self) -> usize {
        self.healthy().count()
    }

    /// True when every healthy replica is known to hold every acknowledged
    /// write and reads may come from any connection: always, for this
    /// engine, since all IO of the volume passes through it.
    pub fn can_multi_conn(&self) -> bool {
        true
    }

    fn healthy(&self) -> impl Iterator<Item = &Slot> {
        self.slots
            .iter()
            .filter(|s| s.healthy.load(Ordering::Acquire))
    }

    fn drop_replica(&self, slot: &Slot, why: &ClientError) {
        if slot.healthy.swap(false, Ordering::AcqRel) {
            slot.client.close("dropped from the healthy set");
            let left = self.healthy_count();
            error!(
                volume = %self.name, replica = %slot.addr, error = %why, healthy_left = left,
                "replica dropped from the healthy set; it stays out until rebuilt"
            );
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn no_healthy(&self) -> EngineError {
        EngineError::NoHealthyReplica {
            volume: self.name.to_string(),
        }
    }

    /// Sends `request` to every healthy replica at once. Succeeds when every
    /// replica still healthy afterwards acknowledged it; those that failed
    /// are dropped first.
    async fn fan_out(&self, request: Request) -> Result<(), EngineError> {
        self.check_fenced()?;
        let targets: Vec<&Slot> = self.healthy().collect();
        if targets.is_empty() {
            return Err(self.no_healthy());
        }
        let results = join_all(targets.iter().map(|s| s.client.call_done(request.clone()))).await;
        let mut acked = 0;
        for (slot, result) in targets.iter().zip(results) {
            match result {
                Ok(()) => acked += 1,
                Err(e) => self.fail(slot, &e),
            }
        }
        // A write some replica refused as stale must not be acknowledged,
        // even if another took it: a newer engine owns the volume now.
        self.check_fenced()?;
        if acked == 0 {
            return Err(self.no_healthy());
        }
        Ok(())
    }

    /// Handles a replica's failure: a stale-generation answer fences the
    /// whole engine, anything else drops that replica.
    fn fail(&self, slot: &Slot, why: &ClientError) {
        let stale = why
            .remote()
            .is_some_and(|e| e.code == ErrorCode::StaleGeneration);
        if stale && !self.fenced.swap(true, Ordering::AcqRel) {
            error!(
                volume = %self.name, replica = %slot.addr, error = %why, generation = %self.generation,
                "a newer engine has taken this volume over; this engine stops all IO"
            );
            for s in &self.slots {
                s.client.close("superseded by a newer engine");
            }
        }
        self.drop_replica(slot, why);
    }

    fn check_fenced(&self) -> Result<(), EngineError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(EngineError::Superseded {
                volume: self.name.to_string(),
            });
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        self.check_range(offset, len as u64)?;
        if len <= MAX_IO_LEN {
            return self.read_chunk(offset, len).await;
        }
        let chunks = chunks(offset, len as u64);
        let parts = join_all(chunks.map(|(o, l)| self.read_chunk(o, l))).await;
        let mut out = BytesMut::with_capacity(len as usize);
        for part in parts {
            out.extend_from_slice(&part?);
        }
        Ok(out.freeze())
    }

    async fn read_chunk(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        // The first healthy replica in the order the volume was given (the
        // local one first, by convention); on failure, drop it and go on.
        self.check_fenced()?;
        while let Some(slot) = self.healthy().next() {
            match slot.client.call(Request::Read { offset, len }).await {
                Ok(Reply::Data(data)) if data.len() == len as usize => return Ok(data),
                Ok(other) => {
                    let e = slot.client.unexpected(&other);
                    self.drop_replica(slot, &e)
                }
                Err(e) => self.fail(slot, &e),
            }
            self.check_fenced()?;
        }
        Err(self.no_healthy())
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        let _guard = self.writes.lock(offset, offset + len).await;
        if len <= MAX_IO_LEN as u64 {
            return self.fan_out(Request::Write { offset, fua, data }).await;
        }
        let results = join_all(chunks(offset, len).map(|(o, l)| {
            let start = (o - offset) as usize;
            let part = data.slice(start..start + l as usize);
            self.fan_out(Request::Write {
                offset: o,
                fua,
                data: part,
            })
        }))
        .await;
        results.into_iter().collect()
    }

    pub async fn flush(&self) -> Result<(), EngineError> {
        self.fan_out(Request::Flush).await
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.check_range(offset, len)?;
        let _guard = self.writes.lock(offset, offset + len).await;
        self.fan_out(Request::Trim { offset, len }).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), EngineError> {
        self.check_range(offset, len)?;
        let _guard = self.writes.lock(offset, offset + len).await;
        self.fan_out(Request::WriteZeroes { offset, len, fua })
            .await
    }
}

/// Cuts `[offset, offset+len)` into pieces the replica protocol carries.
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
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
