//! Network partitions (issue 4 item 5; DESIGN.md invariant 2): the engine
//! runs in network namespace E and each replica daemon in one of its own,
//! A and B, each joined to E by its own veth pair. Cutting A's link is a
//! blackhole (connections stall, nothing is refused or reset): the engine
//! must drop A within its IO timeout and keep the volume writable on B, with
//! no error to the client.
//!
//! The clients (fio, qemu-io) run in the root namespace: the engine's NBD
//! socket is a unix socket, a file, which network namespaces do not
//! separate.
//!
//! Needs root (`ip netns`, veth).

mod common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::netns::{assert_all_cleaned_up, Netns, Veth};
use common::*;

const VOLUME: &str = "part";
const VOLUME_SIZE: &str = "128MiB";
const IO_TIMEOUT_MS: u64 = 2000;
const IO_TIMEOUT: Duration = Duration::from_millis(IO_TIMEOUT_MS);
/// Every daemon has a namespace, so every daemon can use the usual port.
const REPLICA_PORT: u16 = 7700;
/// Time allowed on top of the IO timeout for work that must not wait for
/// more than it (these shared build machines are slow and busy).
const SLACK: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// What the engine logs when it drops a replica from the healthy set.
const DROPPED: &str = "dropped from the healthy set";

/// A replica daemon in `ns`, listening on `addr` (an address of `ns`).
fn start_replica(ns: &Netns, dir: &Path, addr: &str) -> Proc {
    let mut proc = ns.spawn(
        &format!("replica {addr} in {}", ns.name),
        BIN,
        [
            "replica",
            "serve",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            addr,
        ],
        dir.with_extension("log"),
    );
    // Not reachable from the root namespace, so readiness is its log line.
    wait_until(
        "the replica daemon to listen",
        Duration::from_secs(20),
        || {
            assert!(
                proc.is_running(),
                "replica daemon exited:\n{}",
                proc.log_text()
            );
            proc.log_text().contains("replica daemon serving")
        },
    );
    proc
}

/// The engine E, replica daemons in A and B, each linked to E by a veth
/// pair, and a 2-replica volume. Fields drop in order: the processes, then
/// the links, then the namespaces.
struct Lab {
    engine: Proc,
    _replica_a: Proc,
    _replica_b: Proc,
    link_a: Veth,
    link_b: Veth,
    e: Netns,
    _a: Netns,
    _b: Netns,
    socket: PathBuf,
    addr_a: String,
    addr_b: String,
    dir_a: PathBuf,
}

