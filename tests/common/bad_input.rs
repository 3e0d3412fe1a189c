//! What the bad-input tests (`bad_replica_input`, `bad_nbd_input`) share:
//! how long one step may take, and how an engine is stopped and a volume
//! read back to prove the bad input changed no byte.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{files_equal, run, Engine, Replica};

pub const MIB: usize = 1 << 20;
/// How long one step may take before the test calls it a hang.
pub const STEP: Duration = Duration::from_secs(10);

/// Stops an engine with SIGTERM; it must exit cleanly within two steps.
pub fn stop(engine: &mut Engine) {
    engine.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = engine
        .proc
        .wait_exit(STEP * 2)
        .expect("engine did not stop");
    assert!(status.success(), "engine exited with {status}");
}

/// Reads the whole volume through a fresh engine and compares it with `want`.
pub fn assert_volume_holds(tmp: &Path, name: &str, replicas: &[&Replica], want: &Path) {
    // Each replica on its own, if asked: the operator's override.
    let mut engine = Engine::start_with(tmp, name, replicas, &["--allow-missing-replicas"]);
    let back = tmp.join(format!("{name}-back.img"));
    run(Command::new("nbdcopy").arg(engine.uri()).arg(&back));
    assert!(
        files_equal(want, &back),
        "volume {name} does not hold the bytes written before the bad input"
    );
    std::fs::remove_file(&back).unwrap();
    stop(&mut engine);
}
