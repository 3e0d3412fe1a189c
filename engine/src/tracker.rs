//! Which regions of the volume have writes in flight, and which were
//! written since the replicas were last told to clean them.
//!
//! The replicas keep a durable dirty bit per region; only the engine knows
//! when every replica has acknowledged every write to a region, so only it
//! may clear those bits. A region is cleanable when it was written since the
//! last clean and has nothing in flight now.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub struct WriteTracker {
    region_size: u64,
    in_flight: Box<[AtomicU32]>,
    touched: Box<[AtomicU64]>,
    /// The cleaner's clock (one tick per clean pass) and, per region, the
    /// tick of its last write: a region still being written is left dirty,
    /// so a busy region does not cost its replicas a dirty-map sync every
    /// time it is cleaned and written again.
    clock: AtomicU32,
    last_write: Box<[AtomicU32]>,
}

impl WriteTracker {
    pub fn new(volume_size: u64, region_size: u64) -> WriteTracker {
        let regions = volume_size.div_ceil(region_size) as usize;
        WriteTracker {
            region_size,
            in_flight: (0..regions).map(|_| AtomicU32::new(0)).collect(),
            touched: (0..regions.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            clock: AtomicU32::new(0),
            last_write: (0..regions).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    pub fn regions(&self) -> u64 {
        self.in_flight.len() as u64
    }

    fn span(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        let first = (offset / self.region_size) as usize;
        let last = ((offset + len.max(1) - 1) / self.region_size) as usize;
        first..=last.min(self.in_flight.len().saturating_sub(1))
    }

    pub fn begin(&self, offset: u64, len: u64) {
        let now = self.clock.load(Ordering::Relaxed);
        for r in self.span(offset, len) {
            self.last_write[r].store(now, Ordering::Relaxed);
            self.in_flight[r].fetch_add(1, Ordering::AcqRel);
            self.touched[r / 64].fetch_or(1 << (r % 64), Ordering::AcqRel);
        }
    }

    pub fn end(&self, offset: u64, len: u64) {
        for r in self.span(offset, len) {
            self.in_flight[r].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Advances the clock by one clean pass.
    pub fn tick(&self) {
        self.clock.fetch_add(1, Ordering::Relaxed);
    }

    /// Regions written since the last clean, idle now and not written for
    /// `min_idle` ticks, as a bitmap (one bit per region, LSB first); they
    /// stop counting as touched. The caller must hold off new writes while
    /// it queues the clean (the volume's gate), or a write could slip in
    /// between the check and the clean.
    pub fn take_cleanable(&self, min_idle: u32) -> Option<Vec<u8>> {
        let now = self.clock.load(Ordering::Relaxed);
        let mut out = vec![0u8; self.in_flight.len().div_ceil(8)];
        let mut any = false;
        for (w, word) in self.touched.iter().enumerate() {
            let bits = word.load(Ordering::Acquire);
            if bits == 0 {
                continue;
            }
            let mut take = 0u64;
            for b in 0..64 {
                let r = w * 64 + b;
                if bits & (1 << b) == 0 {
                    continue;
                }
                let idle = now.wrapping_sub(self.last_write[r].load(Ordering::Relaxed)) >= min_idle;
                if idle && self.in_flight[r].load(Ordering::Acquire) == 0 {
                    take |= 1 << b;
                    out[r / 8] |= 1 << (r % 8);
                }
            }
            if take != 0 {
                word.fetch_and(!take, Ordering::AcqRel);
                any = true;
            }
        }
        any.then_some(out)
    }

    /// Counts the regions in `bitmap` as touched again: a clean taken with
    /// [`take_cleanable`](Self::take_cleanable) that did not go ahead.
    pub fn retouch(&self, bitmap: &[u8]) {
        for r in set_regions(bitmap) {
            let r = r as usize;
            if r < self.in_flight.len() {
                self.touched[r / 64].fetch_or(1 << (r % 64), Ordering::AcqRel);
            }
        }
    }

    /// Forgets what was touched (after a clean of everything).
    pub fn forget_touched(&self) {
        for w in self.touched.iter() {
            w.store(0, Ordering::Release);
        }
    }
}

/// Iterates the set bits of a region bitmap.
pub fn set_regions(bitmap: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(i, byte)| {
        (0..8)
            .filter(move |b| byte & (1 << b) != 0)
            .map(move |b| (i * 8 + b) as u64)
    })
}

/// The bitmap (one bit per region, LSB first) of `regions`.
pub fn bitmap_of(regions: &[u64]) -> Vec<u8> {
    let len = regions.iter().max().map_or(0, |r| *r as usize / 8 + 1);
    let mut out = vec![0u8; len];
    for &r in regions {
        out[r as usize / 8] |= 1 << (r % 8);
    }
    out
}

/// Bitwise OR of two bitmaps (the longer length wins).
pub fn union(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; a.len().max(b.len())];
    for (i, o) in out.iter_mut().enumerate() {
        *o = a.get(i).copied().unwrap_or(0) | b.get(i).copied().unwrap_or(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bitmap_of_regions_holds_exactly_them() {
        let regions = [0, 3, 8, 17];
        let bitmap = bitmap_of(&regions);
        assert_eq!(bitmap, vec![0b0000_1001, 0b0000_0001, 0b0000_0010]);
        assert_eq!(set_regions(&bitmap).collect::<Vec<_>>(), regions);
        assert!(bitmap_of(&[]).is_empty());
    }

    #[test]
    fn only_idle_touched_regions_are_cleanable() {
        let t = WriteTracker::new(10 << 20, 2 << 20);
        assert_eq!(t.regions(), 5);
        assert_eq!(t.take_cleanable(0), None);
        t.begin(0, 4096);
        t.begin((2 << 20) - 1, 2); // regions 0 and 1
        t.end(0, 4096);
        // Region 1 still has a write in flight, region 0 too (the second).
        assert_eq!(t.take_cleanable(0), None);
        t.end((2 << 20) - 1, 2);
        assert_eq!(t.take_cleanable(1), None, "written this tick: too fresh");
        t.tick();
        assert_eq!(t.take_cleanable(1), Some(vec![0b11]));
        assert_eq!(t.take_cleanable(0), None, "cleaned regions are forgotten");
        t.begin(9 << 20, 1 << 20);
        t.end(9 << 20, 1 << 20);
        assert_eq!(t.take_cleanable(0), Some(vec![0b1_0000]));
        t.retouch(&[0b1_0001]);
        assert_eq!(t.take_cleanable(0), Some(vec![0b1_0001]), "given back");
    }

    #[test]
    fn bitmap_helpers() {
        assert_eq!(
            set_regions(&[0b101, 0, 0b1000_0000]).collect::<Vec<_>>(),
            vec![0, 2, 23]
        );
        assert_eq!(union(&[1, 2], &[4]), vec![5, 2]);
    }
}