impl Lab {
    fn start(dir: &Path) -> Lab {
        let e = Netns::new("e");
        let a = Netns::new("a");
        let b = Netns::new("b");
        // End `b` of each link is on the replica's side: a cut unplugs the
        // replica's node.
        let link_a = Veth::between(&e, &a);
        let link_b = Veth::between(&e, &b);
        let addr_a = format!("{}:{REPLICA_PORT}", link_a.b.ip);
        let addr_b = format!("{}:{REPLICA_PORT}", link_b.b.ip);
        let dir_a = dir.join("a");
        let replica_a = start_replica(&a, &dir_a, &addr_a);
        let replica_b = start_replica(&b, &dir.join("b"), &addr_b);

        // Created from E, as a node's tooling would: E must reach both.
        run(e.command(BIN).args([
            "volume",
            "create",
            VOLUME,
            "--size",
            VOLUME_SIZE,
            "--replica",
            &addr_a,
            "--replica",
            &addr_b,
        ]));

        let socket = dir.join(format!("{VOLUME}.sock"));
        let nbd = format!("unix:{}", socket.display());
        let timeout = format!("{IO_TIMEOUT_MS}ms");
        // The engine's control socket goes in this test's directory, not
        // the machine's /run/shorthorn.
        let run_dir = dir.to_str().unwrap();
        let args = [
            "engine",
            "serve",
            VOLUME,
            "--replica",
            &addr_a,
            "--replica",
            &addr_b,
            "--nbd",
            &nbd,
            "--io-timeout",
            &timeout,
            "--clean-after",
            CLEAN_AFTER.1,
            "--run-dir",
            run_dir,
        ];
        let mut engine = e.spawn(
            &format!("engine {VOLUME} in {}", e.name),
            BIN,
            args,
            dir.join("engine.log"),
        );
        wait_until("the engine to serve NBD", Duration::from_secs(20), || {
            assert!(engine.is_running(), "engine exited:\n{}", engine.log_text());
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        Lab {
            engine,
            _replica_a: replica_a,
            _replica_b: replica_b,
            link_a,
            link_b,
            e,
            _a: a,
            _b: b,
            socket,
            addr_a,
            addr_b,
            dir_a,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The engine's log lines saying it dropped the replica at `addr`.
    fn dropped(&self, addr: &str) -> Vec<String> {
        self.engine
            .log_text()
            .lines()
            .filter(|l| l.contains(DROPPED) && l.contains(addr))
            .map(String::from)
            .collect()
    }
}

/// Runs qemu-io commands against `uri`; panics on any failure, and returns
/// how long they took.
fn qemu_io(uri: &str, cmds: &[&str]) -> Duration {
    let started = Instant::now();
    qemu_io_ok(uri, cmds);
    started.elapsed()
}

/// Stops the engine, then compares the replicas byte for byte; `when`
/// says what they went through, for the failure message.
fn stop_and_verify(lab: &mut Lab, when: &str) {
    let status = sigterm_and_wait(&mut lab.engine, STOP_TIMEOUT);
    assert!(status.success(), "engine exited with {status}");
    let out = verify_in(&lab.e, lab);
    assert_eq!(
        out.status.code(),
        Some(0),
        "replicas differ {when}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The longest fio waited for one IO in direction `dir` ("read", "write").
fn worst(report: &FioReport, dir: &str) -> Duration {
    report.jobs()[0][dir]["lat_ns"]["max"]
        .as_u64()
        .map(Duration::from_nanos)
        .unwrap_or_else(|| panic!("fio reports no worst {dir} latency"))
}

#[test]
fn cutting_a_replica_link_keeps_the_volume_writable() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut lab = Lab::start(tmp.path());
        qemu_io(&lab.uri(), &["write -P 0x11 96M 16M", "flush"]);
        let before = allocated_bytes(&lab.dir_a);

        // Random writes over the first 64 MiB at queue depth 16, verified
        // as they go and all again at the end.
        let job = [
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=64M",
            "--verify=crc32c",
            "--verify_backlog=1024",
        ];
        let mut fio = Fio::start(tmp.path(), "partition", &lab.uri(), &job);
        wait_until(
            "fio's writes to reach replica A",
            Duration::from_secs(60),
            || {
                assert!(
                    fio.proc.is_running(),
                    "fio ended before the link was cut:\n{}",
                    fio.proc.log_text()
                );
                allocated_bytes(&lab.dir_a) >= before + (16 << 20)
            },
        );
        lab.link_a.cut();
        let cut_at = Instant::now();
        assert!(
            fio.proc.is_running(),
            "fio finished before the link was cut; the job is too small to test anything"
        );

        // Writes and a flush straight after the cut: they wait for A at
        // most the IO timeout, then go on with B alone.
        let took = qemu_io(
            &lab.uri(),
            &[
                "write -P 0x22 80M 2M",
                "flush",
                "read -P 0x22 80M 2M",
                "read -P 0x11 96M 16M",
            ],
        );
        assert!(
            took < IO_TIMEOUT + SLACK,
            "IO right after the cut took {took:?}; the IO timeout is {IO_TIMEOUT:?}"
        );

        let report = fio.wait(Duration::from_secs(180));
        report.assert_clean();
        assert_eq!(report.io_bytes("write"), 64 << 20);
        assert_eq!(
            report.io_bytes("read"),
            64 << 20,
            "fio did not verify it all"
        );
        // The reads and writes in flight at the cut wait for A up to the IO
        // timeout, then go on without it; nothing may wait much longer.
        let (worst_read, worst_write) = (worst(&report, "read"), worst(&report, "write"));
        eprintln!(
            "link cut {:?} before fio ended; worst fio latency: read {worst_read:?}, \
             write {worst_write:?}; IO right after the cut took {took:?}",
            cut_at.elapsed()
        );
        assert!(
            worst_read.max(worst_write) < IO_TIMEOUT + SLACK,
            "an IO waited {:?}; the IO timeout is {IO_TIMEOUT:?}",
            worst_read.max(worst_write)
        );

        assert!(
            lab.engine.is_running(),
            "the engine died:\n{}",
            lab.engine.log_text()
        );
        let dropped = lab.dropped(&lab.addr_a);
        assert!(
            !dropped.is_empty(),
            "the engine never dropped the cut-off replica {}:\n{}",
            lab.addr_a,
            lab.engine.log_text()
        );
        // A blackhole, not a refusal: A was dropped for its silence.
        assert!(
            dropped[0].contains("did not answer within"),
            "replica A was dropped for another reason than its silence: {}",
            dropped[0]
        );
        assert!(
            lab.dropped(&lab.addr_b).is_empty(),
            "the engine dropped replica B too:\n{}",
            lab.engine.log_text()
        );
        let status = sigterm_and_wait(&mut lab.engine, STOP_TIMEOUT);
        assert!(status.success(), "engine exited with {status}");
    }
    assert_all_cleaned_up();
}

/// How many IO timeouts a request waits, at most, for a replica that keeps
/// answering others (the engine's `SLOW_REPLICA_TIMEOUTS`).
const SLOW_REPLICA_TIMEOUTS: u32 = 3;

/// Sequential 128 KiB writes at depth 24 (3 MiB in flight), then read back
/// and verified. Over a link to B of 11 Mbit/s, each write waits for the
/// 3 MiB ahead of it to reach B (2.4 s), and B's answer may then wait for
/// the acknowledgements its TCP needs, queued behind the same data: here
/// 2.4 s on average and 4.6 s at worst, between one IO timeout (2 s) and
/// three.
const DEEP_WRITES: [&str; 5] = [
    "--rw=write",
    "--bs=128k",
    "--iodepth=24",
    "--size=16M",
    "--verify=crc32c",
];

/// A replica behind a slow link (a node on Wi-Fi) answers every request,
/// late: each write waits behind megabytes of others for the link. It is
/// slow, not gone, and must stay in the volume: the volume then writes at
/// the link's speed and keeps both copies, instead of dropping B, writing
/// with one copy, and rebuilding B over the same slow link again and
/// again, with a pause each time.
#[test]
fn a_replica_behind_a_slow_link_stays_in_the_volume() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut lab = Lab::start(tmp.path());
        lab.link_b.limit_rate("11mbit");
        let report = Fio::run(
            tmp.path(),
            "slow-link",
            &lab.uri(),
            &DEEP_WRITES,
            Duration::from_secs(180),
        );
        report.assert_wrote_and_verified(16 << 20);
        let waited = worst(&report, "write");
        let mean = report.jobs()[0]["write"]["lat_ns"]["mean"]
            .as_f64()
            .unwrap_or(0.0);
        eprintln!(
            "writes over the slow link: worst {waited:?}, mean {:?}",
            Duration::from_nanos(mean as u64)
        );
        // Otherwise the link was not slow enough to test anything.
        assert!(
            waited > IO_TIMEOUT,
            "no write waited longer than the IO timeout ({waited:?})"
        );
        assert!(
            waited < SLOW_REPLICA_TIMEOUTS * IO_TIMEOUT + SLACK,
            "a write waited {waited:?}"
        );
        assert!(
            lab.dropped(&lab.addr_b).is_empty() && lab.dropped(&lab.addr_a).is_empty(),
            "the engine dropped a replica that was slow but answering:\n{}",
            lab.engine.log_text()
        );
        assert_eq!(healthy(tmp.path()), 2);

        lab.link_b.full_speed();
        stop_and_verify(&mut lab, "after writing over the slow link");
    }
    assert_all_cleaned_up();
}

/// One write too large to cross a slow link within the IO timeout (4 MiB,
/// the largest request an engine sends a replica, over 9 Mbit/s: about
/// 3.7 s, against 2 s), on an idle volume: B can answer nothing until it
/// has the whole request, but its node acknowledges the bytes as they
/// arrive, which shows it alive. It must stay in the volume.
#[test]
fn a_large_write_crossing_a_slow_link_keeps_its_replica() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut lab = Lab::start(tmp.path());
        lab.link_b.limit_rate("9mbit");
        let took = qemu_io(&lab.uri(), &["write -P 0x5a 8M 4M"]);
        eprintln!("a 4 MiB write over the slow link took {took:?}");
        assert!(
            took > IO_TIMEOUT,
            "the write took {took:?}: the link was not slow enough to test anything"
        );
        assert!(
            lab.dropped(&lab.addr_b).is_empty(),
            "the engine dropped a replica that was receiving a large write:\n{}",
            lab.engine.log_text()
        );
        assert_eq!(healthy(tmp.path()), 2);

        lab.link_b.full_speed();
        qemu_io(&lab.uri(), &["read -P 0x5a 8M 4M"]);
        stop_and_verify(&mut lab, "after the large write");
    }
    assert_all_cleaned_up();
}

