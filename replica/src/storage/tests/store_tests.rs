//! The data directory: create, delete, list, reopen, generations, metadata.

use std::fs;
use std::sync::Arc;

use shorthorn_proto::{ErrorCode, Generation, VolumeName};

use super::{assert_matches, fresh_volume, name, open_store, pattern, Disk, Model, MIB};
use crate::storage::meta::{Meta, META_FILE, META_TMP_FILE};
use crate::storage::{open_io, IoEngineChoice, StorageError, Store, BLOCK_SIZE};

for_each_engine!(
    reopen_recovers_data_generation_chain_and_maps,
    generation_is_persisted_and_never_goes_back,
    create_is_idempotent_and_refuses_conflicts,
    bad_sizes_and_names_create_nothing,
    delete_removes_the_volume_and_stops_its_handles,
    metadata_is_replaced_atomically,
    leftovers_of_crashes_are_swept_at_open,
    a_broken_volume_does_not_stop_the_others,
);

async fn reopen_recovers_data_generation_chain_and_maps(disk: Disk) {
    let size = 4 * MIB;
    let (dir, store, r) = fresh_volume(&disk, size).await;
    let mut model = Model::new(size);
    let writes: [(u64, usize); 5] = [
        (0, 3 * BLOCK_SIZE as usize),
        (10 * BLOCK_SIZE + 5, 100),
        (MIB, 64 * 1024),
        (2 * MIB + 4000, 10_000),
        (size - 1, 1),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64, len);
        r.write(off, data.clone(), false).await.unwrap();
        model.write(off, &data);
        if i == 1 || i == 3 {
            r.snapshot().await.unwrap();
        }
    }
    r.set_generation(Generation(42), "engine-a").await.unwrap();
    let chain = r.layer_ids();
    let maps = r.layer_maps();
    assert_eq!(chain.len(), 3);
    assert!(maps.iter().all(|(_, m)| m.is_some()));
    drop((r, store));

    let store = open_store(dir.path(), &disk);
    let r = store.get(&name("vol")).unwrap();
    assert_eq!(r.size(), size);
    assert_eq!(r.generation(), Generation(42));
    assert_eq!(r.layer_ids(), chain);
    // Maps rebuilt from SEEK_DATA equal the ones kept while writing.
    assert_eq!(r.layer_maps(), maps);
    assert_matches(&r, &model).await;

    // And the reopened replica keeps working over its chain.
    let data = pattern(99, 5000);
    r.write(10 * BLOCK_SIZE + 1, data.clone(), false)
        .await
        .unwrap();
    model.write(10 * BLOCK_SIZE + 1, &data);
    assert_matches(&r, &model).await;
}

async fn generation_is_persisted_and_never_goes_back(disk: Disk) {
    let (dir, store, r) = fresh_volume(&disk, MIB).await;
    assert_eq!(r.generation(), Generation(0));
    r.set_generation(Generation(5), "engine-a").await.unwrap();
    r.set_generation(Generation(5), "engine-a").await.unwrap();
    let err = r
        .set_generation(Generation(3), "engine-a")
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StorageError::StaleGeneration {
            current: Generation(5),
            requested: Generation(3)
        }
    ));
    assert_eq!(err.code(), ErrorCode::StaleGeneration);
    assert_eq!(r.generation(), Generation(5));
    // On disk before set_generation returned.
    let meta = Meta::load(&dir.path().join("volumes/vol"), "vol").unwrap();
    assert_eq!(meta.generation, 5);
    drop((r, store));
    let store = open_store(dir.path(), &disk);
    let r = store.get(&name("vol")).unwrap();
    assert_eq!(r.generation(), Generation(5));
    assert!(r.set_generation(Generation(4), "engine-a").await.is_err());
    r.set_generation(Generation(6), "engine-a").await.unwrap();
}

