//! One layer of a replica: a sparse file as long as the volume, and the map
//! of the 4 KiB blocks it holds.
//!
//! Maps are learned from the file itself with SEEK_DATA/SEEK_HOLE, so they
//! need no journal of their own. That relies on the filesystem reporting
//! holes at 4 KiB granularity or finer (ext4, xfs, btrfs and tmpfs do).
//! The blocking functions here run at open and snapshot time, on a blocking
//! thread, never on the reactor.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use super::block_map::BlockMap;
use super::error::StorageError;
use super::units::{BlockIndex, BlockRange, ByteOffset, LayerId, BLOCK_SIZE};

pub struct Layer {
    pub id: LayerId,
    pub file: Arc<File>,
    /// Which blocks this layer holds. `None` only for the head of a chain of
    /// one layer, whose reads go straight to the file (holes read as zeros).
    pub map: Option<Arc<BlockMap>>,
}

impl Layer {
    pub fn holds(&self, b: BlockIndex) -> bool {
        self.map.as_ref().is_some_and(|m| m.contains(b))
    }
}

/// Opens the file of layer `id` in `dir`, checking its length.
pub fn open_file(dir: &Path, id: LayerId, size: u64) -> Result<File, StorageError> {
    let path = dir.join(id.file_name());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                StorageError::Corrupt(format!("{} is missing", path.display()))
            }
            _ => StorageError::io(format!("opening {}", path.display()), e),
        })?;
    let len = file
        .metadata()
        .map_err(|e| StorageError::io(format!("stat {}", path.display()), e))?
        .len();
    if len != size {
        return Err(StorageError::Corrupt(format!(
            "{} is {len} bytes long, the volume is {size}",
            path.display()
        )));
    }
    Ok(file)
}

/// Creates an empty (all-hole) layer file of `size` bytes and makes it
/// durable, replacing any leftover of the same name. The caller syncs `dir`.
pub fn create_file(dir: &Path, id: LayerId, size: u64) -> Result<File, StorageError> {
    let path = dir.join(id.file_name());
    let ctx = |what: &str| format!("{what} {}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| StorageError::io(ctx("creating"), e))?;
    file.set_len(size)
        .map_err(|e| StorageError::io(ctx("sizing"), e))?;
    file.sync_all()
        .map_err(|e| StorageError::io(ctx("syncing"), e))?;
    Ok(file)
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a descriptor we own; reads and writes use positioned
    // IO, so moving the file position disturbs nothing.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Learns which blocks of a `size`-byte layer file hold data. A block that
/// holds any allocated byte counts as held.
pub fn scan_map(file: &File, size: u64) -> std::io::Result<BlockMap> {
    let map = BlockMap::new(size / BLOCK_SIZE);
    let mut pos = 0;
    while pos < size {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        map.insert_range(BlockRange {
            start: BlockIndex::containing(ByteOffset(data)),
            end: BlockIndex::ceil(ByteOffset(hole)),
        });
        if hole <= pos {
            break; // a filesystem that answers nonsense must not loop us
        }
        pos = hole;
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn scan_finds_exactly_the_written_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let f = create_file(dir.path(), LayerId(1), 64 * BLOCK_SIZE).unwrap();
        assert_eq!(scan_map(&f, 64 * BLOCK_SIZE).unwrap().count(), 0);
        f.write_all_at(&[1; 10], 3 * BLOCK_SIZE + 100).unwrap();
        f.write_all_at(&[1; 3 * BLOCK_SIZE as usize], 10 * BLOCK_SIZE)
            .unwrap();
        f.write_all_at(&[1; 1], 64 * BLOCK_SIZE - 1).unwrap();
        let map = scan_map(&f, 64 * BLOCK_SIZE).unwrap();
        let held: Vec<u64> = (0..64).filter(|&b| map.contains(BlockIndex(b))).collect();
        assert_eq!(held, vec![3, 10, 11, 12, 63]);
    }

    #[test]
    fn wrong_length_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        create_file(dir.path(), LayerId(1), 8192).unwrap();
        assert!(matches!(
            open_file(dir.path(), LayerId(1), 4096),
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            open_file(dir.path(), LayerId(2), 8192),
            Err(StorageError::Corrupt(_))
        ));
        open_file(dir.path(), LayerId(1), 8192).unwrap();
    }
}