/// A replica that answers, but so slowly that a write would wait more than
/// three IO timeouts for it (over a link of 2 Mbit/s, 3 MiB take 13 s), is
/// dropped when the first write has waited that long, and the
/// volume goes on with A: slowness delays IO boundedly, never indefinitely.
#[test]
fn a_replica_too_slow_for_three_timeouts_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut lab = Lab::start(tmp.path());
        lab.link_b.limit_rate("2mbit");
        let report = Fio::run(
            tmp.path(),
            "too-slow",
            &lab.uri(),
            &DEEP_WRITES,
            Duration::from_secs(180),
        );
        report.assert_wrote_and_verified(16 << 20);
        let dropped = lab.dropped(&lab.addr_b);
        assert!(
            !dropped.is_empty(),
            "the engine kept a replica that took over {SLOW_REPLICA_TIMEOUTS} IO timeouts \
             per write:\n{}",
            lab.engine.log_text()
        );
        assert!(
            dropped[0].contains("too slow"),
            "B was dropped for another reason than its slowness: {}",
            dropped[0]
        );
        assert!(lab.dropped(&lab.addr_a).is_empty(), "A was dropped too");
        // Status says why, although B's other writes in flight then failed
        // for their closed connection.
        let b = replica_status(tmp.path(), VOLUME, &lab.addr_b);
        assert!(
            b["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("too slow")),
            "status hides why B is out: {b:#}"
        );
        // The writes waiting for B waited three timeouts, then for A to
        // answer the ping that asks whether it still serves, and for
        // whatever saving the new membership on A takes.
        let waited = worst(&report, "write");
        eprintln!("worst write before B was dropped: {waited:?}");
        assert!(
            waited < (SLOW_REPLICA_TIMEOUTS + 1) * IO_TIMEOUT + SLACK,
            "a write waited {waited:?}"
        );
        lab.link_b.full_speed();
        let status = sigterm_and_wait(&mut lab.engine, STOP_TIMEOUT);
        assert!(status.success(), "engine exited with {status}");
    }
    assert_all_cleaned_up();
}

