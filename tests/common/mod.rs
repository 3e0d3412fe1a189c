//! Shared pieces of the multi-process tests: real `shorthorn` daemons and
//! engines on loopback, real client tools, and guards that stop every
//! process and release every mount and loop device when a test ends —
//! including when it fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_shorthorn");

/// A child process killed (SIGKILL) and reaped when dropped. If the test is
/// failing, its log is printed first, so a failure shows why.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("create log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `kill -9`: the process gets no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log_text());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A replica daemon process on a loopback port, serving a directory.
pub struct Replica {
    pub proc: Proc,
    pub addr: String,
    pub dir: PathBuf,
    pub io_engine: String,
}

impl Replica {
    pub fn start(dir: &Path, io_engine: &str) -> Replica {
        Self::start_at(dir, io_engine, &format!("127.0.0.1:{}", free_port()))
    }

    /// A daemon started with `extra` flags of `replica serve`.
    pub fn start_with(dir: &Path, io_engine: &str, extra: &[&str]) -> Replica {
        let addr = format!("127.0.0.1:{}", free_port());
        Self::spawn_at(dir, io_engine, &addr, &format!("replica {addr}"), extra)
    }

    pub fn start_at(dir: &Path, io_engine: &str, addr: &str) -> Replica {
        Self::spawn_at(dir, io_engine, addr, &format!("replica {addr}"), &[])
    }

