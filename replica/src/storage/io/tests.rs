//! Tests of the engines themselves: buffered and O_DIRECT files, and the
//! uring engine's shutdown.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::*;

#[test]
fn choice_parses_and_prints() {
    for c in [
        IoEngineChoice::Auto,
        IoEngineChoice::Uring,
        IoEngineChoice::Sync,
    ] {
        assert_eq!(c.to_string().parse::<IoEngineChoice>(), Ok(c));
    }
    assert!("libaio".parse::<IoEngineChoice>().is_err());
}

fn open(path: &Path, direct: bool, len: u64) -> Arc<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(path).unwrap();
    file.set_len(len).unwrap();
    Arc::new(file)
}

fn block(fill: u8, len: usize) -> Bytes {
    let mut buf = AlignedBuf::zeroed(len);
    buf.fill(fill);
    buf.into_bytes()
}

/// A buffered file takes IO at any offset and length.
async fn engine_basics(io: Arc<dyn DiskIo>) {
    let dir = tempfile::tempdir().unwrap();
    let file = open(&dir.path().join("f"), false, 1 << 20);

    // Many writes in flight at once, then read them back.
    let writes = (0..100u64).map(|i| {
        io.write_at(
            file.clone(),
            i * 5000 + 3,
            Bytes::from(vec![(i % 251) as u8 + 1; 5000]),
        )
    });
    futures::future::try_join_all(writes).await.unwrap();
    io.sync_data(file.clone()).await.unwrap();
    for i in (0..100u64).step_by(7) {
        let got = io.read_at(file.clone(), i * 5000 + 3, 5000).await.unwrap();
        assert!(got.iter().all(|&b| b == (i % 251) as u8 + 1), "block {i}");
    }
    // Past the end of the file: zero-filled, full length.
    let tail = io.read_at(file.clone(), (1 << 20) - 10, 100).await.unwrap();
    assert_eq!(tail.len(), 100);
    assert!(tail[10..].iter().all(|&b| b == 0));
    // A punched hole reads zeros, and the size stays.
    io.punch_hole(file.clone(), 8192, 8192).await.unwrap();
    let hole = io.read_at(file.clone(), 8192, 8192).await.unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    assert_eq!(file.metadata().unwrap().len(), 1 << 20);
    let mut raw = [0u8; 1];
    file.read_at(&mut raw, 8191).unwrap();
    assert_eq!(raw[0], 2);
    // Zero-length operations are fine.
    assert!(io.read_at(file.clone(), 0, 0).await.unwrap().is_empty());
    io.write_at(file.clone(), 0, Bytes::new()).await.unwrap();
}

/// An O_DIRECT file takes aligned IO from aligned memory, including reads
/// past its end and into holes.
async fn engine_direct(io: Arc<dyn DiskIo>) {
    let dir = tempfile::tempdir().unwrap();
    let len = 1u64 << 20;
    let file = open(&dir.path().join("f"), true, len);
    let writes = (0..64u64).map(|i| io.write_at(file.clone(), i * 8192, block(i as u8 + 1, 4096)));
    futures::future::try_join_all(writes).await.unwrap();
    io.sync_data(file.clone()).await.unwrap();
    for i in 0..64u64 {
        let got = io.read_at(file.clone(), i * 8192, 8192).await.unwrap();
        assert!((got.as_ptr() as usize).is_multiple_of(IO_ALIGN));
        assert!(got[..4096].iter().all(|&b| b == i as u8 + 1), "block {i}");
        assert!(got[4096..].iter().all(|&b| b == 0), "hole after block {i}");
    }
    let tail = io
        .read_at(file.clone(), len - 4096, 3 * 4096)
        .await
        .unwrap();
    assert_eq!(tail.len(), 3 * 4096);
    assert!(tail.iter().all(|&b| b == 0));
    io.punch_hole(file.clone(), 0, 4096).await.unwrap();
    let hole = io.read_at(file.clone(), 0, 4096).await.unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    // A large write in one request.
    io.write_at(file.clone(), 4096, block(0xAA, 512 * 1024))
        .await
        .unwrap();
    let big = io.read_at(file.clone(), 4096, 512 * 1024).await.unwrap();
    assert!(big.iter().all(|&b| b == 0xAA));

    // Unaligned IO is the caller's bug: some filesystems answer EINVAL,
    // ext4 quietly falls back to the page cache. The data path's tests run
    // through `StrictAlignment` to catch it either way.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_engine_basics() {
    let io = open_io(IoEngineChoice::Sync).unwrap();
    assert_eq!(io.name(), "sync");
    engine_basics(io.clone()).await;
    engine_direct(io).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_engine_basics_multi_thread() {
    let io = open_io(IoEngineChoice::Uring).expect("io_uring must work on this machine");
    assert_eq!(io.name(), "uring");
    engine_basics(io.clone()).await;
    engine_direct(io).await;
}

#[tokio::test(flavor = "current_thread")]
async fn uring_engine_basics_current_thread() {
    let io = open_io(IoEngineChoice::Uring).expect("io_uring must work on this machine");
    engine_basics(io.clone()).await;
    engine_direct(io).await;
}

#[test]
fn auto_picks_uring_here() {
    assert_eq!(open_io(IoEngineChoice::Auto).unwrap().name(), "uring");
}

#[test]
fn uring_drop_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let file = open(&dir.path().join("f"), true, 600 * 4096);
    let io = UringIo::new().unwrap();
    // More than the ring holds, so some wait in the thread's backlog.
    let futs: Vec<_> = (0..600u64)
        .map(|i| io.write_at(file.clone(), i * 4096, block(1, 4096)))
        .collect();
    // Dropping the last handle joins the thread once all 600 are done.
    drop(io);
    futures::executor::block_on(futures::future::try_join_all(futs)).unwrap();
}
