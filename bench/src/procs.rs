//! Child processes of the bench — servers and fio runs — behind a guard that
//! stops and reaps them when dropped, so an error, a panic or Ctrl-C never
//! leaves one running; plus the stop flag Ctrl-C sets and peak-RSS reading.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Set when the user asks the bench to stop; every wait checks it.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_set() {
            bail!("interrupted");
        }
        Ok(())
    }
}

/// A child process, stopped (SIGTERM, then SIGKILL after a grace period)
/// and reaped when dropped. Its stdout and stderr go to a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    stopped: bool,
}

/// How long a server gets between SIGTERM and SIGKILL (an engine flushes
/// its volume on the way out).
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            // Plain-text logs from the shorthorn servers (tracing colours
            // its output unless told not to).
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
            stopped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the end of the log if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.stopped = true;
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 15)
            );
        }
        Ok(())
    }

    /// Peak resident set size so far (`VmHWM`), in KiB; `None` once the
    /// process is gone.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        vm_hwm_kib(&status)
    }

    /// Waits for the process to exit by itself, polling the stop flag.
    pub fn wait(&mut self, timeout: Duration, stop: &StopFlag) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.stopped = true;
                return Ok(status);
            }
            stop.check()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not finish within {} s; log {}",
                    self.name,
                    timeout.as_secs(),
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not stop within {} s; killing it",
            self.name,
            grace.as_secs()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

/// Runs a command to completion with its output in `log`; an error if it
/// fails, with the end of its log.
pub fn run_to_end(
    name: &str,
    cmd: &mut Command,
    log: PathBuf,
    timeout: Duration,
    stop: &StopFlag,
) -> anyhow::Result<()> {
    let mut p = Proc::spawn(name, cmd, log)?;
    let status = p.wait(timeout, stop)?;
    if !status.success() {
        bail!(
            "{name} failed ({status}); last lines of {}:\n{}",
            p.log.display(),
            tail(&p.log, 15)
        );
    }
    Ok(())
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `VmHWM` from the text of `/proc/PID/status`, in KiB.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_peak_rss() {
        let status =
            "Name:\tshorthorn\nVmPeak:\t  123456 kB\nVmHWM:\t   20480 kB\nVmRSS:\t 10 kB\n";
        assert_eq!(vm_hwm_kib(status), Some(20480));
        assert_eq!(vm_hwm_kib("Name:\tx\n"), None);
    }

    #[test]
    fn a_dropped_guard_stops_its_process() {
        let dir = std::env::temp_dir();
        let log = dir.join(format!("shorthorn-bench-test-{}.log", std::process::id()));
        let p = Proc::spawn("sleep", Command::new("sleep").arg("600"), log.clone()).unwrap();
        let pid = p.pid();
        assert!(p.peak_rss_kib().is_some());
        drop(p);
        // Reaped, not a zombie: the pid has no /proc entry any more (or
        // belongs to some unrelated new process, which is not a sleep 600).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert_ne!(cmdline, b"sleep\x00600\x00");
        let _ = std::fs::remove_file(log);
    }

    #[test]
    fn a_failing_command_shows_its_log() {
        let log =
            std::env::temp_dir().join(format!("shorthorn-bench-fail-{}.log", std::process::id()));
        let e = run_to_end(
            "sh",
            Command::new("sh").args(["-c", "echo the reason >&2; exit 3"]),
            log.clone(),
            Duration::from_secs(10),
            &StopFlag::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("the reason"), "{e}");
        let _ = std::fs::remove_file(log);
    }
}
