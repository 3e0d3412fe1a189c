//! One layer of a replica: a sparse file as long as the volume, opened with
//! O_DIRECT where the filesystem allows it, and the map of the 4 KiB blocks
//! it holds.
//!
//! Maps are learned from the file itself with SEEK_DATA/SEEK_HOLE, so they
//! need no journal of their own. That relies on the filesystem reporting
//! holes at 4 KiB granularity or finer (ext4, xfs, btrfs and tmpfs do).
//! The blocking functions here run at open and snapshot time, on a blocking
//! thread, never on the reactor.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::block_map::BlockMap;
use super::error::StorageError;
use super::units::{BlockIndex, BlockRange, ByteOffset, LayerId, BLOCK_SIZE};

pub struct Layer {
    pub id: LayerId,
    pub file: Arc<File>,
    /// Opened with O_DIRECT: every IO on `file` must be aligned to
    /// [`IO_ALIGN`](super::io::IO_ALIGN) in offset, length and memory.
    pub direct: bool,
    /// Which blocks this layer holds. `None` only for the head of a chain of
    /// one layer, whose reads go straight to the file (holes read as zeros).
    pub map: Option<Arc<BlockMap>>,
}

impl Layer {
    pub fn holds(&self, b: BlockIndex) -> bool {
        self.map.as_ref().is_some_and(|m| m.contains(b))
    }
}

/// How a store opens its layer files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FileMode {
    /// O_DIRECT: the replica's IO goes straight to the device, without the
    /// page cache's copies, its memory and its per-write locking (a
    /// buffered write costs several times the CPU of a direct one). Where
    /// the filesystem refuses O_DIRECT (EINVAL at open: tmpfs before Linux
    /// 6.6, some FUSE filesystems), buffered instead.
    #[default]
    Direct,
    /// Through the page cache.
    Buffered,
}

impl std::fmt::Display for FileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileMode::Direct => "direct",
            FileMode::Buffered => "buffered",
        })
    }
}

/// An open layer file, and whether it is O_DIRECT.
pub struct LayerFile {
    pub file: File,
    pub direct: bool,
}

/// Opens the layer files of one store as its [`FileMode`] says, and warns
/// once if the filesystem refuses O_DIRECT.
#[derive(Debug)]
pub struct LayerOpener {
    mode: FileMode,
    fell_back: AtomicBool,
    /// Testing only: act as on a filesystem that refuses O_DIRECT.
    #[cfg(test)]
    refuse_direct: bool,
}

impl LayerOpener {
    pub fn new(mode: FileMode) -> LayerOpener {
        LayerOpener {
            mode,
            fell_back: AtomicBool::new(false),
            #[cfg(test)]
            refuse_direct: false,
        }
    }

    /// A direct opener on a filesystem that (pretends to) refuse O_DIRECT:
    /// exercises the fallback where every filesystem at hand accepts it.
    #[cfg(test)]
    pub fn refusing_direct() -> LayerOpener {
        LayerOpener {
            refuse_direct: true,
            ..LayerOpener::new(FileMode::Direct)
        }
    }

    pub fn mode(&self) -> FileMode {
        self.mode
    }

    /// Whether O_DIRECT was refused and files were opened buffered instead.
    pub fn fell_back(&self) -> bool {
        self.fell_back.load(Ordering::Relaxed)
    }

    fn open_with(&self, options: &OpenOptions, path: &Path) -> std::io::Result<LayerFile> {
        if self.mode == FileMode::Direct {
            let mut direct = options.clone();
            direct.custom_flags(libc::O_DIRECT);
            #[cfg(test)]
            let opened = if self.refuse_direct {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                direct.open(path)
            };
            #[cfg(not(test))]
            let opened = direct.open(path);
            match opened {
                Ok(file) => return Ok(LayerFile { file, direct: true }),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if !self.fell_back.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            path = %path.display(),
                            "the filesystem refuses O_DIRECT; layer files go through the page cache (more CPU per IO)"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(LayerFile {
            file: options.open(path)?,
            direct: false,
        })
    }

    /// Opens the file of layer `id` in `dir`, checking its length.
    pub fn open(&self, dir: &Path, id: LayerId, size: u64) -> Result<LayerFile, StorageError> {
        let path = dir.join(id.file_name());
        let opened = self
            .open_with(OpenOptions::new().read(true).write(true), &path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    StorageError::Corrupt(format!("{} is missing", path.display()))
                }
                _ => StorageError::io(format!("opening {}", path.display()), e),
            })?;
        let len = opened
            .file
            .metadata()
            .map_err(|e| StorageError::io(format!("stat {}", path.display()), e))?
            .len();
        if len != size {
            return Err(StorageError::Corrupt(format!(
                "{} is {len} bytes long, the volume is {size}",
                path.display()
            )));
        }
        Ok(opened)
    }

