//! [`AlignedBuf`]: heap memory aligned to [`IO_ALIGN`], as O_DIRECT wants.
//!
//! Layer files are opened with O_DIRECT, which makes the kernel DMA straight
//! from and into the caller's memory: buffer address, file offset and length
//! must all be multiples of the device's logical block size. 4096 covers
//! every device in practice (512 and 4096 are the only sizes seen) and is
//! also the volume's block size, so one constant serves both.
//!
//! Reads land in an `AlignedBuf` and leave as [`Bytes`] without a copy
//! ([`AlignedBuf::into_bytes`]); writes whose payload is not aligned are
//! copied into one first. An engine receives block-sized writes from its
//! clients straight into one ([`AlignedBuf::read_from`]), so a replica in the
//! same process writes them to disk as they are.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

use bytes::Bytes;

/// Alignment of memory, offsets and lengths for O_DIRECT IO.
pub const IO_ALIGN: usize = 4096;

/// Freed buffers, reused before asking the allocator again. Nearly every
/// IO needs one, and the allocator is slow for both sizes that matter:
/// - one block (4 KiB IO): glibc's aligned allocation splits and re-merges
///   heap chunks on each call; without the pool, allocator functions took
///   ~5% of a replica daemon's CPU under 4 KiB random writes;
/// - larger (128 KiB IO, rebuild copies): glibc gives these fresh pages that
///   the kernel must fault in and zero, and hands them back on free. Under
///   128 KiB sequential writes that was ~24k page faults a second in the two
///   replica daemons, and ~10% more CPU per IO than with the pool.
static POOL: Mutex<Pool> = Mutex::new(Pool {
    blocks: Vec::new(),
    large: VecDeque::new(),
    large_bytes: 0,
});
/// One-block buffers kept at most (2 MiB).
const POOL_MAX: usize = 512;
/// Bytes of larger buffers kept at most: 64 writes of 128 KiB in flight,
/// the most a client's queue holds, come back to it whole.
const LARGE_POOL_BYTES: usize = 9 << 20;
/// Larger buffers than this go back to the allocator.
const LARGE_MAX: usize = 1 << 20;
/// Larger buffers kept at most, whatever their size, so that finding one
/// of a given size stays a short scan.
const LARGE_ENTRIES: usize = 128;

struct Pool {
    /// Addresses of one-block buffers.
    blocks: Vec<usize>,
    /// (capacity, address) of larger ones, oldest first: when full, the
    /// oldest goes, so a pool filled by one kind of IO makes room for the
    /// next kind.
    large: VecDeque<(usize, usize)>,
    large_bytes: usize,
}

impl Pool {
    fn take(&mut self, cap: usize) -> Option<usize> {
        if cap == IO_ALIGN {
            return self.blocks.pop();
        }
        let i = self.large.iter().rposition(|&(c, _)| c == cap)?;
        let (_, addr) = self.large.remove(i)?;
        self.large_bytes -= cap;
        Some(addr)
    }

    /// Keeps a freed buffer, or gives it back to the allocator; pushes
    /// out the oldest larger ones to make room.
    fn keep(&mut self, cap: usize, addr: usize) {
        if cap == IO_ALIGN {
            if self.blocks.len() < POOL_MAX {
                self.blocks.push(addr);
            } else {
                release(cap, addr);
            }
            return;
        }
        if cap > LARGE_MAX {
            return release(cap, addr);
        }
        while self.large_bytes + cap > LARGE_POOL_BYTES || self.large.len() >= LARGE_ENTRIES {
            let Some((old, old_addr)) = self.large.pop_front() else {
                break;
            };
            self.large_bytes -= old;
            release(old, old_addr);
        }
        self.large.push_back((cap, addr));
        self.large_bytes += cap;
    }
}

