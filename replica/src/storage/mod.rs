//! The replica's on-disk storage: a data directory of volumes, each a chain
//! of sparse layer files plus an atomically replaced `meta.json`.
//!
//! ```text
//! DATA/volumes/<name>/meta.json        size, generation, layer chain, state
//! DATA/volumes/<name>/layer-<id>.img   sparse, `size` bytes; newest = live head
//! ```
//!
//! A block's current data is in the newest layer holding it; which layer
//! holds what is learned at open from the files (SEEK_DATA/SEEK_HOLE) and
//! kept in memory. All disk IO goes through [`DiskIo`] (io_uring or
//! pread/pwrite), on layer files opened with O_DIRECT where the filesystem
//! allows it; this module never blocks the async reactor on the data path. It owns the bytes on disk and nothing else: it knows no sockets
//! and no protocol beyond the error codes it maps to.
//!
//! Module map: [`store`] (the data directory), [`replica`] (one volume's
//! metadata, generation, snapshots), `datapath` (read, write, zeroing,
//! flush), `chain` (an immutable layer chain and its write gate), [`layer`]
//! and [`block_map`] (one layer file and its map), [`meta`] (`meta.json`),
//! [`units`] (typed offsets and blocks), [`io`] (the disk boundary).

pub mod block_map;
mod chain;
mod datapath;
pub mod error;
pub mod io;
pub mod layer;
pub mod meta;
pub mod replica;
pub mod store;
pub mod units;

#[cfg(test)]
mod tests;

pub use error::StorageError;
pub use io::{open_io, AlignedBuf, DiskIo, IoEngineChoice, IoFuture};
pub use layer::FileMode;
pub use replica::Replica;
pub use store::Store;
pub use units::{BlockIndex, ByteOffset, LayerId, BLOCK_SIZE};