/// Like [`DEEP_WRITES`] (3 MiB in flight), but 4 MiB in all: enough for
/// writes to wait far longer than three IO timeouts behind a link of
/// 2 Mbit/s, and done in about 20 s.
const FEW_DEEP_WRITES: [&str; 5] = [
    "--rw=write",
    "--bs=128k",
    "--iodepth=24",
    "--size=4M",
    "--verify=crc32c",
];

/// A is cut off, and B, behind a link too slow for three IO timeouts per
/// write (as above), is left the volume's only healthy replica. Dropping it
/// as too slow would leave no replica and fail the writes with EIO,
/// although B answers them all: it must stay, and the volume write at its
/// speed, with no error.
#[test]
fn the_last_healthy_replica_is_kept_however_slow() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut lab = Lab::start(tmp.path());
        lab.link_a.cut();
        lab.link_b.limit_rate("2mbit");
        let report = Fio::run(
            tmp.path(),
            "left-alone",
            &lab.uri(),
            &FEW_DEEP_WRITES,
            Duration::from_secs(180),
        );
        report.assert_wrote_and_verified(4 << 20);
        let waited = worst(&report, "write");
        eprintln!("worst write with B alone behind the slow link: {waited:?}");
        // Otherwise B was never too slow, and nothing was tested.
        assert!(
            waited > SLOW_REPLICA_TIMEOUTS * IO_TIMEOUT,
            "no write waited longer than {SLOW_REPLICA_TIMEOUTS} IO timeouts ({waited:?})"
        );
        let dropped = lab.dropped(&lab.addr_a);
        assert!(
            dropped
                .first()
                .is_some_and(|d| d.contains("did not answer within")),
            "A was not dropped for its silence:\n{}",
            lab.engine.log_text()
        );
        assert!(
            lab.dropped(&lab.addr_b).is_empty(),
            "the engine dropped its last healthy replica, which answered:\n{}",
            lab.engine.log_text()
        );
        assert_eq!(healthy(tmp.path()), 1);
        lab.link_b.full_speed();
        let status = sigterm_and_wait(&mut lab.engine, STOP_TIMEOUT);
        assert!(status.success(), "engine exited with {status}");
    }
    assert_all_cleaned_up();
}

