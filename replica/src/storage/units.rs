//! Typed units of the storage layer: byte offsets, 4 KiB block indices, byte
//! ranges already checked against a volume's size, and layer ids.
//!
//! Every conversion between bytes and blocks goes through this module, so
//! rounding is decided in one place and overflow is an error, never a wrap.

use std::fmt;

use super::error::StorageError;

/// The unit of copy-up, of layer maps and of volume sizes.
pub const BLOCK_SIZE: u64 = 4096;

/// Formats bytes for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A position in a volume (or a layer file), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteOffset(pub u64);

/// The index of a 4 KiB block: block `n` covers bytes `n*4096 .. (n+1)*4096`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIndex(pub u64);

impl ByteOffset {
    pub fn is_block_aligned(self) -> bool {
        self.0.is_multiple_of(BLOCK_SIZE)
    }

    /// Distance in bytes from the start of the block holding this offset.
    pub fn within_block(self) -> u64 {
        self.0 % BLOCK_SIZE
    }
}

impl BlockIndex {
    /// The block holding byte `offset`.
    pub fn containing(offset: ByteOffset) -> BlockIndex {
        BlockIndex(offset.0 / BLOCK_SIZE)
    }

    /// The first block starting at or after `offset`.
    pub fn ceil(offset: ByteOffset) -> BlockIndex {
        BlockIndex(offset.0.div_ceil(BLOCK_SIZE))
    }

    /// Where this block starts. `None` if that does not fit in a `u64`.
    pub fn start(self) -> Option<ByteOffset> {
        self.0.checked_mul(BLOCK_SIZE).map(ByteOffset)
    }

    pub fn next(self) -> BlockIndex {
        BlockIndex(self.0 + 1)
    }
}

/// A non-empty-or-empty half-open byte range `[start, end)` that was checked
/// to lie inside a volume. Only [`ByteRange::checked`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    start: u64,
    end: u64,
}

impl ByteRange {
    /// `offset .. offset+len`, refused whole if any byte is past `size` or
    /// the sum overflows.
    pub fn checked(offset: u64, len: u64, size: u64) -> Result<ByteRange, StorageError> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(ByteRange { start: offset, end }),
            _ => Err(StorageError::OutOfRange { offset, len, size }),
        }
    }

    pub fn start(self) -> ByteOffset {
        ByteOffset(self.start)
    }

    pub fn end(self) -> ByteOffset {
        ByteOffset(self.end)
    }

    pub fn len(self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(self) -> bool {
        self.start == self.end
    }

    /// The blocks this range touches, partially or wholly.
    pub fn blocks(self) -> BlockRange {
        BlockRange {
            start: BlockIndex::containing(self.start()),
            end: BlockIndex::ceil(self.end()),
        }
    }

    /// The blocks this range covers wholly (may be empty).
    pub fn whole_blocks(self) -> BlockRange {
        let start = BlockIndex::ceil(self.start());
        let end = BlockIndex::containing(self.end());
        BlockRange {
            start,
            end: end.max(start),
        }
    }

    /// The part of this range inside `other` (may be empty).
    pub fn intersect(self, other: ByteRange) -> ByteRange {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end).max(start);
        ByteRange { start, end }
    }

    /// The bytes of block range `blocks`. Block ranges built from a checked
    /// byte range always fit, since a volume's size fits in a `u64`.
    pub fn of_blocks(blocks: BlockRange) -> ByteRange {
        let start = blocks.start.start().expect("block range inside a volume");
        let end = blocks.end.start().expect("block range inside a volume");
        ByteRange {
            start: start.0,
            end: end.0,
        }
    }
}

/// A half-open range of blocks `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub start: BlockIndex,
    pub end: BlockIndex,
}

impl BlockRange {
    pub fn is_empty(self) -> bool {
        self.start >= self.end
    }

    pub fn iter(self) -> impl Iterator<Item = BlockIndex> {
        (self.start.0..self.end.0).map(BlockIndex)
    }

    /// Splits the range, lazily, into maximal runs of consecutive blocks
    /// with the same `key`, each key computed once per block.
    pub fn runs_by<K: PartialEq, F: FnMut(BlockIndex) -> K>(
        self,
        mut key: F,
    ) -> impl Iterator<Item = (K, BlockRange)> {
        let end = self.end;
        let mut pos = self.start;
        let mut carried: Option<K> = None;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let start = pos;
            let k = carried.take().unwrap_or_else(|| key(start));
            pos = start.next();
            while pos < end {
                let next = key(pos);
                if next != k {
                    carried = Some(next);
                    break;
                }
                pos = pos.next();
            }
            Some((k, BlockRange { start, end: pos }))
        })
    }
}

/// The id of one layer of a replica's chain; names its file `layer-<id>.img`.
/// Ids grow: a newer layer always has a larger id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerId(pub u64);

impl LayerId {
    pub fn file_name(self) -> String {
        format!("layer-{}.img", self.0)
    }

    pub fn next(self) -> LayerId {
        LayerId(self.0 + 1)
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_refuse_overflow_and_past_end() {
        assert!(ByteRange::checked(0, 4096, 4096).is_ok());
        assert!(ByteRange::checked(4096, 0, 4096).is_ok());
        assert!(matches!(
            ByteRange::checked(1, 4096, 4096),
            Err(StorageError::OutOfRange { .. })
        ));
        assert!(matches!(
            ByteRange::checked(u64::MAX, 2, u64::MAX),
            Err(StorageError::OutOfRange { .. })
        ));
    }

    #[test]
    fn block_rounding() {
        let r = ByteRange::checked(100, 8192, 1 << 20).unwrap();
        assert_eq!(r.blocks().start, BlockIndex(0));
        assert_eq!(r.blocks().end, BlockIndex(3));
        assert_eq!(r.whole_blocks().start, BlockIndex(1));
        assert_eq!(r.whole_blocks().end, BlockIndex(2));
        let small = ByteRange::checked(100, 10, 1 << 20).unwrap();
        assert!(small.whole_blocks().is_empty());
        assert_eq!(BlockIndex(u64::MAX).start(), None);
    }

    #[test]
    fn runs_by_key() {
        let r = BlockRange {
            start: BlockIndex(3),
            end: BlockIndex(12),
        };
        let mut calls = 0;
        let runs: Vec<(bool, u64, u64)> = r
            .runs_by(|b| {
                calls += 1;
                (4..7).contains(&b.0) || b.0 == 11
            })
            .map(|(k, r)| (k, r.start.0, r.end.0))
            .collect();
        assert_eq!(
            runs,
            [(false, 3, 4), (true, 4, 7), (false, 7, 11), (true, 11, 12)]
        );
        assert_eq!(calls, 9);
        let empty = BlockRange {
            start: BlockIndex(5),
            end: BlockIndex(5),
        };
        assert_eq!(empty.runs_by(|_| 0).count(), 0);
    }
}
