//! fio, the real load generator: its command line for one job against one
//! target, and its JSON output turned into numbers. Results are read from
//! fio's `--output-format=json`, never from its human-readable text.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::workload::Shape;

/// How fio reaches a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FioTarget {
    /// A file on the local filesystem, through libaio with O_DIRECT.
    File(std::path::PathBuf),
    /// An NBD server, through fio's `nbd` engine (libnbd), by URI.
    Nbd(String),
    /// Several files in one directory (`STEM.0`, `STEM.1`, ...), each with a
    /// fio job of its own running the same shape at the same time, through
    /// libaio with O_DIRECT: what the disk gives each copy of the data when
    /// it holds several.
    Copies {
        dir: std::path::PathBuf,
        stem: &'static str,
        copies: usize,
    },
}

impl FioTarget {
    /// How many files, and fio jobs, the target has.
    pub fn copies(&self) -> usize {
        match self {
            FioTarget::Copies { copies, .. } => *copies,
            _ => 1,
        }
    }
}

/// One fio job: a shape run against a target for a time, or (prefill) once
/// over the whole target.
#[derive(Clone, Debug)]
pub struct Job<'a> {
    pub name: &'a str,
    pub target: &'a FioTarget,
    pub size_bytes: u64,
    pub shape: Shape,
    /// `None` writes or reads the whole target once (prefill); otherwise
    /// the job is time based.
    pub timing: Option<Timing>,
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub ramp: Duration,
    pub runtime: Duration,
}

/// The prefill shape: the whole target written sequentially in 1 MiB IOs.
pub const PREFILL: Shape = Shape {
    rw: "write",
    block_size_kib: 1024,
    iodepth: 16,
    read_percent: None,
};

impl Job<'_> {
    /// fio's arguments for this job, writing its JSON report to `output`.
    pub fn args(&self, output: &Path) -> Vec<String> {
        let mut a = vec![
            format!("--name={}", self.name),
            format!("--size={}", self.size_bytes),
            format!("--rw={}", self.shape.rw),
            format!("--bs={}k", self.shape.block_size_kib),
            format!("--iodepth={}", self.shape.iodepth),
            format!("--numjobs={}", self.target.copies()),
            // A fresh random sequence each run, and no map of blocks already
            // touched: keeps fio's own CPU cost, which competes with the
            // server on a small machine, low and equal for every target.
            "--randrepeat=0".into(),
            "--norandommap=1".into(),
            "--group_reporting=1".into(),
            "--output-format=json".into(),
            format!("--output={}", output.display()),
        ];
        if let Some(p) = self.shape.read_percent {
            a.push(format!("--rwmixread={p}"));
        }
        match self.target {
            FioTarget::File(path) => {
                a.push("--ioengine=libaio".into());
                a.push("--direct=1".into());
                a.push(format!("--filename={}", path.display()));
            }
            FioTarget::Nbd(uri) => {
                a.push("--ioengine=nbd".into());
                a.push(format!("--uri={uri}"));
            }
            FioTarget::Copies { dir, stem, .. } => {
                a.push("--ioengine=libaio".into());
                a.push("--direct=1".into());
                a.push(format!("--directory={}", dir.display()));
                // fio expands `$jobnum`: job 0 gets STEM.0, job 1 STEM.1.
                a.push(format!("--filename_format={stem}.$jobnum"));
            }
        }
        match self.timing {
            Some(t) => {
                a.push("--time_based=1".into());
                a.push(format!("--ramp_time={}ms", t.ramp.as_millis()));
                a.push(format!("--runtime={}ms", t.runtime.as_millis()));
            }
            // The prefill ends durable: flushed (an NBD FLUSH, or fsync on
            // the file) before any measurement starts.
            None => a.push("--end_fsync=1".into()),
        }
        a
    }

    pub fn command(&self, output: &Path) -> Command {
        let mut c = Command::new("fio");
        c.args(self.args(output));
        c
    }
}

/// One direction's figures from a fio job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirResult {
    pub total_ios: u64,
    pub iops: f64,
    pub bw_bytes: u64,
    /// Mean completion latency (fio's `clat_ns.mean`).
    pub clat_mean_ns: f64,
}

/// What the bench takes from one fio job's JSON report.
#[derive(Clone, Debug, PartialEq)]
pub struct FioResult {
    pub fio_version: String,
    pub read: DirResult,
    pub write: DirResult,
}

#[derive(Deserialize)]
struct Report {
    #[serde(rename = "fio version")]
    fio_version: String,
    jobs: Vec<ReportJob>,
}

#[derive(Deserialize)]
struct ReportJob {
    jobname: String,
    error: i64,
    read: ReportDir,
    write: ReportDir,
}

#[derive(Deserialize)]
struct ReportDir {
    total_ios: u64,
    iops: f64,
    bw_bytes: u64,
    clat_ns: ReportStats,
}

#[derive(Deserialize)]
struct ReportStats {
    mean: f64,
}