/// What the engine logs when a rebuild ends, with its `kind` (`delta` or
/// `full`), `bytes_compared` and `bytes_copied`.
const REBUILT: &str = "rebuild finished";

fn healthy(dir: &Path) -> u64 {
    status_json(dir, VOLUME)["healthy"].as_u64().unwrap_or(0)
}

fn verify_in(ns: &Netns, lab: &Lab) -> Output {
    ns.command(BIN)
        .args([
            "replica",
            "verify",
            VOLUME,
            "--replica",
            &lab.addr_a,
            "--replica",
            &lab.addr_b,
        ])
        .output()
        .expect("run shorthorn replica verify")
}

#[test]
fn restored_link_brings_the_replica_back_by_delta_rebuild() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut lab = Lab::start(tmp.path());
        // 64 MiB on both replicas: a full rebuild would copy all of it.
        qemu_io(&lab.uri(), &["write -P 0x11 0 64M", "flush"]);
        // Let the engine clean those regions (it waits until a region has
        // been idle for about a second), so the delta below is only what A
        // misses during the cut.
        std::thread::sleep(Duration::from_millis(3000));

        lab.link_a.cut();
        // 4 MiB written while A is away, in four places.
        let outage: [(u64, u64); 4] = [
            (1 << 20, 1 << 20),
            (20 << 20, 512 << 10),
            (33 << 20, 2 << 20),
            (60 << 20, 512 << 10),
        ];
        let written: u64 = outage.iter().map(|(_, len)| len).sum();
        let writes: Vec<String> = outage
            .iter()
            .map(|(off, len)| format!("write -P 0x33 {off} {len}"))
            .chain(["flush".to_string()])
            .collect();
        let took = qemu_io(
            &lab.uri(),
            &writes.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert!(took < IO_TIMEOUT + SLACK, "IO during the cut took {took:?}");
        assert!(!lab.dropped(&lab.addr_a).is_empty(), "A was not dropped");
        assert_eq!(healthy(tmp.path()), 1, "A is cut off but counted healthy");

        // The engine retries A by itself, with backoff, and rebuilds it
        // online, comparing and copying only what A missed. Healthy again
        // (which the engine sets after logging the rebuild) before B is
        // cut below, or that cut would race A's return.
        lab.link_a.restore();
        wait_until(
            "replica A to be healthy again",
            Duration::from_secs(120),
            || {
                assert!(lab.engine.is_running(), "{}", lab.engine.log_text());
                healthy(tmp.path()) == 2
            },
        );
        let log = lab.engine.log_text();
        let rebuilt = *log_lines(&log, &[REBUILT, &lab.addr_a])
            .last()
            .unwrap_or_else(|| panic!("A is healthy, but no {REBUILT:?} for it:\n{log}"));
        let kind = log_field(rebuilt, "kind");
        let compared = log_number(rebuilt, "bytes_compared");
        let copied = log_number(rebuilt, "bytes_copied");
        let size = status_json(tmp.path(), VOLUME)["size"].as_u64().unwrap();
        eprintln!(
            "{} rebuild compared {compared} and copied {copied} bytes of a {size}-byte \
             volume, for {written} written during the cut",
            kind.unwrap_or("?")
        );
        assert_eq!(
            kind,
            Some("delta"),
            "A came back with its data, yet was not rebuilt by delta: {rebuilt}"
        );
        // Five 2 MiB regions were written during the cut: 10 MiB to compare.
        assert!(
            compared <= size / 8,
            "the delta rebuild compared {compared} bytes of a {size}-byte volume, \
             for {written} written while A was away"
        );
        // No lower bound: a write the engine sent A after the cut, before
        // dropping it, waits in the old connection's send buffer; when the
        // link is back, TCP may deliver it before the engine reconnects
        // (from then on A would refuse it), and then it is not copied.
        assert!(
            copied <= 4 * written,
            "the rebuild copied {copied} bytes for {written} written while A was away"
        );

        // A alone must now serve everything: cut B and read it all back.
        lab.link_b.cut();
        let mut reads: Vec<String> = outage
            .iter()
            .map(|(off, len)| format!("read -P 0x33 {off} {len}"))
            .collect();
        reads.extend(["read -P 0x11 8M 4M".into(), "read -P 0x11 40M 8M".into()]);
        qemu_io(
            &lab.uri(),
            &reads.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert!(!lab.dropped(&lab.addr_b).is_empty(), "B was not dropped");
        lab.link_b.restore();

        // B missed nothing while cut (only reads happened), so once the
        // engine is stopped, the replicas must compare identical.
        stop_and_verify(&mut lab, "after the rebuild");
    }
    assert_all_cleaned_up();
}

