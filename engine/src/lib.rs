//! The per-volume engine: serves one volume to clients over NBD and mirrors
//! every write to each of the volume's replicas.

pub mod attach;
pub mod backend;
pub mod control;
pub mod error;
pub mod nbd;
pub mod range_lock;
pub mod recovery;
pub mod replica_client;
pub mod slot;
pub mod tracker;
pub mod volume;

pub use backend::VolumeBackend;
pub use error::{EngineError, VolumeOptions};
pub use replica_client::{ClientError, ReplicaClient};
pub use volume::{ReplicaState, Volume};
