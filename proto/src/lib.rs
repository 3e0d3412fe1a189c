//! The replica wire protocol, shared by every process that speaks it.
//!
//! The engine (client) and the replica daemon (server) both use these types;
//! neither defines a frame of its own. A connection starts with a versioned
//! handshake ([`Hello`] / [`Welcome`]), then carries pipelined requests, each
//! tagged with a request id; replies may come back in any order.
//!
//! This crate owns the bytes on the wire and nothing else: it never touches a
//! disk and never decides what a request means. It also holds the
//! [`aligned`] buffers both sides put IO data in, so that data received by
//! an engine can reach a replica's O_DIRECT files without another copy.

pub mod aligned;
pub mod codec;
pub mod error;
pub mod frame;
pub mod inflight;
pub mod local;
pub mod membership;
pub mod message;
pub mod net;
pub mod units;

pub use codec::{FrameReader, FrameWriter};
pub use error::{ErrorCode, ProtoError, RemoteError};
pub use frame::{EncodedFrame, RawFrame, FRAME_HEADER_LEN, MAGIC, MAX_BODY_LEN, MAX_IO_LEN};
pub use local::{LocalCall, LocalFuture, LocalService, LocalSession, Opened};
pub use membership::{Member, MemberState, Membership};
pub use message::{Hello, ReplicaState, Reply, Request, VolumeInfo, Welcome, MAX_HASHES};
pub use units::{Generation, NameError, VolumeName};

/// The protocol version this build speaks. Bumped on any incompatible change
/// to a frame's layout or meaning.
pub const PROTOCOL_VERSION: u8 = 1;
