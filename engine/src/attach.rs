//! Starting an engine: finding out, from the replicas alone, which of them
//! hold every acknowledged write; claiming the volume under a new
//! generation; and making the up-to-date replicas identical again after a
//! crash, before the first client request is served.
//!
//! The rule for starting: the replica with the highest membership epoch
//! says who is healthy. Every replica it lists as healthy must be reachable
//! (and at that epoch), or the engine refuses to start — one of them might
//! hold writes the others miss — unless the operator says they are gone for
//! good (`--allow-missing-replicas`). At the first start, before any epoch,
//! every replica named must be reachable on the same terms. Everything else
//! becomes "out" and is rebuilt in the background once the volume serves.

use std::sync::Arc;

use futures::future::join_all;
use shorthorn_proto::{
    ErrorCode, Generation, MemberState, Membership, ReplicaState as WireState, Reply, Request,
    VolumeInfo, VolumeName,
};
use tracing::{info, warn};

use crate::error::{EngineError, VolumeOptions};
use crate::replica_client::{ClientError, ReplicaClient};
use crate::slot::Slot;
use crate::tracker::{set_regions, union};
use crate::volume::Volume;

/// Dirty-region size the engine works in; replicas must agree.
pub const REGION_SIZE: u64 = 2 << 20;

pub(crate) struct Seen {
    addr: String,
    info: VolumeInfo,
    pub(crate) state: WireState,
}

/// A volume this engine has claimed, whose start is not finished: the
/// replicas that may differ where writes were in flight when the last
/// engine stopped are not compared yet. [`Starting::finish`] compares them
/// and hands the volume over, ready to serve. Until then the volume
/// answers `status` (it says it is starting) and nothing else.
pub struct Starting {
    volume: Arc<Volume>,
    /// Regions to compare (a bitmap, as the replicas keep them).
    dirty: Vec<u8>,
}

impl Starting {
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Makes the up-to-date replicas identical where writes may have been
    /// in flight, and returns the volume ready to serve, with the recovery
    /// loop and the pinger running.
    pub async fn finish(self) -> Result<Arc<Volume>, EngineError> {
        let Starting { volume, dirty } = self;
        volume.clone().spawn_pinger();
        volume.reconcile(&dirty).await?;
        volume.started();
        info!(
            volume = %volume.name, size = volume.size, generation = %volume.generation,
            healthy = volume.healthy_count(), replicas = volume.slots.load().len(),
            "volume attached"
        );
        volume.clone().spawn_recovery();
        Ok(volume)
    }
}

