//! The `shorthorn` command line as people meet it: help texts, volume
//! management against a real replica daemon (including what it must refuse,
//! and how clearly), engine start-up failures, and `shorthorn dev` from
//! start to Ctrl-C and back again.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the CLI; it must finish within `limit`. Returns its status and its
/// combined stdout and stderr.
fn run_within(limit: Duration, args: &[&str], log: PathBuf) -> (ExitStatus, String, Duration) {
    let started = Instant::now();
    let mut p = Proc::spawn(
        &format!("shorthorn {}", args.join(" ")),
        Command::new(BIN).args(args),
        log,
    );
    let status = p.wait_exit(limit).unwrap_or_else(|| {
        panic!(
            "`shorthorn {}` still running after {limit:?}",
            args.join(" ")
        )
    });
    (status, p.log_text(), started.elapsed())
}

/// The CLI must refuse `args`: a failure exit, and every one of `wants` in
/// what it printed.
fn refused(args: &[&str], wants: &[&str]) -> Output {
    let out = shorthorn(args);
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "`shorthorn {}` succeeded:\n{}{err}",
        args.join(" "),
        text(&out.stdout)
    );
    for w in wants {
        assert!(
            err.contains(w),
            "`shorthorn {}` did not say {w:?}:\n{err}",
            args.join(" ")
        );
    }
    assert!(
        !err.contains("panicked"),
        "`shorthorn {}` panicked:\n{err}",
        args.join(" ")
    );
    out
}

#[test]
fn engine_serve_refuses_timeouts_that_are_no_wait() {
    let serve = [
        "engine",
        "serve",
        "v",
        "--replica",
        "127.0.0.1:1",
        "--nbd",
        "127.0.0.1:0",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        serve.iter().copied().chain(extra.iter().copied()).collect()
    };
    refused(
        &with(&["--io-timeout", "0s"]),
        &["--io-timeout", "at least 1ms"],
    );
    refused(
        &with(&["--io-timeout", "5h"]),
        &["unknown unit", "ms, s or m"],
    );
    refused(&with(&["--io-timeout-ms", "0"]), &["--io-timeout-ms", "0"]);
    refused(
        &with(&["--io-timeout", "2s", "--io-timeout-ms", "2000"]),
        &["cannot be used with"],
    );
}

#[test]
fn help_texts_name_every_flag() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &["replica", "volume", "engine", "dev", "--log", "--version"],
        ),
        (
            &["replica", "serve", "--help"],
            &[
                "--data-dir",
                "--listen",
                "--io-engine",
                "--max-connections",
                "--over-provisioning",
            ],
        ),
        (
            &["volume", "create", "--help"],
            &["<NAME>", "--size", "--replica", "--timeout-ms"],
        ),
        (
            &["volume", "list", "--help"],
            &["--replica", "--timeout-ms"],
        ),
        (
            &["volume", "inspect", "--help"],
            &[
                "<NAME>",
                "--replica",
                "--allow-missing-replicas",
                "--timeout-ms",
            ],
        ),
        (
            &["engine", "serve", "--help"],
            &[
                "<NAME>",
                "--replica",
                "--nbd",
                "--io-timeout",
                "--io-timeout-ms",
                "--max-connections",
            ],
        ),
        (
            &["dev", "--help"],
            &[
                "--data-dir",
                "--replicas",
                "--size",
                "--name",
                "--nbd",
                "--io-engine",
            ],
        ),
    ];
    for (args, flags) in cases {
        let out = shorthorn(args);
        let help = text(&out.stdout);
        assert!(
            out.status.success(),
            "`shorthorn {}` failed: {}",
            args.join(" "),
            text(&out.stderr)
        );
        for flag in *flags {
            assert!(
                help.contains(flag),
                "`shorthorn {}` does not mention {flag}:\n{help}",
                args.join(" ")
            );
        }
    }
    let out = shorthorn(&["--version"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("shorthorn "));

    // No command, an unknown one, a missing required flag: usage errors.
    for args in [
        &[][..],
        &["frobnicate"][..],
        &["volume", "create", "v"][..],
        &["engine", "serve", "v", "--replica", "127.0.0.1:1"][..],
    ] {
        let out = shorthorn(args);
        assert_eq!(out.status.code(), Some(2), "`shorthorn {}`", args.join(" "));
        assert!(text(&out.stderr).contains("Usage"), "{}", text(&out.stderr));
    }
}