/// The harness itself: traffic crosses a link, a cut makes connecting hang
/// (a blackhole, not a refusal), a restore brings it back; and when the
/// test panics, every namespace, link and process is still gone.
#[test]
fn netns_harness_cuts_restores_and_cleans_up_after_a_failing_test() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pids = Vec::new();
    let failed = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let x = Netns::new("x");
        let y = Netns::new("y");
        let mut link = Veth::between(&x, &y);
        let _to_root = Veth::to_root(&y);
        let addr = format!("{}:{REPLICA_PORT}", link.b.ip);
        let daemon = start_replica(&y, &tmp.path().join("y"), &addr);
        pids.push(daemon.pid());
        let list = |timeout_ms: &str| {
            x.command(BIN)
                .args([
                    "volume",
                    "list",
                    "--replica",
                    &addr,
                    "--timeout-ms",
                    timeout_ms,
                ])
                .output()
                .unwrap()
        };
        assert!(list("5000").status.success(), "x cannot reach y");

        link.cut();
        let started = Instant::now();
        let out = list("1000");
        let took = started.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "reached y over a cut link");
        assert!(
            err.contains("no answer within") && took >= Duration::from_secs(1),
            "connecting over a cut link must hang until the timeout, \
             not fail at once ({took:?}): {err}"
        );

        link.restore();
        let out = list("5000");
        assert!(
            out.status.success(),
            "y unreachable after the restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        panic!("deliberate failure: the guards must clean up anyway");
    }));
    assert!(failed.is_err(), "the closure was meant to panic");
    assert_all_cleaned_up();
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} from the failed test is still alive"
        );
    }
}
