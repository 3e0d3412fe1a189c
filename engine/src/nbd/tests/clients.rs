//! The real clients installed on the machine — nbdinfo, qemu-io/qemu-img,
//! nbdcopy, fio's nbd engine — against a real server on unix and TCP
//! sockets. Every child is killed if its test fails or times out.

use std::process::Output;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use serde_json::Value;

use super::{config, Kind, MemBackend, TestServer};
use crate::nbd::NbdServerConfig;

const MIB: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(60);

/// Runs a client to completion and insists that it succeeded. The child is
/// killed (tokio's `kill_on_drop`) if the test panics or the time runs out.
async fn run(program: &str, args: &[&str]) -> Output {
    // Clients that leave files behind (fio's state files) leave them here.
    let scratch = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(scratch.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LIMIT, child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    // fio's nbd engine may print a line before its report.
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').unwrap_or(0);
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_sees_size_flags_and_block_sizes() {
    for (kind, multi_conn) in [(Kind::Unix, false), (Kind::Tcp, true)] {
        let backend = MemBackend::new(4 * MIB);
        let cfg = NbdServerConfig {
            multi_conn,
            ..config("vol")
        };
        let server = TestServer::start(kind, &backend, cfg).await;
        let info = json(&run("nbdinfo", &["--json", &server.uri()]).await);
        assert_eq!(info["protocol"], "newstyle-fixed");
        let export = &info["exports"][0];
        assert_eq!(export["export-name"], "vol", "{info}");
        assert_eq!(export["export-size"], 4 * MIB as u64);
        assert_eq!(export["is_read_only"], false);
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero"] {
            assert_eq!(export[flag], true, "{flag} in {export}");
        }
        assert_eq!(export["can_multi_conn"], multi_conn);
        assert_eq!(export["block_size_minimum"], 512);
        assert_eq!(export["block_size_preferred"], 4096);
        assert_eq!(export["block_size_maximum"], 32 * MIB as u64);

        let list = json(&run("nbdinfo", &["--list", "--json", &server.listen.to_string()]).await);
        assert_eq!(list["exports"][0]["export-name"], "vol", "{list}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_zeroes_and_fua_land_in_the_backend() {
    for kind in [Kind::Tcp, Kind::Unix] {
        let backend = MemBackend::patterned(8 * MIB);
        let server = TestServer::start_default(kind, &backend).await;
        let uri = server.uri();

        let img = json(&run("qemu-img", &["info", "--output=json", &uri]).await);
        assert_eq!(img["virtual-size"], 8 * MIB as u64, "{img}");

        let out = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "write -z 1M 64k",
                "-c",
                "read -P 0 1M 64k",
                "-c",
                "write -f -P 0xcd 2M 4k",
                "-c",
                "flush",
                "-c",
                "discard 4M 1M",
                "-c",
                "read -P 0x0 4M 1M",
                &uri,
            ],
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("fail"), "qemu-io reported: {stdout}");
        assert!(
            stdout.contains("read 1048576/1048576 bytes at offset 0"),
            "{stdout}"
        );

        let data = backend.snapshot();
        assert!(data[..MIB].iter().all(|b| *b == 0xab));
        assert!(data[MIB..MIB + 65536].iter().all(|b| *b == 0));
        assert!(data[2 * MIB..2 * MIB + 4096].iter().all(|b| *b == 0xcd));
        // Untouched bytes keep their pattern.
        let untouched = 3 * MIB;
        assert_eq!(data[untouched], (untouched % 251) as u8);
        assert!(backend.flushes() >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_copies_64_mib_in_and_out_unchanged() {
    let size = 64 * MIB;
    let backend = MemBackend::new(size);
    // Multi-conn lets nbdcopy open several connections at once.
    let cfg = NbdServerConfig {
        multi_conn: true,
        ..config("vol")
    };
    let server = TestServer::start(Kind::Unix, &backend, cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("in.img");
    let copy = dir.path().join("out.img");
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(64).fill_bytes(&mut data);
    // Leave a hole so zero detection and WRITE_ZEROES get exercised.
    data[8 * MIB..12 * MIB].fill(0);
    std::fs::write(&source, &data).unwrap();

    let uri = server.uri();
    run("nbdcopy", &["--flush", source.to_str().unwrap(), &uri]).await;
    assert!(backend.snapshot() == data, "volume differs from the source");
    std::fs::File::create(&copy).unwrap();
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]).await;
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "copy differs from the source"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_without_errors() {
    for kind in [Kind::Unix, Kind::Tcp] {
        let backend = MemBackend::new(32 * MIB);
        let server = TestServer::start_default(kind, &backend).await;
        let uri = format!("--uri={}", server.uri());
        let out = run(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &uri,
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_state_save=0",
                "--output-format=json",
            ],
        )
        .await;
        let report = json(&out);
        let job = &report["jobs"][0];
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(job["write"]["io_bytes"], 16 * MIB as u64);
        // Verification read back everything that was written.
        assert_eq!(job["read"]["io_bytes"], 16 * MIB as u64);
    }
}
