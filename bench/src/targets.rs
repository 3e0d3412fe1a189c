//! The four targets, set up side by side in one work directory: the raw
//! disk (a file), nbdkit's file plugin, and shorthorn 1- and 2-replica
//! volumes with their replica daemons and engines. Owns every server
//! process of a run and stops them all — engines first — when dropped.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;

use crate::fio::FioTarget;
use crate::procs::{run_to_end, Proc, StopFlag};
use crate::workload::Workload;
use crate::EngineMode;

/// One column of the results table.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetKind {
    /// A file in the work directory, through libaio with O_DIRECT.
    #[value(name = "raw")]
    Raw,
    /// nbdkit's file plugin serving a file in the work directory.
    #[value(name = "nbdkit-file")]
    NbdkitFile,
    /// A shorthorn volume with one replica.
    #[value(name = "shorthorn-1r")]
    Shorthorn1r,
    /// A shorthorn volume with two replicas.
    #[value(name = "shorthorn-2r")]
    Shorthorn2r,
    /// Two files in the work directory, each written by its own fio job at
    /// the same time (libaio, O_DIRECT); each cell is what one of them got.
    /// Both of shorthorn-2r's replicas live on this one disk, so this is the
    /// most its writes can get here. Write workloads only.
    #[value(name = "raw-2-copies")]
    RawTwoCopies,
}

impl TargetKind {
    pub const ALL: [TargetKind; 5] = [
        TargetKind::Raw,
        TargetKind::NbdkitFile,
        TargetKind::Shorthorn1r,
        TargetKind::Shorthorn2r,
        TargetKind::RawTwoCopies,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Raw => "raw",
            TargetKind::NbdkitFile => "nbdkit-file",
            TargetKind::Shorthorn1r => "shorthorn-1r",
            TargetKind::Shorthorn2r => "shorthorn-2r",
            TargetKind::RawTwoCopies => "raw-2-copies",
        }
    }

    /// Whether the bench runs `workload` on this target. The two-copies
    /// disk stands for shorthorn-2r's writes, which go to both replicas;
    /// its reads go to one, so for them the raw disk is the comparison.
    pub fn runs(self, workload: Workload) -> bool {
        self != TargetKind::RawTwoCopies || workload.writes_only()
    }

    fn replicas(self) -> usize {
        match self {
            TargetKind::Shorthorn1r => 1,
            TargetKind::Shorthorn2r => 2,
            _ => 0,
        }
    }
}

/// Everything a run creates in the work directory, by name; the bench
/// removes these and nothing else.
const RAW_FILE: &str = "raw.img";
const NBDKIT_FILE: &str = "nbdkit-file.img";
/// The two-copies target's files: `raw-copy.0` and `raw-copy.1` (fio names
/// them from the job number).
const RAW_COPY_STEM: &str = "raw-copy";
const RAW_COPIES: usize = 2;
const REPLICA_DIRS: [&str; 2] = ["replica-1", "replica-2"];
/// Replica daemon 1's engine-control socket when it hosts the engines.
const ENGINE_CONTROL: &str = "r1-engines.ctl";

fn socket_name(kind: TargetKind) -> String {
    format!("{}.sock", kind.name())
}

/// Removes what an earlier run left (with `--keep`, or killed), so every
/// run starts from empty targets.
pub fn remove_leftovers(dir: &Path) -> anyhow::Result<()> {
    for name in [RAW_FILE, NBDKIT_FILE] {
        remove_if_present(&dir.join(name))?;
    }
    for i in 0..RAW_COPIES {
        remove_if_present(&dir.join(format!("{RAW_COPY_STEM}.{i}")))?;
    }
    for kind in TargetKind::ALL {
        remove_if_present(&dir.join(socket_name(kind)))?;
    }
    for name in REPLICA_DIRS {
        let d = dir.join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Replica daemon 1 or 2.
    Replica(usize),
    Engine(TargetKind),
    Nbdkit,
}

struct Server {
    role: Role,
    proc: Proc,
}

/// The running targets of one bench run.
pub struct Lab {
    pub dir: PathBuf,
    pub logs: PathBuf,
    /// The targets in column order, with how fio reaches each.
    pub targets: Vec<(TargetKind, FioTarget)>,
    servers: Vec<Server>,
    /// Engines run inside replica daemon 1.
    hosted: bool,
}

/// What `Lab::start` needs to know.
pub struct LabConfig<'a> {
    pub dir: &'a Path,
    pub kinds: &'a [TargetKind],
    pub size_bytes: u64,
    pub shorthorn_exe: &'a Path,
    pub io_engine: &'a str,
    pub engines: EngineMode,
}

const START_TIMEOUT: Duration = Duration::from_secs(20);