#[test]
fn volume_create_is_idempotent_and_refuses_bad_input_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let r = Replica::start(&tmp.path().join("r1"), "auto");
    let addr = r.addr.as_str();

    let out = shorthorn(&[
        "volume",
        "create",
        "vol1",
        "--size",
        "64MiB",
        "--replica",
        addr,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("created vol1 (64 MiB)"),
        "{}",
        text(&out.stdout)
    );
    // Again with the same size (spelled another way): a no-op that says so.
    let out = shorthorn(&[
        "volume",
        "create",
        "vol1",
        "--size",
        "67108864",
        "--replica",
        addr,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("already exists"),
        "{}",
        text(&out.stdout)
    );
    // Another size: refused, naming both sizes.
    refused(
        &[
            "volume",
            "create",
            "vol1",
            "--size",
            "128MiB",
            "--replica",
            addr,
        ],
        &["vol1", "already exists", "67108864", "134217728"],
    );

    let listing = |want: &[&str]| {
        let out = shorthorn(&["volume", "list", "--replica", addr]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let list = text(&out.stdout);
        let rows: Vec<&str> = list.lines().skip(1).collect();
        assert_eq!(rows.len(), want.len(), "volume list:\n{list}");
        for (row, name) in rows.iter().zip(want) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(cols[0], addr, "{row}");
            assert_eq!(cols[1], *name, "{row}");
        }
        list
    };
    let list = listing(&["vol1"]);
    assert!(list.contains("64 MiB"), "{list}");

    // Names that are not names: refused before anything is sent.
    let before = tree(tmp.path());
    for name in ["../x", "", "a b", "..", "a/b", "-x", ".hidden", "/etc"] {
        let out = refused(
            &[
                "volume",
                "create",
                "--size",
                "64MiB",
                "--replica",
                addr,
                "--",
                name,
            ],
            &["volume name"],
        );
        assert_eq!(out.status.code(), Some(2), "usage error for {name:?}");
    }
    // Sizes that are not sizes, or not sizes a volume can have.
    for (size, says) in [
        ("12parsecs", "parsecs"),
        ("0", "size"),
        ("1000", "1000"),
        ("", "not a size"),
        ("-5", "size"),
        ("99999999999TiB", "too large"),
        ("64 MiB extra", "unit"),
    ] {
        refused(
            &[
                "volume",
                "create",
                "sized",
                "--size",
                size,
                "--replica",
                addr,
            ],
            &[says],
        );
    }
    refused(
        &[
            "volume",
            "create",
            "many",
            "--size",
            "64MiB",
            "--replica",
            addr,
            "--replica",
            addr,
            "--replica",
            addr,
        ],
        &["1 or 2 replicas"],
    );
    // One daemon named twice, as written or by another name for it: a
    // "2-replica" volume with one copy is refused.
    let port = addr.rsplit(':').next().unwrap();
    let by_name = format!("localhost:{port}");
    for twice in [addr, by_name.as_str()] {
        refused(
            &[
                "volume",
                "create",
                "twice",
                "--size",
                "64MiB",
                "--replica",
                addr,
                "--replica",
                twice,
            ],
            &["same replica daemon"],
        );
    }
    assert_eq!(
        tree(tmp.path()),
        before,
        "a refused create left files behind"
    );
    // A size clash on the second daemon leaves nothing on the first.
    let r2 = Replica::start(&tmp.path().join("r2"), "auto");
    let out = shorthorn(&[
        "volume",
        "create",
        "clash",
        "--size",
        "64MiB",
        "--replica",
        &r2.addr,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = tree(tmp.path());
    refused(
        &[
            "volume",
            "create",
            "clash",
            "--size",
            "128MiB",
            "--replica",
            addr,
            "--replica",
            &r2.addr,
        ],
        &["clash", "already exists", "nothing was created"],
    );
    assert_eq!(
        tree(tmp.path()),
        before,
        "a refused create left files behind"
    );
    assert!(!tmp.path().join("x").exists());
    listing(&["vol1"]);

    // Daemons that are not there, or not daemons: a clear error, quickly.
    let closed = format!("127.0.0.1:{}", free_port());
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap().to_string();
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let web_addr = web.local_addr().unwrap().to_string();
    let web_server = std::thread::spawn(move || {
        // Answers like a web server, then hangs up.
        use std::io::Write;
        if let Ok((mut s, _)) = web.accept() {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    for (target, says, limit) in [
        (closed.as_str(), "Connection refused", 5),
        (hole_addr.as_str(), "no handshake answer", 8),
        (web_addr.as_str(), "not a shorthorn replica", 5),
        ("not-an-address", "not-an-address", 10),
    ] {
        let (status, log, took) = run_within(
            Duration::from_secs(30),
            &[
                "volume",
                "create",
                "far",
                "--size",
                "64MiB",
                "--replica",
                target,
                "--timeout-ms",
                "2000",
            ],
            tmp.path().join("far.log"),
        );
        assert!(!status.success(), "create on {target} succeeded:\n{log}");
        assert!(log.contains(target), "error does not name {target}:\n{log}");
        assert!(
            log.contains(says),
            "error for {target} does not say {says:?}:\n{log}"
        );
        assert!(
            took < Duration::from_secs(limit),
            "create on {target} took {took:?}"
        );
    }
    web_server.join().unwrap();
    drop(hole);
    refused(
        &[
            "volume",
            "list",
            "--replica",
            &closed,
            "--timeout-ms",
            "2000",
        ],
        &[closed.as_str()],
    );

    // The daemon took no harm from any of it.
    assert!(listing(&["vol1"]).contains("64 MiB"));
    let out = shorthorn(&[
        "volume",
        "create",
        "vol2",
        "--size",
        "4096",
        "--replica",
        addr,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    listing(&["vol1", "vol2"]);
}

/// Volumes are thin, but their sizes together may not pass the daemon's
/// disk (times `--over-provisioning`): a volume that does not fit is
/// refused before it is promised space, a two-replica create refused by
/// its second daemon leaves nothing behind on the first, and a size past
/// what the filesystem can hold in one file says so.
#[test]
fn volume_create_refuses_what_the_disk_cannot_hold_and_leaves_nothing_half_created() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = Replica::start(&tmp.path().join("plain"), "auto");
    let half = Replica::start_with(
        &tmp.path().join("half"),
        "auto",
        &["--over-provisioning", "50"],
    );
    let fs = nix::sys::statvfs::statvfs(tmp.path()).unwrap();
    let disk = fs.blocks() as u64 * fs.fragment_size() as u64;
    // Fits under 100% of the disk, not under 50%.
    let three_quarters = (disk / 4 * 3 / 4096 * 4096).to_string();
    let create = |name: &str, size: &str, replicas: &[&Replica]| {
        let mut args = vec!["volume", "create", name, "--size", size];
        for r in replicas {
            args.extend(["--replica", r.addr.as_str()]);
        }
        shorthorn(&args)
    };
    let listed = |r: &Replica| {
        let out = shorthorn(&["volume", "list", "--replica", &r.addr]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };

    let out = create("big", &three_quarters, &[&plain, &half]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "created on a daemon without room");
    for want in [
        "does not fit",
        "50%",
        "--over-provisioning",
        "nothing was left created",
    ] {
        assert!(err.contains(want), "did not say {want:?}: {err}");
    }
    assert!(!listed(&plain).contains("big"), "{}", listed(&plain));

    // Alone on the daemon that has room it fits; a second one does not.
    let out = create("big", &three_quarters, &[&plain]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = create("again", &three_quarters, &[&plain]);
    assert!(!out.status.success(), "over-provisioned past 100%");
    assert!(
        text(&out.stderr).contains("already claim"),
        "{}",
        text(&out.stderr)
    );
    // Deleting gives the room back.
    let out = shorthorn(&["volume", "delete", "big", "--replica", &plain.addr]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = create("again", &three_quarters, &[&plain]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // No limit: past the largest file ext4 holds (16 TiB with 4 KiB
    // blocks), said in those words instead of the OS's "File too large".
    let unlimited = Replica::start_with(
        &tmp.path().join("none"),
        "auto",
        &["--over-provisioning", "0"],
    );
    let ext4 = nix::sys::statfs::statfs(tmp.path())
        .unwrap()
        .filesystem_type()
        == nix::sys::statfs::EXT4_SUPER_MAGIC;
    if ext4 {
        let out = create("huge", "100TiB", &[&unlimited]);
        assert!(!out.status.success(), "a 100 TiB volume was created");
        assert!(
            text(&out.stderr).contains("largest file"),
            "{}",
            text(&out.stderr)
        );
    }
    let out = create("thin", &three_quarters, &[&unlimited]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn volume_delete_refuses_while_an_engine_serves_the_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let host = Replica::start_hosting(&tmp.path().join("r1"), "auto");
    let other = Replica::start(&tmp.path().join("r2"), "auto");
    let both = [&host, &other];
    let delete = |name: &'static str| {
        vec![
            "volume",
            "delete",
            name,
            "--replica",
            &host.addr,
            "--replica",
            &other.addr,
        ]
    };
    let pattern = ["write -P 0x5a 0 1M"];
    let holds = ["read -P 0x5a 0 1M"];

    // An engine process, reaching both replicas over TCP.
    create_volume("apart", "16MiB", &both);
    let mut engine = Engine::start(tmp.path(), "apart", &both);
    qemu_io_ok(&engine.uri(), &pattern);
    let out = refused(
        &delete("apart"),
        &["apart", "in use by engine", "engine stop"],
    );
    assert_eq!(out.status.code(), Some(1));
    // Refused on the first replica asked, so neither lost anything.
    qemu_io_ok(&engine.uri(), &holds);
    assert_identical("apart", &both);
    common::bad_input::stop(&mut engine);
    let out = shorthorn(&delete("apart"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deleted apart"),
        "{}",
        text(&out.stdout)
    );

    // An engine hosted in replica daemon 1, whose own replica it reaches
    // in memory: refused the same way, by both daemons.
    create_volume("hosted", "16MiB", &both);
    let mut hosted = HostedEngine::start(&host, tmp.path(), "hosted", &both);
    qemu_io_ok(&hosted.uri(), &pattern);
    for r in both {
        refused(
            &["volume", "delete", "hosted", "--replica", &r.addr],
            &["hosted", "in use by engine"],
        );
    }
    qemu_io_ok(&hosted.uri(), &holds);
    // Once the stop has returned, the engine has let go of the volume.
    hosted.stop_ok();
    let out = shorthorn(&delete("hosted"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = shorthorn(&["volume", "list", "--replica", &host.addr]);
    assert!(
        !text(&out.stdout).contains("hosted"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_data_directory_is_served_by_one_daemon_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r1");
    let mut first = Replica::start(&dir, "auto");
    create_volume("kept", "16MiB", &[&first]);
    let dir_arg = dir.to_str().unwrap();
    let second_daemon = |dir: &str| {
        let port = free_port().to_string();
        let listen = format!("127.0.0.1:{port}");
        // Bounded: a second daemon that is let in serves until killed.
        shorthorn_within(
            Duration::from_secs(20),
            &["replica", "serve", "--data-dir", dir, "--listen", &listen],
        )
    };

    // A second daemon on the same directory: refused, naming the holder.
    let out = second_daemon(dir_arg);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another shorthorn process"), "{err}");
    assert!(err.contains(&format!("pid {}", first.proc.pid())), "{err}");
    // The first one never noticed.
    let list = shorthorn(&["volume", "list", "--replica", &first.addr]);
    assert!(
        text(&list.stdout).contains("kept"),
        "{}",
        text(&list.stdout)
    );

    // The lock dies with its holder, however it ends: after kill -9 the
    // directory is served again at once.
    first.restart_after_kill9();
    let list = shorthorn(&["volume", "list", "--replica", &first.addr]);
    assert!(
        text(&list.stdout).contains("kept"),
        "{}",
        text(&list.stdout)
    );

    // A file where the directory should be: said plainly, once.
    let file = tmp.path().join("afile");
    std::fs::write(&file, b"not a directory").unwrap();
    let out = second_daemon(file.to_str().unwrap());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("afile: not a directory"), "{err}");
    assert_eq!(
        err.to_lowercase().matches("not a directory").count(),
        1,
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
}

#[test]
fn engine_serve_fails_clearly_when_it_cannot_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let r = Replica::start(&tmp.path().join("r1"), "auto");
    create_volume("real", "16MiB", &[&r]);
    let sock = tmp.path().join("e.sock");
    let nbd = format!("unix:{}", sock.display());
    let closed = format!("127.0.0.1:{}", free_port());
    let long_dir = tmp.path().join("d".repeat(120)).display().to_string();
    let kept_dir = tmp.path().join("kept").display().to_string();
    std::fs::create_dir(&kept_dir).unwrap();
    let kept_ctl = Path::new(&kept_dir).join("real.ctl");
    std::fs::write(&kept_ctl, b"keep me").unwrap();
    let kept_file = tmp.path().join("kept.txt").display().to_string();
    std::fs::write(&kept_file, b"keep me too").unwrap();

    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        // A volume no replica has.
        (
            vec!["nope", "--replica", &r.addr],
            vec!["nope", "no volume named"],
        ),
        // No replica reachable.
        (
            vec!["real", "--replica", &closed],
            vec!["real", closed.as_str(), "Connection refused"],
        ),
        // Three replicas.
        (
            vec![
                "real",
                "--replica",
                &r.addr,
                "--replica",
                &r.addr,
                "--replica",
                &r.addr,
            ],
            vec!["1 or 2 replicas"],
        ),
        (
            vec!["real", "--replica", &r.addr, "--replica", &r.addr],
            vec!["same replica daemon"],
        ),
        (
            vec![
                "real",
                "--replica",
                &r.addr,
                "--run-dir",
                "/proc/shorthorn-run",
            ],
            vec!["--run-dir /proc/shorthorn-run", "control socket"],
        ),
        // A socket path longer than a unix socket can have: refused before
        // the volume is attached (which would fence its previous engine).
        (
            vec!["real", "--replica", &r.addr, "--run-dir", &long_dir],
            vec!["--run-dir", "at most 107 bytes"],
        ),
        // Two replicas at the volume's first start, one not answering: a
        // node down, or a typo? The operator says which.
        (
            vec!["real", "--replica", &r.addr, "--replica", &closed],
            vec![
                "cannot be reached",
                closed.as_str(),
                "never been attached",
                "--allow-missing-replicas",
            ],
        ),
        // A file where the control socket would go, or where its directory
        // would: refused, and the file left alone.
        (
            vec!["real", "--replica", &r.addr, "--run-dir", &kept_dir],
            vec!["real.ctl", "exists and is not a socket"],
        ),
        (
            vec!["real", "--replica", &r.addr, "--run-dir", &kept_file],
            vec!["kept.txt is not a directory"],
        ),
    ];
    for (extra, wants) in cases {
        let mut args = vec!["engine", "serve", "--nbd", &nbd, "--io-timeout-ms", "2000"];
        args.extend(extra.iter());
        let (status, log, took) = run_within(
            Duration::from_secs(20),
            &args,
            tmp.path().join("engine.log"),
        );
        assert!(!status.success(), "`{}` succeeded:\n{log}", args.join(" "));
        for w in wants {
            assert!(
                log.contains(w),
                "`{}` did not say {w:?}:\n{log}",
                args.join(" ")
            );
        }
        assert!(!log.contains("panicked"), "{log}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
        assert!(
            std::os::unix::net::UnixStream::connect(&sock).is_err(),
            "a failed engine left its NBD socket answering"
        );
    }
    assert_eq!(std::fs::read(&kept_ctl).unwrap(), b"keep me");
    assert_eq!(std::fs::read(&kept_file).unwrap(), b"keep me too");
    // Said so, it starts on the one that answers; the other stays out.
    let mut engine = Engine::start_with(
        tmp.path(),
        "real",
        &[&r],
        &["--replica", &closed, "--allow-missing-replicas"],
    );
    let status = status_json(tmp.path(), "real");
    assert_eq!(status["healthy"], 1, "{status}");
    common::bad_input::stop(&mut engine);
    // Bad arguments: usage errors naming the culprit.
    refused(
        &[
            "engine",
            "serve",
            "../x",
            "--replica",
            &r.addr,
            "--nbd",
            &nbd,
        ],
        &["volume name"],
    );
    refused(
        &[
            "engine",
            "serve",
            "real",
            "--replica",
            &r.addr,
            "--nbd",
            "nowhere",
        ],
        &["nowhere"],
    );
    // A socket path it cannot create.
    let bad_sock = format!("unix:{}", tmp.path().join("no/such/dir/e.sock").display());
    let (status, log, _) = run_within(
        Duration::from_secs(20),
        &[
            "engine",
            "serve",
            "real",
            "--replica",
            &r.addr,
            "--nbd",
            &bad_sock,
        ],
        tmp.path().join("engine-bad-sock.log"),
    );
    assert!(!status.success(), "{log}");
    assert!(log.contains("no/such/dir"), "{log}");

    // After all that, a good engine still starts and serves the volume.
    let engine = Engine::start(tmp.path(), "real", &[&r]);
    let out = run(Command::new("nbdinfo").arg("--size").arg(engine.uri()));
    assert_eq!(text(&out.stdout).trim(), (16u64 << 20).to_string());
}

// ----- shorthorn dev -------------------------------------------------------

/// Pids (other than ours) whose command line mentions `marker`.
fn pids_mentioning(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let mut cmdline = Vec::new();
        if let Ok(mut f) = std::fs::File::open(e.path().join("cmdline")) {
            let _ = f.read_to_end(&mut cmdline);
        }
        if text(&cmdline).replace('\0', " ").contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..."; comm may hold spaces, so cut after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Kills (by pid) whatever is left that mentions the test's own directory,
/// so a failing test leaves no daemons behind.
struct Sweep(String);

impl Drop for Sweep {
    fn drop(&mut self) {
        for pid in pids_mentioning(&self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(uri));
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(
        !said.contains("verification failed") && !said.contains("error"),
        "qemu-io: {said}"
    );
    said
}

/// A running `shorthorn dev`, up and serving.
struct Dev {
    proc: Proc,
    /// The NBD URI it printed.
    uri: String,
    /// Its child processes (replica daemons and engine).
    children: Vec<i32>,
}

/// Starts `shorthorn dev --data-dir MARKER --size 64MiB EXTRA...` and waits
/// until it says it is up; its output goes to `tmp`/`log`.
fn start_dev(tmp: &Path, marker: &str, log: &str, extra: &[&str]) -> Dev {
    let mut proc = Proc::spawn(
        "shorthorn dev",
        Command::new(BIN)
            .args(["dev", "--data-dir", marker, "--size", "64MiB"])
            .args(extra),
        tmp.join(log),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let uri = loop {
        let log = proc.log_text();
        if log.contains("shorthorn dev is up") {
            if let Some(line) = log.lines().find(|l| l.trim_start().starts_with("NBD URI:")) {
                break line.trim_start()["NBD URI:".len()..].trim().to_string();
            }
        }
        assert!(proc.is_running(), "dev exited before it was up:\n{log}");
        assert!(Instant::now() < deadline, "dev not up in 30 s:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(uri.starts_with("nbd+unix://"), "{uri}");
    assert!(
        uri.contains(marker),
        "the socket is not in the data dir: {uri}"
    );
    let children: Vec<i32> = pids_mentioning(marker)
        .into_iter()
        .filter(|pid| *pid != proc.pid())
        .collect();
    for pid in &children {
        assert_eq!(
            parent_of(*pid),
            Some(proc.pid()),
            "pid {pid} is not dev's child"
        );
    }
    Dev {
        proc,
        uri,
        children,
    }
}

/// The command in `log` that starts, after its indentation, with
/// `command`, its continuation lines (after a `\`) joined on.
fn example_line(log: &str, command: &str) -> String {
    let mut lines = log.lines().map(str::trim_start);
    let mut line = lines
        .find(|l| l.starts_with(command))
        .unwrap_or_else(|| panic!("dev printed no `{command}` example:\n{log}"))
        .to_string();
    while let Some(head) = line.strip_suffix('\\') {
        line = format!("{head}{}", lines.next().unwrap_or_default());
    }
    line
}

/// dev printed its three copy-paste examples, each aimed at this volume:
/// fio through its nbd engine; qemu-img and nbdcopy; and a filesystem by
/// nbdfuse, losetup, mkfs.ext4 and mount.
fn assert_examples(log: &str, uri: &str, socket: &Path) {
    let quoted = format!("'{uri}'");
    let fio = example_line(log, "fio ");
    // Its size depends on the volume's: only that it has one is checked.
    for want in [
        "--ioengine=nbd",
        &format!("--uri={quoted}"),
        "--size=",
        "--verify=",
    ] {
        assert!(fio.contains(want), "the fio example lacks {want}: {fio}");
    }
    for command in ["qemu-img convert", "nbdcopy "] {
        let line = example_line(log, command);
        assert!(
            line.contains(&quoted),
            "{command} is not aimed at {uri}: {line}"
        );
    }
    let fuse = example_line(log, "nbdfuse ");
    let socket = socket.display().to_string();
    assert!(
        fuse.contains(&format!("--unix {socket}")),
        "nbdfuse is not aimed at {socket}: {fuse}"
    );
    // The loop device goes over the file nbdfuse makes.
    let fuse_file = fuse.split_whitespace().nth(1).unwrap_or_default();
    let losetup = example_line(log, "LOOP=$(losetup");
    assert!(
        losetup.ends_with(&format!(" {fuse_file})")),
        "losetup is not over nbdfuse's {fuse_file}: {losetup}"
    );
    let mkfs = example_line(log, "mkfs.ext4 ");
    assert!(mkfs.contains("mount $LOOP"), "no mount after mkfs: {mkfs}");
}

/// Ctrl-C: dev exits 0 within 20 s, and every process it started is gone.
fn ctrl_c_stops_everything(dev: &mut Dev, marker: &str) {
    dev.proc.signal(Signal::SIGINT);
    let status = dev
        .proc
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| {
            panic!(
                "dev still running 20 s after Ctrl-C:\n{}",
                dev.proc.log_text()
            )
        });
    assert!(
        status.success(),
        "dev exited with {status}:\n{}",
        dev.proc.log_text()
    );
    for pid in &dev.children {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || !pids_mentioning(marker).contains(pid),
            "dev's child {pid} outlived it"
        );
    }
    assert_eq!(
        pids_mentioning(marker),
        Vec::<i32>::new(),
        "processes left behind"
    );
    assert!(
        dev.proc.log_text().contains("data kept in"),
        "{}",
        dev.proc.log_text()
    );
}

#[test]
fn dev_serves_a_volume_and_ctrl_c_stops_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let marker = data.display().to_string();
    let _sweep = Sweep(marker.clone());
    let size = 64u64 << 20;

    for round in 0..2 {
        let mut dev = start_dev(tmp.path(), &marker, &format!("dev-{round}.log"), &[]);
        let uri = dev.uri.clone();
        let log = dev.proc.log_text();
        assert_examples(&log, &uri, &data.canonicalize().unwrap().join("dev.sock"));
        assert!(log.contains("2 replica(s) on"), "{log}");
        if round == 1 {
            assert!(
                log.contains("already exists"),
                "the second run did not find the volume:\n{log}"
            );
        }
        // Two replica daemons and an engine, all children of dev.
        assert_eq!(dev.children.len(), 3, "dev's processes: {:?}", dev.children);

        let out = run(Command::new("nbdinfo").arg("--json").arg(&uri));
        let json = text(&out.stdout);
        let export_size = json.split("\"export-size\":").nth(1).and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        });
        assert_eq!(export_size, Some(size), "nbdinfo --json:\n{json}");

        let patterns = [
            (0x5c, 4u64 << 20, 1u64 << 20),
            (0xa7, size - (256 << 10), 256 << 10),
        ];
        if round == 0 {
            let mut cmds = Vec::new();
            for (p, off, len) in patterns {
                cmds.push(format!("write -P {p:#x} {off} {len}"));
            }
            cmds.push("flush".into());
            for (p, off, len) in patterns {
                cmds.push(format!("read -P {p:#x} {off} {len}"));
            }
            qemu_io(&uri, &cmds);
        } else {
            let cmds: Vec<String> = patterns
                .iter()
                .map(|(p, off, len)| format!("read -P {p:#x} {off} {len}"))
                .collect();
            qemu_io(&uri, &cmds);
        }
        // Untouched space reads as zeroes.
        qemu_io(&uri, &[format!("read -P 0 {} {}", 8 << 20, 1 << 20)]);

        ctrl_c_stops_everything(&mut dev, &marker);
    }
}

/// `--replicas 1`: the volume lives on one replica (two daemons still
/// run), serves IO, and Ctrl-C stops every process.
#[test]
fn dev_with_one_replica_serves_and_ctrl_c_stops_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let marker = data.display().to_string();
    let _sweep = Sweep(marker.clone());

    let mut dev = start_dev(tmp.path(), &marker, "dev.log", &["--replicas", "1"]);
    let uri = dev.uri.clone();
    let log = dev.proc.log_text();
    let data = data.canonicalize().unwrap();
    assert_examples(&log, &uri, &data.join("dev.sock"));
    let up = example_line(&log, "shorthorn dev is up");
    assert!(
        up.contains("1 replica(s) on 127.0.0.1:") && !up.contains(" and "),
        "not one replica: {up}"
    );
    assert_eq!(
        dev.children.len(),
        3,
        "two replica daemons and an engine: {:?}",
        dev.children
    );
    // The engine was given exactly one replica.
    let engines: Vec<String> = dev
        .children
        .iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| text(&c).replace('\0', " "))
        .filter(|c| c.contains(" engine serve "))
        .collect();
    assert_eq!(engines.len(), 1, "dev's engines: {engines:?}");
    assert_eq!(
        engines[0].matches("--replica ").count(),
        1,
        "{}",
        engines[0]
    );

    let (off, len) = (3u64 << 20, 512u64 << 10);
    qemu_io(
        &uri,
        &[
            format!("write -P 0x3e {off} {len}"),
            "flush".into(),
            format!("read -P 0x3e {off} {len}"),
            format!("read -P 0 0 {off}"),
        ],
    );
    // Read back on a connection of its own, too.
    qemu_io(&uri, &[format!("read -P 0x3e {off} {len}")]);

    ctrl_c_stops_everything(&mut dev, &marker);
    // The data is on the first daemon's volume, and the second has none.
    assert!(
        data.join("replica-1/volumes/dev").exists(),
        "{:?}",
        tree(&data)
    );
    assert!(
        !data.join("replica-2/volumes/dev").exists(),
        "{:?}",
        tree(&data)
    );
}

/// `volume status --watch-ms` into a reader that stops after one line
/// (`| head -1`) ends quietly with success, instead of panicking on the
/// closed pipe.
#[test]
fn volume_status_ends_quietly_when_its_reader_goes_away() {
    let tmp = tempfile::tempdir().unwrap();
    let r = Replica::start(&tmp.path().join("r"), "auto");
    create_volume("watched", "16MiB", &[&r]);
    let _engine = Engine::start(tmp.path(), "watched", &[&r]);
    let mut status = Command::new(BIN)
        .args([
            "volume",
            "status",
            "watched",
            "--watch-ms",
            "50",
            "--run-dir",
        ])
        .arg(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    status
        .stdout
        .take()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert!(first.starts_with(b"volume watched"), "{}", text(&first));
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = status.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = status.kill();
            panic!("volume status --watch-ms went on writing into a closed pipe");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    status
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(exit.success(), "{exit}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
