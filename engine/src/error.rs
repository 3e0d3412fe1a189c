//! The engine's error type and its options.

use std::time::Duration;

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
    #[error("volume {volume}: another engine changed the membership while this one started")]
    RaceLost { volume: String },
    #[error("volume {volume}: a newer engine has taken it over; this one no longer does IO")]
    Superseded { volume: String },
    #[error("volume {volume}: generation counter exhausted on its replicas")]
    GenerationExhausted { volume: String },
    #[error("request [{offset}, +{len}) is past the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume {volume}: {detail}")]
    Unsafe { volume: String, detail: String },
    #[error("volume {volume}: {detail}")]
    Membership { volume: String, detail: String },
}

/// [`VolumeOptions::clean_after`] unless told otherwise.
pub const DEFAULT_CLEAN_AFTER: Duration = Duration::from_secs(10);

/// How an engine treats its replicas.
#[derive(Clone, Debug)]
pub struct VolumeOptions {
    /// A replica that does not answer a request within this is dropped.
    pub io_timeout: Duration,
    /// How long a region must go unwritten before the replicas are told
    /// it is clean. Longer: a writer that comes back to the same region
    /// within it (a database committing every few seconds) pays no
    /// dirty-map sync, which costs a disk cache flush, on its next write.
    /// Shorter: less to compare after an engine crash.
    pub clean_after: Duration,
    /// This engine's identity: in the replicas' logs, and as the owner of
    /// the generation it claims. Must be unique per engine start.
    pub client_id: String,
    /// Start even though replicas the volume lists as healthy cannot be
    /// reached. Only for replicas that are gone for good: if one of them
    /// holds writes the others miss, those writes are lost.
    pub allow_missing_replicas: bool,
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
            clean_after: DEFAULT_CLEAN_AFTER,
            client_id: VolumeOptions::unique_client_id("volume"),
            allow_missing_replicas: false,
        }
    }
}
