//! The NBD frontend: how every client (the kernel's `/dev/nbdX`, qemu,
//! libnbd's `nbdcopy`/`nbdinfo`/`nbdfuse`, fio) reaches a volume.
//!
//! The server speaks the fixed newstyle handshake (`NBD_OPT_EXPORT_NAME`,
//! `INFO`, `GO`, `LIST`, `ABORT`; structured replies are refused, so every
//! reply is a simple reply) and the commands READ, WRITE, FLUSH, TRIM,
//! WRITE_ZEROES and DISC with the FUA flag. It serves one export, backed by an
//! [`NbdBackend`]; the volume engine implements that trait, tests use an
//! in-memory one.
//!
//! What this module owns: the wire protocol, per-connection concurrency and
//! backpressure, and input checking. What it must never do: pass a request
//! the checks refused to the backend, decide anything about replication or
//! durability (that is the backend's job), or let one client's bad bytes
//! affect another connection.
//!
//! Layout: [`proto`] (wire constants and headers), `handshake` (option
//! haggling), `request` (checks), `transmission` (request loop), `writer`
//! (batched vectored replies), `listen` (addresses and sockets), `server`
//! (accept loop, limits, shutdown), `error` (the one error mapping).

mod error;
mod handshake;
mod listen;
pub mod proto;
mod request;
mod server;
mod transmission;
mod writer;

#[cfg(test)]
mod tests;

use futures::future::BoxFuture;

pub use error::NbdError;
pub(crate) use listen::remove_stale_socket;
pub use listen::{socket_file_at, NbdListen, ParseListenError};
pub use server::{serve, NbdServer, NbdServerConfig, HANDSHAKE_TIMEOUT, SHUTDOWN_GRACE};
pub use transmission::{MAX_DISCARDED_WRITE, MAX_INFLIGHT_BYTES, MAX_INFLIGHT_REQUESTS};

/// The storage behind the export.
///
/// The server calls these methods from a connection's reader in the order
/// requests arrive on that connection, and awaits the returned futures
/// concurrently, so they may complete in any order. Every offset and length
/// has been checked first: inside the export, multiples of
/// [`proto::MIN_BLOCK_SIZE`], and at most [`proto::MAX_BLOCK_SIZE`] for READ
/// and WRITE. A future must always complete (with an error if need be): the
/// client is waiting on it.
pub trait NbdBackend: Send + Sync + 'static {
    /// Size of the export in bytes; read once per connection at handshake.
    fn size(&self) -> u64;

    /// Reads exactly `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<bytes::Bytes, NbdError>>;

    /// Writes `data` at `offset`; with `fua`, the data is on stable storage
    /// before the future completes.
    fn write(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), NbdError>>;

    /// Makes every write that has completed so far durable.
    fn flush(&self) -> BoxFuture<'static, Result<(), NbdError>>;

    /// The client no longer needs this range; its contents are unspecified
    /// until written again.
    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<(), NbdError>>;

    /// Makes the range read back as zeroes; with `fua`, durably.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), NbdError>>;
}
