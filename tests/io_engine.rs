//! The replica daemon's choice of disk IO engine, on a kernel that refuses
//! io_uring: containers under Docker's default seccomp profile, and hosts
//! with `kernel.io_uring_disabled` set, are like that. The daemons here run
//! under a seccomp filter that answers `io_uring_setup` with ENOSYS, the
//! way such a kernel does, so the fallback is exercised for real.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `io_uring_setup` on every Linux architecture with the generic syscall
/// table, x86_64 included.
const SYS_IO_URING_SETUP: u32 = 425;

/// Makes `cmd`'s process see io_uring as missing: its `io_uring_setup`
/// fails with ENOSYS; every other call is allowed.
fn without_io_uring(cmd: &mut Command) -> &mut Command {
    // Classic BPF over `struct seccomp_data`, whose first field is the
    // syscall number.
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let filter = [
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: SYS_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    // SAFETY: between fork and exec the closure only makes two prctl calls
    // on memory it owns (`filter`, moved in); no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn serve_cmd(dir: &Path, addr: &str, io_engine: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["replica", "serve", "--data-dir"]).arg(dir).args([
        "--listen",
        addr,
        "--io-engine",
        io_engine,
    ]);
    cmd
}

#[test]
fn auto_falls_back_to_sync_io_when_the_kernel_refuses_io_uring_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();

    // Where the kernel allows it, auto takes io_uring.
    let usual = Replica::start(&tmp.path().join("usual"), "auto");
    let log = usual.proc.log_text();
    assert!(
        log.contains("disk IO engine chosen") && log.contains("engine=\"uring\""),
        "auto on a kernel with io_uring:\n{log}"
    );
    drop(usual);

    // Where it does not, auto falls back to sync, and the log says so.
    let dir = tmp.path().join("refused");
    let addr = format!("127.0.0.1:{}", free_port());
    let proc = Proc::spawn(
        "replica without io_uring",
        without_io_uring(&mut serve_cmd(&dir, &addr, "auto")),
        tmp.path().join("refused.log"),
    );
    let mut r = Replica {
        proc,
        addr: addr.clone(),
        dir,
        io_engine: "auto".into(),
    };
    wait_until(
        "the daemon without io_uring to serve",
        Duration::from_secs(20),
        || {
            assert!(r.proc.is_running(), "daemon exited:\n{}", r.proc.log_text());
            r.proc.log_text().contains("replica daemon serving")
        },
    );
    let log = r.proc.log_text();
    for says in [
        "io_uring unavailable, falling back to sync IO",
        "engine=\"sync\"",
        "io_engine=\"sync\"",
    ] {
        assert!(log.contains(says), "no {says:?} in the log:\n{log}");
    }

    // And it serves a volume through an engine, bytes and all.
    create_volume("plain", "16MiB", &[&r]);
    let engine = Engine::start(tmp.path(), "plain", &[&r]);
    let uri = engine.uri();
    qemu_io_ok(&uri, &["write -P 0x5a 1M 256k", "flush"]);
    let out = qemu_io_ok(&uri, &["read -P 0x5a 1M 256k", "read -P 0 0 1M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn uring_asked_for_on_a_kernel_that_refuses_it_is_a_clear_start_up_error() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let out = without_io_uring(&mut serve_cmd(&tmp.path().join("d"), &addr, "uring"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without io_uring:\n{err}");
    assert!(
        err.contains("io_uring"),
        "the error does not name io_uring:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
