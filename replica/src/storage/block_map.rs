//! [`BlockMap`]: which 4 KiB blocks a layer holds, one bit per block.
//!
//! Bits are atomics so the head's map can be set by many writers at once
//! without a lock, and chunks are allocated on first use so a sparse volume
//! costs memory only for the gigabytes it has touched. A map never clears a
//! bit: a layer only ever gains blocks (a punched hole under a set bit reads
//! as zeros, which is what the punch meant).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::units::{BlockIndex, BlockRange};

/// 32 KiB of bits per chunk: one chunk maps 1 GiB of volume.
const WORDS_PER_CHUNK: usize = 4096;
const BLOCKS_PER_CHUNK: u64 = WORDS_PER_CHUNK as u64 * 64;

pub struct BlockMap {
    blocks: u64,
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl BlockMap {
    /// An empty map for a layer of `blocks` blocks.
    pub fn new(blocks: u64) -> BlockMap {
        let n = blocks.div_ceil(BLOCKS_PER_CHUNK) as usize;
        BlockMap {
            blocks,
            chunks: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    fn chunk(&self, i: usize) -> &[AtomicU64] {
        self.chunks[i].get_or_init(|| (0..WORDS_PER_CHUNK).map(|_| AtomicU64::new(0)).collect())
    }

    /// Splits a block into (chunk, word, bit).
    fn locate(b: BlockIndex) -> (usize, usize, u32) {
        let chunk = (b.0 / BLOCKS_PER_CHUNK) as usize;
        let within = b.0 % BLOCKS_PER_CHUNK;
        (chunk, (within / 64) as usize, (within % 64) as u32)
    }

    pub fn contains(&self, b: BlockIndex) -> bool {
        if b.0 >= self.blocks {
            return false;
        }
        let (c, w, bit) = Self::locate(b);
        match self.chunks[c].get() {
            // Acquire pairs with the Release in `insert_range`: whoever sees
            // the bit also sees that the data it stands for was written.
            Some(words) => words[w].load(Ordering::Acquire) & (1 << bit) != 0,
            None => false,
        }
    }

    pub fn insert(&self, b: BlockIndex) {
        self.insert_range(BlockRange {
            start: b,
            end: b.next(),
        });
    }

    /// Marks every block of `r` held. Blocks past the map's end are ignored.
    pub fn insert_range(&self, r: BlockRange) {
        let mut b = r.start.0;
        let end = r.end.0.min(self.blocks);
        while b < end {
            let (c, w, bit) = Self::locate(BlockIndex(b));
            let n = (64 - bit as u64).min(end - b);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.chunk(c)[w].fetch_or(mask, Ordering::Release);
            b += n;
        }
    }

    /// How many blocks are held.
    pub fn count(&self) -> u64 {
        self.chunks
            .iter()
            .filter_map(|c| c.get())
            .flat_map(|words| words.iter())
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// The held blocks as maximal runs, in order (for tests and diagnostics).
    pub fn runs(&self) -> Vec<BlockRange> {
        let mut out: Vec<BlockRange> = Vec::new();
        for b in (0..self.blocks).map(BlockIndex) {
            if !self.contains(b) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == b => last.end = b.next(),
                _ => out.push(BlockRange {
                    start: b,
                    end: b.next(),
                }),
            }
        }
        out
    }
}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMap")
            .field("blocks", &self.blocks)
            .field("held", &self.count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(a: u64, b: u64) -> BlockRange {
        BlockRange {
            start: BlockIndex(a),
            end: BlockIndex(b),
        }
    }

    #[test]
    fn ranges_across_words_and_chunks() {
        let m = BlockMap::new(BLOCKS_PER_CHUNK * 2 + 10);
        m.insert_range(range(60, 200));
        m.insert_range(range(BLOCKS_PER_CHUNK - 3, BLOCKS_PER_CHUNK + 2));
        m.insert(BlockIndex(BLOCKS_PER_CHUNK * 2 + 9));
        m.insert(BlockIndex(BLOCKS_PER_CHUNK * 2 + 10)); // past the end: ignored
        assert!(!m.contains(BlockIndex(59)));
        assert!(m.contains(BlockIndex(60)) && m.contains(BlockIndex(199)));
        assert!(!m.contains(BlockIndex(200)));
        assert_eq!(m.count(), 140 + 5 + 1);
        assert_eq!(
            m.runs(),
            vec![
                range(60, 200),
                range(BLOCKS_PER_CHUNK - 3, BLOCKS_PER_CHUNK + 2),
                range(BLOCKS_PER_CHUNK * 2 + 9, BLOCKS_PER_CHUNK * 2 + 10)
            ]
        );
    }
}
