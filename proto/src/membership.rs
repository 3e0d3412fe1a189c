//! Who belongs to a volume, as the replicas remember it.
//!
//! The engine writes the volume's membership to every healthy replica each
//! time it changes (a replica dropped, rebuilt, added, removed), with a
//! higher epoch each time. A replica that was dropped misses those updates,
//! so at the next start the replica with the highest epoch says who is up
//! to date — there is no central database to lose.

use bytes::{BufMut, BytesMut};

use crate::error::ProtoError;
use crate::frame::{put_string, FieldReader};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Holds every acknowledged write.
    Healthy,
    /// Dropped: misses writes made since. It stays a member so that its
    /// return can be a delta rebuild (nothing is cleaned while one is out).
    Out,
    /// Being rebuilt; receives live writes, not yet trusted for reads.
    Rebuilding,
}

impl MemberState {
    fn to_u8(self) -> u8 {
        match self {
            MemberState::Healthy => 1,
            MemberState::Out => 2,
            MemberState::Rebuilding => 3,
        }
    }

    fn from_u8(n: u8) -> Result<MemberState, ProtoError> {
        Ok(match n {
            1 => MemberState::Healthy,
            2 => MemberState::Out,
            3 => MemberState::Rebuilding,
            n => {
                return Err(ProtoError::malformed(
                    "membership",
                    format!("unknown member state {n}"),
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Healthy => "healthy",
            MemberState::Out => "out",
            MemberState::Rebuilding => "rebuilding",
        }
    }
}

/// One replica of the volume: its identity (chosen by the replica when the
/// volume was created on it, so it survives address changes) and the
/// address the engine last used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub addr: String,
    pub state: MemberState,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// Raised by one on every change. Zero: never set (a new volume).
    pub epoch: u64,
    pub members: Vec<Member>,
}

impl Membership {
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn all_healthy(&self) -> bool {
        self.members.iter().all(|m| m.state == MemberState::Healthy)
    }

    pub(crate) fn put(&self, b: &mut BytesMut) {
        b.put_u64_le(self.epoch);
        b.put_u16_le(self.members.len() as u16);
        for m in &self.members {
            put_string(b, &m.id);
            put_string(b, &m.addr);
            b.put_u8(m.state.to_u8());
        }
    }

    pub(crate) fn get(r: &mut FieldReader<'_>) -> Result<Membership, ProtoError> {
        let epoch = r.u64()?;
        let n = r.u16()?;
        if n > 16 {
            return Err(ProtoError::malformed(
                "membership",
                format!("{n} members is more than any volume has"),
            ));
        }
        let mut members = Vec::with_capacity(n as usize);
        for _ in 0..n {
            members.push(Member {
                id: r.string()?,
                addr: r.string()?,
                state: MemberState::from_u8(r.u8()?)?,
            });
        }
        Ok(Membership { epoch, members })
    }
}
