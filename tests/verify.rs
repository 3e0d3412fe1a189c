//! `shorthorn replica verify`, against real replica daemons: replicas
//! written through a 2-replica engine compare identical; after an engine
//! with one replica alone wrote a few sectors, exactly those sectors are
//! reported, with exit status 1; every way of failing to compare exits 2
//! with a clear message. The checker only looks: running it next to a
//! serving engine fences nothing.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const VOLUME_SIZE: &str = "64MiB";
const VOLUME_BYTES: u64 = 64 << 20;
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `shorthorn replica verify VOLUME --replica ... EXTRA...`.
fn verify(volume: &str, replicas: &[&str], extra: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["replica", "verify", volume]);
    for r in replicas {
        cmd.args(["--replica", r]);
    }
    cmd.args(extra)
        .output()
        .expect("run shorthorn replica verify")
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--json printed no JSON ({e}):\n{}", show(out)))
}

/// `(offset, len)` of every differing range in a `--json` summary.
fn json_ranges(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v["differing_ranges"]
        .as_array()
        .expect("differing_ranges is a list")
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["len"].as_u64().unwrap()))
        .collect()
}

#[test]
fn identical_replicas_pass_and_a_lone_write_is_pinpointed() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "uring");
    let r2 = Replica::start(&tmp.path().join("r2"), "sync");
    create_volume("ver", VOLUME_SIZE, &[&r1, &r2]);
    let addrs = [r1.addr.as_str(), r2.addr.as_str()];

    // Random bytes over the whole volume, so a difference anywhere shows.
    let src = tmp.path().join("src.img");
    random_file(&src, VOLUME_BYTES as usize, 7);
    let mut engine = Engine::start(tmp.path(), "ver", &[&r1, &r2]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(engine.uri()));
    qemu_io_ok(&engine.uri(), &["write -P 0x11 1M 3M", "flush"]);

    // Next to the idle engine: it only looks, so the engine keeps writing.
    let out = verify("ver", &addrs, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("identical: {VOLUME_BYTES} bytes compared")),
        "{}",
        show(&out)
    );
    qemu_io_ok(
        &engine.uri(),
        &["write -P 0x12 2M 4k", "flush", "read -P 0x12 2M 4k"],
    );
    let status = sigterm_and_wait(&mut engine.proc, STOP_TIMEOUT);
    assert!(status.success(), "engine exited with {status}");
    assert!(
        !engine
            .proc
            .log_text()
            .contains("dropped from the healthy set"),
        "verify disturbed the engine:\n{}",
        engine.proc.log_text()
    );
    drop(engine);

    // Small chunks, many in flight, and the machine-readable summary.
    let out = verify(
        "ver",
        &addrs,
        &[
            "--json",
            "--chunk-size",
            "64KiB",
            "--chunks-in-flight",
            "16",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v = json(&out);
    assert_eq!(v["result"], "identical", "{v:#}");
    assert_eq!(v["bytes_compared"], VOLUME_BYTES, "{v:#}");
    assert_eq!(v["size"], VOLUME_BYTES, "{v:#}");
    assert_eq!(v["differing_bytes"], 0, "{v:#}");
    assert_eq!(v["replicas"].as_array().unwrap().len(), 2, "{v:#}");

    // Now an engine with the second replica alone writes: 8 KiB across the
    // 8 MiB boundary (a chunk boundary for every chunk size up to 8 MiB)
    // and one 512-byte sector. Only the second replica has them.
    let mut lone = Engine::start_alone(tmp.path(), "ver", &r2);
    let straddle = (8 << 20) - 4096;
    let sector = (40 << 20) + 512;
    qemu_io_ok(
        &lone.uri(),
        &[
            &format!("write -P 0xee {straddle} 8k"),
            &format!("write -P 0xee {sector} 512"),
            "flush",
        ],
    );
    let status = sigterm_and_wait(&mut lone.proc, STOP_TIMEOUT);
    assert!(status.success(), "engine exited with {status}");
    drop(lone);

    let want = vec![(straddle, 8192), (sector, 512)];
    let out = verify("ver", &addrs, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("different: 8704 bytes") && lines[0].contains("in 2 ranges"),
        "{}",
        show(&out)
    );
    assert!(
        lines[1].starts_with(&format!("  offset {straddle} len 8192 ")),
        "{}",
        show(&out)
    );
    assert!(
        lines[2].starts_with(&format!("  offset {sector} len 512 ")),
        "{}",
        show(&out)
    );
    // And a reminder that a running engine's writes in flight differ.
    assert!(
        lines[3].contains("stop it and compare again"),
        "{}",
        show(&out)
    );
    assert_eq!(lines.len(), 4, "{}", show(&out));

    for chunk in ["4MiB", "4KiB"] {
        let out = verify("ver", &addrs, &["--json", "--chunk-size", chunk]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let v = json(&out);
        assert_eq!(v["result"], "different", "{v:#}");
        assert_eq!(json_ranges(&v), want, "chunk size {chunk}: {v:#}");
        assert_eq!(v["differing_bytes"], 8192 + 512, "{v:#}");
        assert_eq!(v["differing_range_count"], 2, "{v:#}");
        assert_eq!(v["bytes_compared"], VOLUME_BYTES, "{v:#}");
        // The lone engine took a newer generation on the second replica.
        let gens: Vec<u64> = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["generation"].as_u64().unwrap())
            .collect();
        assert!(gens[1] > gens[0], "{v:#}");
    }
}

#[test]
fn what_cannot_be_compared_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let r1 = Replica::start(&tmp.path().join("r1"), "auto");
    let r2 = Replica::start(&tmp.path().join("r2"), "auto");
    create_volume("same", "8MiB", &[&r1, &r2]);
    create_volume("lopsided", "8MiB", &[&r1]);
    create_volume("lopsided", "4MiB", &[&r2]);
    let nobody = format!("127.0.0.1:{}", free_port());
    let addrs = [r1.addr.as_str(), r2.addr.as_str()];

    let cases: Vec<(&str, Vec<&str>, Vec<&str>, String)> = vec![
        (
            "ghost",
            addrs.to_vec(),
            vec![],
            format!("replica daemon {} has no volume ghost", r1.addr),
        ),
        (
            "same",
            vec![r1.addr.as_str(), nobody.as_str()],
            vec![],
            format!("cannot connect to replica {nobody}"),
        ),
        (
            "lopsided",
            addrs.to_vec(),
            vec![],
            "the replicas disagree on the volume's size".to_string(),
        ),
        (
            "same",
            vec![r1.addr.as_str()],
            vec![],
            "give at least two --replica".to_string(),
        ),
        (
            "same",
            vec![r1.addr.as_str(), r1.addr.as_str()],
            vec![],
            "is named twice".to_string(),
        ),
        (
            "same",
            addrs.to_vec(),
            vec!["--chunk-size", "5MiB"],
            "--chunk-size must be".to_string(),
        ),
    ];
    for (volume, replicas, extra, message) in &cases {
        let out = verify(volume, replicas, extra);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(message.as_str()),
            "want {message:?}:\n{}",
            show(&out)
        );
        assert!(out.stdout.is_empty(), "{}", show(&out));

        let mut extra = extra.clone();
        extra.push("--json");
        let out = verify(volume, replicas, &extra);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let v = json(&out);
        assert_eq!(v["result"], "error", "{v:#}");
        assert!(
            v["error"].as_str().unwrap().contains(message.as_str()),
            "{v:#}"
        );
    }
    // The size mismatch names both sizes.
    let out = verify("lopsided", &addrs, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("8 MiB (8388608 bytes)") && err.contains("4 MiB (4194304 bytes)"),
        "{}",
        show(&out)
    );
}
