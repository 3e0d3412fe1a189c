//! How much of the machine other processes took while a job ran: the CPU
//! time the whole machine spent busy (`/proc/stat`), minus what the bench
//! itself, its fio runs and its servers spent. A share near zero means the
//! job had the machine to itself; on a shared 2-core machine it often does
//! not, and its figures are then not worth much.

use std::time::Instant;

/// A point in time to measure from.
#[derive(Clone, Copy, Debug)]
pub struct CpuSnapshot {
    at: Instant,
    /// CPU seconds the machine has spent busy since boot.
    machine_busy_s: f64,
    /// CPU seconds spent by this process and its reaped children (fio,
    /// with its own job processes).
    fio_s: f64,
    /// CPU seconds spent by the live servers given.
    servers_s: f64,
}

impl CpuSnapshot {
    /// `servers`: pids of running children whose CPU time counts as ours.
    pub fn take(servers: &[u32]) -> Option<CpuSnapshot> {
        let ticks = clock_ticks_per_s()?;
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let machine_busy_s = machine_busy_ticks(&stat)? as f64 / ticks;
        let mut servers_s = 0.0;
        for pid in servers {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            servers_s += process_ticks(&stat)? as f64 / ticks;
        }
        Some(CpuSnapshot {
            at: Instant::now(),
            machine_busy_s,
            fio_s: own_and_reaped_children_s(),
            servers_s,
        })
    }

    /// The share (0-1) of all the machine's CPU time since `self` that went
    /// to other processes. Kernel work done for the bench outside its
    /// processes (write-back, interrupts) counts as other; a job that only
    /// measures itself, on an idle machine, reads a few percent.
    pub fn others_share_since(&self, later: &CpuSnapshot) -> f64 {
        let ours = (later.fio_s - self.fio_s) + (later.servers_s - self.servers_s);
        let others = (later.machine_busy_s - self.machine_busy_s) - ours;
        self.share_of_cores(later, others)
    }

    /// The share (0-1) of all the machine's CPU time since `self` that was
    /// busy, whoever spent it. Near 1, a job was held back by the CPU, not
    /// by the disk.
    pub fn busy_share_since(&self, later: &CpuSnapshot) -> f64 {
        self.share_of_cores(later, later.machine_busy_s - self.machine_busy_s)
    }

    /// `cpu_s` CPU seconds as a share of what every core could give
    /// between `self` and `later`.
    fn share_of_cores(&self, later: &CpuSnapshot, cpu_s: f64) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = later.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        (cpu_s / (wall * cores)).clamp(0.0, 1.0)
    }

    /// CPU time per IO since `self`, in µs, of fio (with the bench, which
    /// only waits meanwhile) and of the servers together, for a job that
    /// did `iops` IOs per second while measured. The time spans the ramp as
    /// well, when fio does IO at the same rate but does not count it, so
    /// the IOs are taken as `iops` × the whole time.
    pub fn per_io_since(&self, later: &CpuSnapshot, iops: f64) -> Option<CpuPerIo> {
        let ios = iops * later.at.duration_since(self.at).as_secs_f64();
        (ios >= 1.0).then(|| CpuPerIo {
            fio_us: (later.fio_s - self.fio_s).max(0.0) * 1e6 / ios,
            servers_us: (later.servers_s - self.servers_s).max(0.0) * 1e6 / ios,
        })
    }
}

/// CPU time one IO cost (µs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuPerIo {
    /// fio itself: the client's side.
    pub fio_us: f64,
    /// Every server process of the run (nbdkit, replica daemons, engines);
    /// those not serving the job's target sit idle and add next to nothing.
    pub servers_us: f64,
}

fn clock_ticks_per_s() -> Option<f64> {
    // SAFETY: sysconf reads a constant of the running system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (t > 0).then_some(t as f64)
}

/// Busy ticks on the `cpu` line of `/proc/stat`: everything but idle and
/// iowait (guest time is already inside user time).
fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

/// utime + stime of a process (all its threads) from `/proc/PID/stat`.
fn process_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; fields resume
    // after the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn own_and_reaped_children_s() -> f64 {
    let usage = |who| {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut r) } != 0 {
            return 0.0;
        }
        let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        s(r.ru_utime) + s(r.ru_stime)
    };
    usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = "cpu  100 5 50 1000 30 2 3 4 0 0\ncpu0 50 2 25 500 15 1 1 2 0 0\n";
        assert_eq!(machine_busy_ticks(stat), Some(100 + 5 + 50 + 2 + 3 + 4));
        let pid = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 77 23 0 0 20 0 4 0 5 0\n";
        assert_eq!(process_ticks(pid), Some(100));
    }

    #[test]
    fn the_share_is_a_fraction() {
        let before = CpuSnapshot::take(&[]).unwrap();
        let until = Instant::now() + std::time::Duration::from_millis(300);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = CpuSnapshot::take(&[]).unwrap();
        let share = before.others_share_since(&after);
        assert!((0.0..=1.0).contains(&share));
        // This thread alone kept one core busy the whole time.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy = before.busy_share_since(&after);
        assert!(busy <= 1.0 && busy >= 0.8 / cores, "busy {busy}");
    }
}
