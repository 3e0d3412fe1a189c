//! The workloads the bench measures: the seed's mixed workload and kbench's
//! set. Each knows its fio shape (pattern, block size, queue depth) and
//! which figure of fio's result it reports. Nothing here runs anything.

use clap::ValueEnum;

use crate::fio::FioResult;

/// One row of the results table.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    /// The seed's `randrw 75/25, 4k, iodepth 64`: read + write IOPS.
    #[value(name = "seed-randrw")]
    SeedRandrw,
    /// Random read IOPS, 4k, iodepth 64.
    #[value(name = "randread-iops")]
    RandreadIops,
    /// Random write IOPS, 4k, iodepth 64.
    #[value(name = "randwrite-iops")]
    RandwriteIops,
    /// Sequential read bandwidth, 128k, iodepth 64.
    #[value(name = "seqread-bw")]
    SeqreadBw,
    /// Sequential write bandwidth, 128k, iodepth 64.
    #[value(name = "seqwrite-bw")]
    SeqwriteBw,
    /// Random read mean completion latency, 4k, iodepth 1.
    #[value(name = "randread-lat")]
    RandreadLat,
    /// Random write mean completion latency, 4k, iodepth 1.
    #[value(name = "randwrite-lat")]
    RandwriteLat,
}

/// What a workload's figure measures, which decides its unit and which way
/// is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// IO operations per second (higher is better).
    Iops,
    /// MiB per second (higher is better).
    MibPerSec,
    /// Mean completion latency in microseconds (lower is better).
    LatencyUs,
}

impl Metric {
    pub fn lower_is_better(self) -> bool {
        self == Metric::LatencyUs
    }
}

/// shorthorn-2r's goal for a row, as a ratio to the raw disk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// The ratio must be at least this (IOPS, bandwidth).
    AtLeast(f64),
    /// The ratio must be at most this (latency).
    AtMost(f64),
}

impl Goal {
    /// How far `ratio` is from the goal: `None` when met, else the gap.
    pub fn shortfall(self, ratio: f64) -> Option<f64> {
        let gap = match self {
            Goal::AtLeast(g) => g - ratio,
            Goal::AtMost(g) => ratio - g,
        };
        (gap > 0.0).then_some(gap)
    }
}

/// The fio parameters that make a workload what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// fio's `--rw`.
    pub rw: &'static str,
    pub block_size_kib: u32,
    pub iodepth: u32,
    /// fio's `--rwmixread`, for mixed workloads.
    pub read_percent: Option<u32>,
}

