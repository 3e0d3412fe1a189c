//! The data path of a [`Replica`]: read, write, trim, write-zeroes, flush.
//!
//! A chain of one layer is the fast path: every operation goes straight to
//! the head file, with no map. Over a chain of snapshots, reads take each
//! run of blocks from the newest layer holding it, and writes go to the
//! head and mark its map — after the data is written, so a reader that sees
//! the bit finds the data. Zeroing over snapshots writes real zeros
//! wherever a snapshot holds data, since a hole in the head would let the
//! snapshot's bytes show through.
//!
//! Layer files are O_DIRECT where the filesystem allows it, so the disk
//! sees only whole, aligned 4 KiB blocks from aligned memory: a read is
//! widened to the blocks it touches and the bytes asked for are sliced out
//! (no copy); a write's payload is copied into aligned memory, and a block
//! it covers only in part is first read — from the newest layer holding it
//! — and merged (read-modify-write). Two such writes into one block take
//! turns on the replica's partial-block lock, so neither loses the other's
//! bytes. Over a buffered head (O_DIRECT refused) writes go down as they
//! come, and only a partial block living in a snapshot is read and merged
//! (copied up), under the same lock.
//!
//! The protocol does not order concurrent writes that overlap (their bytes
//! may land in either order, as on a disk); writes that do not overlap never
//! disturb each other's bytes, whatever their alignment.
//!
//! This module never touches metadata and never blocks: all IO goes
//! through [`DiskIo`](super::io::DiskIo).

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::sync::MutexGuard;

use super::chain::Chain;
use super::error::StorageError;
use super::io::aligned::is_aligned;
use super::io::AlignedBuf;
use super::layer::Layer;
use super::replica::Replica;
use super::units::{BlockIndex, BlockRange, ByteRange, BLOCK_SIZE};

