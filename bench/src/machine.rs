//! Where a run happened: date, cores, memory, kernel, the disk and
//! filesystem under the work directory, shorthorn's git revision, the tool
//! versions and the load on the machine. Best effort: anything that cannot
//! be found is reported as unknown rather than failing the run.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug)]
pub struct Machine {
    pub cores: String,
    pub memory: String,
    pub kernel: String,
    pub disk: String,
}

impl Machine {
    pub fn probe(work_dir: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|m| m.trim().to_string());
        let n = std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_else(|_| "?".into());
        let cores = match model {
            Some(m) => format!("{n} × {m}"),
            None => n,
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<u64>().ok())
            .map(|k| format!("{:.1} GiB", k as f64 / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cores,
            memory,
            kernel,
            disk: describe_disk(work_dir),
        }
    }
}

/// `/dev/vda (ext4; virtio_blk)`: the device and filesystem under `dir`
/// (from `df`), with the disk's model or driver from sysfs when known.
fn describe_disk(dir: &Path) -> String {
    let out = Command::new("df")
        .args(["--output=source,fstype"])
        .arg(dir)
        .output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => return "unknown (df failed)".into(),
    };
    let Some(line) = text.lines().nth(1) else {
        return "unknown".into();
    };
    let mut fields = line.split_whitespace();
    let (source, fstype) = (fields.next().unwrap_or("?"), fields.next().unwrap_or("?"));
    let mut about = vec![fstype.to_string()];
    if let Some(dev) = source.strip_prefix("/dev/") {
        about.extend(sysfs_disk(dev));
    }
    format!("{source} ({})", about.join("; "))
}

/// Model and driver of the whole disk holding block device `dev` (which
/// may be a partition).
fn sysfs_disk(dev: &str) -> Vec<String> {
    let mut class = Path::new("/sys/class/block").join(dev);
    if class.join("partition").exists() {
        // A partition's sysfs directory sits inside its disk's.
        if let Some(parent) = std::fs::canonicalize(&class)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            class = parent;
        }
    }
    let read = |name: &str| {
        std::fs::read_to_string(class.join(name))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let mut out = Vec::new();
    // The vendor alone is often a bare PCI id (virtio's is 0x1af4): only
    // worth showing next to a model name.
    if let Some(model) = read("device/model") {
        out.push(match read("device/vendor") {
            Some(vendor) => format!("{vendor} {model}"),
            None => model,
        });
    }
    if let Some(driver) = std::fs::read_link(class.join("device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    {
        out.push(driver);
    }
    out
}

/// shorthorn's revision: `git rev-parse --short HEAD`, plus `-dirty` when
/// tracked files differ from it.
pub fn git_revision(repo: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]).filter(|o| o.status.success()) else {
        return "unknown (not a git checkout)".into();
    };
    let rev = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{rev}-dirty")
    } else {
        rev
    }
}

/// The first line of `PROGRAM --version`, e.g. `fio-3.33`.
pub fn tool_version(program: &str) -> Option<String> {
    let o = Command::new(program).arg("--version").output().ok()?;
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

/// Now, as `2025-11-21 06:40 UTC`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_string(secs)
}

fn utc_string(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    let rem = unix_secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A command line as one could paste it into a shell.
pub fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_string(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_string(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_string(1_763_707_260), "2025-11-21 06:41 UTC");
    }

    #[test]
    fn command_lines_quote_what_needs_it() {
        let args = ["shorthorn", "bench", "--note", "tests ran", "--dir=/a b"];
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            shell_line(&args),
            "shorthorn bench --note 'tests ran' '--dir=/a b'"
        );
    }

    #[test]
    fn this_machine_is_described() {
        let m = Machine::probe(Path::new("."));
        assert!(!m.kernel.is_empty());
        assert!(!m.cores.is_empty());
    }
}
