//! [`Store`]: the data directory, and the volumes (replicas) in it.
//!
//! Layout: `DATA/volumes/<name>/` per volume. Directories whose names start
//! with a dot are the store's own scratch (`.tmp-<name>` while a volume is
//! being created, `.del-<name>` while one is being removed); a volume name
//! never starts with a dot, so the two can never collide, and a crash
//! leaves only scratch that the next open sweeps away.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use shorthorn_proto::VolumeName;
use tokio::sync::Mutex;

use super::error::StorageError;
use super::io::DiskIo;
use super::layer::{FileMode, LayerOpener};
use super::meta::sync_dir;
use super::replica::{self, blocking, Replica};
use super::units::{human, BLOCK_SIZE};

pub const VOLUMES_DIR: &str = "volumes";
/// The file a daemon holds locked while it serves a data directory.
pub const LOCK_FILE: &str = "daemon.lock";
const CREATING_PREFIX: &str = ".tmp-";
const DELETING_PREFIX: &str = ".del-";

/// Volumes are thin (sparse files), but by default their sizes together may
/// not exceed the filesystem holding them, so a volume cannot be promised
/// space the node will never have (Longhorn's scheduler has the same rule,
/// with the same knob).
pub const DEFAULT_OVER_PROVISIONING: u32 = 100;

/// Largest volume accepted: 1 PiB, far below the kernel's `i64` offsets.
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;

/// A data directory claimed by one process (a replica daemon, or `shorthorn
/// dev` for its whole tree): an exclusive `flock` on `DATA/daemon.lock`,
/// which names the holder's pid. Two daemons on one
/// directory would each think they own its replicas (their generations,
/// dirty maps and layers) and undo each other's fencing, so the second is
/// refused. The kernel lets go of the lock when the holder exits, however
/// it exits, so a crashed daemon never leaves its directory locked.
pub struct DataDirLock {
    _file: fs::File,
}

