//! The per-volume engine: serves one volume to clients over NBD and mirrors
//! every write to each of the volume's replicas.

pub mod backend;
pub mod nbd;
pub mod range_lock;
pub mod replica_client;
pub mod volume;

pub use backend::VolumeBackend;
pub use replica_client::{ClientError, ReplicaClient};
pub use volume::{EngineError, ReplicaState, Volume, VolumeOptions};