/// Parses fio's JSON report. fio prints notes such as `fio: connected to
/// NBD server` into the same stream before the JSON document, so the
/// document is taken from the first line that opens an object.
pub fn parse(text: &str) -> anyhow::Result<FioResult> {
    let start = if text.starts_with('{') {
        0
    } else {
        match text.find("\n{") {
            Some(i) => i + 1,
            None => bail!("no JSON document in fio's output: {}", first_line(text)),
        }
    };
    let report: Report = serde_json::from_str(&text[start..])
        .with_context(|| format!("fio's JSON report ({})", first_line(&text[start..])))?;
    let [job] = <[ReportJob; 1]>::try_from(report.jobs)
        .map_err(|jobs| anyhow::anyhow!("expected one job in fio's report, got {}", jobs.len()))?;
    if job.error != 0 {
        bail!(
            "fio job {} failed: error {} ({})",
            job.jobname,
            job.error,
            std::io::Error::from_raw_os_error(job.error as i32)
        );
    }
    let dir = |d: ReportDir| DirResult {
        total_ios: d.total_ios,
        iops: d.iops,
        bw_bytes: d.bw_bytes,
        clat_mean_ns: d.clat_ns.mean,
    };
    Ok(FioResult {
        fio_version: report.fio_version,
        read: dir(job.read),
        write: dir(job.write),
    })
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Workload;

    // Captured from fio 3.33 on this project's machines: fio's nbd engine
    // against nbdkit's file plugin (note the line fio prints before the
    // JSON), and libaio with O_DIRECT on a file.
    const NBD_SEED: &str = include_str!("../testdata/fio-nbd-seed-randrw.json");
    const LIBAIO_LAT: &str = include_str!("../testdata/fio-libaio-randread-lat.json");

    #[test]
    fn parses_a_mixed_nbd_job_behind_fios_notes() {
        let r = parse(NBD_SEED).unwrap();
        assert_eq!(r.fio_version, "fio-3.33");
        assert!(r.read.total_ios > 0 && r.write.total_ios > 0);
        // 75/25 mix: three reads for each write, give or take.
        let mix = r.read.iops / (r.read.iops + r.write.iops);
        assert!((0.70..0.80).contains(&mix), "read share {mix}");
        let total = Workload::SeedRandrw.figure(&r).unwrap();
        assert!((total - (r.read.iops + r.write.iops)).abs() < 1e-6);
    }

    #[test]
    fn parses_a_latency_job() {
        let r = parse(LIBAIO_LAT).unwrap();
        assert_eq!(r.write.total_ios, 0);
        let us = Workload::RandreadLat.figure(&r).unwrap();
        assert!((us - r.read.clat_mean_ns / 1000.0).abs() < 1e-9);
        assert!(us > 1.0 && us < 100_000.0, "{us} µs");
        // A write figure from a read-only job is a broken run, not a zero.
        assert_eq!(Workload::RandwriteLat.figure(&r), None);
    }

    #[test]
    fn a_failed_job_is_an_error() {
        let failed = LIBAIO_LAT.replacen("\"error\" : 0", "\"error\" : 5", 1);
        let e = parse(&failed).unwrap_err().to_string();
        assert!(e.contains("error 5"), "{e}");
        assert!(parse("fio: engine nbd not loadable\n").is_err());
    }

    #[test]
    fn command_lines_name_the_right_engine() {
        let file = FioTarget::File("/d/raw.img".into());
        let nbd = FioTarget::Nbd("nbd+unix:///?socket=/d/s.sock".into());
        let job = |target| Job {
            name: "randread-lat",
            target,
            size_bytes: 1 << 30,
            shape: Workload::RandreadLat.shape(),
            timing: Some(Timing {
                ramp: Duration::from_millis(500),
                runtime: Duration::from_secs(2),
            }),
        };
        let has_all = |a: &[String], wants: &[&str]| {
            for want in wants {
                assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
            }
        };
        let a = job(&file).args(Path::new("/o.json"));
        has_all(
            &a,
            &[
                "--ioengine=libaio",
                "--direct=1",
                "--filename=/d/raw.img",
                "--rw=randread",
                "--bs=4k",
                "--iodepth=1",
                "--size=1073741824",
                "--ramp_time=500ms",
                "--runtime=2000ms",
                "--output-format=json",
            ],
        );
        let a = job(&nbd).args(Path::new("/o.json"));
        assert!(a.contains(&"--ioengine=nbd".to_string()));
        assert!(a.contains(&"--uri=nbd+unix:///?socket=/d/s.sock".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("--direct")));
        assert!(a.contains(&"--numjobs=1".to_string()));
        let copies = FioTarget::Copies {
            dir: "/d".into(),
            stem: "raw-copy",
            copies: 2,
        };
        let a = job(&copies).args(Path::new("/o.json"));
        has_all(
            &a,
            &[
                "--numjobs=2",
                "--group_reporting=1",
                "--directory=/d",
                "--filename_format=raw-copy.$jobnum",
                "--direct=1",
            ],
        );
        assert!(!a.iter().any(|x| x.starts_with("--filename=")));
    }
}