    /// Creates an empty (all-hole) layer file of `size` bytes and makes it
    /// durable, replacing any leftover of the same name. The caller syncs
    /// `dir`.
    pub fn create(&self, dir: &Path, id: LayerId, size: u64) -> Result<LayerFile, StorageError> {
        let path = dir.join(id.file_name());
        let ctx = |what: &str| format!("{what} {}", path.display());
        let created = self
            .open_with(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true),
                &path,
            )
            .map_err(|e| StorageError::io(ctx("creating"), e))?;
        created
            .file
            .set_len(size)
            .map_err(|e| StorageError::io(ctx("sizing"), e))?;
        created
            .file
            .sync_all()
            .map_err(|e| StorageError::io(ctx("syncing"), e))?;
        Ok(created)
    }
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

    fn is_direct(file: &File) -> bool {
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert!(flags >= 0);
        flags & libc::O_DIRECT != 0
    }

    #[test]
    fn scan_finds_exactly_the_written_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let opener = LayerOpener::new(FileMode::Buffered);
        let f = opener
            .create(dir.path(), LayerId(1), 64 * BLOCK_SIZE)
            .unwrap()
            .file;
        assert_eq!(scan_map(&f, 64 * BLOCK_SIZE).unwrap().count(), 0);
        f.write_all_at(&[1; 10], 3 * BLOCK_SIZE + 100).unwrap();
        f.write_all_at(&[1; 3 * BLOCK_SIZE as usize], 10 * BLOCK_SIZE)
            .unwrap();
        f.write_all_at(&[1; 1], 64 * BLOCK_SIZE - 1).unwrap();
        // The map comes out the same through an O_DIRECT descriptor.
        let direct = LayerOpener::new(FileMode::Direct);
        for f in [
            f,
            direct
                .open(dir.path(), LayerId(1), 64 * BLOCK_SIZE)
                .unwrap()
                .file,
        ] {
            let map = scan_map(&f, 64 * BLOCK_SIZE).unwrap();
            let held: Vec<u64> = (0..64).filter(|&b| map.contains(BlockIndex(b))).collect();
            assert_eq!(held, vec![3, 10, 11, 12, 63]);
        }
    }

    #[test]
    fn wrong_length_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let opener = LayerOpener::new(FileMode::Direct);
        opener.create(dir.path(), LayerId(1), 8192).unwrap();
        assert!(matches!(
            opener.open(dir.path(), LayerId(1), 4096),
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            opener.open(dir.path(), LayerId(2), 8192),
            Err(StorageError::Corrupt(_))
        ));
        opener.open(dir.path(), LayerId(1), 8192).unwrap();
    }

    #[test]
    fn files_are_direct_unless_refused_or_asked_not_to() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (LayerOpener::new(FileMode::Direct), true, false),
            (LayerOpener::new(FileMode::Buffered), false, false),
            (LayerOpener::refusing_direct(), false, true),
        ];
        for (i, (opener, direct, fell_back)) in cases.into_iter().enumerate() {
            let id = LayerId(i as u64 + 1);
            let created = opener.create(dir.path(), id, 8192).unwrap();
            assert_eq!(created.direct, direct, "{opener:?}");
            assert_eq!(is_direct(&created.file), direct, "{opener:?}");
            let opened = opener.open(dir.path(), id, 8192).unwrap();
            assert_eq!(opened.direct, direct, "{opener:?}");
            assert_eq!(is_direct(&opened.file), direct, "{opener:?}");
            assert_eq!(opener.fell_back(), fell_back, "{opener:?}");
        }
    }
}
