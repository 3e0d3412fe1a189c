//! Engines hosted inside a replica daemon (`replica serve --engine-control`,
//! `engine start --daemon`, `engine stop`): the hosted engine passes fio's
//! verify and reaches its own daemon's replica in memory, carries on when
//! the other replica's daemon is killed and takes it back when it returns,
//! bad requests are refused with a clear message while the daemon keeps
//! serving, SIGTERM stops the daemon's engines (flushed) before it exits,
//! and a kill -9 of the hosting daemon (engine and local replica at once)
//! loses no flushed write and is reconciled cheaply on restart.
//!
//! Daemon 1 hosts the engine and runs io_uring; daemon 2 runs plain
//! pread/pwrite, so both disk IO engines carry the hosted path.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const VOLUME_SIZE: &str = "128MiB";
/// fio covers the whole volume, so every block is written and verified.
const FIO_SIZE: u64 = 128 << 20;
const FIO_TIMEOUT: Duration = Duration::from_secs(50);
const STEP: Duration = Duration::from_secs(30);
/// What the daemon logs when an engine's session is accepted.
const ATTACHED: &str = "engine attached";
/// The span field of a session that came from an engine in the same process.
const IN_PROCESS: &str = "peer=in-process";
/// What the engine logs when it drops a replica from the healthy set.
const DROPPED: &str = "dropped from the healthy set";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// fio writing 4k blocks at random over 16 MiB at offset 16 MiB for up to
/// 30 s, returned once 2 MiB more of them have landed on `other`: a client
/// busy writing when something happens to the volume.
fn busy_writer(dir: &Path, uri: &str, other: &Replica, iodepth: &str) -> Fio {
    let before = allocated_bytes(&other.dir);
    let busy = Fio::start(
        dir,
        "busy",
        uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            iodepth,
            "--offset=16M",
            "--size=16M",
            "--time_based",
            "--runtime=30",
        ],
    );
    wait_until("fio to write", STEP, || {
        allocated_bytes(&other.dir) >= before + (2 << 20)
    });
    busy
}

/// The daemon's log lines for engine sessions it accepted.
fn attach_lines(replica: &Replica) -> Vec<String> {
    replica
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains(ATTACHED))
        .map(String::from)
        .collect()
}

/// Every engine session `host` accepted came from its hosted engine, in
/// memory (never over TCP to itself), and `other` served the same engine
/// over TCP.
fn assert_local_session_in_process(host: &Replica, other: &Replica) {
    let local = attach_lines(host);
    assert!(
        !local.is_empty(),
        "daemon {} logged no engine session:\n{}",
        host.addr,
        host.proc.log_text()
    );
    assert!(
        local.iter().all(|l| l.contains(IN_PROCESS)),
        "the hosted engine reached its own daemon {} over TCP, not in memory:\n{}",
        host.addr,
        local.join("\n")
    );
    let remote = attach_lines(other);
    assert!(
        !remote.is_empty() && remote.iter().all(|l| !l.contains(IN_PROCESS)),
        "daemon {} should have served the engine over TCP:\n{}",
        other.addr,
        remote.join("\n")
    );
}

#[test]
fn hosted_engine_passes_fio_verify_and_reaches_its_own_replica_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let host = Replica::start_hosting(&tmp.path().join("host"), "uring");
    let other = Replica::start(&tmp.path().join("other"), "sync");
    create_volume("hosted", VOLUME_SIZE, &[&host, &other]);

    let mut engine = HostedEngine::start(&host, tmp.path(), "hosted", &[&host, &other]);
    assert!(
        engine.uri.contains(engine.socket.to_str().unwrap()),
        "engine start printed {:?}, not a URI of {}",
        engine.uri,
        engine.socket.display()
    );
    let job = verified_random_writes("--bs=4k", FIO_SIZE, &[]);
    let report = Fio::run(
        tmp.path(),
        "hosted",
        &engine.uri(),
        &as_args(&job),
        FIO_TIMEOUT,
    );
    report.assert_wrote_and_verified(FIO_SIZE);
    assert_eq!(
        healthy(tmp.path(), "hosted"),
        2,
        "a replica left the healthy set in a run without faults: {:#}",
        status_json(tmp.path(), "hosted")
    );

    engine.stop_ok();
    assert!(
        !engine.socket.exists(),
        "engine stop left the NBD socket behind"
    );
    assert!(
        !engine.control.exists(),
        "engine stop left the engine's control socket behind"
    );
    let (ok, _) = qemu_io(&engine.uri(), &["read 0 4k"]);
    assert!(!ok, "the stopped engine still serves");
    assert_identical("hosted", &[&host, &other]);
    assert_local_session_in_process(&host, &other);
    let log = host.proc.log_text();
    assert!(
        !log.contains(DROPPED),
        "a replica was dropped in a run without faults:\n{log}"
    );
}