impl Volume {
    /// Attaches to the volume's replicas (as listed by the operator) and
    /// claims it; [`Starting::finish`] then readies it to serve.
    pub async fn claim(
        name: VolumeName,
        addrs: &[String],
        options: &VolumeOptions,
    ) -> Result<Starting, EngineError> {
        // Another engine starting at the same moment can change the
        // membership between our look and our claim; then the look is
        // stale and we start over (our claim has fenced the other by then).
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Volume::open_once(name.clone(), addrs, options).await {
                Err(EngineError::RaceLost { .. }) if attempt < 4 => {
                    warn!(volume = %name, attempt, "membership changed while starting; looking again");
                }
                other => return other,
            }
        }
    }

    async fn open_once(
        name: VolumeName,
        addrs: &[String],
        options: &VolumeOptions,
    ) -> Result<Starting, EngineError> {
        let timeout = options.io_timeout;
        let client = options.client_id.as_str();
        let vol = name.to_string();

        // 1. Look (generation 0: nothing changes on the replicas).
        let (seen, unreachable) = look_all(&name, addrs, options).await?;
        let size = seen[0].info.size;

        // 2. Decide who is up to date.
        let (slots, epoch, healthy) = plan(&name, &seen, &unreachable, options)?;

        // 3. Claim the volume on everyone reachable.
        let generation = seen
            .iter()
            .map(|s| s.info.generation)
            .max()
            .unwrap_or_default()
            .next()
            .ok_or_else(|| EngineError::GenerationExhausted {
                volume: vol.clone(),
            })?;
        let attached = join_all(
            seen.iter()
                .map(|s| ReplicaClient::connect(&s.addr, client, &vol, generation, timeout)),
        )
        .await;
        for (s, result) in seen.iter().zip(attached) {
            let slot = slots.iter().find(|x| x.addr == s.addr).expect("planned");
            match result {
                Ok(c) => slot.set_client(Some(Arc::new(c))),
                Err(ClientError::Remote { error, .. })
                    if error.code == ErrorCode::StaleGeneration =>
                {
                    // Another engine claimed the volume between our look
                    // and our attach: let its claim win.
                    return Err(EngineError::HeldByAnotherEngine {
                        volume: vol,
                        reason: format!("{}: {}", s.addr, error.message),
                    });
                }
                Err(e) if slot.state() == MemberState::Healthy => {
                    return Err(EngineError::Unsafe {
                        volume: vol,
                        detail: format!("up-to-date replica {} failed to attach: {e}", s.addr),
                    });
                }
                Err(e) => {
                    warn!(volume = %name, replica = %s.addr, error = %e, "replica failed to attach; it stays out");
                    *slot.progress.last.lock().unwrap() = Some(e.to_string());
                }
            }
        }

        // From here on no other engine can change the replicas; check that
        // none did since we looked.
        for s in &seen {
            let slot = slots.iter().find(|x| x.addr == s.addr).expect("planned");
            let Some(c) = slot.client() else { continue };
            match c.call(Request::GetState).await {
                Ok(Reply::State(now)) if now.membership == s.state.membership => {}
                Ok(Reply::State(_)) => return Err(EngineError::RaceLost { volume: vol }),
                Ok(other) => {
                    return Err(EngineError::Unsafe {
                        volume: vol,
                        detail: c.unexpected(&other).to_string(),
                    })
                }
                Err(e) if slot.state() == MemberState::Healthy => {
                    return Err(EngineError::Unsafe {
                        volume: vol,
                        detail: format!("up-to-date replica {} failed: {e}", s.addr),
                    })
                }
                Err(_) => slot.set_client(None),
            }
        }

        let volume = Arc::new(Volume::new(
            name.clone(),
            size,
            generation,
            options.clone(),
            slots,
            epoch,
            REGION_SIZE,
        ));
        volume.note_peers();
        volume.ensure_membership().await?;

        // 4. Where writes may have been in flight when the last engine
        // stopped, the up-to-date replicas may differ: Starting::finish
        // compares them there.
        let dirty = healthy
            .iter()
            .filter_map(|id| seen.iter().find(|s| &s.state.replica_id == id))
            .fold(Vec::new(), |acc, s| union(&acc, &s.state.dirty));
        Ok(Starting { volume, dirty })
    }
}

