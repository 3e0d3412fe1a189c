//! Fencing (DESIGN.md invariant 4): each engine start claims a higher
//! generation; once a newer engine holds a volume, the older one's writes
//! fail — on every replica, including ones the newer engine never reached.

mod common;

use common::*;

#[test]
fn an_older_engine_cannot_write_once_a_newer_one_started() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "uring");
    let r2 = Replica::start(&tmp.path().join("r2"), "sync");
    create_volume("fenced", "16MiB", &[&r1, &r2]);

    let old = Engine::start(tmp.path(), "fenced", &[&r1, &r2]);
    let (ok, out) = qemu_io(&old.uri(), &["write -P 0x11 0 1M", "flush"]);
    assert!(ok, "{out}");

    let new = Engine::start(tmp.path(), "fenced", &[&r1, &r2]);
    let (ok, out) = qemu_io(&new.uri(), &["write -P 0x22 0 64k"]);
    assert!(ok, "{out}");

    let (ok, out) = qemu_io(&old.uri(), &["write -P 0x33 1M 64k"]);
    assert!(!ok, "the superseded engine's write succeeded:\n{out}");
    let (ok, out) = qemu_io(&old.uri(), &["read 0 4k"]);
    assert!(!ok, "the superseded engine still serves reads:\n{out}");
    assert!(old
        .proc
        .log_text()
        .contains("a newer engine has taken this volume over"));

    // Neither replica holds a byte the old engine sent after the newer
    // engine started.
    let (ok, out) = qemu_io(
        &new.uri(),
        &[
            "read -P 0x22 0 64k",
            "read -P 0x11 64k 960k",
            "read -P 0x00 1M 64k",
        ],
    );
    assert!(ok, "{out}");
    drop(new);
    for only in [&r1, &r2] {
        let check =
            Engine::start_with(tmp.path(), "fenced", &[only], &["--allow-missing-replicas"]);
        let (ok, out) = qemu_io(&check.uri(), &["read -P 0x00 1M 64k"]);
        assert!(ok, "replica {} took a superseded write:\n{out}", only.addr);
    }
}

/// The newer engine is started on one replica only (the operator says the
/// other is gone); the older one, still attached to both, must stop at the
/// first refusal and acknowledge nothing more. When the other replica is
/// added back, it is rebuilt, and whatever the old engine left there is
/// overwritten.
#[test]
fn an_older_engine_stops_even_where_the_newer_one_has_not_reached() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "auto");
    let r2 = Replica::start(&tmp.path().join("r2"), "auto");
    create_volume("split", "16MiB", &[&r1, &r2]);
    let old = Engine::start(tmp.path(), "split", &[&r1, &r2]);
    let (ok, out) = qemu_io(&old.uri(), &["write -P 0x11 0 1M", "flush"]);
    assert!(ok, "{out}");
    let new = Engine::start_with(tmp.path(), "split", &[&r1], &["--allow-missing-replicas"]);
    for cmd in ["write -P 0x33 1M 64k", "write -P 0x44 2M 64k", "flush"] {
        let (ok, out) = qemu_io(&old.uri(), &[cmd]);
        assert!(!ok, "the superseded engine acknowledged {cmd:?}:\n{out}");
    }
    // The operator said the other replica was gone, so it left the
    // volume; added back, it is rebuilt, and afterwards both hold exactly
    // the newer engine's view.
    add_replica(tmp.path(), "split", &r2.addr);
    wait_until(
        "the second replica to be rebuilt",
        std::time::Duration::from_secs(30),
        || status_json(tmp.path(), "split")["healthy"].as_u64() == Some(2),
    );
    drop(old);
    let (ok, out) = qemu_io(&new.uri(), &["read -P 0x11 0 1M", "read -P 0x00 1M 64k"]);
    assert!(ok, "{out}");
    drop(new);
    let out = shorthorn(&[
        "replica",
        "verify",
        "split",
        "--replica",
        &r1.addr,
        "--replica",
        &r2.addr,
    ]);
    assert!(
        out.status.success(),
        "replicas differ after the rebuild:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