impl Lab {
    /// Starts the servers the chosen targets need and creates their
    /// volumes. On error, whatever was started is stopped again.
    pub fn start(cfg: &LabConfig, stop: &StopFlag) -> anyhow::Result<Lab> {
        let logs = cfg.dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let mut lab = Lab {
            dir: cfg.dir.to_path_buf(),
            logs,
            targets: Vec::new(),
            servers: Vec::new(),
            hosted: cfg.engines == EngineMode::Hosted,
        };
        let replicas_needed = cfg.kinds.iter().map(|k| k.replicas()).max().unwrap_or(0);
        let mut replica_addrs = Vec::new();
        for i in 1..=replicas_needed {
            replica_addrs.push(lab.start_replica(cfg, i, stop)?);
        }
        for &kind in cfg.kinds {
            let target = match kind {
                TargetKind::Raw => FioTarget::File(lab.dir.join(RAW_FILE)),
                TargetKind::RawTwoCopies => FioTarget::Copies {
                    dir: lab.dir.clone(),
                    stem: RAW_COPY_STEM,
                    copies: RAW_COPIES,
                },
                TargetKind::NbdkitFile => lab.start_nbdkit(cfg, stop)?,
                TargetKind::Shorthorn1r | TargetKind::Shorthorn2r => {
                    lab.start_volume(cfg, kind, &replica_addrs[..kind.replicas()], stop)?
                }
            };
            lab.targets.push((kind, target));
        }
        Ok(lab)
    }