/// What the replicas at `addrs` say about the volume, through sessions that
/// change nothing, and which of them could not be reached. Fails when none
/// answers, one does not hold the volume, or they disagree on its shape.
async fn look_all(
    name: &VolumeName,
    addrs: &[String],
    options: &VolumeOptions,
) -> Result<(Vec<Seen>, Vec<(String, String)>), EngineError> {
    let timeout = options.io_timeout;
    let client = options.client_id.as_str();
    let vol = name.to_string();
    let looks = join_all(addrs.iter().map(|addr| look(addr, client, &vol, timeout))).await;
    let mut seen = Vec::new();
    let mut unreachable = Vec::new();
    for (addr, look) in addrs.iter().zip(looks) {
        match look {
            Ok(s) => seen.push(s),
            Err(ClientError::Remote { error, .. }) if error.code == ErrorCode::NotFound => {
                return Err(EngineError::NotOnReplica {
                    volume: vol,
                    replica: addr.clone(),
                    reason: error.message,
                });
            }
            Err(e) => {
                warn!(volume = %name, replica = %addr, error = %e, "replica unreachable");
                unreachable.push((addr.clone(), e.to_string()));
            }
        }
    }
    if seen.is_empty() {
        return Err(EngineError::NoReplicaReachable {
            volume: vol,
            reasons: unreachable
                .iter()
                .map(|(a, e)| format!("{a}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    let size = seen[0].info.size;
    if seen.iter().any(|s| s.info.size != size) {
        let detail = seen
            .iter()
            .map(|s| format!("{}: {}", s.addr, s.info.size))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(EngineError::SizeMismatch {
            volume: vol,
            detail,
        });
    }
    if let Some(s) = seen.iter().find(|s| s.state.region_size != REGION_SIZE) {
        return Err(EngineError::Unsafe {
            volume: vol,
            detail: format!(
                "replica {} tracks {}-byte regions, this engine {REGION_SIZE}",
                s.addr, s.state.region_size
            ),
        });
    }
    Ok((seen, unreachable))
}

/// One replica's own account of a volume, for people deciding what to do.
pub struct ReplicaView {
    pub addr: String,
    pub replica_id: String,
    pub generation: Generation,
    /// The membership as this replica last saved it.
    pub membership: Membership,
    /// Bytes in regions its dirty map marks (writes maybe in flight, or
    /// made while a member was out).
    pub dirty_bytes: u64,
}

/// What an engine started with exactly these replicas would do, found out
/// without claiming the volume or changing anything.
pub struct StartPreview {
    pub replicas: Vec<ReplicaView>,
    /// Named replicas that did not answer, with why.
    pub unreachable: Vec<(String, String)>,
    /// Each replica's part at such a start (healthy: serves; out: rebuilt,
    /// in full when the flag says so), or why the start would be refused.
    pub verdict: Result<Vec<(String, MemberState, bool)>, EngineError>,
}

/// Looks at the replicas at `addrs` and runs the start rule on what they
/// say, as `engine serve` with the same replicas and options would.
pub async fn preview_start(
    name: &VolumeName,
    addrs: &[String],
    options: &VolumeOptions,
) -> Result<StartPreview, EngineError> {
    let (seen, unreachable) = look_all(name, addrs, options).await?;
    let verdict = plan(name, &seen, &unreachable, options).map(|(slots, _, _)| {
        slots
            .iter()
            .map(|s| (s.addr.clone(), s.state(), s.id().is_empty()))
            .collect()
    });
    let replicas = seen
        .into_iter()
        .map(|s| ReplicaView {
            dirty_bytes: set_regions(&s.state.dirty).count() as u64 * s.state.region_size,
            addr: s.addr,
            replica_id: s.state.replica_id,
            generation: s.info.generation,
            membership: s.state.membership,
        })
        .collect();
    Ok(StartPreview {
        replicas,
        unreachable,
        verdict,
    })
}

/// What a replica says about itself, through a session that changes
/// nothing (generation 0).
pub(crate) async fn look(
    addr: &str,
    client: &str,
    volume: &str,
    timeout: std::time::Duration,
) -> Result<Seen, ClientError> {
    let c = ReplicaClient::connect(addr, client, volume, Generation(0), timeout).await?;
    let info = c.volume().cloned().expect("volume session has a volume");
    let reply = c.call(Request::GetState).await;
    c.close("look done");
    match reply? {
        Reply::State(state) => Ok(Seen {
            addr: addr.to_string(),
            info,
            state,
        }),
        other => Err(c.unexpected(&other)),
    }
}

/// The slots, the membership epoch to build on, and the ids of the healthy
/// replicas.
type Plan = (Vec<Arc<Slot>>, u64, Vec<String>);

/// Turns what the replicas say into slots: healthy (up to date), or out
/// (to be rebuilt).
fn plan(
    name: &VolumeName,
    seen: &[Seen],
    unreachable: &[(String, String)],
    options: &VolumeOptions,
) -> Result<Plan, EngineError> {
    let vol = name.to_string();
    let newest = seen
        .iter()
        .max_by_key(|s| s.state.membership.epoch)
        .expect("at least one seen");
    let auth: &Membership = &newest.state.membership;
    let mut slots: Vec<Arc<Slot>> = Vec::new();
    let mut healthy = Vec::new();

    if auth.epoch == 0 {
        // Never attached before: every replica is as empty as the others.
        // One that does not answer may be down, or may be a mistyped
        // address; nothing on the replicas tells which, and starting would
        // make it a member. So the operator says.
        if !unreachable.is_empty() && !options.allow_missing_replicas {
            return Err(EngineError::Unsafe {
                volume: vol,
                detail: format!(
                    "replica(s) {} cannot be reached, and the volume has never been attached, so \
                     nothing tells a replica that is down from an address that is wrong. Check \
                     --replica and bring them up, or pass --allow-missing-replicas to start \
                     without them (they are rebuilt when they answer)",
                    unreachable
                        .iter()
                        .map(|(addr, _)| addr.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        for s in seen {
            slots.push(Arc::new(Slot::new(
                &s.addr,
                &s.state.replica_id,
                MemberState::Healthy,
            )));
            healthy.push(s.state.replica_id.clone());
        }
        for (addr, _) in unreachable {
            slots.push(Arc::new(Slot::new(addr, "", MemberState::Out)));
        }
        return Ok((slots, 0, healthy));
    }

    let apart: Vec<String> = seen
        .iter()
        .filter(|s| !std::ptr::eq(*s, newest) && served_apart(&s.state, auth))
        .map(|s| {
            format!(
                "{} (epoch {}: {})",
                s.addr,
                s.state.membership.epoch,
                describe(&s.state.membership)
            )
        })
        .collect();
    if !apart.is_empty() {
        return Err(EngineError::Unsafe {
            volume: vol,
            detail: format!(
                "replicas named here were served apart from each other, so each may hold writes \
                 the other lacks: the newest membership, on {} (epoch {}: {}), and {}. Starting \
                 them together would rebuild one over the other and lose its writes, so no flag \
                 overrides this. Start with only the replica whose data you keep; then delete \
                 the volume on the other daemon (`shorthorn volume delete {name} --replica \
                 ADDR`), create it there again and name both: it is rebuilt from the one kept",
                newest.addr,
                auth.epoch,
                describe(auth),
                apart.join("; ")
            ),
        });
    }

    // Why a member this start has no replica for is absent.
    let absent = |addr: &str| {
        if unreachable.iter().any(|(a, _)| a == addr) {
            "cannot be reached"
        } else {
            "is not named with --replica"
        }
    };
    let mut missing = Vec::new();
    for m in &auth.members {
        let here = seen.iter().find(|s| s.state.replica_id == m.id);
        match (m.state, here) {
            (MemberState::Healthy, Some(s)) if s.state.membership.epoch == auth.epoch => {
                slots.push(Arc::new(Slot::new(&s.addr, &m.id, MemberState::Healthy)));
                healthy.push(m.id.clone());
            }
            (MemberState::Healthy, None) => {
                // Only allowed when the operator says it is gone for good;
                // then it leaves the membership (brought back later, it is
                // a new replica: `volume add-replica`, full rebuild).
                let why = if let Some(other) = seen.iter().find(|s| s.addr == m.addr) {
                    format!(
                        "{} answers with another replica (id {}, not {}): it was deleted and \
                         created again",
                        m.addr, other.state.replica_id, m.id
                    )
                } else {
                    format!("{} {}", m.addr, absent(&m.addr))
                };
                missing.push(why);
            }
            (_, Some(s)) => {
                // Out, being rebuilt, or behind on membership: rebuilt later.
                slots.push(Arc::new(Slot::new(&s.addr, &m.id, MemberState::Out)));
                if m.state == MemberState::Rebuilding {
                    // An interrupted rebuild may not hold the base data:
                    // it restarts as a full one.
                    slots.last().unwrap().set_id("");
                }
            }
            (_, None) if seen.iter().any(|s| s.addr == m.addr) => {
                // Its daemon answers with another replica: deleted and
                // created again. That one joins below as a new member; one
                // address never gets two slots (two writing sessions on one
                // replica would supersede each other).
            }
            (_, None) => {
                let why = absent(&m.addr);
                info!(
                    volume = %name, replica = %m.addr, state = m.state.as_str(),
                    "a member of the volume {why}; it stays a member and is rebuilt when it \
                     answers (`shorthorn volume remove-replica` drops it)"
                );
                // Like a reachable one: an interrupted rebuild restarts in
                // full.
                let id = if m.state == MemberState::Rebuilding {
                    ""
                } else {
                    m.id.as_str()
                };
                slots.push(Arc::new(Slot::new(&m.addr, id, MemberState::Out)));
            }
        }
    }
    // Replicas the operator named that the volume does not list: new
    // members, filled by a full rebuild.
    for s in seen {
        if auth.member(&s.state.replica_id).is_none() {
            slots.push(Arc::new(Slot::new(&s.addr, "", MemberState::Out)));
        }
    }
    if !missing.is_empty() {
        if !options.allow_missing_replicas {
            return Err(EngineError::Unsafe {
                volume: vol,
                detail: format!(
                    "the volume's membership (epoch {}) lists replicas as holding every \
                     acknowledged write that this start does not have: {}. Starting without them \
                     could lose writes only they have. Name them and bring them back, or pass \
                     --allow-missing-replicas if they are gone for good",
                    auth.epoch,
                    missing.join("; ")
                ),
            });
        }
        warn!(volume = %name, missing = %missing.join("; "), "starting without up-to-date replicas, as asked");
    }
    let listed: Vec<&str> = auth
        .members
        .iter()
        .filter(|m| m.state == MemberState::Healthy)
        .map(|m| m.addr.as_str())
        .collect();
    if healthy.is_empty() && listed.is_empty() && options.allow_missing_replicas && seen.len() == 1
    {
        // Engines before this one could save a membership with no healthy
        // replica (every replica dropped at once). Nothing then says which
        // holds the data; the operator names the one replica to serve from.
        let s = &seen[0];
        let slot = slots.iter().find(|x| x.addr == s.addr).expect("planned");
        slot.set_id(&s.state.replica_id);
        slot.set_state(MemberState::Healthy);
        healthy.push(s.state.replica_id.clone());
        warn!(volume = %name, replica = %s.addr, "the membership lists no replica as up to date; serving from the one named, as asked");
    }
    if healthy.is_empty() {
        let detail = if listed.is_empty() {
            format!(
                "the volume's membership (epoch {}) lists no replica as up to date, so nothing \
                 says which one holds the data. If you know, start with that replica alone and \
                 --allow-missing-replicas: it serves as it is, and the others are rebuilt from it",
                auth.epoch
            )
        } else {
            format!(
                "no reachable replica is up to date (membership epoch {}); the up-to-date ones are {}",
                auth.epoch,
                listed.join(", ")
            )
        };
        return Err(EngineError::Unsafe {
            volume: vol,
            detail,
        });
    }
    Ok((slots, auth.epoch, healthy))
}

/// Whether a replica's own membership shows it was served in a history
/// apart from `newest`'s, rather than left behind by it. Under fencing only
/// one engine writes each epoch, and a replica that was merely dropped,
/// removed or interrupted still lists the replicas it last served with. So
/// the two histories split when the same epoch was written twice, or when
/// this replica last served with no replica the newest membership knows of,
/// or when the newest membership no longer lists it while it was, in its
/// own eyes, the only up-to-date one. Each split needs a start without some
/// up-to-date replica (`--allow-missing-replicas`) on one side.
fn served_apart(state: &WireState, newest: &Membership) -> bool {
    let own = &state.membership;
    let me = state.replica_id.as_str();
    if own.epoch == 0 {
        // Never attached: it holds no writes of its own.
        return false;
    }
    if own.epoch == newest.epoch {
        return own != newest;
    }
    let others = || {
        own.members
            .iter()
            .filter(|m| m.id != me && !m.id.is_empty())
    };
    let knows_newest = others().any(|m| newest.member(&m.id).is_some());
    let only_healthy = !others().any(|m| m.state == MemberState::Healthy);
    !knows_newest || (newest.member(me).is_none() && only_healthy)
}

/// A membership in words for an operator: its replicas and their states.
fn describe(m: &Membership) -> String {
    m.members
        .iter()
        .map(|m| format!("{} {}", m.addr, m.state.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemberState::{Healthy as H, Out as O, Rebuilding as R};

    /// A membership at `epoch` from (id, state) pairs; addresses follow ids.
    fn m(epoch: u64, members: &[(&str, MemberState)]) -> Membership {
        Membership {
            epoch,
            members: members
                .iter()
                .map(|(id, state)| shorthorn_proto::Member {
                    id: id.to_string(),
                    addr: format!("{id}:7700"),
                    state: *state,
                })
                .collect(),
        }
    }

    fn apart(id: &str, own: Membership, newest: &Membership) -> bool {
        let state = WireState {
            replica_id: id.to_string(),
            membership: own,
            region_size: REGION_SIZE,
            dirty: Default::default(),
        };
        served_apart(&state, newest)
    }

    /// Histories that only left a replica behind: it is rebuilt, as before.
    #[test]
    fn a_replica_left_behind_is_not_taken_for_one_served_apart() {
        // Never attached.
        assert!(!apart("b", m(0, &[]), &m(3, &[("a", H), ("b", O)])));
        // Dropped while the engine went on with a.
        assert!(!apart(
            "b",
            m(2, &[("a", H), ("b", H)]),
            &m(3, &[("a", H), ("b", O)])
        ));
        // Gone for good: a started alone, with the operator's override.
        assert!(!apart("b", m(2, &[("a", H), ("b", H)]), &m(3, &[("a", H)])));
        // Removed with remove-replica.
        assert!(!apart("b", m(4, &[("a", H), ("b", H)]), &m(5, &[("a", H)])));
        // Dropped again as its rebuild finished: it was the source then.
        assert!(!apart(
            "b",
            m(4, &[("b", H), ("a", R)]),
            &m(6, &[("a", H), ("b", O)])
        ));
        // Left behind twice over: a was replaced by c since.
        assert!(!apart(
            "b",
            m(2, &[("a", H), ("b", H)]),
            &m(7, &[("c", H), ("a", O), ("b", O)])
        ));
        // Same epoch, same membership: one history.
        assert!(!apart(
            "b",
            m(3, &[("a", H), ("b", H)]),
            &m(3, &[("a", H), ("b", H)])
        ));
        // A first start without it: its id was not known yet.
        assert!(!apart("b", m(0, &[]), &m(1, &[("a", H), ("", O)])));
    }

    /// Histories that split: each side may hold writes the other lacks.
    #[test]
    fn replicas_served_apart_are_told_apart() {
        // Each started alone with the override.
        assert!(apart("b", m(3, &[("b", H)]), &m(5, &[("a", H)])));
        // The same epoch written twice.
        assert!(apart(
            "b",
            m(3, &[("b", H), ("a", O)]),
            &m(3, &[("a", H), ("b", O)])
        ));
        // An engine went on with b after dropping a, then a started alone.
        assert!(apart("b", m(3, &[("b", H), ("a", O)]), &m(5, &[("a", H)])));
        // An engine went on with a after dropping b, then b started alone.
        assert!(apart("b", m(3, &[("b", H)]), &m(5, &[("a", H), ("b", O)])));
        // Both first started alone with the override.
        assert!(apart(
            "b",
            m(1, &[("b", H), ("", O)]),
            &m(2, &[("a", H), ("", O)])
        ));
    }
}
