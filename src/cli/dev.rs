//! `shorthorn dev`: a whole shorthorn on one machine, for a first try.
//!
//! Starts replica daemons and one engine as child processes of this one
//! (the same binary), on loopback, with data under one local directory;
//! creates the volume; prints how to use it; and on Ctrl-C stops everything
//! it started. Data stays in the directory, so a second run finds the same
//! volume with the same bytes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use shorthorn_engine::nbd::NbdListen;
use shorthorn_proto::{Request, VolumeName};
use shorthorn_replica::storage::store::DataDirLock;
use tokio::process::{Child, Command};

use super::size::{human, parse_size};

#[derive(Args)]
pub struct DevArgs {
    /// Where replica data, sockets and logs go.
    #[arg(long, default_value = "./shorthorn-data")]
    pub data_dir: PathBuf,
    /// Replicas of the volume (1 or 2); two replica daemons run either way.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub replicas: u8,
    /// Volume size, e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Volume name.
    #[arg(long, default_value = "dev")]
    pub name: VolumeName,
    /// Where the engine serves NBD (default: a unix socket in the data dir).
    #[arg(long, value_name = "unix:PATH|HOST:PORT")]
    pub nbd: Option<NbdListen>,
    /// Disk IO engine for the replica daemons: auto, uring or sync.
    #[arg(long, default_value = "auto", value_parser = ["auto", "uring", "sync"])]
    pub io_engine: String,
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, args: &[String], log: PathBuf) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("finding this program's path")?;
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating log {}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 15)
            )),
            _ => None,
        }
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
            {
                eprintln!("{} did not stop in 10 s; killing it", self.name);
                let _ = self.child.kill().await;
            }
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    super::volume::check_size(args.size)?;
    // Held until every process below has stopped: a second `dev` on the
    // same directory is refused before it touches the first one's logs.
    let _claimed = DataDirLock::claim(&args.data_dir)?;
    let data_dir = args.data_dir.canonicalize()?;
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;

    let mut procs: Vec<Proc> = Vec::new();
    let result = start_and_serve(&args, &data_dir, &logs, &mut procs).await;
    if !procs.is_empty() {
        eprintln!("\nstopping {} processes...", procs.len());
    }
    // Engine first (it flushes the volume to the replicas), then replicas.
    for p in procs.iter_mut().rev() {
        p.stop().await;
    }
    if result.is_ok() {
        eprintln!("stopped; data kept in {}", data_dir.display());
    }
    result
}

async fn start_and_serve(
    args: &DevArgs,
    data_dir: &Path,
    logs: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<()> {
    let mut replicas = Vec::new();
    for i in 1..=2 {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let dir = data_dir.join(format!("replica-{i}"));
        let name = format!("replica daemon {i}");
        procs.push(Proc::spawn(
            &name,
            &[
                "replica".into(),
                "serve".into(),
                "--data-dir".into(),
                dir.display().to_string(),
                "--listen".into(),
                addr.clone(),
                "--io-engine".into(),
                args.io_engine.clone(),
            ],
            logs.join(format!("replica-{i}.log")),
        )?);
        replicas.push(addr);
    }
    for (addr, proc) in replicas.iter().zip(procs.iter_mut()) {
        wait_for_replica(addr, proc).await?;
    }
    let replicas: Vec<String> = replicas.into_iter().take(args.replicas as usize).collect();
    super::volume::create(&args.name, args.size, &replicas, Duration::from_secs(10)).await?;

    let nbd = match &args.nbd {
        Some(n) => n.clone(),
        None => NbdListen::Unix(data_dir.join(format!("{}.sock", args.name))),
    };
    let mut engine_args = vec![
        "engine".to_string(),
        "serve".into(),
        args.name.to_string(),
        "--nbd".into(),
        nbd_arg(&nbd),
        "--run-dir".into(),
        data_dir.display().to_string(),
    ];
    for r in &replicas {
        engine_args.push("--replica".into());
        engine_args.push(r.clone());
    }
    procs.push(Proc::spawn(
        "engine",
        &engine_args,
        logs.join(format!("engine-{}.log", args.name)),
    )?);
    wait_for_nbd(&nbd, procs.last_mut().unwrap()).await?;

    print_welcome(args, &nbd, &replicas, logs);

    // Serve until asked to stop, or until a child dies on its own.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {
                for p in procs.iter_mut() {
                    if let Some(why) = p.exited() {
                        bail!("{why}");
                    }
                }
            }
        }
    }
}

