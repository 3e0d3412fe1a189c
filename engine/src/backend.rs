//! Glue between the NBD frontend and the volume: each NBD command becomes
//! one volume call, and engine errors become NBD error values here.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::nbd::{NbdBackend, NbdError};
use crate::volume::{EngineError, Volume};

pub struct VolumeBackend {
    volume: Arc<Volume>,
}

impl VolumeBackend {
    pub fn new(volume: Arc<Volume>) -> VolumeBackend {
        VolumeBackend { volume }
    }
}

fn nbd_error(e: EngineError) -> NbdError {
    match e {
        EngineError::OutOfRange { .. } => NbdError::Invalid,
        // No replica left to hold the data: the client must see EIO, and
        // the reason is already in the engine's log.
        _ => NbdError::Io,
    }
}

impl NbdBackend for VolumeBackend {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<Bytes, NbdError>> {
        let v = self.volume.clone();
        async move { v.read(offset, len).await.map_err(nbd_error) }.boxed()
    }

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), NbdError>> {
        let v = self.volume.clone();
        async move { v.write(offset, data, fua).await.map_err(nbd_error) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), NbdError>> {
        let v = self.volume.clone();
        async move { v.flush().await.map_err(nbd_error) }.boxed()
    }

    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<(), NbdError>> {
        let v = self.volume.clone();
        async move { v.trim(offset, len as u64).await.map_err(nbd_error) }.boxed()
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), NbdError>> {
        let v = self.volume.clone();
        async move {
            v.write_zeroes(offset, len as u64, fua)
                .await
                .map_err(nbd_error)
        }
        .boxed()
    }
}
