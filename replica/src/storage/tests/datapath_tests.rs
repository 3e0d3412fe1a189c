//! Reads, writes and zeroing, on a single layer and over snapshot chains.

use bytes::Bytes;
use rand::{Rng, SeedableRng};

use std::time::Duration;

use super::{
    assert_matches, file_id, fresh_volume, pattern, Disk, HeldWrites, Model, SyncLog, MIB,
};
use crate::storage::units::BlockRange;
use crate::storage::{StorageError, BLOCK_SIZE};

for_each_engine!(
    round_trips_at_odd_offsets,
    concurrent_non_overlapping_writes,
    out_of_range_is_refused_whole,
    trim_and_write_zeroes_on_one_layer,
    reads_across_a_snapshot_chain,
    partial_writes_over_a_snapshot_keep_the_rest_of_the_block,
    concurrent_partial_writes_into_one_snapshot_block,
    zeroing_over_snapshots_hides_old_data,
    writes_racing_a_snapshot_are_never_lost,
    snapshot_waits_for_writes_in_flight,
    flush_and_fua_reach_fdatasync_on_the_head,
);

async fn round_trips_at_odd_offsets(disk: Disk) {
    let size = 4 * MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for i in 0..60u64 {
        let len = rng.gen_range(1..3 * BLOCK_SIZE as usize + 17);
        let off = rng.gen_range(0..size - len as u64);
        let data = pattern(i, len);
        r.write(off, data.clone(), false).await.unwrap();
        model.write(off, &data);
        // Read back exactly what was written, and a little around it.
        let got = r.read(off, len as u32).await.unwrap();
        assert_eq!(got, data, "write {i} at {off} len {len}");
    }
    // The last byte and the first byte of the volume.
    r.write(size - 1, Bytes::from_static(&[0xEE]), false)
        .await
        .unwrap();
    model.write(size - 1, &[0xEE]);
    r.write(0, Bytes::from_static(&[0xAB]), false)
        .await
        .unwrap();
    model.write(0, &[0xAB]);
    assert_matches(&r, &model).await;
}