/// Zeros are written from this buffer, in pieces of at most its size. It is
/// aligned, so O_DIRECT writes take whole-block pieces without a copy.
const ZERO_CHUNK: usize = 1 << 20;
#[repr(C, align(4096))]
struct Zeros([u8; ZERO_CHUNK]);
static ZEROS: Zeros = Zeros([0; ZERO_CHUNK]);
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
                Some(i) => self.read_layer(&chain, *i, range).await,
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
                    let zeros = Bytes::from_static(&ZEROS.0[..len as usize]);
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
        if chain.head().direct {
            self.write_direct(chain, range, data).boxed()
        } else {
            self.write_buffered(chain, range, data)
        }
    }

    /// Writes into an O_DIRECT head: one write of the whole blocks `range`
    /// touches, from aligned memory. Blocks it covers only in part are read
    /// and merged first, under their stripes of the partial-block lock.
    async fn write_direct(
        &self,
        chain: &Chain,
        range: ByteRange,
        data: Bytes,
    ) -> Result<(), StorageError> {
        let head = chain.head();
        let blocks = range.blocks();
        let cover = ByteRange::of_blocks(blocks);
        let write_err = |e| self.io_error(format!("writing {}", head.id), e);
        if cover == range {
            let data = if is_aligned(&data) {
                data
            } else {
                AlignedBuf::copy_from(&data).into_bytes()
            };
            self.io
                .write_at(head.file.clone(), range.start().0, data)
                .await
                .map_err(write_err)?;
            if let Some(map) = &head.map {
                map.insert_range(blocks);
            }
            return Ok(());
        }

        let first = blocks.start;
        let last = BlockIndex(blocks.end.0 - 1);
        let partial = |b: BlockIndex| !covers(range, b);
        let mut edges = Vec::with_capacity(2);
        if partial(first) {
            edges.push(first);
        }
        if last != first && partial(last) {
            edges.push(last);
        }
        let _turns = self.lock_partial_blocks(&edges).await;
        // Under the lock no other write changes these blocks' bytes outside
        // its own range, so what is read here is what must be kept.
        let reads = edges.iter().filter_map(|&b| {
            let source = block_source(chain, b)?;
            let at = ByteRange::of_blocks(BlockRange {
                start: b,
                end: b.next(),
            });
            Some(async move {
                self.io
                    .read_at(source.file.clone(), at.start().0, BLOCK_SIZE as usize)
                    .await
                    .map(|buf| (at, buf))
                    .map_err(|e| self.io_error(format!("reading {} to merge", source.id), e))
            })
        });
        let old = futures::future::try_join_all(reads).await?;
        let mut buf = AlignedBuf::zeroed(cover.len() as usize);
        for (at, block) in old {
            let skip = (at.start().0 - cover.start().0) as usize;
            buf[skip..skip + block.len()].copy_from_slice(&block);
        }
        let skip = (range.start().0 - cover.start().0) as usize;
        buf[skip..skip + data.len()].copy_from_slice(&data);
        self.io
            .write_at(head.file.clone(), cover.start().0, buf.into_bytes())
            .await
            .map_err(write_err)?;
        if let Some(map) = &head.map {
            map.insert_range(blocks);
        }
        Ok(())
    }

    /// Takes the partial-block lock stripes of `blocks`, in stripe order so
    /// two writers never wait on each other's second stripe.
    async fn lock_partial_blocks(&self, blocks: &[BlockIndex]) -> Vec<MutexGuard<'_, ()>> {
        let stripes = self.partial_block.len() as u64;
        let mut indices: Vec<usize> = blocks.iter().map(|b| (b.0 % stripes) as usize).collect();
        indices.sort_unstable();
        indices.dedup();
        let mut guards = Vec::with_capacity(indices.len());
        for i in indices {
            guards.push(self.partial_block[i].lock().await);
        }
        guards
    }

    /// Writes into a buffered head: as it comes, except that a block it
    /// covers only in part and that lives only in a snapshot is copied up.
    fn write_buffered<'a>(
        &'a self,
        chain: &'a Chain,
        range: ByteRange,
        data: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
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
            let needs_copy_up = |b: BlockIndex| {
                !covers(range, b) && !map.contains(b) && chain.lower_holder(b).is_some()
            };

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
    /// `b` into a buffered head, first filling the rest of the block from
    /// the snapshot that holds it.
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

        let _turn = self.lock_partial_blocks(&[b]).await;
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
            .write_at(head.file.clone(), block.start().0, buf.into_bytes())
            .await
            .map_err(write_err)?;
        map.insert(b);
        Ok(())
    }

    /// Reads `range` from layer `index`. From an O_DIRECT file it reads the
    /// whole blocks the range touches and slices the bytes asked for out of
    /// them, without a copy.
    async fn read_layer(
        &self,
        chain: &Chain,
        index: usize,
        range: ByteRange,
    ) -> Result<Bytes, StorageError> {
        let layer = &chain.layers()[index];
        let at = if layer.direct {
            ByteRange::of_blocks(range.blocks())
        } else {
            range
        };
        let buf = self
            .io
            .read_at(layer.file.clone(), at.start().0, at.len() as usize)
            .await
            .map_err(|e| self.io_error(format!("reading {}", layer.id), e))?;
        let mut bytes = buf.into_bytes();
        if at != range {
            bytes.advance((range.start().0 - at.start().0) as usize);
            bytes.truncate(range.len() as usize);
        }
        Ok(bytes)
    }

    async fn sync_head(&self, chain: &Chain) -> Result<(), StorageError> {
        let head = chain.head();
        self.io
            .sync_data(head.file.clone())
            .await
            .map_err(|e| self.io_error(format!("syncing {}", head.id), e))
    }
}

/// Whether `range` covers all of block `b`.
fn covers(range: ByteRange, b: BlockIndex) -> bool {
    let whole = ByteRange::of_blocks(BlockRange {
        start: b,
        end: b.next(),
    });
    range.intersect(whole) == whole
}

/// The layer holding the current bytes of block `b` (`None`: zeros). With
/// one layer that is the head, whose holes read as zeros anyway.
fn block_source(chain: &Chain, b: BlockIndex) -> Option<&Layer> {
    let head = chain.head();
    if chain.is_single() || head.holds(b) {
        return Some(head);
    }
    chain.lower_holder(b).map(|l| &**l)
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
