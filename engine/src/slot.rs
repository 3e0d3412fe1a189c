//! One replica of a volume as the engine sees it: where it is, what it is
//! called, whether it may serve reads, and the connection to it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use shorthorn_proto::{Member, MemberState};

use crate::replica_client::ReplicaClient;

pub struct Slot {
    pub addr: String,
    /// The replica's own id (learned from it; empty until first reached).
    id: Mutex<String>,
    state: AtomicU8,
    client: ArcSwapOption<ReplicaClient>,
    /// A full rebuild of it has begun and not finished: it lacks data no
    /// dirty map records, so however it drops out, it comes back in full.
    full_rebuild_pending: AtomicBool,
    /// Rebuilt, and being recorded as healthy: the membership lists it as
    /// healthy while it does not yet count as such (see
    /// `Volume::promote`).
    promoting: AtomicBool,
    /// Last dropped for keeping a request waiting three IO timeouts while
    /// it answered others (a link too slow for the volume's writes): its
    /// rebuilds are tried less often, since each try that fails so stalls
    /// the writes that wait for it. Cleared once it is healthy again.
    too_slow: AtomicBool,
    pub progress: RebuildProgress,
}

/// How far a rebuild has got, for `volume status`.
#[derive(Default)]
pub struct RebuildProgress {
    pub total: AtomicU64,
    pub scanned: AtomicU64,
    pub copied: AtomicU64,
    pub started: Mutex<Option<Instant>>,
    /// When the last rebuild ended (unset while one runs), so its rate
    /// stays what it was rather than falling as time goes by.
    pub finished: Mutex<Option<Instant>>,
    pub last: Mutex<Option<String>>,
}

impl RebuildProgress {
    /// Seconds the current or last rebuild ran (0 before the first).
    pub fn seconds(&self) -> f64 {
        let started = *self.started.lock().unwrap();
        let finished = *self.finished.lock().unwrap();
        match (started, finished) {
            (Some(s), Some(f)) if f >= s => (f - s).as_secs_f64(),
            (Some(s), _) => s.elapsed().as_secs_f64(),
            (None, _) => 0.0,
        }
    }
}

impl Slot {
    pub fn new(addr: &str, id: &str, state: MemberState) -> Slot {
        Slot {
            addr: addr.to_string(),
            id: Mutex::new(id.to_string()),
            state: AtomicU8::new(encode(state)),
            client: ArcSwapOption::empty(),
            full_rebuild_pending: AtomicBool::new(false),
            promoting: AtomicBool::new(false),
            too_slow: AtomicBool::new(false),
            progress: RebuildProgress::default(),
        }
    }

    pub fn id(&self) -> String {
        self.id.lock().unwrap().clone()
    }

    pub fn set_id(&self, id: &str) {
        *self.id.lock().unwrap() = id.to_string();
    }

    pub fn state(&self) -> MemberState {
        decode(self.state.load(Ordering::Acquire))
    }

    /// Sets the state; returns the previous one.
    pub fn set_state(&self, s: MemberState) -> MemberState {
        decode(self.state.swap(encode(s), Ordering::AcqRel))
    }

    /// Moves from `from` to `to` only if the slot is in `from`.
    pub fn transition(&self, from: MemberState, to: MemberState) -> bool {
        self.state
            .compare_exchange(
                encode(from),
                encode(to),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Receives writes: healthy, or being rebuilt.
    pub fn takes_writes(&self) -> bool {
        matches!(self.state(), MemberState::Healthy | MemberState::Rebuilding)
    }

    pub fn client(&self) -> Option<Arc<ReplicaClient>> {
        self.client.load_full()
    }

    pub fn set_client(&self, c: Option<Arc<ReplicaClient>>) {
        if let Some(old) = self.client.swap(c) {
            old.close("replaced");
        }
    }

    pub fn set_full_rebuild_pending(&self, pending: bool) {
        self.full_rebuild_pending.store(pending, Ordering::Release);
    }

    pub fn full_rebuild_pending(&self) -> bool {
        self.full_rebuild_pending.load(Ordering::Acquire)
    }

    pub fn set_too_slow(&self, too_slow: bool) {
        self.too_slow.store(too_slow, Ordering::Release);
    }

    pub fn too_slow(&self) -> bool {
        self.too_slow.load(Ordering::Acquire)
    }

    pub fn set_promoting(&self, promoting: bool) {
        self.promoting.store(promoting, Ordering::Release);
    }

    /// What the volume's membership records of it: healthy while it is
    /// being promoted. Until a full rebuild of it has made it healthy its
    /// id is left out: a later engine (or this one) then takes it for a new
    /// replica and rebuilds it in full, never by delta from dirty maps that
    /// do not cover what it lacks.
    pub fn member(&self) -> Member {
        let state = match self.state() {
            MemberState::Rebuilding if self.promoting.load(Ordering::Acquire) => {
                MemberState::Healthy
            }
            state => state,
        };
        Member {
            id: if self.full_rebuild_pending() && state != MemberState::Healthy {
                String::new()
            } else {
                self.id()
            },
            addr: self.addr.clone(),
            state,
        }
    }
}

fn encode(s: MemberState) -> u8 {
    match s {
        MemberState::Healthy => 1,
        MemberState::Out => 2,
        MemberState::Rebuilding => 3,
    }
}

fn decode(n: u8) -> MemberState {
    match n {
        1 => MemberState::Healthy,
        3 => MemberState::Rebuilding,
        _ => MemberState::Out,
    }
}