    fn spawn_at(dir: &Path, io_engine: &str, addr: &str, name: &str, extra: &[&str]) -> Replica {
        let log = dir.with_extension(format!("{}.log", now_ms()));
        let proc = Proc::spawn(
            name,
            Command::new(BIN)
                .args([
                    "replica",
                    "serve",
                    "--data-dir",
                    dir.to_str().unwrap(),
                    "--listen",
                    addr,
                    "--io-engine",
                    io_engine,
                ])
                .args(extra),
            log,
        );
        let mut r = Replica {
            proc,
            addr: addr.to_string(),
            dir: dir.to_path_buf(),
            io_engine: io_engine.to_string(),
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&mut self) {
        let addr = self.addr.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                self.proc.is_running(),
                "replica daemon exited:\n{}",
                self.proc.log_text()
            );
            // Its own log line too, not only the port: a port picked free a
            // moment ago may already answer for another test's daemon.
            if TcpStream::connect(&addr).is_ok()
                && self.proc.log_text().contains("replica daemon serving")
            {
                return;
            }
            assert!(Instant::now() < deadline, "replica daemon never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon (`kill -9`) and starts it again on the same port.
    pub fn restart_after_kill9(&mut self) {
        self.proc.kill9();
        let again = Replica::start_at(&self.dir, &self.io_engine, &self.addr);
        *self = again;
    }

    /// Kills a daemon that hosts engines (`kill -9`: they die with it) and
    /// starts it again, hosting, on the same port.
    pub fn restart_hosting_after_kill9(&mut self) {
        self.proc.kill9();
        let again = Replica::start_hosting_at(&self.dir, &self.io_engine, &self.addr);
        *self = again;
    }
}

/// Replica daemons that also host engines (`--engine-control`).
impl Replica {
    /// A replica daemon hosting engines, its engine-control socket next to
    /// its data directory ([`engine_control`](Self::engine_control)).
    pub fn start_hosting(dir: &Path, io_engine: &str) -> Replica {
        Self::start_hosting_at(dir, io_engine, &format!("127.0.0.1:{}", free_port()))
    }

    pub fn start_hosting_at(dir: &Path, io_engine: &str, addr: &str) -> Replica {
        let control = engine_control_of(dir);
        let mut r = Self::spawn_at(
            dir,
            io_engine,
            addr,
            &format!("replica {addr} (hosting engines)"),
            &["--engine-control", control.to_str().unwrap()],
        );
        // The TCP port is bound before the control socket: wait for both.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&control).is_err() {
            assert!(
                r.proc.is_running(),
                "replica daemon exited:\n{}",
                r.proc.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "replica daemon never served its engine-control socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// The engine-control socket of a daemon started with
    /// [`start_hosting`](Self::start_hosting).
    pub fn engine_control(&self) -> PathBuf {
        engine_control_of(&self.dir)
    }
}

fn engine_control_of(dir: &Path) -> PathBuf {
    dir.with_extension("ctl")
}

/// Engines the tests start clean a region once it has gone unwritten for
/// this long (`--clean-after`, 10s unless told), so that a test can wait
/// for the regions it wrote to be clean in a couple of seconds. A test
/// that gives `--clean-after` itself overrides it.
pub const CLEAN_AFTER: (&str, &str) = ("SHORTHORN_CLEAN_AFTER", "600ms");

/// Runs the `shorthorn` CLI to completion under `timeout`, so a hang fails
/// the test instead of blocking it.
pub fn shorthorn_within(limit: Duration, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(limit.as_secs().max(1).to_string())
        .arg(BIN)
        .args(args)
        .env(CLEAN_AFTER.0, CLEAN_AFTER.1)
        .output()
        .expect("run shorthorn")
}

/// `shorthorn replica verify`: fails the test unless the volume's replicas
/// on `replicas` hold the same bytes.
pub fn assert_identical(volume: &str, replicas: &[&Replica]) {
    let mut args = vec!["replica", "verify", volume];
    for r in replicas {
        args.extend(["--replica", r.addr.as_str()]);
    }
    let out = shorthorn_within(Duration::from_secs(120), &args);
    assert!(
        out.status.success(),
        "replicas of {volume} differ:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `shorthorn engine stop --daemon PATH VOLUME`.
pub fn engine_stop(daemon: &Path, volume: &str) -> Output {
    shorthorn_within(
        Duration::from_secs(60),
        &[
            "engine",
            "stop",
            "--daemon",
            daemon.to_str().unwrap(),
            volume,
        ],
    )
}

/// An engine hosted by a replica daemon (`engine start --daemon`), serving
/// one volume on a unix socket; stopped (`engine stop`) when dropped.
pub struct HostedEngine {
    /// The daemon's engine-control socket.
    pub daemon: PathBuf,
    pub volume: String,
    pub socket: PathBuf,
    /// The engine's own control socket (`--run-dir`/VOLUME.ctl).
    pub control: PathBuf,
    /// The NBD URI `engine start` printed.
    pub uri: String,
    running: bool,
}

impl HostedEngine {
    pub fn start(host: &Replica, dir: &Path, volume: &str, replicas: &[&Replica]) -> HostedEngine {
        Self::start_with(host, dir, volume, replicas, &[])
    }

    pub fn start_with(
        host: &Replica,
        dir: &Path,
        volume: &str,
        replicas: &[&Replica],
        extra: &[&str],
    ) -> HostedEngine {
        Self::try_start(host, dir, volume, replicas, extra).unwrap_or_else(|out| {
            panic!(
                "engine start {volume} failed ({}):\n{}\nits daemon:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                host.proc.log_text()
            )
        })
    }

    /// `engine start` in `host`'s daemon, with its NBD socket and run dir
    /// in `dir`; what the CLI said if it failed.
    pub fn try_start(
        host: &Replica,
        dir: &Path,
        volume: &str,
        replicas: &[&Replica],
        extra: &[&str],
    ) -> Result<HostedEngine, Output> {
        let daemon = host.engine_control();
        let socket = dir.join(format!("{volume}-{}.sock", now_ms()));
        let nbd = format!("unix:{}", socket.display());
        let mut args = vec!["engine", "start", "--daemon", daemon.to_str().unwrap()];
        args.push(volume);
        for r in replicas {
            args.extend(["--replica", &r.addr]);
        }
        args.extend(["--nbd", &nbd, "--run-dir", dir.to_str().unwrap()]);
        args.extend(extra);
        let out = shorthorn_within(Duration::from_secs(60), &args);
        if !out.status.success() {
            return Err(out);
        }
        let uri = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            uri.starts_with("nbd+unix://"),
            "engine start printed no NBD URI: {uri:?}"
        );
        Ok(HostedEngine {
            daemon,
            volume: volume.to_string(),
            socket,
            control: dir.join(format!("{volume}.ctl")),
            uri,
            running: true,
        })
    }

    pub fn uri(&self) -> String {
        self.uri.clone()
    }

    /// `engine stop`; what the CLI said.
    pub fn stop(&mut self) -> Output {
        self.running = false;
        engine_stop(&self.daemon, &self.volume)
    }

    /// Like [`stop`](Self::stop), panicking if the daemon refuses.
    pub fn stop_ok(&mut self) {
        let out = self.stop();
        assert!(
            out.status.success(),
            "engine stop {} failed ({}): {}",
            self.volume,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The daemon went away with the engine in it: nothing to stop on drop.
    pub fn forget(&mut self) {
        self.running = false;
    }
}

impl Drop for HostedEngine {
    fn drop(&mut self) {
        if self.running {
            // The daemon may be gone already (the test killed it): then
            // this fails at once, which is fine.
            let _ = self.stop();
        }
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Runs the `shorthorn` CLI to completion.
pub fn shorthorn(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env(CLEAN_AFTER.0, CLEAN_AFTER.1)
        .output()
        .expect("run shorthorn")
}

pub fn create_volume(name: &str, size: &str, replicas: &[&Replica]) {
    let mut args = vec!["volume", "create", name, "--size", size];
    for r in replicas {
        args.push("--replica");
        args.push(&r.addr);
    }
    let out = shorthorn(&args);
    assert!(
        out.status.success(),
        "volume create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How many replicas the running engine of `volume` counts as healthy.
pub fn healthy(dir: &Path, volume: &str) -> u64 {
    status_json(dir, volume)["healthy"].as_u64().unwrap_or(0)
}

/// Waits (up to a minute) until the engine of `volume` counts `n` healthy
/// replicas.
pub fn wait_healthy(dir: &Path, volume: &str, n: u64) {
    wait_healthy_within(dir, volume, n, Duration::from_secs(60));
}

pub fn wait_healthy_within(dir: &Path, volume: &str, n: u64, within: Duration) {
    wait_until(&format!("{n} healthy replicas of {volume}"), within, || {
        healthy(dir, volume) == n
    });
}

/// What the engine's status says of the replica at `addr`.
pub fn replica_status(dir: &Path, volume: &str, addr: &str) -> serde_json::Value {
    let s = status_json(dir, volume);
    s["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["addr"] == addr).cloned())
        .unwrap_or_else(|| panic!("no replica {addr} in {s:#}"))
}

/// The engine's `volume status --json` answer (its run dir is `dir`).
pub fn status_json(dir: &Path, volume: &str) -> serde_json::Value {
    let out = shorthorn(&[
        "volume",
        "status",
        volume,
        "--json",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `shorthorn volume add-replica VOLUME --replica ADDR`, through the
/// engine whose run dir is `dir`; panics with the CLI's message on failure.
pub fn add_replica(dir: &Path, volume: &str, addr: &str) {
    let out = shorthorn(&[
        "volume",
        "add-replica",
        volume,
        "--replica",
        addr,
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An engine process serving one volume on a unix socket.
pub struct Engine {
    pub proc: Proc,
    pub socket: PathBuf,
}

impl Engine {
    pub fn start(dir: &Path, volume: &str, replicas: &[&Replica]) -> Engine {
        Self::start_with(dir, volume, replicas, &[])
    }

    pub fn start_with(dir: &Path, volume: &str, replicas: &[&Replica], extra: &[&str]) -> Engine {
        let mut engine = Self::spawn(dir, volume, replicas, extra);
        engine.wait_serving(Duration::from_secs(20));
        engine
    }

    /// Starts an engine without waiting for it to serve.
    pub fn spawn(dir: &Path, volume: &str, replicas: &[&Replica], extra: &[&str]) -> Engine {
        let stamp = now_ms();
        let socket = dir.join(format!("{volume}-{stamp}.sock"));
        let mut cmd = Command::new(BIN);
        cmd.env(CLEAN_AFTER.0, CLEAN_AFTER.1)
            .args(["engine", "serve", volume, "--nbd"])
            .arg(format!("unix:{}", socket.display()))
            .arg("--run-dir")
            .arg(dir);
        for r in replicas {
            cmd.args(["--replica", &r.addr]);
        }
        cmd.args(extra);
        let proc = Proc::spawn(
            &format!("engine {volume}"),
            &mut cmd,
            dir.join(format!("engine-{volume}-{stamp}.log")),
        );
        Engine { proc, socket }
    }

    /// Waits until the engine serves NBD; panics if it exits first or
    /// takes longer than `limit`.
    pub fn wait_serving(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            assert!(
                self.proc.is_running(),
                "engine exited:\n{}",
                self.proc.log_text()
            );
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "engine never served NBD");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An engine on one replica of a volume that has more, telling it the
    /// others are gone (`--allow-missing-replicas`): the operator's
    /// override, used by tests that look at each replica on its own.
    pub fn start_alone(dir: &Path, volume: &str, replica: &Replica) -> Engine {
        Self::start_with(dir, volume, &[replica], &["--allow-missing-replicas"])
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs qemu-io commands (`-c` each) against `uri`, with `opts` before
/// them, under `timeout 60` so a hang fails the test instead of blocking
/// it. Returns whether every command succeeded, and what qemu-io said.
pub fn qemu_io_with(uri: &str, opts: &[&str], cmds: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("timeout");
    cmd.args(["60", "qemu-io", "-f", "raw"]).args(opts);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(uri).output().expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("failed"), text)
}

pub fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_with(uri, &[], cmds)
}

/// Like [`qemu_io`], panicking with qemu-io's output on any failure.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let (ok, text) = qemu_io(uri, cmds);
    assert!(ok, "qemu-io {cmds:?} failed:\n{text}");
    text
}

/// A file of random bytes (deterministic per seed).
pub fn random_file(path: &Path, len: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

pub fn files_equal(a: &Path, b: &Path) -> bool {
    let mut fa = std::fs::File::open(a).unwrap();
    let mut fb = std::fs::File::open(b).unwrap();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// A FUSE mount made by `nbdfuse`, exposing the NBD export as one file.
/// Unmounted (and the nbdfuse process reaped) on drop.
pub struct FuseExport {
    pub mountpoint: PathBuf,
    pub file: PathBuf,
    proc: Proc,
}

impl FuseExport {
    pub fn new(dir: &Path, socket: &Path) -> FuseExport {
        let mountpoint = dir.join("fuse");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let file = mountpoint.join("disk");
        let proc = Proc::spawn(
            "nbdfuse",
            Command::new("nbdfuse").arg(&file).arg("--unix").arg(socket),
            dir.join("nbdfuse.log"),
        );
        let mut fx = FuseExport {
            mountpoint,
            file,
            proc,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fx.file.exists() {
            assert!(
                fx.proc.is_running(),
                "nbdfuse exited:\n{}",
                fx.proc.log_text()
            );
            assert!(Instant::now() < deadline, "nbdfuse never mounted");
            std::thread::sleep(Duration::from_millis(25));
        }
        fx
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .status();
        if self.proc.wait_exit(Duration::from_secs(10)).is_none() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// A loop device over a file; detached on drop.
pub struct LoopDevice {
    pub dev: String,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        let out = run(Command::new("losetup").args(["--find", "--show"]).arg(file));
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        LoopDevice { dev }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("losetup")
                .args(["-d", &self.dev])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                self.wait_gone();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not detach {}", self.dev);
    }
}

/// A mounted filesystem; unmounted on drop.
pub struct Mount {
    pub target: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(dev: &str, target: &Path) -> Mount {
        std::fs::create_dir_all(target).unwrap();
        run(Command::new("mount").arg(dev).arg(target));
        Mount {
            target: target.to_path_buf(),
            mounted: true,
        }
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            run(Command::new("umount").arg(&self.target));
            self.mounted = false;
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.target)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.target).status();
            }
        }
    }
}

/// Every path under `dir`, except logs (which grow).
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "log") {
                continue;
            }
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Bytes of disk actually allocated under `dir`, recursively (a sparse file
/// counts only its written blocks): how a test sees writes land on a
/// replica without knowing its file layout.
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// True when `path` is a mount point right now (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    table.lines().any(|line| {
        // Field 5 is the mount point, with spaces and the like octal-escaped.
        line.split(' ')
            .nth(4)
            .map(|m| Path::new(&m.replace("\\040", " ")) == want)
            .unwrap_or(false)
    })
}

impl LoopDevice {
    /// `losetup -d` on a device something still holds open (udev's blkid,
    /// a late close) only marks it for auto-clear and returns; the kernel
    /// unbinds the file when the last opener goes. Waits for that, up to
    /// 10 s, so whoever checks next sees the device really free.
    fn wait_gone(&self) {
        let name = self.dev.trim_start_matches("/dev/");
        let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
        let deadline = Instant::now() + Duration::from_secs(10);
        while backing.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if backing.exists() {
            eprintln!("{} still bound 10 s after losetup -d", self.dev);
        }
    }

    /// Like [`attach`](Self::attach), with `--direct-io=on`: the loop device
    /// reads and writes its file with O_DIRECT, so no page cache over the
    /// file hides the data path from the filesystem on top.
    pub fn attach_direct_io(file: &Path) -> LoopDevice {
        let out = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file));
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        LoopDevice { dev }
    }
}

/// The loop devices now bound to `file` (per
/// /sys/block/loop*/loop/backing_file): empty once every one is detached.
pub fn loop_devices_backed_by(file: &Path) -> Vec<String> {
    let want = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
    let Ok(blocks) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    blocks
        .flatten()
        .filter_map(|b| {
            let backing = std::fs::read_to_string(b.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end_matches('\n');
            let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
            (Path::new(backing) == want)
                .then(|| format!("/dev/{}", b.file_name().to_string_lossy()))
        })
        .collect()
}

impl FuseExport {
    /// Whether the `nbdfuse` process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }
}

/// One fio job through fio's own `nbd` engine, running in the background
/// (killed if the test ends first). Its result is fio's JSON report, read
/// when it exits.
pub struct Fio {
    pub proc: Proc,
    json: PathBuf,
}

impl Fio {
    /// Starts `fio --name=NAME --ioengine=nbd --uri=URI JOB...` in `dir`.
    ///
    /// Runs with `--continue_on_error=all`: fio then counts every IO and
    /// verify error in `total_err` instead of stopping at the first, and
    /// exits 0 whatever happened, so [`FioReport::assert_clean`] checks the
    /// report, not only the exit code.
    pub fn start(dir: &Path, name: &str, uri: &str, job: &[&str]) -> Fio {
        let json = dir.join(format!("fio-{name}.json"));
        let mut cmd = Command::new("fio");
        cmd.current_dir(dir)
            .arg(format!("--name={name}"))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={uri}"))
            .args([
                "--output-format=json",
                "--continue_on_error=all",
                "--verify_state_save=0",
                "--eta=never",
                // Jobs as threads of the one fio process, so killing it
                // (when a test fails) leaves no job process behind.
                "--thread",
            ])
            .arg(format!("--output={}", json.display()))
            .args(job);
        let proc = Proc::spawn(
            &format!("fio {name}"),
            &mut cmd,
            dir.join(format!("fio-{name}.log")),
        );
        Fio { proc, json }
    }

    /// Starts the job and waits for it.
    pub fn run(dir: &Path, name: &str, uri: &str, job: &[&str], timeout: Duration) -> FioReport {
        Fio::start(dir, name, uri, job).wait(timeout)
    }

    /// Waits up to `timeout` for fio to finish and reads its report.
    pub fn wait(mut self, timeout: Duration) -> FioReport {
        let Some(status) = self.proc.wait_exit(timeout) else {
            panic!("fio still running after {timeout:?}");
        };
        let log = self.proc.log_text();
        let text = std::fs::read_to_string(&self.json).unwrap_or_default();
        // fio may print a line of its own before the JSON document.
        let start = text.find('{').unwrap_or_else(|| {
            panic!("fio ({status}) wrote no JSON report:\n{text}\nits output:\n{log}")
        });
        let json: serde_json::Value = serde_json::from_str(&text[start..])
            .unwrap_or_else(|e| panic!("fio's report is not JSON ({e}):\n{text}\n{log}"));
        FioReport { status, json, log }
    }
}

/// fio's JSON report of one run, with its exit status and output.
pub struct FioReport {
    pub status: std::process::ExitStatus,
    pub json: serde_json::Value,
    pub log: String,
}

impl FioReport {
    pub fn jobs(&self) -> &[serde_json::Value] {
        self.json["jobs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// fio exited 0 and every job reports no error at all: `error` (the
    /// job's first error, an errno) and `total_err`/`first_error` (every IO
    /// and verify error counted under `--continue_on_error`) are all 0.
    pub fn assert_clean(&self) {
        let show = || format!("fio output:\n{}\nreport:\n{:#}", self.log, self.json);
        assert!(
            self.status.success(),
            "fio failed ({}); {}",
            self.status,
            show()
        );
        assert!(!self.jobs().is_empty(), "fio reported no job; {}", show());
        for job in self.jobs() {
            let name = job["jobname"].as_str().unwrap_or("?");
            for key in ["error", "total_err", "first_error"] {
                let v = job[key]
                    .as_i64()
                    .unwrap_or_else(|| panic!("job {name} has no {key:?}; {}", show()));
                assert_eq!(v, 0, "fio job {name}: {key} = {v}; {}", show());
            }
        }
    }

    /// [`assert_clean`](Self::assert_clean), and fio wrote `size` bytes and
    /// read all of them back to verify them.
    pub fn assert_wrote_and_verified(&self, size: u64) {
        self.assert_clean();
        assert_eq!(self.io_bytes("write"), size);
        assert_eq!(
            self.io_bytes("read"),
            size,
            "fio did not read back (verify) the whole volume"
        );
    }

    /// Bytes fio moved in one direction ("read" or "write"), over all jobs.
    pub fn io_bytes(&self, direction: &str) -> u64 {
        self.jobs()
            .iter()
            .map(|j| j[direction]["io_bytes"].as_u64().unwrap_or(0))
            .sum()
    }
}

/// Asks a process to stop (SIGTERM) and waits for it; panics with its log
/// if it does not exit within `timeout`.
pub fn sigterm_and_wait(proc: &mut Proc, timeout: Duration) -> std::process::ExitStatus {
    proc.signal(nix::sys::signal::Signal::SIGTERM);
    proc.wait_exit(timeout).unwrap_or_else(|| {
        panic!(
            "{} did not stop within {timeout:?} of SIGTERM:\n{}",
            proc.name,
            proc.log_text()
        )
    })
}

pub mod bad_input;
pub mod netns;

/// fio options for random writes at queue depth 32 over `size` bytes, each
/// block verified with crc32c; `extra` appended.
pub fn verified_random_writes(block_size: &str, size: u64, extra: &[&str]) -> Vec<String> {
    let size = format!("--size={size}");
    [
        "--rw=randwrite",
        block_size,
        "--iodepth=32",
        "--verify=crc32c",
    ]
    .into_iter()
    .chain([size.as_str()])
    .chain(extra.iter().copied())
    .map(String::from)
    .collect()
}

/// A job's options as the `&str` slice `Fio` takes.
pub fn as_args(job: &[String]) -> Vec<&str> {
    job.iter().map(String::as_str).collect()
}

/// The value of field `name` in one of a daemon's log lines
/// (`... name=VALUE ...`, or `name="VALUE"` for text), without quotes.
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[at..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

/// Like [`log_field`], for a number; panics naming the line if the field
/// is missing or not a number.
pub fn log_number(line: &str, name: &str) -> u64 {
    log_field(line, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {name}= in log line {line:?}"))
}

/// The lines of `log` that contain every one of `needles`.
pub fn log_lines<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}