async fn create_is_idempotent_and_refuses_conflicts(disk: Disk) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &disk);
    let (a, created) = store.create_volume(&name("b-vol"), MIB).await.unwrap();
    assert!(created);
    a.write(0, pattern(1, 100), false).await.unwrap();
    let (again, created) = store.create_volume(&name("b-vol"), MIB).await.unwrap();
    assert!(!created);
    assert!(Arc::ptr_eq(&a, &again));
    assert_eq!(again.read(0, 100).await.unwrap(), pattern(1, 100));
    let err = store
        .create_volume(&name("b-vol"), 2 * MIB)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::AlreadyExists { name, size, requested }
            if name == "b-vol" && *size == MIB && *requested == 2 * MIB),
        "{err:?}"
    );
    assert_eq!(err.code(), ErrorCode::AlreadyExists);
    store.create_volume(&name("a-vol"), MIB).await.unwrap();
    store.create_volume(&name("c.vol"), 2 * MIB).await.unwrap();
    let names: Vec<String> = store.list().iter().map(|r| r.name().to_string()).collect();
    assert_eq!(names, ["a-vol", "b-vol", "c.vol"]);
    let err = store.get(&name("nope")).unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)));
    assert_eq!(err.code(), ErrorCode::NotFound);
    // Concurrent creates of one name: exactly one creates it.
    let race = name("race");
    let (x, y) = tokio::join!(
        store.create_volume(&race, MIB),
        store.create_volume(&race, MIB)
    );
    assert!(x.unwrap().1 ^ y.unwrap().1);
}

async fn bad_sizes_and_names_create_nothing(disk: Disk) {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    let store = open_store(&data, &disk);
    for size in [0, 1000, BLOCK_SIZE + 1, u64::MAX - 4095] {
        let err = store.create_volume(&name("v"), size).await.unwrap_err();
        assert!(matches!(err, StorageError::Invalid(_)), "{size}: {err:?}");
        assert_eq!(err.code(), ErrorCode::Invalid);
    }
    // Names that would leave the directory cannot even be made.
    for bad in ["..", "../escape", "/etc", "a/b", ".tmp-x", ""] {
        assert!(VolumeName::new(bad).is_err(), "{bad:?}");
    }
    // A legal name full of dots stays a plain child of volumes/.
    store.create_volume(&name("x..y"), MIB).await.unwrap();
    let mut outside: Vec<_> = fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    outside.sort();
    assert_eq!(outside, ["data"]);
    let mut inside: Vec<_> = fs::read_dir(data.join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    inside.sort();
    assert_eq!(inside, ["x..y"]);
}

async fn delete_removes_the_volume_and_stops_its_handles(disk: Disk) {
    let (dir, store, r) = fresh_volume(&disk, MIB).await;
    r.write(0, pattern(3, 4096), false).await.unwrap();
    store.delete_volume(&name("vol")).await.unwrap();
    assert!(matches!(
        store.get(&name("vol")),
        Err(StorageError::NotFound(_))
    ));
    assert!(store.list().is_empty());
    assert!(fs::read_dir(dir.path().join("volumes"))
        .unwrap()
        .next()
        .is_none());
    let err = r.read(0, 10).await.unwrap_err();
    assert!(matches!(err, StorageError::Deleted(_)));
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert!(r.write(0, pattern(3, 10), false).await.is_err());
    assert!(matches!(
        store.delete_volume(&name("vol")).await,
        Err(StorageError::NotFound(_))
    ));
    // The name can be used again, for a fresh, zeroed volume.
    let (fresh, created) = store.create_volume(&name("vol"), MIB).await.unwrap();
    assert!(created);
    assert!(fresh.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
}

async fn metadata_is_replaced_atomically(disk: Disk) {
    let (dir, _store, r) = fresh_volume(&disk, MIB).await;
    let vdir = dir.path().join("volumes/vol");
    let check = |generation: u64, layers: Vec<u64>| {
        assert!(!vdir.join(META_TMP_FILE).exists());
        let text = fs::read_to_string(vdir.join(META_FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["format"], 1);
        assert_eq!(v["name"], "vol");
        assert_eq!(v["size"], MIB);
        assert_eq!(v["generation"], generation);
        assert_eq!(v["state"], "healthy");
        assert_eq!(v["head"], *layers.last().unwrap());
        assert_eq!(v["layers"], serde_json::json!(layers));
        for id in layers {
            let f = vdir.join(format!("layer-{id}.img"));
            assert_eq!(fs::metadata(f).unwrap().len(), MIB);
        }
    };
    check(0, vec![1]);
    r.set_generation(Generation(3), "engine-a").await.unwrap();
    check(3, vec![1]);
    let snap = r.snapshot().await.unwrap();
    assert_eq!(snap.0, 1);
    check(3, vec![1, 2]);
    r.snapshot().await.unwrap();
    check(3, vec![1, 2, 3]);
    let mut files: Vec<_> = fs::read_dir(&vdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["layer-1.img", "layer-2.img", "layer-3.img", "meta.json"]
    );
}

async fn leftovers_of_crashes_are_swept_at_open(disk: Disk) {
    let (dir, store, r) = fresh_volume(&disk, MIB).await;
    r.write(0, pattern(4, 100), false).await.unwrap();
    drop((r, store));
    let volumes = dir.path().join("volumes");
    // An interrupted create, an interrupted delete, a snapshot whose layer
    // file was made but never named in meta.json, and a torn meta temp file.
    fs::create_dir_all(volumes.join(".tmp-half")).unwrap();
    fs::write(volumes.join(".tmp-half/layer-1.img"), b"x").unwrap();
    fs::create_dir_all(volumes.join(".del-gone")).unwrap();
    fs::write(volumes.join("vol/layer-2.img"), b"").unwrap();
    fs::write(volumes.join("vol").join(META_TMP_FILE), b"{").unwrap();
    let store = open_store(dir.path(), &disk);
    assert!(!volumes.join(".tmp-half").exists());
    assert!(!volumes.join(".del-gone").exists());
    assert!(!volumes.join("vol/layer-2.img").exists());
    assert!(!volumes.join("vol").join(META_TMP_FILE).exists());
    let r = store.get(&name("vol")).unwrap();
    assert_eq!(r.read(0, 100).await.unwrap(), pattern(4, 100));
    // A snapshot after that reuses id 2 cleanly.
    assert_eq!(r.snapshot().await.unwrap().0, 1);
    assert_eq!(r.layer_ids().last().unwrap().0, 2);
}

async fn a_broken_volume_does_not_stop_the_others(disk: Disk) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &disk);
    store.create_volume(&name("good"), MIB).await.unwrap();
    store.create_volume(&name("bad"), MIB).await.unwrap();
    drop(store);
    let volumes = dir.path().join("volumes");
    fs::write(volumes.join("bad").join(META_FILE), b"garbage").unwrap();
    fs::write(volumes.join("stray-file"), b"").unwrap();
    let store = open_store(dir.path(), &disk);
    let names: Vec<String> = store.list().iter().map(|r| r.name().to_string()).collect();
    assert_eq!(names, ["good"]);
    // The broken one is neither served nor silently replaced.
    let err = store.create_volume(&name("bad"), MIB).await.unwrap_err();
    assert!(matches!(err, StorageError::Corrupt(_)), "{err:?}");
}

/// The daemon shares stores and replicas across tasks and spawns their
/// futures: all of it must be `Send` (and the handles `Sync`).
#[test]
fn handles_and_futures_are_send() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<crate::storage::Store>();
    send_sync::<crate::storage::Replica>();
    send_sync::<crate::storage::StorageError>();
    fn futures(store: &crate::storage::Store, r: &crate::storage::Replica) {
        send(&store.create_volume(&name("x"), MIB));
        send(&store.delete_volume(&name("x")));
        send(&r.read(0, 1));
        send(&r.write(0, bytes::Bytes::new(), false));
        send(&r.flush());
        send(&r.trim(0, 1));
        send(&r.write_zeroes(0, 1, true));
        send(&r.snapshot());
        send(&r.set_generation(Generation(1), "engine-a"));
    }
    let _ = futures;
}

