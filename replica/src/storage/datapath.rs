//! The data path of a [`Replica`]: read, write, trim, write-zeroes, flush.
//!
//! A chain of one layer is the fast path: every operation goes straight to
//! the head file, with no map and no lock. Over a chain of snapshots, reads
//! take each run of blocks from the newest layer holding it, and writes go
//! to the head and mark its map — after the data is written, so a reader
//! that sees the bit finds the data. A write covering only part of a block
//! that lives only in a snapshot first copies the block up into the head.
//! Zeroing over snapshots writes real zeros wherever a snapshot holds data,
//! since a hole in the head would let the snapshot's bytes show through.
//!
//! This module never touches metadata and never blocks: all IO goes
//! through [`DiskIo`](super::io::DiskIo).

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};

use super::chain::Chain;
use super::error::StorageError;
use super::replica::Replica;
use super::units::{BlockIndex, BlockRange, ByteRange, BLOCK_SIZE};

/// Zeros are written from this buffer, in pieces of at most its size.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
/// Zero-writing pieces in flight at once for one request.
const ZERO_PARALLEL: usize = 4;

impl Replica {
    /// Reads `len` bytes at `offset`. Never-written blocks read as zeros.
    #[tracing::instrument(level = "trace", name = "read", skip(self), fields(volume = %self.name))]
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, StorageError> {
        self.check_live()?;
        let range = ByteRange::checked(offset, u64::from(len), self.size)?;
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let chain = self.chain.load_full();
        let runs = source_runs(&chain, range);
        if let [(source, _)] = runs.as_slice() {
            return match source {
                Some(i) => self
                    .read_layer(&chain, *i, range)
                    .await
                    .map(BytesMut::freeze),
                None => Ok(Bytes::from(vec![0u8; len as usize])),
            };
        }
        let reads = runs.iter().filter_map(|&(source, part)| {
            let chain = &chain;
            source.map(
                |i| async move { self.read_layer(chain, i, part).await.map(|buf| (part, buf)) },
            )
        });
        let parts = futures::future::try_join_all(reads).await?;
        let mut out = BytesMut::zeroed(len as usize);
        for (part, buf) in parts {
            let at = (part.start().0 - offset) as usize;
            out[at..at + buf.len()].copy_from_slice(&buf);
        }
        Ok(out.freeze())
    }