impl DataDirLock {
    /// Claims `data_dir` (creating it if missing) for this process.
    pub fn claim(data_dir: &Path) -> Result<DataDirLock, StorageError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        match fs::metadata(data_dir) {
            Ok(m) if !m.is_dir() => {
                return Err(StorageError::io(
                    format!("data directory {}", data_dir.display()),
                    std::io::ErrorKind::NotADirectory.into(),
                ))
            }
            _ => fs::create_dir_all(data_dir)
                .map_err(|e| StorageError::io(format!("creating {}", data_dir.display()), e))?,
        }
        let path = data_dir.join(LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on a descriptor `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(StorageError::io(format!("locking {}", path.display()), e));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(StorageError::InUse(format!(
                "data directory {} is in use by another shorthorn process ({holder}); \
                 one directory is served by one process at a time",
                data_dir.display()
            )));
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| StorageError::io(format!("writing {}", path.display()), e))?;
        Ok(DataDirLock { _file: file })
    }
}

pub struct Store {
    volumes_dir: PathBuf,
    io: Arc<dyn DiskIo>,
    opener: Arc<LayerOpener>,
    volumes: RwLock<BTreeMap<VolumeName, Arc<Replica>>>,
    /// Serializes create and delete; the data path never takes it.
    admin: Mutex<()>,
    /// How much the volumes here may claim together, in percent of the
    /// filesystem under them; 0: no limit.
    over_provisioning: u32,
}

impl Store {
    /// Opens (creating if needed) `data_dir/volumes` and every volume in it,
    /// layer files with O_DIRECT where the filesystem allows it.
    /// A volume that fails to open is logged and left out, so one broken
    /// volume does not stop the others. Blocking: call at start-up.
    pub fn open(data_dir: &Path, io: Arc<dyn DiskIo>) -> Result<Store, StorageError> {
        Store::open_with(data_dir, io, FileMode::Direct)
    }

    /// [`Store::open`], opening layer files as `mode` says.
    pub fn open_with(
        data_dir: &Path,
        io: Arc<dyn DiskIo>,
        mode: FileMode,
    ) -> Result<Store, StorageError> {
        Store::open_with_opener(data_dir, io, LayerOpener::new(mode))
    }

    pub(crate) fn open_with_opener(
        data_dir: &Path,
        io: Arc<dyn DiskIo>,
        opener: LayerOpener,
    ) -> Result<Store, StorageError> {
        let opener = Arc::new(opener);
        let volumes_dir = data_dir.join(VOLUMES_DIR);
        fs::create_dir_all(&volumes_dir)
            .map_err(|e| StorageError::io(format!("creating {}", volumes_dir.display()), e))?;
        warn_if_coarse_holes(&volumes_dir);
        let mut volumes = BTreeMap::new();
        let entries = fs::read_dir(&volumes_dir)
            .map_err(|e| StorageError::io(format!("listing {}", volumes_dir.display()), e))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| StorageError::io(format!("listing {}", volumes_dir.display()), e))?;
            let path = entry.path();
            let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
                tracing::warn!(path = %path.display(), "skipping entry with a non-UTF-8 name");
                continue;
            };
            if file_name.starts_with(CREATING_PREFIX) || file_name.starts_with(DELETING_PREFIX) {
                tracing::warn!(path = %path.display(), "removing leftover of an interrupted create or delete");
                if let Err(e) = fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove leftover");
                }
                continue;
            }
            let Ok(name) = VolumeName::new(file_name) else {
                tracing::warn!(path = %path.display(), "skipping entry that is not a volume name");
                continue;
            };
            if !path.is_dir() {
                tracing::warn!(path = %path.display(), "skipping non-directory entry");
                continue;
            }
            match Replica::open(path.clone(), name.clone(), io.clone(), opener.clone()) {
                Ok(r) => {
                    volumes.insert(name, Arc::new(r));
                }
                Err(e) => {
                    tracing::error!(volume = %name, error = %e, "cannot open volume; leaving it out");
                }
            }
        }
        tracing::info!(
            dir = %volumes_dir.display(),
            volumes = volumes.len(),
            io = io.name(),
            files = %opener.mode(),
            "replica store opened"
        );
        Ok(Store {
            volumes_dir,
            io,
            opener,
            volumes: RwLock::new(volumes),
            admin: Mutex::new(()),
            over_provisioning: DEFAULT_OVER_PROVISIONING,
        })
    }

    /// Lets the volumes here claim together up to `percent` of the
    /// filesystem under them (0: no limit). Only creating checks it.
    pub fn set_over_provisioning(&mut self, percent: u32) {
        self.over_provisioning = percent;
    }

    /// Refuses a new volume of `size` bytes that would take the volumes'
    /// sizes together past the over-provisioning limit.
    fn check_room(&self, size: u64) -> Result<(), StorageError> {
        if self.over_provisioning == 0 {
            return Ok(());
        }
        let fs = nix::sys::statvfs::statvfs(&self.volumes_dir).map_err(|e| {
            StorageError::io(
                format!(
                    "measuring the filesystem under {}",
                    self.volumes_dir.display()
                ),
                e.into(),
            )
        })?;
        let disk = fs.blocks() as u128 * fs.fragment_size() as u128;
        let limit = disk * self.over_provisioning as u128 / 100;
        let claimed: u64 = self.list().iter().map(|r| r.size()).sum();
        if claimed as u128 + size as u128 <= limit {
            return Ok(());
        }
        let limit = u64::try_from(limit).unwrap_or(u64::MAX);
        let disk = u64::try_from(disk).unwrap_or(u64::MAX);
        Err(StorageError::NoRoom(format!(
            "a {} volume does not fit: the volumes here already claim {} of {} ({}% of the {} \
             filesystem under {}). Volumes are thin, so their sizes may add up to more than the \
             disk if the daemon is started with a higher `--over-provisioning` (0 for no limit); \
             writes then fail once the disk is really full",
            human(size),
            human(claimed),
            human(limit),
            self.over_provisioning,
            human(disk),
            self.volumes_dir.display(),
        )))
    }

    /// Creates an empty volume of `size` bytes. Creating an existing volume
    /// again with the same size succeeds with `created == false`.
    pub async fn create_volume(
        &self,
        name: &VolumeName,
        size: u64,
    ) -> Result<(Arc<Replica>, bool), StorageError> {
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) || size > MAX_VOLUME_SIZE {
            return Err(StorageError::Invalid(format!(
                "volume size {size} must be a positive multiple of {BLOCK_SIZE} up to {MAX_VOLUME_SIZE}"
            )));
        }
        let _admin = self.admin.lock().await;
        if let Ok(existing) = self.get(name) {
            return if existing.size() == size {
                Ok((existing, false))
            } else {
                Err(StorageError::AlreadyExists {
                    name: name.to_string(),
                    size: existing.size(),
                    requested: size,
                })
            };
        }
        self.check_room(size)?;
        let volumes_dir = self.volumes_dir.clone();
        let name2 = name.clone();
        let io = self.io.clone();
        let opener = self.opener.clone();
        let replica =
            blocking(move || create_on_disk(&volumes_dir, name2, size, io, opener)).await?;
        let replica = Arc::new(replica);
        self.volumes
            .write()
            .expect("volume table lock")
            .insert(name.clone(), replica.clone());
        tracing::info!(volume = %name, size, "volume created");
        Ok((replica, true))
    }

    /// Deletes a volume and its data. Handles to it still held elsewhere
    /// answer [`StorageError::Deleted`] from then on.
    pub async fn delete_volume(&self, name: &VolumeName) -> Result<(), StorageError> {
        let _admin = self.admin.lock().await;
        let replica = self.get(name)?;
        replica.set_deleted(true);
        let volumes_dir = self.volumes_dir.clone();
        let name2 = name.clone();
        if let Err(e) = blocking(move || delete_on_disk(&volumes_dir, &name2)).await {
            replica.set_deleted(false);
            return Err(e);
        }
        self.volumes
            .write()
            .expect("volume table lock")
            .remove(name);
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Every volume, sorted by name.
    pub fn list(&self) -> Vec<Arc<Replica>> {
        self.volumes
            .read()
            .expect("volume table lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, name: &VolumeName) -> Result<Arc<Replica>, StorageError> {
        self.volumes
            .read()
            .expect("volume table lock")
            .get(name)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(name.to_string()))
    }

    /// The IO engine every volume of this store uses.
    pub fn io(&self) -> &Arc<dyn DiskIo> {
        &self.io
    }

    /// Whether layer files are opened with O_DIRECT: asked for, and not
    /// refused by the filesystem so far.
    pub fn direct_io(&self) -> bool {
        self.opener.mode() == FileMode::Direct && !self.opener.fell_back()
    }
}

/// Builds the volume in a scratch directory, then renames it into place, so
/// a crash never leaves a half-made volume under its real name. Blocking.
fn create_on_disk(
    volumes_dir: &Path,
    name: VolumeName,
    size: u64,
    io: Arc<dyn DiskIo>,
    opener: Arc<LayerOpener>,
) -> Result<Replica, StorageError> {
    let dir = volumes_dir.join(name.as_str());
    if dir.exists() {
        return Err(StorageError::Corrupt(format!(
            "{} exists but could not be opened as a volume; inspect or remove it",
            dir.display()
        )));
    }
    let tmp = volumes_dir.join(format!("{CREATING_PREFIX}{name}"));
    let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| StorageError::io(ctx("removing", &tmp), e))?;
    }
    fs::create_dir(&tmp).map_err(|e| StorageError::io(ctx("creating", &tmp), e))?;
    let built = replica::initialize(&tmp, &name, size, &opener)
        .and_then(|()| sync_dir(&tmp))
        .and_then(|()| {
            fs::rename(&tmp, &dir).map_err(|e| StorageError::io(ctx("renaming", &tmp), e))
        })
        .and_then(|()| sync_dir(volumes_dir));
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        if let StorageError::Io { error, .. } = &e {
            if error.raw_os_error() == Some(libc::EFBIG) {
                return Err(StorageError::NoRoom(format!(
                    "a {} volume is larger than the largest file the filesystem under {} can hold",
                    human(size),
                    volumes_dir.display()
                )));
            }
        }
        return Err(e);
    }
    Replica::open(dir, name, io, opener)
}

/// Renames the volume out of the namespace (durably), then removes it. A
/// crash after the rename leaves scratch that the next open removes.
fn delete_on_disk(volumes_dir: &Path, name: &VolumeName) -> Result<(), StorageError> {
    let dir = volumes_dir.join(name.as_str());
    let doomed = volumes_dir.join(format!("{DELETING_PREFIX}{name}"));
    if doomed.exists() {
        let _ = fs::remove_dir_all(&doomed);
    }
    fs::rename(&dir, &doomed)
        .map_err(|e| StorageError::io(format!("renaming {} for deletion", dir.display()), e))?;
    sync_dir(volumes_dir)?;
    if let Err(e) = fs::remove_dir_all(&doomed) {
        tracing::warn!(path = %doomed.display(), error = %e, "could not remove deleted volume's files; the next open will");
    }
    Ok(())
}

/// Layer maps come from SEEK_DATA: a filesystem that allocates in units
/// larger than a block would make a layer seem to hold blocks it never got.
fn warn_if_coarse_holes(dir: &Path) {
    if let Ok(st) = nix::sys::statvfs::statvfs(dir) {
        if st.fragment_size() > BLOCK_SIZE {
            tracing::warn!(
                dir = %dir.display(),
                fragment = st.fragment_size(),
                "filesystem allocates in units larger than 4 KiB; snapshot chains may read wrong data after a restart"
            );
        }
    }
}