async fn concurrent_non_overlapping_writes(disk: Disk) {
    let size = 8 * MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    // 64 writers, each owning a 128 KiB stretch, writing it in odd pieces.
    let stretch = 128 * 1024u64;
    let mut tasks = Vec::new();
    for w in 0..64u64 {
        let r = r.clone();
        let base = w * stretch;
        let data = pattern(1000 + w, stretch as usize);
        model.write(base, &data);
        tasks.push(tokio::spawn(async move {
            let mut off = 0u64;
            let mut piece = 1 + w * 37 % 9000;
            while off < stretch {
                let len = piece.min(stretch - off);
                let bytes = data.slice(off as usize..(off + len) as usize);
                r.write(base + off, bytes, false).await.unwrap();
                off += len;
                piece = piece * 3 % 20_000 + 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Read back concurrently too.
    let reads = (0..64u64).map(|w| {
        let r = r.clone();
        async move { (w, r.read(w * stretch, stretch as u32).await.unwrap()) }
    });
    for (w, got) in futures::future::join_all(reads).await {
        let want = &model.0[(w * stretch) as usize..((w + 1) * stretch) as usize];
        assert!(got.as_ref() == want, "writer {w}'s stretch");
    }
    assert_matches(&r, &model).await;
}

async fn out_of_range_is_refused_whole(disk: Disk) {
    let size = MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let tail = pattern(5, 100);
    r.write(size - 100, tail.clone(), false).await.unwrap();

    let refused = |res: Result<(), StorageError>| {
        assert!(
            matches!(res, Err(StorageError::OutOfRange { .. })),
            "{res:?}"
        )
    };
    refused(r.write(size - 100, pattern(6, 200), false).await);
    refused(r.write(size, pattern(6, 1), true).await);
    refused(r.write(u64::MAX - 10, pattern(6, 100), false).await);
    refused(r.trim(size - 50, 100).await);
    refused(r.write_zeroes(size - 50, 100, false).await);
    refused(r.trim(u64::MAX, u64::MAX).await);
    refused(r.write(size + 1, Bytes::new(), false).await);
    assert!(matches!(
        r.read(size - 100, 101).await,
        Err(StorageError::OutOfRange { offset, len: 101, size: s }) if offset == size - 100 && s == size
    ));
    assert!(matches!(
        r.read(u64::MAX, 1).await,
        Err(StorageError::OutOfRange { .. })
    ));
    // Nothing was partly done.
    assert_eq!(r.read(size - 100, 100).await.unwrap(), tail);
    // Zero-length operations inside the volume are no-ops.
    assert!(r.read(size, 0).await.unwrap().is_empty());
    r.write(size, Bytes::new(), true).await.unwrap();
    r.trim(0, 0).await.unwrap();
    r.write_zeroes(size, 0, true).await.unwrap();
    assert_eq!(r.read(size - 100, 100).await.unwrap(), tail);
}

async fn trim_and_write_zeroes_on_one_layer(disk: Disk) {
    let size = 4 * MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let data = pattern(7, 2 * MIB as usize);
    r.write(0, data.clone(), false).await.unwrap();
    model.write(0, &data);
    r.flush().await.unwrap();
    let head = r.chain.load().head().file.clone();
    let allocated_before = std::os::unix::fs::MetadataExt::blocks(&head.metadata().unwrap());

    // Unaligned at both ends, spanning many blocks: whole blocks punched.
    r.trim(1000, MIB + 5000).await.unwrap();
    model.zero(1000, MIB + 5000);
    // Inside a single block.
    r.write_zeroes(3 * MIB / 2 + 10, 100, true).await.unwrap();
    model.zero(3 * MIB / 2 + 10, 100);
    // Exactly one aligned block.
    r.write_zeroes(BLOCK_SIZE * 400, BLOCK_SIZE, false)
        .await
        .unwrap();
    model.zero(BLOCK_SIZE * 400, BLOCK_SIZE);
    assert_matches(&r, &model).await;

    let allocated_after = std::os::unix::fs::MetadataExt::blocks(&head.metadata().unwrap());
    assert!(
        allocated_after + 2000 < allocated_before,
        "trim deallocates: {allocated_before} -> {allocated_after} sectors"
    );
    // Trimming never-written space is fine too.
    r.trim(3 * MIB, MIB).await.unwrap();
    assert_matches(&r, &model).await;
}

async fn reads_across_a_snapshot_chain(disk: Disk) {
    let size = 4 * MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let mut write = |off: u64, len: usize, seed: u64| {
        let data = pattern(seed, len);
        model.write(off, &data);
        (off, data)
    };
    // Layer 1: a wide stretch.
    let (o, d) = write(0, 2 * MIB as usize, 10);
    r.write(o, d, false).await.unwrap();
    let snap1 = r.snapshot().await.unwrap();
    // Layer 2: a block-aligned patch in the middle and a fresh area.
    let (o, d) = write(64 * BLOCK_SIZE, 16 * BLOCK_SIZE as usize, 11);
    r.write(o, d, false).await.unwrap();
    let (o, d) = write(3 * MIB, 10 * BLOCK_SIZE as usize, 12);
    r.write(o, d, false).await.unwrap();
    let snap2 = r.snapshot().await.unwrap();
    // Layer 3 (head): overlapping both, unaligned.
    let (o, d) = write(70 * BLOCK_SIZE + 123, 20 * BLOCK_SIZE as usize, 13);
    r.write(o, d, false).await.unwrap();
    assert!(snap1 < snap2);
    assert_eq!(r.layer_ids().len(), 3);
    assert_eq!(r.layer_ids()[..2], [snap1, snap2]);
    // One read that crosses layer 1, layer 2, layer 3 and never-written
    // space, plus every other range of the volume.
    let got = r
        .read(60 * BLOCK_SIZE + 7, (40 * BLOCK_SIZE) as u32)
        .await
        .unwrap();
    let want = &model.0[(60 * BLOCK_SIZE + 7) as usize..(100 * BLOCK_SIZE + 7) as usize];
    assert!(got.as_ref() == want);
    assert_matches(&r, &model).await;
}

async fn partial_writes_over_a_snapshot_keep_the_rest_of_the_block(disk: Disk) {
    let size = MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let base = pattern(20, 64 * BLOCK_SIZE as usize);
    r.write(0, base.clone(), false).await.unwrap();
    model.write(0, &base);
    r.snapshot().await.unwrap();
    // Small writes inside one block, across a block boundary, and one that
    // covers whole blocks with partial edges.
    for (i, (off, len)) in [
        (5 * BLOCK_SIZE + 100, 10usize),
        (8 * BLOCK_SIZE - 3, 6),
        (20 * BLOCK_SIZE + 1, 3 * BLOCK_SIZE as usize),
        (63 * BLOCK_SIZE + 4000, 96),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(30 + i as u64, len);
        r.write(off, data.clone(), i % 2 == 0).await.unwrap();
        model.write(off, &data);
    }
    // A second small write into an already copied-up block.
    r.write(5 * BLOCK_SIZE + 2000, pattern(40, 8), false)
        .await
        .unwrap();
    model.write(5 * BLOCK_SIZE + 2000, &pattern(40, 8));
    // Partial write into a block no layer holds: the rest stays zero.
    r.write(100 * BLOCK_SIZE + 50, pattern(41, 10), false)
        .await
        .unwrap();
    model.write(100 * BLOCK_SIZE + 50, &pattern(41, 10));
    assert_matches(&r, &model).await;
}

async fn concurrent_partial_writes_into_one_snapshot_block(disk: Disk) {
    let size = MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let base = pattern(50, 4 * BLOCK_SIZE as usize);
    r.write(0, base.clone(), false).await.unwrap();
    model.write(0, &base);
    r.snapshot().await.unwrap();
    // Eight 512-byte sectors of block 1, each written by its own task at
    // once: every copy-up must keep the others' sectors.
    let mut tasks = Vec::new();
    for s in 0..8u64 {
        if s == 3 {
            continue; // one sector keeps its snapshot bytes
        }
        let off = BLOCK_SIZE + s * 512;
        let data = pattern(60 + s, 512);
        model.write(off, &data);
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            r.write(off, data, false).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_matches(&r, &model).await;
}

async fn zeroing_over_snapshots_hides_old_data(disk: Disk) {
    let size = 4 * MIB;
    let (dir, store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let data = pattern(70, 2 * MIB as usize);
    r.write(0, data.clone(), false).await.unwrap();
    model.write(0, &data);
    r.snapshot().await.unwrap();
    // Trim across the snapshot's data and beyond it into never-written
    // space; unaligned at both ends.
    r.trim(MIB + 999, MIB + 70_000).await.unwrap();
    model.zero(MIB + 999, MIB + 70_000);
    // Data written in the head then zeroed, over snapshot data.
    let patch = pattern(71, 3 * BLOCK_SIZE as usize);
    r.write(100 * BLOCK_SIZE, patch.clone(), false)
        .await
        .unwrap();
    r.write_zeroes(100 * BLOCK_SIZE + 10, 2 * BLOCK_SIZE, true)
        .await
        .unwrap();
    model.write(100 * BLOCK_SIZE, &patch);
    model.zero(100 * BLOCK_SIZE + 10, 2 * BLOCK_SIZE);
    r.snapshot().await.unwrap();
    // Zeroing on top of two snapshots, one sub-block range.
    r.write_zeroes(10, 20, false).await.unwrap();
    model.zero(10, 20);
    assert_matches(&r, &model).await;

    // The zeros are real data in the upper layers: they survive a reopen.
    drop((r, store));
    let store = super::open_store(dir.path(), &disk);
    let r = store.get(&super::name("vol")).unwrap();
    assert_matches(&r, &model).await;
}

async fn writes_racing_a_snapshot_are_never_lost(disk: Disk) {
    let size = 4 * MIB;
    let (_dir, _store, r) = fresh_volume(&disk, size).await;
    // Writers keep writing distinct blocks (some partial, over data the
    // first snapshot freezes) while snapshots are taken.
    let base = pattern(80, size as usize);
    r.write(0, base.clone(), false).await.unwrap();
    let mut model = Model::new(size);
    model.write(0, &base);
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let r = r.clone();
        writers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            for i in 0..100u64 {
                let block = w * 200 + i;
                let off = block * BLOCK_SIZE + (i % 3) * 1000;
                let data = pattern(block, 1500 + (i as usize % 2) * 4000);
                r.write(off, data.clone(), false).await.unwrap();
                done.push((off, data));
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            done
        }));
    }
    for _ in 0..3 {
        r.snapshot().await.unwrap();
        tokio::task::yield_now().await;
    }
    for w in writers {
        for (off, data) in w.await.unwrap() {
            model.write(off, &data);
        }
    }
    assert_eq!(r.layer_ids().len(), 4);
    assert_matches(&r, &model).await;
}

async fn snapshot_waits_for_writes_in_flight(disk: Disk) {
    let held = HeldWrites::new(disk.io.clone());
    let (dir, store, r) = fresh_volume(&disk.with_io(held.clone()), MIB).await;
    held.arm();
    let early = pattern(100, 6000);
    let write = tokio::spawn({
        let (r, early) = (r.clone(), early.clone());
        async move { r.write(2 * BLOCK_SIZE + 5, early, false).await }
    });
    held.entered.notified().await;
    // The write is in flight in the head; the snapshot must wait for it.
    let snapshot = tokio::spawn({
        let r = r.clone();
        async move { r.snapshot().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !snapshot.is_finished(),
        "snapshot froze a head with a write in flight"
    );
    // A write arriving now waits for the snapshot and lands in the new head.
    let late = tokio::spawn({
        let r = r.clone();
        async move { r.write(10 * BLOCK_SIZE, pattern(101, 100), false).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!late.is_finished());
    held.release();
    write.await.unwrap().unwrap();
    let snap = snapshot.await.unwrap().unwrap();
    late.await.unwrap().unwrap();

    let maps = r.layer_maps();
    assert_eq!(maps[0].0, snap);
    let frozen = maps[0].1.as_ref().unwrap();
    let head = maps[1].1.as_ref().unwrap();
    let blocks = |runs: &Vec<BlockRange>| -> Vec<u64> {
        runs.iter().flat_map(|r| r.iter()).map(|b| b.0).collect()
    };
    assert_eq!(blocks(frozen), [2, 3]);
    assert_eq!(blocks(head), [10]);
    assert_eq!(r.read(2 * BLOCK_SIZE + 5, 6000).await.unwrap(), early);
    drop((r, store));
    let store = super::open_store(dir.path(), &disk);
    let r = store.get(&super::name("vol")).unwrap();
    assert_eq!(r.read(2 * BLOCK_SIZE + 5, 6000).await.unwrap(), early);
    assert_eq!(
        r.read(10 * BLOCK_SIZE, 100).await.unwrap(),
        pattern(101, 100)
    );
}

async fn flush_and_fua_reach_fdatasync_on_the_head(disk: Disk) {
    let log = SyncLog::new(disk.io.clone());
    let (_dir, _store, r) = fresh_volume(&disk.with_io(log.clone()), MIB).await;
    let head = || file_id(&r.chain.load().head().file);
    // Each step must end with a sync of the file the data is in.
    let synced_head_since = |before: usize| {
        let synced = log.synced();
        synced.len() > before && synced[before..].contains(&head())
    };

    let n = log.synced().len();
    r.write(4096, pattern(89, 8192), false).await.unwrap();
    assert_eq!(log.synced().len(), n, "a plain write waits for FLUSH");
    r.flush().await.unwrap();
    assert!(synced_head_since(n), "FLUSH syncs the head");

    let n = log.synced().len();
    r.write(4096, pattern(90, 8192), true).await.unwrap();
    assert!(synced_head_since(n), "a FUA write syncs the head");

    // After a snapshot the head is a new file: that is the one synced.
    r.snapshot().await.unwrap();
    let n = log.synced().len();
    r.write(0, pattern(91, 100), true).await.unwrap();
    assert!(synced_head_since(n), "FUA into a new head syncs it");
    let n = log.synced().len();
    r.flush().await.unwrap();
    assert!(
        synced_head_since(n),
        "FLUSH after a snapshot syncs the new head"
    );
    let n = log.synced().len();
    r.write_zeroes(0, 4096, true).await.unwrap();
    assert!(synced_head_since(n), "WRITE_ZEROES with FUA syncs the head");
    assert_eq!(r.read(4096, 8192).await.unwrap(), pattern(90, 8192));
}