    fn start_replica(
        &mut self,
        cfg: &LabConfig,
        index: usize,
        stop: &StopFlag,
    ) -> anyhow::Result<String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port")?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let data = self.dir.join(REPLICA_DIRS[index - 1]);
        let mut cmd = Command::new(cfg.shorthorn_exe);
        cmd.args(["replica", "serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", &addr, "--io-engine", cfg.io_engine]);
        if index == 1 && cfg.engines == EngineMode::Hosted {
            let control = self.dir.join(ENGINE_CONTROL);
            remove_if_present(&control)?;
            cmd.arg("--engine-control").arg(control);
        }
        let proc = Proc::spawn(
            &format!("replica daemon {index}"),
            &mut cmd,
            self.logs.join(format!("replica-{index}.log")),
        )?;
        self.servers.push(Server {
            role: Role::Replica(index),
            proc,
        });
        let server = self.servers.last_mut().unwrap();
        wait_until_up(&mut server.proc, stop, || TcpStream::connect(&addr).is_ok())?;
        Ok(addr)
    }

    fn start_nbdkit(&mut self, cfg: &LabConfig, stop: &StopFlag) -> anyhow::Result<FioTarget> {
        let file = self.dir.join(NBDKIT_FILE);
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(cfg.size_bytes))
            .with_context(|| format!("creating {}", file.display()))?;
        let socket = self.socket(TargetKind::NbdkitFile)?;
        // --exit-with-parent: nbdkit goes away even if the bench is killed
        // with SIGKILL and its guards never run.
        let proc = Proc::spawn(
            "nbdkit",
            Command::new("nbdkit")
                .args(["--foreground", "--exit-with-parent", "--unix"])
                .arg(&socket)
                .arg("file")
                .arg(&file),
            self.logs.join("nbdkit.log"),
        )?;
        self.servers.push(Server {
            role: Role::Nbdkit,
            proc,
        });
        self.wait_for_socket(&socket, stop)?;
        Ok(FioTarget::Nbd(nbd_uri(&socket)))
    }

    fn start_volume(
        &mut self,
        cfg: &LabConfig,
        kind: TargetKind,
        replicas: &[String],
        stop: &StopFlag,
    ) -> anyhow::Result<FioTarget> {
        let volume = format!("bench-{}r", replicas.len());
        let mut create = Command::new(cfg.shorthorn_exe);
        create.args(["volume", "create", &volume, "--size"]);
        create.arg(cfg.size_bytes.to_string());
        let mut serve = Command::new(cfg.shorthorn_exe);
        match cfg.engines {
            EngineMode::Hosted => serve
                .args(["engine", "start", "--daemon"])
                .arg(self.dir.join(ENGINE_CONTROL))
                .arg(&volume),
            EngineMode::Process => serve.args(["engine", "serve", &volume]),
        };
        for r in replicas {
            create.args(["--replica", r]);
            serve.args(["--replica", r]);
        }
        run_to_end(
            &format!("shorthorn volume create {volume}"),
            &mut create,
            self.logs.join(format!("volume-create-{volume}.log")),
            START_TIMEOUT,
            stop,
        )?;
        let socket = self.socket(kind)?;
        serve.arg("--nbd").arg(format!("unix:{}", socket.display()));
        // Control sockets next to the NBD sockets, not in /run.
        if let Some(dir) = socket.parent() {
            serve.arg("--run-dir").arg(dir);
        }
        if cfg.engines == EngineMode::Hosted {
            // Returns once the daemon serves the volume; the daemon stops
            // the engine (flushing it) when it is stopped itself.
            run_to_end(
                &format!("shorthorn engine start {volume}"),
                &mut serve,
                self.logs.join(format!("engine-start-{volume}.log")),
                START_TIMEOUT,
                stop,
            )?;
            return Ok(FioTarget::Nbd(nbd_uri(&socket)));
        }
        let proc = Proc::spawn(
            &format!("engine {}", kind.name()),
            &mut serve,
            self.logs.join(format!("engine-{}.log", kind.name())),
        )?;
        self.servers.push(Server {
            role: Role::Engine(kind),
            proc,
        });
        self.wait_for_socket(&socket, stop)?;
        Ok(FioTarget::Nbd(nbd_uri(&socket)))
    }

    fn socket(&self, kind: TargetKind) -> anyhow::Result<PathBuf> {
        let socket = self.dir.join(socket_name(kind));
        // sun_path holds 108 bytes with its NUL.
        if socket.as_os_str().len() > 100 {
            bail!(
                "the socket path {} is too long for a unix socket; pick a shorter --dir",
                socket.display()
            );
        }
        remove_if_present(&socket)?;
        Ok(socket)
    }

    fn wait_for_socket(&mut self, socket: &Path, stop: &StopFlag) -> anyhow::Result<()> {
        let server = self.servers.last_mut().unwrap();
        wait_until_up(&mut server.proc, stop, || {
            UnixStream::connect(socket).is_ok()
        })
    }

    /// An error if any server has exited: its figures would be wrong.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for s in &mut self.servers {
            s.proc.check_running()?;
        }
        Ok(())
    }

    /// Process ids of the running servers.
    pub fn server_pids(&self) -> Vec<u32> {
        self.servers.iter().map(|s| s.proc.pid()).collect()
    }

    /// Peak RSS (KiB) of every server so far, labelled for the report.
    pub fn peak_rss(&self) -> Vec<(String, Option<u64>)> {
        let kinds: Vec<TargetKind> = self.targets.iter().map(|(k, _)| *k).collect();
        self.servers
            .iter()
            .map(|s| {
                let label = match s.role {
                    Role::Replica(i) => {
                        let serves: Vec<&str> = kinds
                            .iter()
                            .filter(|k| k.replicas() >= i)
                            .map(|k| k.name())
                            .collect();
                        let hosts = if i == 1 && self.hosted {
                            " and hosts their engines"
                        } else {
                            ""
                        };
                        format!("replica daemon {i} (serves {}{hosts})", serves.join(", "))
                    }
                    Role::Engine(k) => format!("engine {}", k.name()),
                    Role::Nbdkit => "nbdkit file plugin".to_string(),
                };
                (label, s.proc.peak_rss_kib())
            })
            .collect()
    }

    /// Problems visible in the engines' logs that make a column misleading,
    /// such as a 2-replica volume that ran on one replica.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.servers {
            // Volumes whose engine logs into this server's log.
            let volumes: Vec<TargetKind> = match s.role {
                Role::Engine(kind) => vec![kind],
                Role::Replica(1) if self.hosted => self
                    .targets
                    .iter()
                    .map(|(k, _)| *k)
                    .filter(|k| k.replicas() > 0)
                    .collect(),
                _ => continue,
            };
            let log = std::fs::read_to_string(&s.proc.log).unwrap_or_default();
            for kind in volumes {
                let volume = format!("volume=bench-{}r", kind.replicas());
                // The engine's own messages for a replica left out of the
                // healthy set (crate shorthorn-engine, volume.rs).
                let dropped = log
                    .lines()
                    .filter(|l| l.contains(&volume))
                    .filter(|l| {
                        l.contains("dropped from the healthy set")
                            || l.contains("volume starts without it")
                    })
                    .count();
                if dropped > 0 {
                    out.push(format!(
                        "{}: the engine lost {dropped} replica(s) during the run (see {}); \
                         its figures are not those of a healthy volume",
                        kind.name(),
                        s.proc.log.display()
                    ));
                }
            }
        }
        out
    }

    /// Stops the servers: engines first (each flushes its volume to its
    /// replicas), then nbdkit and the replica daemons.
    pub fn stop(&mut self) {
        let engines_first = |s: &Server| !matches!(s.role, Role::Engine(_));
        self.servers.sort_by_key(engines_first);
        for s in &mut self.servers {
            s.proc.stop(Duration::from_secs(10));
        }
        self.servers.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop();
    }
}

/// libnbd's URI for an NBD server on a unix socket (default export).
pub fn nbd_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

fn wait_until_up(
    proc: &mut Proc,
    stop: &StopFlag,
    mut up: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        proc.check_running()?;
        stop.check()?;
        if up() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not come up within {} s; log {}",
                proc.name,
                START_TIMEOUT.as_secs(),
                proc.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
