//! The replica: a volume's bytes on one node's disk, and the daemon that
//! serves them over the replica protocol.

pub mod server;
pub mod storage;
pub mod volume_state;