/// Gives a buffer's memory back to the allocator.
fn release(cap: usize, addr: usize) {
    // SAFETY: every buffer, pooled or not, was allocated in
    // `AlignedBuf::allocate` with the layout of its capacity, and is
    // released once.
    unsafe { std::alloc::dealloc(addr as *mut u8, AlignedBuf::layout(cap)) };
}

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An owned, fixed-length byte buffer whose memory starts on an
/// [`IO_ALIGN`] boundary.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation outright, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, IO_ALIGN).expect("IO buffer length fits a Layout")
    }

    /// What a buffer of `len` bytes really holds: whole blocks, so that
    /// buffers of nearly the same length (frames whose fields differ a
    /// little) share the pool.
    fn capacity(len: usize) -> usize {
        len.next_multiple_of(IO_ALIGN)
    }

    /// Memory for `len` (> 0) bytes, uninitialised: from the pool when one
    /// of its size is there, else from the allocator.
    fn allocate(len: usize) -> NonNull<u8> {
        let cap = AlignedBuf::capacity(len);
        if let Some(addr) = pool().take(cap) {
            return NonNull::new(addr as *mut u8).expect("pooled buffers are non-null");
        }
        let layout = AlignedBuf::layout(cap);
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf::empty();
        }
        let ptr = AlignedBuf::allocate(len);
        // SAFETY: `ptr` points to `len` writable bytes we own; afterwards
        // every byte is initialised.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        AlignedBuf { ptr, len }
    }

    /// A copy of `src` in aligned memory.
    pub fn copy_from(src: &[u8]) -> AlignedBuf {
        let len = src.len();
        if len == 0 {
            return AlignedBuf::empty();
        }
        let ptr = AlignedBuf::allocate(len);
        // SAFETY: both regions are `len` bytes long and cannot overlap (the
        // destination is ours alone); afterwards every byte is initialised.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr.as_ptr(), len) };
        AlignedBuf { ptr, len }
    }

    /// Exactly `len` bytes read from `reader` into aligned memory, with no
    /// zeroing and no copy on the way. Fails with `UnexpectedEof` if the
    /// stream ends first.
    pub async fn read_from<R>(reader: &mut R, len: usize) -> std::io::Result<AlignedBuf>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        AlignedBuf::read_after(reader, 0, &[], len).await
    }

    /// `pad` zero bytes, then `prefix`, then the rest of `len` bytes read
    /// from `reader`: a block of data whose first `pad` bytes belong to
    /// something before it (a frame's fields), so that what follows them
    /// starts on an aligned address. `pad` is below [`IO_ALIGN`].
    pub async fn read_after<R>(
        reader: &mut R,
        pad: usize,
        prefix: &[u8],
        len: usize,
    ) -> std::io::Result<AlignedBuf>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt;
        assert!(pad < IO_ALIGN && prefix.len() <= len);
        let total = pad + len;
        if total == 0 {
            return Ok(AlignedBuf::empty());
        }
        let buf = AlignedBuf {
            ptr: AlignedBuf::allocate(total),
            len: total,
        };
        // SAFETY: `buf` owns `total` bytes at `ptr`. The pad and prefix are
        // written here; the rest only through `ReadBuf`, which tracks what
        // is initialised, and the buffer is returned only once all is.
        unsafe {
            std::ptr::write_bytes(buf.ptr.as_ptr(), 0, pad);
            std::ptr::copy_nonoverlapping(prefix.as_ptr(), buf.ptr.as_ptr().add(pad), prefix.len());
        }
        let start = pad + prefix.len();
        // SAFETY: as above; the slice is the not yet written tail.
        let spare = unsafe {
            std::slice::from_raw_parts_mut(
                buf.ptr
                    .as_ptr()
                    .add(start)
                    .cast::<std::mem::MaybeUninit<u8>>(),
                total - start,
            )
        };
        let mut read = tokio::io::ReadBuf::uninit(spare);
        while read.remaining() > 0 {
            if reader.read_buf(&mut read).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(buf)
    }

    fn empty() -> AlignedBuf {
        // A zero-length slice may start anywhere non-null; this one is even
        // aligned, so `is_aligned` holds for every `AlignedBuf`.
        let ptr = NonNull::new(IO_ALIGN as *mut u8).expect("non-null");
        AlignedBuf { ptr, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Turns the buffer into [`Bytes`] that own it: no copy.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

/// Whether `data` may be handed to an O_DIRECT write as it is.
pub fn is_aligned(data: &[u8]) -> bool {
    (data.as_ptr() as usize).is_multiple_of(IO_ALIGN) && data.len().is_multiple_of(IO_ALIGN)
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        pool().keep(AlignedBuf::capacity(self.len), self.ptr.as_ptr() as usize);
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by `self` (or none).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_from_fills_aligned_memory_from_a_trickling_stream() {
        let data: Vec<u8> = (0..3 * IO_ALIGN).map(|i| (i * 7 % 251) as u8).collect();
        let (mut tx, mut rx) = tokio::io::duplex(1000);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Odd-sized pieces, so the reader needs many reads.
            for piece in sent.chunks(333) {
                tx.write_all(piece).await.unwrap();
            }
            tx.write_all(b"next").await.unwrap();
        });
        let buf = AlignedBuf::read_from(&mut rx, data.len()).await.unwrap();
        assert!(is_aligned(&buf));
        assert_eq!(&buf[..], &data[..]);
        // Nothing past `len` was taken from the stream.
        let mut rest = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut rx, &mut rest)
            .await
            .unwrap();
        assert_eq!(&rest, b"next");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn read_from_a_stream_that_ends_early_is_an_error() {
        let short = vec![1u8; IO_ALIGN - 1];
        match AlignedBuf::read_from(&mut &short[..], IO_ALIGN).await {
            Ok(_) => panic!("a short stream filled a buffer"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        }
    }

    #[test]
    fn buffers_are_aligned_and_hold_their_bytes() {
        for len in [0, 1, 511, 4096, 3 * 4096 + 7, 1 << 20] {
            let z = AlignedBuf::zeroed(len);
            assert_eq!(z.len(), len);
            assert!((z.as_ptr() as usize).is_multiple_of(IO_ALIGN));
            assert!(z.iter().all(|&b| b == 0));
            let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut c = AlignedBuf::copy_from(&src);
            assert!((c.as_ptr() as usize).is_multiple_of(IO_ALIGN));
            assert_eq!(&c[..], &src[..]);
            if len > 0 {
                c[len - 1] = 0xFF;
                assert_eq!(c[len - 1], 0xFF);
            }
            let bytes = c.into_bytes();
            assert_eq!(bytes.len(), len);
            assert!((bytes.as_ptr() as usize).is_multiple_of(IO_ALIGN));
        }
    }

    #[test]
    fn pooled_buffers_come_back_clean() {
        // Dirty a few one-block buffers, free them into the pool, and take
        // them out again: zeroed means zeroed, copies are exact.
        let dirty: Vec<AlignedBuf> = (0..8)
            .map(|_| AlignedBuf::copy_from(&[0xAB; IO_ALIGN]))
            .collect();
        drop(dirty);
        for _ in 0..8 {
            let z = AlignedBuf::zeroed(IO_ALIGN);
            assert!((z.as_ptr() as usize).is_multiple_of(IO_ALIGN));
            assert!(z.iter().all(|&b| b == 0));
        }
        let src: Vec<u8> = (0..IO_ALIGN).map(|i| i as u8).collect();
        assert_eq!(&AlignedBuf::copy_from(&src)[..], &src[..]);
        // Many more than the pool keeps, freed at once: the rest go back to
        // the allocator.
        let many: Vec<AlignedBuf> = (0..2 * POOL_MAX)
            .map(|_| AlignedBuf::zeroed(IO_ALIGN))
            .collect();
        drop(many);
        assert!(pool().blocks.len() <= POOL_MAX);
    }

    #[test]
    fn larger_buffers_are_reused_oldest_first_within_the_budget() {
        // A pool of its own, so other tests' buffers cannot interfere.
        let mut pool = Pool {
            blocks: Vec::new(),
            large: VecDeque::new(),
            large_bytes: 0,
        };
        let new = |cap: usize| AlignedBuf::allocate(cap).as_ptr() as usize;
        let cap = AlignedBuf::capacity(128 * 1024 + 100);
        assert_eq!(cap, 33 * IO_ALIGN, "whole blocks");
        let a = new(cap);
        pool.keep(cap, a);
        assert_eq!(pool.take(2 * cap), None, "only the same size is handed out");
        assert_eq!(pool.take(cap), Some(a));
        assert_eq!(pool.take(cap), None);
        // Fill past the budget: the oldest are given back, the newest kept.
        let addrs: Vec<usize> = (0..LARGE_POOL_BYTES / cap + 5).map(|_| new(cap)).collect();
        for &addr in &addrs {
            pool.keep(cap, addr);
        }
        assert!(pool.large_bytes <= LARGE_POOL_BYTES);
        assert_eq!(pool.large_bytes, pool.large.len() * cap);
        assert!(pool.large.len() < addrs.len());
        assert_eq!(pool.large.back(), Some(&(cap, *addrs.last().unwrap())));
        assert!(!pool.large.iter().any(|&(_, x)| x == addrs[0]));
        // Many small ones: the count is bounded too.
        let two = 2 * IO_ALIGN;
        for _ in 0..LARGE_ENTRIES + 10 {
            pool.keep(two, new(two));
        }
        assert!(pool.large.len() <= LARGE_ENTRIES);
        assert_eq!(pool.large.back().map(|e| e.0), Some(two));
        // Too big to keep: straight back to the allocator.
        let before = pool.large_bytes;
        pool.keep(2 * LARGE_MAX, new(2 * LARGE_MAX));
        assert_eq!(pool.large_bytes, before);
        while let Some((c, addr)) = pool.large.pop_front() {
            release(c, addr);
        }
    }

    #[test]
    fn pooled_larger_buffers_come_back_clean() {
        let len = 37 * IO_ALIGN - 100;
        drop(AlignedBuf::copy_from(&vec![0xCD; len]));
        let z = AlignedBuf::zeroed(len);
        assert_eq!(z.len(), len);
        assert!(z.iter().all(|&b| b == 0));
        let src: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        drop(z);
        assert_eq!(&AlignedBuf::copy_from(&src)[..], &src[..]);
    }

    #[test]
    fn alignment_check() {
        let buf = AlignedBuf::zeroed(8192);
        assert!(is_aligned(&buf));
        assert!(is_aligned(&buf[4096..]));
        assert!(!is_aligned(&buf[..100]));
        assert!(!is_aligned(&buf[512..4608]));
        assert!(is_aligned(&buf[..0]));
    }
}