    /// Writes `data` at `offset`; with `fua`, the data is on stable storage
    /// before this returns.
    #[tracing::instrument(level = "trace", name = "write", skip(self, data), fields(volume = %self.name, len = data.len()))]
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), StorageError> {
        self.check_live()?;
        let range = ByteRange::checked(offset, data.len() as u64, self.size)?;
        if range.is_empty() {
            return Ok(());
        }
        let chain = self.enter().await?;
        self.write_in(&chain, range, data).await?;
        if fua {
            self.sync_head(&chain).await?;
        }
        Ok(())
    }

    /// Makes every write that completed before this call durable.
    ///
    /// Only the live head is ever written (a snapshot syncs the head before
    /// freezing it), so syncing the head covers every layer written since
    /// the last flush.
    #[tracing::instrument(level = "trace", name = "flush", skip(self), fields(volume = %self.name))]
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.check_live()?;
        let chain = self.chain.load_full();
        self.sync_head(&chain).await
    }

    /// Discards a range: it reads as zeros afterwards.
    #[tracing::instrument(level = "trace", name = "trim", skip(self), fields(volume = %self.name))]
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.zero(offset, len, false).await
    }

    /// Makes a range read as zeros, deallocating whole blocks where that is
    /// safe; with `fua`, durably before returning.
    #[tracing::instrument(level = "trace", name = "write_zeroes", skip(self), fields(volume = %self.name))]
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), StorageError> {
        self.zero(offset, len, fua).await
    }

    async fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), StorageError> {
        self.check_live()?;
        let range = ByteRange::checked(offset, len, self.size)?;
        if range.is_empty() {
            return Ok(());
        }
        let chain = self.enter().await?;
        let whole = range.whole_blocks();
        // Partial blocks at the edges are written as zeros (copying up from
        // a snapshot when needed, like any partial write).
        let edges: Vec<ByteRange> = if whole.is_empty() {
            vec![range]
        } else {
            let inner = ByteRange::of_blocks(whole);
            let before = ByteRange::checked(
                range.start().0,
                inner.start().0 - range.start().0,
                self.size,
            )?;
            let after =
                ByteRange::checked(inner.end().0, range.end().0 - inner.end().0, self.size)?;
            vec![before, after]
        };
        for edge in edges.into_iter().filter(|e| !e.is_empty()) {
            self.write_zeros_in(&chain, edge).await?;
        }
        // Whole blocks: a hole where no snapshot holds data, real zeros
        // where one does. A chain of one layer has no snapshots.
        let single = chain.is_single();
        for (snapshot_below, blocks) in
            whole.runs_by(|b| !single && chain.lower_holder(b).is_some())
        {
            let bytes = ByteRange::of_blocks(blocks);
            if snapshot_below {
                self.write_zeros_in(&chain, bytes).await?;
            } else {
                let head = chain.head();
                self.io
                    .punch_hole(head.file.clone(), bytes.start().0, bytes.len())
                    .await
                    .map_err(|e| self.io_error(format!("punching {}", head.id), e))?;
            }
        }
        if fua {
            self.sync_head(&chain).await?;
        }
        Ok(())
    }

    async fn write_zeros_in(&self, chain: &Chain, range: ByteRange) -> Result<(), StorageError> {
        let pieces = (range.start().0..range.end().0)
            .step_by(ZERO_CHUNK)
            .map(|start| {
                let len = (range.end().0 - start).min(ZERO_CHUNK as u64);
                async move {
                    let piece = ByteRange::checked(start, len, self.size)?;
                    let zeros = Bytes::from_static(&ZEROS[..len as usize]);
                    self.write_in(chain, piece, zeros).await
                }
            });
        futures::stream::iter(pieces)
            .buffer_unordered(ZERO_PARALLEL)
            .try_collect::<()>()
            .await
    }

    /// Writes `data` (exactly `range.len()` bytes) into the head of `chain`.
    fn write_in<'a>(
        &'a self,
        chain: &'a Chain,
        range: ByteRange,
        data: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        debug_assert_eq!(range.len(), data.len() as u64);
        let head = chain.head();
        if chain.is_single() {
            return async move {
                self.io
                    .write_at(head.file.clone(), range.start().0, data)
                    .await
                    .map_err(|e| self.io_error(format!("writing {}", head.id), e))
            }
            .boxed();
        }
        async move {
            let map = head
                .map
                .as_ref()
                .expect("the head of a layered chain has a map");
            let blocks = range.blocks();
            let first = blocks.start;
            let last = BlockIndex(blocks.end.0 - 1);
            let covers = |b: BlockIndex| {
                let whole = ByteRange::of_blocks(BlockRange {
                    start: b,
                    end: b.next(),
                });
                range.intersect(whole) == whole
            };
            let needs_copy_up =
                |b: BlockIndex| !covers(b) && !map.contains(b) && chain.lower_holder(b).is_some();

            let mut direct = blocks;
            let mut jobs: Vec<BoxFuture<'_, Result<(), StorageError>>> = Vec::new();
            if needs_copy_up(first) {
                direct.start = first.next();
                jobs.push(self.copy_up(chain, first, range, data.clone()).boxed());
            }
            if last != first && needs_copy_up(last) {
                direct.end = last;
                jobs.push(self.copy_up(chain, last, range, data.clone()).boxed());
            }
            if !direct.is_empty() {
                let part = range.intersect(ByteRange::of_blocks(direct));
                let skip = (part.start().0 - range.start().0) as usize;
                let bytes = data.slice(skip..skip + part.len() as usize);
                jobs.push(
                    async move {
                        self.io
                            .write_at(head.file.clone(), part.start().0, bytes)
                            .await
                            .map_err(|e| self.io_error(format!("writing {}", head.id), e))?;
                        map.insert_range(direct);
                        Ok(())
                    }
                    .boxed(),
                );
            }
            futures::future::try_join_all(jobs).await.map(|_| ())
        }
        .boxed()
    }

    /// Writes the part of `data` (which covers `range`) that falls in block
    /// `b` into the head, first filling the rest of the block from the
    /// snapshot that holds it.
    async fn copy_up(
        &self,
        chain: &Chain,
        b: BlockIndex,
        range: ByteRange,
        data: Bytes,
    ) -> Result<(), StorageError> {
        let head = chain.head();
        let map = head
            .map
            .as_ref()
            .expect("the head of a layered chain has a map");
        let block = ByteRange::of_blocks(BlockRange {
            start: b,
            end: b.next(),
        });
        let part = range.intersect(block);
        let skip = (part.start().0 - range.start().0) as usize;
        let bytes = data.slice(skip..skip + part.len() as usize);

        let _turn = self.copy_up[(b.0 % self.copy_up.len() as u64) as usize]
            .lock()
            .await;
        let write_err = |e| self.io_error(format!("writing {}", head.id), e);
        if map.contains(b) {
            // Another writer copied it up while we waited: just our bytes.
            return self
                .io
                .write_at(head.file.clone(), part.start().0, bytes)
                .await
                .map_err(write_err);
        }
        let source = chain
            .lower_holder(b)
            .expect("copy-up only for blocks a snapshot holds");
        let mut buf = self
            .io
            .read_at(source.file.clone(), block.start().0, BLOCK_SIZE as usize)
            .await
            .map_err(|e| self.io_error(format!("reading {} to copy up", source.id), e))?;
        let at = part.start().within_block() as usize;
        buf[at..at + bytes.len()].copy_from_slice(&bytes);
        self.io
            .write_at(head.file.clone(), block.start().0, buf.freeze())
            .await
            .map_err(write_err)?;
        map.insert(b);
        Ok(())
    }

    async fn read_layer(
        &self,
        chain: &Chain,
        index: usize,
        range: ByteRange,
    ) -> Result<BytesMut, StorageError> {
        let layer = &chain.layers()[index];
        self.io
            .read_at(layer.file.clone(), range.start().0, range.len() as usize)
            .await
            .map_err(|e| self.io_error(format!("reading {}", layer.id), e))
    }

    async fn sync_head(&self, chain: &Chain) -> Result<(), StorageError> {
        let head = chain.head();
        self.io
            .sync_data(head.file.clone())
            .await
            .map_err(|e| self.io_error(format!("syncing {}", head.id), e))
    }
}

/// Splits `range` into runs of bytes served by one source: the index of the
/// layer holding them, or `None` for zeros.
fn source_runs(chain: &Chain, range: ByteRange) -> Vec<(Option<usize>, ByteRange)> {
    let layers = chain.layers();
    if chain.is_single() {
        return vec![(Some(layers.len() - 1), range)];
    }
    // Newest first: the head, then the snapshots below it.
    let index_of = |b: BlockIndex| (0..layers.len()).rev().find(|&i| layers[i].holds(b));
    range
        .blocks()
        .runs_by(index_of)
        .map(|(s, blocks)| (s, range.intersect(ByteRange::of_blocks(blocks))))
        .collect()
}
