//! Real clients write a volume through a 2-replica engine; each replica on
//! its own then serves back exactly the same bytes (DESIGN.md invariants 1
//! and 3: every acknowledged write is on every healthy replica).

mod common;

use std::process::Command;

use common::*;

const SIZE: usize = 256 << 20;

#[test]
fn both_replicas_hold_every_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "auto");
    let r2 = Replica::start(&tmp.path().join("r2"), "auto");
    create_volume("copy", "256MiB", &[&r1, &r2]);

    let src = tmp.path().join("src.img");
    random_file(&src, SIZE, 2024);

    let mut engine = Engine::start(tmp.path(), "copy", &[&r1, &r2]);
    // qemu-img writes it in; nbdcopy reads it back.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(engine.uri()));
    let back = tmp.path().join("back.img");
    run(Command::new("nbdcopy").arg(engine.uri()).arg(&back));
    assert!(
        files_equal(&src, &back),
        "read-back differs from what was written"
    );
    engine.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(engine
        .proc
        .wait_exit(std::time::Duration::from_secs(20))
        .is_some());

    for (name, only) in [("first", &r1), ("second", &r2)] {
        let engine = Engine::start_alone(tmp.path(), "copy", only);
        let out = tmp.path().join(format!("only-{name}.img"));
        run(Command::new("nbdcopy").arg(engine.uri()).arg(&out));
        assert!(
            files_equal(&src, &out),
            "the {name} replica alone does not hold every acknowledged write"
        );
        std::fs::remove_file(&out).unwrap();
    }
}