#[test]
fn hosted_engine_carries_on_when_the_other_daemon_is_killed_and_takes_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let host = Replica::start_hosting(&tmp.path().join("host"), "uring");
    let mut other = Replica::start(&tmp.path().join("other"), "sync");
    create_volume("survive", VOLUME_SIZE, &[&host, &other]);
    let mut engine = HostedEngine::start_with(
        &host,
        tmp.path(),
        "survive",
        &[&host, &other],
        &["--io-timeout", "2s"],
    );
    // Verify as it goes, so reads are in flight too when the daemon dies.
    let job = verified_random_writes("--bs=4k", FIO_SIZE, &["--verify_backlog=1024"]);
    let mut fio = Fio::start(tmp.path(), "survive", &engine.uri(), &as_args(&job));

    // Kill once fio's writes are visibly landing on daemon 2, a quarter of
    // the way through: the rest of the writes go to the local replica only.
    let started = Instant::now();
    wait_until("fio's writes to reach daemon 2", STEP, || {
        allocated_bytes(&other.dir) >= FIO_SIZE / 4
    });
    other.proc.kill9();
    let killed_at = started.elapsed();
    assert!(
        fio.proc.is_running(),
        "fio finished before daemon 2 was killed; the job is too small to test anything"
    );
    wait_healthy_within(tmp.path(), "survive", 1, STEP);
    let dropped_at = started.elapsed();
    other.restart_after_kill9();
    let report = fio.wait(FIO_TIMEOUT);
    eprintln!(
        "daemon 2 killed {killed_at:?} into the fio run, dropped at {dropped_at:?}, \
         fio done at {:?}",
        started.elapsed()
    );
    report.assert_wrote_and_verified(FIO_SIZE);

    // The engine takes daemon 2 back by itself and rebuilds it.
    wait_healthy_within(tmp.path(), "survive", 2, Duration::from_secs(40));
    let log = host.proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(DROPPED) && l.contains(&other.addr)),
        "the hosted engine never dropped the killed daemon {}:\n{log}",
        other.addr
    );
    assert!(
        !log.lines()
            .any(|l| l.contains(DROPPED) && l.contains(&host.addr)),
        "the hosted engine dropped its own daemon's replica:\n{log}"
    );
    engine.stop_ok();
    assert_identical("survive", &[&host, &other]);
}

/// One JSON line to a daemon's engine-control socket, and its answer.
fn raw_request(control: &Path, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"))
}