/// Which side of fio's result a figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Read,
    Write,
    Both,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::SeedRandrw,
        Workload::RandreadIops,
        Workload::RandwriteIops,
        Workload::SeqreadBw,
        Workload::SeqwriteBw,
        Workload::RandreadLat,
        Workload::RandwriteLat,
    ];

    /// The name used on the command line, in progress lines and fio job names.
    pub fn name(self) -> &'static str {
        match self {
            Workload::SeedRandrw => "seed-randrw",
            Workload::RandreadIops => "randread-iops",
            Workload::RandwriteIops => "randwrite-iops",
            Workload::SeqreadBw => "seqread-bw",
            Workload::SeqwriteBw => "seqwrite-bw",
            Workload::RandreadLat => "randread-lat",
            Workload::RandwriteLat => "randwrite-lat",
        }
    }

    /// The row label in the results table.
    pub fn label(self) -> &'static str {
        match self {
            Workload::SeedRandrw => "seed randrw 75/25 4k QD64, IOPS r+w",
            Workload::RandreadIops => "random read 4k QD64, IOPS",
            Workload::RandwriteIops => "random write 4k QD64, IOPS",
            Workload::SeqreadBw => "seq read 128k QD64, MiB/s",
            Workload::SeqwriteBw => "seq write 128k QD64, MiB/s",
            Workload::RandreadLat => "random read 4k QD1, mean µs (lower is better)",
            Workload::RandwriteLat => "random write 4k QD1, mean µs (lower is better)",
        }
    }

    /// The 2-replica goal the project set for this row (issue 3).
    pub fn goal_2r(self) -> Goal {
        match self {
            Workload::SeedRandrw | Workload::RandwriteIops | Workload::SeqwriteBw => {
                Goal::AtLeast(0.50)
            }
            Workload::RandreadIops => Goal::AtLeast(0.60),
            Workload::SeqreadBw => Goal::AtLeast(0.70),
            Workload::RandreadLat | Workload::RandwriteLat => Goal::AtMost(3.0),
        }
    }

    /// Longhorn v1's published ratio to the raw disk for this row, where
    /// there is one: what users compare against.
    pub fn longhorn_v1(self) -> Option<&'static str> {
        match self {
            Workload::SeedRandrw => Some("0.50x"),
            Workload::RandwriteIops => Some("0.23x–0.27x"),
            Workload::RandreadIops => Some("0.62x–0.65x"),
            Workload::SeqwriteBw => Some("~0.9x"),
            Workload::SeqreadBw => None,
            Workload::RandwriteLat => Some("5x–8x"),
            Workload::RandreadLat => Some("2x–3.5x"),
        }
    }

    /// The row label without its metric, for tables whose cells all share
    /// one unit: `random write 4k QD64`.
    pub fn shape_label(self) -> &'static str {
        self.label().split(',').next().unwrap_or_default()
    }

    pub fn metric(self) -> Metric {
        match self {
            Workload::SeedRandrw | Workload::RandreadIops | Workload::RandwriteIops => Metric::Iops,
            Workload::SeqreadBw | Workload::SeqwriteBw => Metric::MibPerSec,
            Workload::RandreadLat | Workload::RandwriteLat => Metric::LatencyUs,
        }
    }

    pub fn shape(self) -> Shape {
        let (rw, block_size_kib, iodepth, read_percent) = match self {
            Workload::SeedRandrw => ("randrw", 4, 64, Some(75)),
            Workload::RandreadIops => ("randread", 4, 64, None),
            Workload::RandwriteIops => ("randwrite", 4, 64, None),
            Workload::SeqreadBw => ("read", 128, 64, None),
            Workload::SeqwriteBw => ("write", 128, 64, None),
            Workload::RandreadLat => ("randread", 4, 1, None),
            Workload::RandwriteLat => ("randwrite", 4, 1, None),
        };
        Shape {
            rw,
            block_size_kib,
            iodepth,
            read_percent,
        }
    }

    fn side(self) -> Side {
        match self {
            Workload::SeedRandrw => Side::Both,
            Workload::RandreadIops | Workload::SeqreadBw | Workload::RandreadLat => Side::Read,
            Workload::RandwriteIops | Workload::SeqwriteBw | Workload::RandwriteLat => Side::Write,
        }
    }

    /// Whether the workload only writes.
    pub fn writes_only(self) -> bool {
        self.side() == Side::Write
    }

    /// The workload's figure from one fio run, in the unit of its metric;
    /// `None` when fio did no IO on the side that counts (a broken run, not
    /// a slow one).
    pub fn figure(self, result: &FioResult) -> Option<f64> {
        let sides = match self.side() {
            Side::Read => vec![&result.read],
            Side::Write => vec![&result.write],
            Side::Both => vec![&result.read, &result.write],
        };
        if sides.iter().any(|s| s.total_ios == 0) {
            return None;
        }
        Some(match self.metric() {
            Metric::Iops => sides.iter().map(|s| s.iops).sum(),
            Metric::MibPerSec => {
                sides.iter().map(|s| s.bw_bytes as f64).sum::<f64>() / (1024.0 * 1024.0)
            }
            // Latency rows are single-sided.
            Metric::LatencyUs => sides[0].clat_mean_ns / 1000.0,
        })
    }

    /// The figure of one of `copies` fio jobs that ran side by side and
    /// were reported as a group: fio sums their IOPS and bandwidth, and
    /// averages their latency.
    pub fn per_copy(self, group_figure: f64, copies: usize) -> f64 {
        match self.metric() {
            Metric::Iops | Metric::MibPerSec => group_figure / copies.max(1) as f64,
            Metric::LatencyUs => group_figure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn names_match_the_command_line() {
        for w in Workload::ALL {
            let parsed = Workload::from_str(w.name(), false).unwrap();
            assert_eq!(parsed, w);
        }
    }

    #[test]
    fn latency_rows_are_queue_depth_one() {
        for w in Workload::ALL {
            let qd1 = w.shape().iodepth == 1;
            assert_eq!(qd1, w.metric() == Metric::LatencyUs, "{}", w.name());
        }
    }
}
