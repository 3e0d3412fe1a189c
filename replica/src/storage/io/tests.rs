//! Tests of the engines themselves: buffered and O_DIRECT files, and the
//! uring engine's life inside the async runtime (bursts, backlog, dropped
//! futures, dropped handles, dropped runtimes, both runtime flavours).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::uring::MAX_IN_FLIGHT;
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

/// Thousands of requests from hundreds of tasks at once, far more than the
/// ring holds: every one completes with the right bytes, and the ring's
/// table is empty afterwards.
async fn uring_many_concurrent_ops() {
    let io = Arc::new(UringIo::new().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let blocks = 2048u64;
    let file = open(&dir.path().join("f"), true, blocks * 4096);
    let tasks: Vec<_> = (0..256u64)
        .map(|t| {
            let (io, file) = (io.clone(), file.clone());
            tokio::spawn(async move {
                for round in 0..8u64 {
                    let b = t * 8 + round;
                    let fill = (b % 250) as u8 + 1;
                    io.write_at(file.clone(), b * 4096, block(fill, 4096))
                        .await
                        .unwrap();
                    let got = io.read_at(file.clone(), b * 4096, 4096).await.unwrap();
                    assert!(got.iter().all(|&x| x == fill), "block {b}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // One burst far above the in-flight limit, joined in one task.
    let burst =
        (0..4 * MAX_IN_FLIGHT as u64).map(|i| io.read_at(file.clone(), (i % blocks) * 4096, 4096));
    let got = futures::future::try_join_all(burst).await.unwrap();
    for (i, buf) in got.iter().enumerate() {
        let b = i as u64 % blocks;
        assert!(buf.iter().all(|&x| x == (b % 250) as u8 + 1), "block {b}");
    }
    io.sync_data(file.clone()).await.unwrap();
    assert_eq!(io.ops_known(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn uring_many_concurrent_ops_current_thread() {
    uring_many_concurrent_ops().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uring_many_concurrent_ops_multi_thread() {
    uring_many_concurrent_ops().await;
}

/// Futures dropped with their IO in the kernel (and in the backlog) leave
/// nothing behind: the ring frees each op when the kernel is done with it,
/// and the engine keeps working.
#[tokio::test(flavor = "current_thread")]
async fn uring_dropped_futures_are_cleaned_up() {
    let io = UringIo::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = open(&dir.path().join("f"), true, 4096 * 1024);
    let mut futs: Vec<_> = (0..2 * MAX_IN_FLIGHT as u64)
        .map(|i| io.write_at(file.clone(), (i % 1024) * 4096, block(7, 4096)))
        .collect();
    // Poll each once, so all of them reach the ring, then drop them.
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    for f in &mut futs {
        assert!(f.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(io.ops_known(), 2 * MAX_IN_FLIGHT);
    drop(futs);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while io.ops_known() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "ops never freed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let got = io.read_at(file.clone(), 0, 4096).await.unwrap();
    assert!(got.iter().all(|&b| b == 7));
}

/// Dropping the engine with requests in flight (more than the kernel takes
/// at once) finishes every one of them; the driver then exits and the ring
/// is freed.
async fn uring_drop_finishes_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let file = open(&dir.path().join("f"), true, 600 * 4096);
    let io = UringIo::new().unwrap();
    let ring = io.liveness();
    // Poll each request once, so all of them reach the ring (a request
    // never polled before the engine is dropped is refused), then hand
    // them to tasks to finish.
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let tasks: Vec<_> = (0..600u64)
        .map(|i| {
            let mut write = io.write_at(file.clone(), i * 4096, block(1 + (i % 200) as u8, 4096));
            assert!(write.as_mut().poll(&mut cx).is_pending());
            tokio::spawn(write)
        })
        .collect();
    drop(io);
    for (i, t) in tasks.into_iter().enumerate() {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("write {i}: {e:?}"));
    }
    // Through the page cache: O_DIRECT would refuse a one-byte read.
    let written = std::fs::read(dir.path().join("f")).unwrap();
    for i in 0..600usize {
        assert_eq!(written[i * 4096 + 4095], 1 + (i % 200) as u8);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ring.is_alive() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ring was never freed"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn uring_drop_finishes_requests_in_flight_current_thread() {
    uring_drop_finishes_requests_in_flight().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_drop_finishes_requests_in_flight_multi_thread() {
    uring_drop_finishes_requests_in_flight().await;
}

/// A runtime that goes away with IO in the kernel takes the driver with it;
/// the engine outlives it and goes on in the next runtime, and dropping it
/// afterwards waits for nothing it should not.
#[test]
fn uring_outlives_a_runtime_with_io_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let file = open(&dir.path().join("f"), true, 1024 * 4096);
    let io = Arc::new(UringIo::new().unwrap());
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    first.block_on(async {
        for i in 0..512u64 {
            let io = io.clone();
            let file = file.clone();
            tokio::spawn(async move { io.write_at(file, i * 4096, block(3, 4096)).await });
        }
        // Let the tasks push and the driver submit, but not finish.
        tokio::task::yield_now().await;
    });
    drop(first);
    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        // A block the first runtime's writes (still going on) do not touch.
        io.write_at(file.clone(), 700 * 4096, block(9, 4096))
            .await
            .unwrap();
        let got = io.read_at(file.clone(), 700 * 4096, 4096).await.unwrap();
        assert!(got.iter().all(|&b| b == 9));
        io.sync_data(file.clone()).await.unwrap();
    });
    drop(second);
    // Some requests of the first runtime may never have been submitted;
    // whatever reached the kernel is waited for here.
    drop(io);
}

/// A request first polled outside any tokio runtime fails cleanly.
#[test]
fn uring_outside_a_runtime_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = open(&dir.path().join("f"), false, 4096);
    let io = UringIo::new().unwrap();
    let r = futures::executor::block_on(io.read_at(file, 0, 4096));
    assert!(r.is_err());
}