#[test]
fn bad_engine_requests_are_refused_clearly_and_the_daemon_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let mut host = Replica::start_hosting(&tmp.path().join("host"), "auto");
    let other = Replica::start(&tmp.path().join("other"), "auto");
    create_volume("kept", "16MiB", &[&host, &other]);
    create_volume("idle", "16MiB", &[&host, &other]);
    let mut engine = HostedEngine::start(&host, tmp.path(), "kept", &[&host, &other]);
    let uri = engine.uri();
    qemu_io_ok(&uri, &["write -P 0x5a 0 1M", "flush"]);
    let dir = tmp.path();
    let still_serves = |host: &mut Replica, after: &str, pattern: u8| {
        assert!(
            host.proc.is_running(),
            "the daemon died after {after}:\n{}",
            host.proc.log_text()
        );
        let write = format!("write -P {pattern:#x} 1M 64k");
        let read = format!("read -P {pattern:#x} 1M 64k");
        let (ok, out) = qemu_io(&uri, &["read -P 0x5a 0 1M", &write, &read]);
        assert!(
            ok,
            "the hosted volume stopped serving after {after}:\n{out}"
        );
        assert_eq!(
            healthy(dir, "kept"),
            2,
            "after {after}: {:#}",
            status_json(dir, "kept")
        );
    };

    // A volume no daemon holds.
    let out = HostedEngine::try_start(&host, tmp.path(), "missing", &[&host, &other], &[])
        .err()
        .expect("engine start of a volume that does not exist succeeded");
    assert!(
        text(&out).contains("volume missing") && text(&out).contains("does not hold this volume"),
        "the refusal does not say the volume is missing:\n{}",
        text(&out)
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("missing"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the failed start left {leftovers:?} behind"
    );
    still_serves(&mut host, "a start of a missing volume", 0x01);

    // The volume it already serves: refused before the daemon attaches it
    // again (which would fence the running engine).
    let out = HostedEngine::try_start(&host, tmp.path(), "kept", &[&host, &other], &[])
        .err()
        .expect("a second engine start of the same volume succeeded");
    assert!(
        text(&out).contains("already has an engine"),
        "unclear refusal of a second start:\n{}",
        text(&out)
    );
    still_serves(&mut host, "a second start of the same volume", 0x02);

    // Stopping a volume it has no engine for.
    let out = engine_stop(&host.engine_control(), "idle");
    assert!(!out.status.success(), "engine stop of idle succeeded");
    assert!(
        text(&out).contains("no engine for volume idle"),
        "unclear refusal of a stop:\n{}",
        text(&out)
    );
    still_serves(&mut host, "a stop of a volume with no engine", 0x03);

    // Requests the CLI would never send.
    for (line, expect) in [
        ("this is not json", "bad request"),
        (r#"{"op":"frobnicate"}"#, "unknown op"),
        (r#"{"op":"start"}"#, "argv"),
        (r#"{"op":"start","argv":["kept","--bogus"]}"#, "--bogus"),
        (r#"{"op":"stop","name":"no/such"}"#, ""),
    ] {
        let answer = raw_request(&host.engine_control(), line);
        assert_eq!(answer["ok"], false, "{line} was accepted: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            !error.is_empty() && error.contains(expect),
            "{line}: unclear answer {answer}"
        );
    }
    let listed = raw_request(&host.engine_control(), r#"{"op":"list"}"#);
    assert_eq!(
        listed["engines"][0]["volume"], "kept",
        "list does not show the hosted engine: {listed}"
    );
    still_serves(&mut host, "malformed requests", 0x04);

    // A daemon given an engine-control path it must not take: it refuses
    // to start, saying why.
    let refused_daemon = |name: &str, control: &Path, says: &str| {
        let mut daemon = Proc::spawn(
            name,
            Command::new(BIN)
                .args(["replica", "serve", "--data-dir"])
                .arg(tmp.path().join(name.replace(' ', "-")))
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .arg("--engine-control")
                .arg(control),
            tmp.path().join(format!("{}.log", name.replace(' ', "-"))),
        );
        let status = daemon
            .wait_exit(STEP)
            .unwrap_or_else(|| panic!("the {name} kept running"));
        assert!(!status.success(), "the {name} exited with {status}");
        assert!(
            daemon.log_text().contains(says),
            "unclear refusal:\n{}",
            daemon.log_text()
        );
    };

    // The same engine-control socket as a live daemon's.
    refused_daemon(
        "second daemon",
        &host.engine_control(),
        "already listening on",
    );
    assert!(
        host.engine_control().exists(),
        "the refused daemon removed the first daemon's control socket"
    );
    still_serves(
        &mut host,
        "a second daemon on the same control socket",
        0x05,
    );

    // A file that is not a socket (a slip of the finger): left as it was.
    let precious = tmp.path().join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    refused_daemon("third daemon", &precious, "exists and is not a socket");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");

    // A daemon that is not there.
    let out = shorthorn_within(
        STEP,
        &[
            "engine",
            "start",
            "--daemon",
            tmp.path().join("nobody.ctl").to_str().unwrap(),
            "kept",
            "--replica",
            &other.addr,
            "--nbd",
            &format!("unix:{}", tmp.path().join("nobody.sock").display()),
            "--run-dir",
            tmp.path().to_str().unwrap(),
        ],
    );
    assert!(
        !out.status.success(),
        "engine start with no daemon succeeded"
    );
    assert!(
        text(&out).contains("nobody.ctl"),
        "the error does not name the daemon's socket:\n{}",
        text(&out)
    );
    still_serves(&mut host, "a start on a daemon that is not there", 0x06);

    // The control socket still works: the engine stops on request.
    engine.stop_ok();
    let (ok, _) = qemu_io(&engine.uri(), &["read 0 4k"]);
    assert!(!ok, "the stopped engine still serves");
    let out = engine_stop(&host.engine_control(), "kept");
    assert!(
        text(&out).contains("no engine for volume kept"),
        "a second stop: {}",
        text(&out)
    );
    assert_identical("kept", &[&host, &other]);
    assert!(host.proc.is_running());
}

/// The restart tests' start: a hosting daemon (io_uring) whose directory a
/// successor will reuse, a plain daemon (sync), and a 64 MiB volume on both
/// served by a hosted engine.
fn hosting_setup(tmp: &Path, volume: &str) -> (PathBuf, Replica, Replica, HostedEngine) {
    let host_dir = tmp.join("host");
    let host = Replica::start_hosting(&host_dir, "uring");
    let other = Replica::start(&tmp.join("other"), "sync");
    create_volume(volume, "64MiB", &[&host, &other]);
    let engine = HostedEngine::start(&host, tmp, volume, &[&host, &other]);
    (host_dir, host, other, engine)
}

#[test]
fn sigterm_stops_hosted_engines_first_and_their_data_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (host_dir, mut host, other, mut engine) = hosting_setup(tmp.path(), "term");
    qemu_io_ok(
        &engine.uri(),
        &["write -P 0x11 0 4M", "flush", "write -P 0x22 4M 4M"],
    );
    // A client busy writing elsewhere when the signal comes: it is answered
    // and disconnected, and does not hold the daemon up.
    let busy = busy_writer(tmp.path(), &engine.uri(), &other, "--iodepth=16");

    let control = host.engine_control();
    let started = Instant::now();
    let status = sigterm_and_wait(&mut host.proc, Duration::from_secs(15));
    let took = started.elapsed();
    engine.forget();
    assert!(status.success(), "the daemon exited with {status}");
    assert!(
        took < Duration::from_secs(5),
        "the daemon took {took:?} to stop"
    );
    let log = host.proc.log_text();
    assert!(
        log.contains("stopping hosted engine"),
        "the daemon did not stop its engine first:\n{log}"
    );
    assert!(
        !control.exists(),
        "the engine-control socket is left behind"
    );
    assert!(!engine.socket.exists(), "the NBD socket is left behind");
    assert!(
        !engine.control.exists(),
        "the engine's control socket is left behind"
    );
    drop(busy);

    // Served again, by a fresh hosted engine in a fresh daemon on the same
    // port: everything the engine acknowledged before the signal is there.
    let addr = host.addr.clone();
    drop(host);
    let host = Replica::start_hosting_at(&host_dir, "uring", &addr);
    let mut engine = HostedEngine::start(&host, tmp.path(), "term", &[&host, &other]);
    qemu_io_ok(
        &engine.uri(),
        &["read -P 0x11 0 4M", "read -P 0x22 4M 4M", "read -P 0 8M 8M"],
    );
    assert_eq!(healthy(tmp.path(), "term"), 2);
    engine.stop_ok();
    assert_identical("term", &[&host, &other]);
}

/// kill -9 of the daemon hosting the engine takes the engine and the local
/// replica down together, mid-write. A fresh daemon and engine on the same
/// port reconcile the replicas cheaply (only regions that may have been in
/// flight), every flushed write is there, and the replicas end identical.
#[test]
fn kill9_of_the_hosting_daemon_keeps_flushed_writes_and_reconciles() {
    let tmp = tempfile::tempdir().unwrap();
    let volume_size: u64 = 64 << 20;
    let (host_dir, mut host, other, mut engine) = hosting_setup(tmp.path(), "crash");
    qemu_io_ok(&engine.uri(), &["write -P 0x3c 0 4M", "flush"]);
    let busy = busy_writer(tmp.path(), &engine.uri(), &other, "--iodepth=32");
    host.proc.kill9();
    engine.forget();
    drop(busy);

    let addr = host.addr.clone();
    drop(host);
    let host = Replica::start_hosting_at(&host_dir, "uring", &addr);
    let mut engine = HostedEngine::start(&host, tmp.path(), "crash", &[&host, &other]);
    qemu_io_ok(&engine.uri(), &["read -P 0x3c 0 4M", "read -P 0 32M 32M"]);
    let status = status_json(tmp.path(), "crash");
    assert_eq!(status["healthy"], 2, "{status:#}");
    let compared = status["reconcile"]["bytes_compared"].as_u64().unwrap();
    assert!(
        compared > 0 && compared <= volume_size / 2,
        "reconciliation compared {compared} bytes of a {volume_size}-byte volume \
         (fio wrote 16 MiB of it):\n{status:#}"
    );
    engine.stop_ok();
    assert_identical("crash", &[&host, &other]);
}

/// Three `engine start` requests for one volume at once: exactly one engine
/// runs, the others are refused as such (not by fencing a half-started
/// engine), and the one that runs serves its URI with both replicas.
#[test]
fn simultaneous_starts_of_one_volume_run_one_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let host = Replica::start_hosting(&tmp.path().join("host"), "auto");
    let other = Replica::start(&tmp.path().join("other"), "auto");
    create_volume("race", "16MiB", &[&host, &other]);
    let runs: Vec<_> = (0..3)
        .map(|i| tmp.path().join(format!("run-{i}")))
        .collect();
    let results: Vec<Result<HostedEngine, Output>> = std::thread::scope(|s| {
        let (host, other) = (&host, &other);
        let started: Vec<_> = runs
            .iter()
            .map(|run| {
                std::fs::create_dir_all(run).unwrap();
                s.spawn(move || HostedEngine::try_start(host, run, "race", &[host, other], &[]))
            })
            .collect();
        started.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let (running, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(
        running.len(),
        1,
        "{} engines started for one volume:\n{}",
        running.len(),
        host.proc.log_text()
    );
    for out in refused.into_iter().map(|r| r.err().unwrap()) {
        let said = text(&out);
        assert!(
            said.contains("already has an engine") || said.contains("still starting"),
            "a concurrent start was refused for the wrong reason:\n{said}"
        );
    }
    let mut engine = running.into_iter().next().unwrap().ok().unwrap();
    qemu_io_ok(&engine.uri(), &["write -P 0x33 0 1M", "read -P 0x33 0 1M"]);
    let dir = engine.control.parent().unwrap().to_path_buf();
    assert_eq!(healthy(&dir, "race"), 2, "{:#}", status_json(&dir, "race"));
    engine.stop_ok();
    assert_identical("race", &[&host, &other]);
}

/// The whole daemon hosting an engine stops for longer than the IO timeout
/// (SIGSTOP here; a laptop suspended, a VM paused) while fio writes. When
/// it runs again, the answers of both replicas are waiting unread: the
/// deadlines that passed meanwhile must not drop them, or every write in
/// flight would fail with EIO.
#[test]
fn a_hosting_daemon_stopped_for_a_while_drops_no_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Replica::start_hosting(&tmp.path().join("a"), "auto");
    let b = Replica::start(&tmp.path().join("b"), "auto");
    create_volume("nap", VOLUME_SIZE, &[&a, &b]);
    let engine =
        HostedEngine::start_with(&a, tmp.path(), "nap", &[&a, &b], &["--io-timeout", "1s"]);
    let fio = Fio::start(
        tmp.path(),
        "nap",
        &engine.uri(),
        &as_args(&verified_random_writes(
            "--bsrange=4k-128k",
            64 << 20,
            &["--time_based", "--runtime=7", "--verify_backlog=256"],
        )),
    );
    std::thread::sleep(Duration::from_millis(1500));
    a.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(4));
    a.proc.signal(nix::sys::signal::Signal::SIGCONT);
    fio.wait(FIO_TIMEOUT).assert_clean();
    let log = a.proc.log_text();
    assert!(
        !log.contains(DROPPED),
        "a replica was dropped for a deadline that passed while its engine was stopped:\n{log}"
    );
    assert_eq!(healthy(tmp.path(), "nap"), 2);
}
