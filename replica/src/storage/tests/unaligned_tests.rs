//! Writes that do not line up with 4 KiB blocks. Under O_DIRECT each one is
//! a read-modify-write of the blocks it covers in part; writes that share a
//! block without overlapping must never lose each other's bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{assert_matches, fresh_volume, open_store, pattern, Disk, Model, MIB};
use crate::storage::{open_io, FileMode, IoEngineChoice, Replica, Store, BLOCK_SIZE};

for_each_engine!(
    concurrent_sector_writes_into_one_block,
    concurrent_byte_writes_sharing_blocks,
    spanning_writes_sharing_edge_blocks_across_stripes,
    unaligned_writes_over_snapshots_and_holes,
);

/// Runs every `(offset, data)` write at once, each in its own task, and
/// records them in `model`. Fails if they do not all finish promptly (a
/// lock-order deadlock would hang here).
async fn write_all_at_once(r: &Arc<Replica>, model: &mut Model, writes: Vec<(u64, Bytes)>) {
    let tasks: Vec<_> = writes
        .into_iter()
        .map(|(off, data)| {
            model.write(off, &data);
            let r = r.clone();
            tokio::spawn(async move { r.write(off, data, false).await })
        })
        .collect();
    let all = futures::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("concurrent writes finish");
    for r in results {
        r.unwrap().unwrap();
    }
}

/// Eight 512-byte sectors of one block written at once by eight tasks, many
/// times over, on never-written blocks and on blocks holding data.
async fn concurrent_sector_writes_into_one_block(disk: Disk) {
    let size = MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let base = pattern(1, 16 * BLOCK_SIZE as usize);
    r.write(8 * BLOCK_SIZE, base.clone(), false).await.unwrap();
    model.write(8 * BLOCK_SIZE, &base);
    for round in 0..20u64 {
        let block = round % 16 + (round % 2) * 8; // holes and data alike
        let writes = (0..8u64)
            .map(|s| {
                let off = block * BLOCK_SIZE + s * 512;
                (off, pattern(100 + round * 8 + s, 512))
            })
            .collect();
        write_all_at_once(&r, &mut model, writes).await;
    }
    assert_matches(&r, &model).await;
}

/// Byte-granular, odd-sized, disjoint writes packed edge to edge across a
/// few blocks, all at once: every block is shared by several writers.
async fn concurrent_byte_writes_sharing_blocks(disk: Disk) {
    let size = MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    for round in 0..4u64 {
        let mut writes = Vec::new();
        let mut off = 3 * BLOCK_SIZE + round * 777;
        for i in 0..120u64 {
            let len = 1 + (i * 37 + round * 11) % 300;
            writes.push((off, pattern(1000 + round * 1000 + i, len as usize)));
            off += len;
        }
        write_all_at_once(&r, &mut model, writes).await;
    }
    assert_matches(&r, &model).await;
}

/// Writes of a few blocks with partial edges at both ends, where each edge
/// block is shared with a neighbour, and whose two edge blocks fall in
/// stripes of the partial-block lock in every order (blocks 63|64 wrap
/// round the 64 stripes).
async fn spanning_writes_sharing_edge_blocks_across_stripes(disk: Disk) {
    let size = 4 * MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    for round in 0..3u64 {
        let stride = 2 * BLOCK_SIZE + 1000 + round * 512;
        let start = 60 * BLOCK_SIZE + 100 + round;
        let writes = (0..48u64)
            .map(|i| {
                (
                    start + i * stride,
                    pattern(5000 + round * 100 + i, stride as usize),
                )
            })
            .collect();
        write_all_at_once(&r, &mut model, writes).await;
    }
    assert_matches(&r, &model).await;
}

/// Unaligned writes into blocks held by a snapshot, by the head, or by
/// nobody, in one chain; then read back across all of them after a reopen.
async fn unaligned_writes_over_snapshots_and_holes(disk: Disk) {
    let size = MIB;
    let (dir, store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let base = pattern(7, 32 * BLOCK_SIZE as usize);
    r.write(0, base.clone(), false).await.unwrap();
    model.write(0, &base);
    r.snapshot().await.unwrap();
    let head_data = pattern(8, 8 * BLOCK_SIZE as usize);
    r.write(16 * BLOCK_SIZE, head_data.clone(), false)
        .await
        .unwrap();
    model.write(16 * BLOCK_SIZE, &head_data);
    let mut writes = Vec::new();
    for (i, block) in [2u64, 17, 40, 31, 32].into_iter().enumerate() {
        // Three pieces per block, none aligned, plus one crossing into the
        // next block (short of the pieces there: none overlap).
        for k in 0..3u64 {
            let off = block * BLOCK_SIZE + 10 + k * 1300;
            writes.push((off, pattern(300 + i as u64 * 10 + k, 1000)));
        }
        let off = block * BLOCK_SIZE + BLOCK_SIZE - 50;
        writes.push((off, pattern(400 + i as u64, 55)));
    }
    write_all_at_once(&r, &mut model, writes).await;
    assert_matches(&r, &model).await;
    drop((r, store));
    let store = open_store(dir.path(), &disk);
    let r = store.get(&super::name("vol")).unwrap();
    assert_matches(&r, &model).await;
}

/// A store opened buffered on purpose works, and a volume written through
/// O_DIRECT files reads the same through buffered ones and back (a data
/// directory moved between filesystems, or a mode changed across restarts).
#[tokio::test(flavor = "current_thread")]
async fn file_modes_read_each_others_volumes() {
    let io = open_io(IoEngineChoice::Uring).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let size = MIB;
    let vol = super::name("vol");
    let mut model = Model::new(size);
    let open = |mode| Store::open_with(dir.path(), io.clone(), mode).unwrap();
    open(FileMode::Direct)
        .create_volume(&vol, size)
        .await
        .unwrap();
    let modes = [
        FileMode::Direct,
        FileMode::Buffered,
        FileMode::Direct,
        FileMode::Buffered,
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        let store = open(mode);
        assert_eq!(store.direct_io(), mode == FileMode::Direct);
        let r = store.get(&vol).unwrap();
        assert_matches(&r, &model).await;
        let off = i as u64 * 10_000 + 123;
        let data = pattern(i as u64, 9000);
        r.write(off, data.clone(), i == 1).await.unwrap();
        model.write(off, &data);
        if i % 2 == 1 {
            r.snapshot().await.unwrap();
        }
        r.flush().await.unwrap();
        assert_matches(&r, &model).await;
    }
}