#[tokio::test]
async fn a_generation_is_held_by_the_engine_that_claimed_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), open_io(IoEngineChoice::Sync).unwrap()).unwrap();
    let name = VolumeName::new("owned").unwrap();
    let (r, _) = store.create_volume(&name, 1 << 20).await.unwrap();
    r.set_generation(Generation(1), "engine-a").await.unwrap();
    // The same engine may reconnect at its generation; another may not.
    r.set_generation(Generation(1), "engine-a").await.unwrap();
    let err = r
        .set_generation(Generation(1), "engine-b")
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::GenerationTaken { .. }), "{err}");
    assert_eq!(err.code(), shorthorn_proto::ErrorCode::StaleGeneration);
    // A wild jump would lock every later engine out; it is refused.
    let err = r
        .set_generation(Generation(u64::MAX), "engine-b")
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Invalid(_)), "{err}");
    r.set_generation(Generation(2), "engine-b").await.unwrap();
    drop(r);
    drop(store);
    let store = Store::open(dir.path(), open_io(IoEngineChoice::Sync).unwrap()).unwrap();
    let r = store.get(&name).unwrap();
    assert_eq!(r.generation(), Generation(2));
    assert!(r.set_generation(Generation(2), "engine-a").await.is_err());
    r.set_generation(Generation(2), "engine-b").await.unwrap();
}
