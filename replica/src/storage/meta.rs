//! `meta.json`: a replica's size, generation and layer chain.
//!
//! It is only ever replaced whole: written to `meta.json.tmp`, fsynced,
//! renamed over `meta.json`, and the directory fsynced, so a crash leaves
//! either the old file or the new one, never a torn mix. Everything here is
//! blocking file IO: call it from a blocking thread, never on the reactor.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::StorageError;
use super::units::{LayerId, BLOCK_SIZE};

pub const META_FILE: &str = "meta.json";
pub const META_TMP_FILE: &str = "meta.json.tmp";
pub const FORMAT: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Healthy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub format: u32,
    pub name: String,
    pub size: u64,
    pub generation: u64,
    /// The engine that claimed `generation`; only it may attach again at
    /// the same generation (a reconnect), any other engine needs a higher one.
    #[serde(default)]
    pub owner: String,
    /// Oldest first; the last one is the head.
    pub layers: Vec<u64>,
    pub head: u64,
    pub state: ReplicaState,
}

impl Meta {
    pub fn new(name: &str, size: u64) -> Meta {
        Meta {
            format: FORMAT,
            name: name.to_owned(),
            size,
            generation: 0,
            owner: String::new(),
            layers: vec![1],
            head: 1,
            state: ReplicaState::Healthy,
        }
    }

    pub fn layer_ids(&self) -> Vec<LayerId> {
        self.layers.iter().copied().map(LayerId).collect()
    }

    /// Checks everything a reader relies on; `dir_name` is the directory the
    /// file was found in.
    fn validate(&self, dir_name: &str) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("unknown format {}", self.format));
        }
        if self.name != dir_name {
            return Err(format!(
                "names volume {:?} but sits in directory {dir_name:?}",
                self.name
            ));
        }
        if self.size == 0 || !self.size.is_multiple_of(BLOCK_SIZE) {
            return Err(format!(
                "size {} is not a positive multiple of {BLOCK_SIZE}",
                self.size
            ));
        }
        if self.layers.is_empty() {
            return Err("empty layer chain".into());
        }
        if !self.layers.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("layer ids {:?} are not increasing", self.layers));
        }
        if self.layers.last() != Some(&self.head) {
            return Err(format!(
                "head {} is not the newest layer of {:?}",
                self.head, self.layers
            ));
        }
        Ok(())
    }

    /// Reads and validates `dir/meta.json`, removing a stale temp file left
    /// by a crash mid-update.
    pub fn load(dir: &Path, dir_name: &str) -> Result<Meta, StorageError> {
        let tmp = dir.join(META_TMP_FILE);
        if tmp.exists() {
            tracing::warn!(path = %tmp.display(), "removing leftover metadata temp file");
            fs::remove_file(&tmp)
                .map_err(|e| StorageError::io(format!("removing {}", tmp.display()), e))?;
        }
        let path = dir.join(META_FILE);
        let text = fs::read(&path)
            .map_err(|e| StorageError::io(format!("reading {}", path.display()), e))?;
        let meta: Meta = serde_json::from_slice(&text)
            .map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display())))?;
        meta.validate(dir_name)
            .map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display())))?;
        Ok(meta)
    }

    /// Replaces `dir/meta.json` atomically and durably.
    pub fn store(&self, dir: &Path) -> Result<(), StorageError> {
        let tmp = dir.join(META_TMP_FILE);
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        let mut text = serde_json::to_vec_pretty(self).expect("meta serializes");
        text.push(b'\n');
        let mut f = File::create(&tmp).map_err(|e| StorageError::io(ctx("creating"), e))?;
        f.write_all(&text)
            .map_err(|e| StorageError::io(ctx("writing"), e))?;
        f.sync_all()
            .map_err(|e| StorageError::io(ctx("syncing"), e))?;
        drop(f);
        fs::rename(&tmp, dir.join(META_FILE)).map_err(|e| StorageError::io(ctx("renaming"), e))?;
        sync_dir(dir)
    }
}

/// fsync a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("syncing directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Meta::new("vol", 1 << 20);
        m.store(dir.path()).unwrap();
        m.generation = 9;
        m.layers.push(2);
        m.head = 2;
        m.store(dir.path()).unwrap();
        assert_eq!(Meta::load(dir.path(), "vol").unwrap(), m);
        assert!(!dir.path().join(META_TMP_FILE).exists());
        let text = fs::read_to_string(dir.path().join(META_FILE)).unwrap();
        assert!(text.contains("\"state\": \"healthy\""), "{text}");
        assert!(text.contains("\"format\": 1"), "{text}");
    }

    #[test]
    fn refuses_inconsistent_files() {
        let dir = tempfile::tempdir().unwrap();
        Meta::new("vol", 1 << 20).store(dir.path()).unwrap();
        assert!(matches!(
            Meta::load(dir.path(), "other"),
            Err(StorageError::Corrupt(_))
        ));
        let mut m = Meta::new("vol", 1 << 20);
        m.head = 5;
        m.store(dir.path()).unwrap();
        assert!(matches!(
            Meta::load(dir.path(), "vol"),
            Err(StorageError::Corrupt(_))
        ));
        fs::write(dir.path().join(META_FILE), b"{not json").unwrap();
        assert!(matches!(
            Meta::load(dir.path(), "vol"),
            Err(StorageError::Corrupt(_))
        ));
    }

    #[test]
    fn leftover_temp_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        Meta::new("vol", 4096).store(dir.path()).unwrap();
        fs::write(dir.path().join(META_TMP_FILE), b"half").unwrap();
        Meta::load(dir.path(), "vol").unwrap();
        assert!(!dir.path().join(META_TMP_FILE).exists());
    }
}