fn nbd_arg(nbd: &NbdListen) -> String {
    match nbd {
        NbdListen::Unix(p) => format!("unix:{}", p.display()),
        NbdListen::Tcp(a) => a.to_string(),
    }
}

async fn wait_for_replica(addr: &str, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(why) = proc.exited() {
            bail!("{why}");
        }
        if super::admin_call(addr, Request::Ping, Duration::from_secs(2))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not come up on {addr} within 20 s", proc.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_nbd(nbd: &NbdListen, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(why) = proc.exited() {
            bail!("{why}");
        }
        let up = match nbd {
            NbdListen::Unix(p) => tokio::net::UnixStream::connect(p).await.is_ok(),
            NbdListen::Tcp(a) => tokio::net::TcpStream::connect(a).await.is_ok(),
        };
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the engine did not serve NBD within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_welcome(args: &DevArgs, nbd: &NbdListen, replicas: &[String], logs: &Path) {
    let uri = nbd.to_string();
    let (fio_target, fuse_source) = match nbd {
        NbdListen::Unix(p) => (format!("--uri='{uri}'"), format!("--unix {}", p.display())),
        NbdListen::Tcp(a) => (
            format!("--uri='{uri}'"),
            format!("--tcp {} {}", a.ip(), a.port()),
        ),
    };
    println!(
        "\nshorthorn dev is up: volume {name} ({size}), {n} replica(s) on {replicas}\n\
         \n  NBD URI: {uri}\n  logs:    {logs}\n\
         \nTry it from another terminal:\n\
         \n  # 1. fio, straight through its nbd engine (random writes, verified)\n\
         \x20 fio --name=try --ioengine=nbd {fio_target} --rw=randwrite --bs=4k --iodepth=32 \\\n\
         \x20     --size={fio_size} --verify=crc32c\n\
         \n  # 2. copy a disk image in and read it back\n\
         \x20 qemu-img convert -n -O raw my-disk.img '{uri}'\n\
         \x20 nbdcopy '{uri}' copy-back.img\n\
         \n  # 3. a real filesystem (as root): NBD -> nbdfuse -> loop device -> ext4\n\
         \x20 mkdir -p /tmp/sh-fuse /mnt/shorthorn\n\
         \x20 nbdfuse /tmp/sh-fuse/{name} {fuse_source} &\n\
         \x20 LOOP=$(losetup --find --show --direct-io=on /tmp/sh-fuse/{name})\n\
         \x20 mkfs.ext4 $LOOP && mount $LOOP /mnt/shorthorn\n\
         \x20 # ...and to undo: umount /mnt/shorthorn; losetup -d $LOOP; fusermount3 -u /tmp/sh-fuse\n\
         \n  # 4. the replicas' state, and rebuild progress after a failure\n\
         \x20 shorthorn volume status {name} --run-dir {run_dir}\n\
         \nPress Ctrl-C to stop every process this started.",
        name = args.name,
        size = human(args.size),
        // fio's file must fit in the volume.
        fio_size = (args.size / (1 << 20)).clamp(1, 256).to_string() + "M",
        n = replicas.len(),
        replicas = replicas.join(" and "),
        logs = logs.display(),
        run_dir = logs.parent().map(|p| p.display().to_string()).unwrap_or_default(),
    );
}
