//! The results table (workloads × targets, each cell the figure and its
//! ratio to the raw disk) and the peak-RSS table, as Markdown that also
//! reads well in a terminal. Pure formatting: no IO.

use crate::hops::{self, RoundTrips};
use crate::targets::TargetKind;
use crate::workload::{Goal, Metric, Workload};
use crate::EngineMode;

/// Figures of one run, by workload and target: one figure per round, in
/// the order the rounds ran.
#[derive(Clone, Debug)]
pub struct Table {
    pub targets: Vec<TargetKind>,
    pub rows: Vec<(Workload, Vec<Vec<f64>>)>,
}

/// The peak-RSS goal for the engine and each replica daemon (issue 3).
pub const RSS_GOAL_KIB: u64 = 64 * 1024;

impl Table {
    pub fn new(workloads: &[Workload], targets: &[TargetKind]) -> Table {
        Table {
            targets: targets.to_vec(),
            rows: workloads
                .iter()
                .map(|&w| (w, vec![Vec::new(); targets.len()]))
                .collect(),
        }
    }

    /// Adds the next round's figure for one cell.
    pub fn add(&mut self, workload: Workload, target: TargetKind, figure: f64) {
        if let Some(cell) = self.cell_mut(workload, target) {
            cell.push(figure);
        }
    }

    /// Every round's figure for one cell (empty if never measured).
    pub fn figures(&self, workload: Workload, target: TargetKind) -> &[f64] {
        let col = self.targets.iter().position(|&t| t == target);
        let row = self.rows.iter().find(|(w, _)| *w == workload);
        match (col, row) {
            (Some(col), Some((_, cells))) => &cells[col],
            _ => &[],
        }
    }

    /// The cell's figure: the median over its rounds.
    pub fn get(&self, workload: Workload, target: TargetKind) -> Option<f64> {
        median(self.figures(workload, target).to_vec())
    }

    /// The cell's ratio to the raw disk: per round, the figure over the raw
    /// disk's figure from the same round (measured right next to it), then
    /// the median of those. Machine noise that lasts minutes moves both
    /// figures of a round together, so it cancels out of each ratio.
    pub fn ratio(&self, workload: Workload, target: TargetKind) -> Option<f64> {
        median(self.round_ratios(workload, target))
    }

    /// The lowest and highest per-round ratio, when there are several rounds.
    pub fn ratio_range(&self, workload: Workload, target: TargetKind) -> Option<(f64, f64)> {
        spread(&self.round_ratios(workload, target))
    }

    /// The cell's figure in round `round` over the raw disk's in the same
    /// round, once both were measured.
    pub fn round_ratio(&self, workload: Workload, target: TargetKind, round: usize) -> Option<f64> {
        let raw = *self.figures(workload, TargetKind::Raw).get(round)?;
        let v = *self.figures(workload, target).get(round)?;
        (raw > 0.0).then(|| v / raw)
    }

    fn round_ratios(&self, workload: Workload, target: TargetKind) -> Vec<f64> {
        (0..self.figures(workload, target).len())
            .filter_map(|round| self.round_ratio(workload, target, round))
            .collect()
    }

    fn cell_mut(&mut self, workload: Workload, target: TargetKind) -> Option<&mut Vec<f64>> {
        let col = self.targets.iter().position(|&t| t == target)?;
        let (_, cells) = self.rows.iter_mut().find(|(w, _)| *w == workload)?;
        Some(&mut cells[col])
    }

    /// A table's first line: the workload column, then one per target.
    fn header(&self) -> Vec<String> {
        let mut header = vec!["workload".to_string()];
        header.extend(self.targets.iter().map(|t| t.name().to_string()));
        header
    }

    /// The Markdown table, columns padded to line up. With several rounds a
    /// raw cell also shows its lowest and highest figure, and every other
    /// cell its lowest and highest per-round ratio.
    pub fn render(&self) -> String {
        let mut lines = vec![self.header()];
        for (w, _) in &self.rows {
            let mut line = vec![w.label().to_string()];
            for &t in &self.targets {
                let figures = self.figures(*w, t);
                let show = |v: f64| format_figure(w.metric(), v);
                line.push(match (self.get(*w, t), self.ratio(*w, t)) {
                    (None, _) => "—".to_string(),
                    (Some(v), _) if t == TargetKind::Raw => match spread(figures) {
                        Some((lo, hi)) => format!("{} ({}–{})", show(v), show(lo), show(hi)),
                        None => show(v),
                    },
                    (Some(v), Some(r)) => match self.ratio_range(*w, t) {
                        Some((lo, hi)) => format!(
                            "{} ({}; {}–{})",
                            show(v),
                            format_ratio(r),
                            format_ratio(lo),
                            format_ratio(hi)
                        ),
                        None => format!("{} ({})", show(v), format_ratio(r)),
                    },
                    (Some(v), None) => show(v),
                });
            }
            lines.push(line);
        }
        markdown(&lines)
    }
}

/// The middle value (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// The lowest and highest of two or more values.
fn spread(values: &[f64]) -> Option<(f64, f64)> {
    if values.len() < 2 {
        return None;
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo, hi))
}

/// The legend printed under the table.
pub const LEGEND: &str = "Each cell: the figure, and in brackets its ratio to the raw disk in \
the same run. IOPS and MiB/s: higher is better. Latency rows (mean completion latency, µs): \
the ratio is latency / raw latency, so lower is better. raw-2-copies: two files on the same \
disk written at once, each by its own fio job; the cell is what one of them got. Both of \
shorthorn-2r's replicas live on this disk, so that is the most its writes can get here (on a \
cluster each replica has a node's disk to itself). With several rounds (--rounds), a cell is \
the median over the rounds and its ratio the median of the per-round ratios, each taken against \
the raw job of the same round; after the ratio come the lowest and highest per-round ratio, and \
the raw column shows its lowest and highest figure.";

/// shorthorn-2r against its goals, one line per measured row, with what
/// this machine allows (see [`bound_2r`]) and Longhorn v1's published ratio
/// beside it; `None` without a raw and a shorthorn-2r column. `trips` holds
/// each round's socket round trips.
pub fn render_goals(table: &Table, trips: &[RoundTrips], engines: EngineMode) -> Option<String> {
    if !table.targets.contains(&TargetKind::Raw)
        || !table.targets.contains(&TargetKind::Shorthorn2r)
    {
        return None;
    }
    let mut lines = vec![vec![
        "workload".to_string(),
        "shorthorn-2r".to_string(),
        "goal".to_string(),
        "bound on this machine".to_string(),
        "Longhorn v1 (published)".to_string(),
        "verdict".to_string(),
    ]];
    for (w, _) in &table.rows {
        let Some(ratio) = table.ratio(*w, TargetKind::Shorthorn2r) else {
            continue;
        };
        let goal = w.goal_2r();
        let goal_text = match goal {
            Goal::AtLeast(g) => format!(">= {}", format_ratio(g)),
            Goal::AtMost(g) => format!("<= {}", format_ratio(g)),
        };
        let bound = bound_2r(table, *w, trips, engines);
        let verdict = match goal.shortfall(ratio) {
            None => "met".to_string(),
            // The bound itself misses the goal: no engine reaches it here.
            Some(gap) if bound.is_some_and(|b| goal.shortfall(b.ratio).is_some()) => {
                format!("short by {gap:.2}; goal beyond this machine's bound")
            }
            Some(gap) => format!("short by {gap:.2}"),
        };
        lines.push(vec![
            w.shape_label().to_string(),
            format_ratio(ratio),
            goal_text,
            bound.map_or("—".to_string(), |b| b.to_string()),
            w.longhorn_v1().unwrap_or("—").to_string(),
            verdict,
        ]);
    }
    (lines.len() > 1).then(|| markdown(&lines))
}

/// The best ratio to the raw disk any 2-replica volume could show on one
/// row of this run, whatever its engine costs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub ratio: f64,
    kind: BoundKind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum BoundKind {
    /// Writes: both replicas share this disk, so they get at most what
    /// `raw-2-copies` got.
    TwoCopies,
    /// Queue depth 1: the raw disk's latency plus the socket round trips
    /// each IO waits for, as measured in the same rounds.
    Hops(&'static str),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            BoundKind::TwoCopies => write!(f, "{} (raw-2-copies)", format_ratio(self.ratio)),
            BoundKind::Hops(hops) => write!(f, "{} (raw + {hops})", format_ratio(self.ratio)),
        }
    }
}

/// What this machine allows shorthorn-2r on row `w`: for the throughput
/// rows that write, raw-2-copies' ratio (a ceiling); for the latency rows,
/// per round the raw latency plus the round trips of the socket hops the
/// IO crosses, over the raw latency (a floor), the median over the rounds.
/// `None` where the run measured neither (and for reads at depth 64, which
/// one replica serves).
pub fn bound_2r(
    table: &Table,
    w: Workload,
    trips: &[RoundTrips],
    engines: EngineMode,
) -> Option<Bound> {
    if w.metric() == Metric::LatencyUs {
        let hops = hops::hops(2, w.writes_only(), engines);
        let floors = table
            .figures(w, TargetKind::Raw)
            .iter()
            .zip(trips)
            .filter(|(raw, _)| **raw > 0.0)
            .map(|(raw, trip)| (raw + hops.cost_us(trip)) / raw)
            .collect();
        return median(floors).map(|ratio| Bound {
            ratio,
            kind: BoundKind::Hops(hops.describe()),
        });
    }
    if w.writes_only() {
        return table.ratio(w, TargetKind::RawTwoCopies).map(|ratio| Bound {
            ratio,
            kind: BoundKind::TwoCopies,
        });
    }
    None
}

/// One line on the socket round trips measured, for the run's header.
pub fn describe_trips(trips: &[RoundTrips]) -> Option<String> {
    let unix = median(trips.iter().map(|t| t.unix_us).collect())?;
    let tcp = median(trips.iter().map(|t| t.tcp_us).collect())?;
    Some(format!(
        "socket round trips of a 4 KiB write and its reply between two threads: unix {} µs, \
         TCP loopback {} µs{}",
        three_digits(unix),
        three_digits(tcp),
        if trips.len() > 1 {
            " (medians over the rounds)"
        } else {
            ""
        }
    ))
}

/// The legend printed under the goals table.
pub const GOALS_LEGEND: &str = "Bound on this machine: about the best any 2-replica volume could \
show here, however little its engine cost. Write rows at depth 64: what raw-2-copies got, since \
both replicas write to this one disk. Depth-1 rows: the raw latency plus the socket round trips \
the IO waits for (the NBD client's unix socket, and TCP to each replica it waits for that is \
reached over TCP: with engines hosted in replica daemon 1, the second replica of a write), each \
timed between two threads in the same round (fio's own cost per IO, in the raw figure, stands in \
for the NBD client's). Where the bound itself misses the goal, no engine can meet it on this \
machine.";

/// The CPU table: per workload and target, the CPU time one IO cost the
/// servers and fio, as `servers + fio` µs, then how busy the machine's
/// cores were meanwhile (medians over the rounds).
pub fn render_cpu(servers: &Table, fio: &Table, busy: &Table) -> String {
    let mut lines = vec![servers.header()];
    for (w, _) in &servers.rows {
        // Every cell here is µs of CPU, whatever the workload's metric.
        let mut line = vec![w.shape_label().to_string()];
        for &t in &servers.targets {
            line.push(match (servers.get(*w, t), fio.get(*w, t)) {
                (Some(s), Some(f)) => {
                    let busy = busy
                        .get(*w, t)
                        .map(|b| format!(" · {:.0}%", b * 100.0))
                        .unwrap_or_default();
                    format!("{} + {}{busy}", three_digits(s), three_digits(f))
                }
                _ => "—".to_string(),
            });
        }
        lines.push(line);
    }
    markdown(&lines)
}

/// The legend printed under the CPU table.
pub const CPU_LEGEND: &str = "Each cell: CPU time per IO in µs, servers + fio. Servers: every \
process the bench started (nbdkit, replica daemons, engines) while the job ran; those not \
serving the job's target sit idle. fio: the client's own side, the same work for every NBD \
target. Ramp time included (IOs counted at the measured rate). After the dot: how busy the \
machine's cores were during the job, as a share of all of them, counting every process and the \
kernel; near 100% a row is held back by the CPU rather than the disk. On a cluster, \
shorthorn-2r's replica daemon 2 runs on another node; here it shares these cores.";

/// The peak-RSS table: one line per server process.
pub fn render_rss(rows: &[(String, Option<u64>)]) -> String {
    let mut lines = vec![vec![
        "process".to_string(),
        "peak RSS (VmHWM)".to_string(),
        "under 64 MiB".to_string(),
    ]];
    for (name, kib) in rows {
        let (rss, ok) = match kib {
            Some(k) => (
                format!("{:.1} MiB", *k as f64 / 1024.0),
                if *k < RSS_GOAL_KIB { "yes" } else { "NO" }.to_string(),
            ),
            None => ("gone".to_string(), "?".to_string()),
        };
        lines.push(vec![name.clone(), rss, ok]);
    }
    markdown(&lines)
}

/// A figure in its metric's unit: `15.4k` IOPS, `812 MiB/s`, `68.2 µs`.
pub fn format_figure(metric: Metric, v: f64) -> String {
    match metric {
        Metric::Iops => format_count(v),
        Metric::MibPerSec => format!("{} MiB/s", three_digits(v)),
        Metric::LatencyUs => format!("{} µs", three_digits(v)),
    }
}

pub fn format_ratio(r: f64) -> String {
    format!("{r:.2}x")
}

/// A count with three significant digits and a k/M suffix: `950`, `5.06k`,
/// `15.4k`, `157k`, `1.23M`.
fn format_count(v: f64) -> String {
    if v >= 999_500.0 {
        format!("{}M", three_digits(v / 1e6))
    } else if v >= 999.5 {
        format!("{}k", three_digits(v / 1e3))
    } else {
        three_digits(v)
    }
}

/// Three significant digits for values under 1000, whole numbers above.
fn three_digits(v: f64) -> String {
    if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn markdown(lines: &[Vec<String>]) -> String {
    let cols = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    let width = |c: usize| {
        lines
            .iter()
            .filter_map(|l| l.get(c))
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
            .max(3)
    };
    let widths: Vec<usize> = (0..cols).map(width).collect();
    let row = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w - s.chars().count()));
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        out.push_str(&row(l
            .iter()
            .zip(&widths)
            .map(|(s, &w)| pad(s, w))
            .collect()));
        if i == 0 {
            out.push_str(&row(widths.iter().map(|&w| "-".repeat(w)).collect()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_like_the_seed_write_up() {
        assert_eq!(format_count(15_400.0), "15.4k");
        assert_eq!(format_count(5_061.0), "5.06k");
        assert_eq!(format_count(157_300.0), "157k");
        assert_eq!(format_count(950.0), "950");
        assert_eq!(format_count(1_234_000.0), "1.23M");
        assert_eq!(format_figure(Metric::LatencyUs, 68.24), "68.2 µs");
        assert_eq!(format_figure(Metric::MibPerSec, 1811.7), "1812 MiB/s");
        assert_eq!(format_ratio(0.6213), "0.62x");
    }

    #[test]
    fn the_table_shows_ratios_to_raw() {
        let targets = TargetKind::ALL;
        let workloads = [Workload::SeedRandrw, Workload::RandwriteLat];
        let mut t = Table::new(&workloads, &targets);
        t.add(Workload::SeedRandrw, TargetKind::Raw, 20_460.0);
        t.add(Workload::SeedRandrw, TargetKind::NbdkitFile, 10_230.0);
        t.add(Workload::SeedRandrw, TargetKind::Shorthorn2r, 12_700.0);
        t.add(Workload::RandwriteLat, TargetKind::Raw, 50.0);
        t.add(Workload::RandwriteLat, TargetKind::Shorthorn1r, 75.0);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("| workload "));
        for name in ["raw", "nbdkit-file", "shorthorn-1r", "shorthorn-2r"] {
            assert!(lines[0].contains(name));
        }
        assert!(lines[1].starts_with("| ---"));
        assert!(lines[2].contains("| 20.5k "), "{}", lines[2]);
        assert!(lines[2].contains("10.2k (0.50x)"), "{}", lines[2]);
        assert!(lines[2].contains("12.7k (0.62x)"), "{}", lines[2]);
        // An unmeasured cell says so rather than showing zero.
        assert!(lines[2].contains("—"));
        // Latency: the ratio is latency / raw, and the row says lower is better.
        assert!(lines[3].contains("lower is better"));
        assert!(lines[3].contains("75.0 µs (1.50x)"), "{}", lines[3]);
        // Columns line up: every line has its bars at the same places.
        let bars = |l: &str| {
            l.chars()
                .enumerate()
                .filter(|(_, c)| *c == '|')
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        assert!(lines.iter().all(|l| bars(l) == bars(lines[0])), "{text}");
    }

    #[test]
    fn rounds_give_medians_and_per_round_ratios() {
        let w = Workload::RandwriteIops;
        let mut t = Table::new(&[w], &[TargetKind::Raw, TargetKind::Shorthorn2r]);
        // The disk was fast in round 2 and slow in round 3; shorthorn
        // followed it, so each round's ratio is about the same.
        for (raw, sh) in [
            (100_000.0, 40_000.0),
            (150_000.0, 63_000.0),
            (80_000.0, 30_000.0),
        ] {
            t.add(w, TargetKind::Raw, raw);
            t.add(w, TargetKind::Shorthorn2r, sh);
        }
        assert_eq!(t.get(w, TargetKind::Raw), Some(100_000.0));
        assert_eq!(t.get(w, TargetKind::Shorthorn2r), Some(40_000.0));
        // Median of 0.40, 0.42 and 0.375, not median / median.
        assert_eq!(
            t.ratio(w, TargetKind::Shorthorn2r),
            Some(40_000.0 / 100_000.0)
        );
        assert_eq!(
            t.ratio_range(w, TargetKind::Shorthorn2r),
            Some((30_000.0 / 80_000.0, 63_000.0 / 150_000.0))
        );
        let text = t.render();
        assert!(text.contains("| 100k (80.0k–150k) |"), "{text}");
        assert!(text.contains("40.0k (0.40x; 0.38x–0.42x)"), "{text}");
        // An even number of rounds: the mean of the middle two.
        t.add(w, TargetKind::Raw, 100_000.0);
        t.add(w, TargetKind::Shorthorn2r, 50_000.0);
        assert_eq!(t.get(w, TargetKind::Shorthorn2r), Some(45_000.0));
        let r = t.ratio(w, TargetKind::Shorthorn2r).unwrap();
        assert!((r - 0.41).abs() < 1e-12, "{r}");
    }

    #[test]
    fn without_raw_there_are_no_ratios() {
        let mut t = Table::new(&[Workload::RandreadIops], &[TargetKind::Shorthorn1r]);
        t.add(Workload::RandreadIops, TargetKind::Shorthorn1r, 40_000.0);
        assert!(t.render().contains("| 40.0k "));
        assert!(!t.render().contains("x)"));
    }

    #[test]
    fn goals_are_judged_on_the_median_ratio() {
        let targets = [TargetKind::Raw, TargetKind::Shorthorn2r];
        let rows = [
            Workload::RandwriteIops,
            Workload::RandreadLat,
            Workload::SeqreadBw,
        ];
        let mut t = Table::new(&rows, &targets);
        t.add(Workload::RandwriteIops, TargetKind::Raw, 100_000.0);
        t.add(Workload::RandwriteIops, TargetKind::Shorthorn2r, 34_000.0);
        t.add(Workload::RandreadLat, TargetKind::Raw, 40.0);
        t.add(Workload::RandreadLat, TargetKind::Shorthorn2r, 100.0);
        let trips = [RoundTrips {
            unix_us: 40.0,
            tcp_us: 60.0,
        }];
        let text = render_goals(&t, &trips, EngineMode::Hosted).unwrap();
        let line = |w: &str| text.lines().find(|l| l.contains(w)).unwrap().to_string();
        let write = line("random write 4k QD64");
        assert!(
            write.contains("0.34x") && write.contains(">= 0.50x"),
            "{write}"
        );
        assert!(
            write.contains("0.23x–0.27x") && write.contains("short by 0.16"),
            "{write}"
        );
        // Latency: lower is better, so 2.5x meets <= 3x.
        let read = line("random read 4k QD1");
        assert!(
            read.contains("2.50x") && read.contains("<= 3.00x"),
            "{read}"
        );
        let verdict = read
            .trim_end()
            .trim_end_matches('|')
            .rsplit('|')
            .next()
            .unwrap();
        assert_eq!(verdict.trim(), "met", "{read}");
        // A row shorthorn-2r did not run is left out.
        assert!(!text.contains("seq read"), "{text}");
        // Without a shorthorn-2r column there is nothing to judge.
        let only_raw = Table::new(&rows, &[TargetKind::Raw]);
        assert!(render_goals(&only_raw, &trips, EngineMode::Hosted).is_none());
    }

    #[test]
    fn bounds_come_from_raw_2_copies_and_the_socket_round_trips() {
        let targets = [
            TargetKind::Raw,
            TargetKind::Shorthorn2r,
            TargetKind::RawTwoCopies,
        ];
        let rows = [
            Workload::RandwriteIops,
            Workload::RandreadIops,
            Workload::RandwriteLat,
            Workload::RandreadLat,
        ];
        let mut t = Table::new(&rows, &targets);
        let trips = [
            RoundTrips {
                unix_us: 40.0,
                tcp_us: 60.0,
            },
            RoundTrips {
                unix_us: 20.0,
                tcp_us: 30.0,
            },
        ];
        for (raw, copies, sh) in [
            (100_000.0, 45_000.0, 30_000.0),
            (50_000.0, 25_000.0, 16_000.0),
        ] {
            t.add(Workload::RandwriteIops, TargetKind::Raw, raw);
            t.add(Workload::RandwriteIops, TargetKind::RawTwoCopies, copies);
            t.add(Workload::RandwriteIops, TargetKind::Shorthorn2r, sh);
        }
        for (raw, sh) in [(50.0, 200.0), (25.0, 110.0)] {
            t.add(Workload::RandwriteLat, TargetKind::Raw, raw);
            t.add(Workload::RandwriteLat, TargetKind::Shorthorn2r, sh);
            t.add(Workload::RandreadLat, TargetKind::Raw, raw);
            t.add(Workload::RandreadLat, TargetKind::Shorthorn2r, sh / 2.0);
        }
        let hosted = EngineMode::Hosted;
        // Depth-64 writes: raw-2-copies' median ratio, (0.45 + 0.50) / 2.
        let b = bound_2r(&t, Workload::RandwriteIops, &trips, hosted).unwrap();
        assert!((b.ratio - 0.475).abs() < 1e-12, "{b:?}");
        assert_eq!(b.to_string(), "0.47x (raw-2-copies)");
        assert!(bound_2r(&t, Workload::RandreadIops, &trips, hosted).is_none());
        // A depth-1 write waits for both hops: (50 + 100) / 50 = 3.0 and
        // (25 + 50) / 25 = 3.0, each round against its own round trips.
        let b = bound_2r(&t, Workload::RandwriteLat, &trips, hosted).unwrap();
        assert_eq!(b.ratio, 3.0);
        assert_eq!(b.to_string(), "3.00x (raw + unix + TCP round trips)");
        // A hosted engine reads from its own daemon: the unix hop only.
        let b = bound_2r(&t, Workload::RandreadLat, &trips, hosted).unwrap();
        assert_eq!(b.ratio, 1.8);
        // An engine of its own reaches that replica over TCP too.
        let b = bound_2r(&t, Workload::RandreadLat, &trips, EngineMode::Process).unwrap();
        assert_eq!(b.ratio, 3.0);

        let text = render_goals(&t, &trips, hosted).unwrap();
        let line = |w: &str| text.lines().find(|l| l.contains(w)).unwrap().to_string();
        // 0.31x against a 0.50x goal and a 0.47x ceiling: beyond the bound.
        let write = line("random write 4k QD64");
        assert!(write.contains("0.47x (raw-2-copies)"), "{write}");
        assert!(
            write.contains("goal beyond this machine's bound"),
            "{write}"
        );
        // 4.2x against a 3x goal and a 3.0x floor: short, yet within reach.
        let lat = line("random write 4k QD1");
        assert!(lat.contains("short by"), "{lat}");
        assert!(!lat.contains("beyond"), "{lat}");
        assert!(describe_trips(&trips)
            .unwrap()
            .contains("unix 30.0 µs, TCP loopback 45.0 µs"));
        assert!(describe_trips(&[]).is_none());
    }

    #[test]
    fn the_cpu_table_adds_servers_and_fio() {
        let w = Workload::RandwriteIops;
        let targets = [TargetKind::Raw, TargetKind::Shorthorn2r];
        let table = || Table::new(&[w], &targets);
        let (mut servers, mut fio, mut busy) = (table(), table(), table());
        servers.add(w, TargetKind::Raw, 0.01);
        fio.add(w, TargetKind::Raw, 6.54);
        for (s, f, b) in [(24.0, 8.0, 0.70), (30.0, 9.0, 0.81), (20.0, 7.0, 0.77)] {
            servers.add(w, TargetKind::Shorthorn2r, s);
            fio.add(w, TargetKind::Shorthorn2r, f);
            busy.add(w, TargetKind::Shorthorn2r, b);
        }
        let text = render_cpu(&servers, &fio, &busy);
        // The raw job's busy share is missing: its cell shows no dot.
        assert!(text.contains("| 0.01 + 6.54 "), "{text}");
        assert!(!text.contains("6.54 ·"), "{text}");
        assert!(text.contains("| random write 4k QD64 |"), "{text}");
        // Each part is its own median: 24 µs, 8 µs, 77%.
        assert!(text.contains("| 24.0 + 8.00 · 77% |"), "{text}");
    }

    #[test]
    fn rss_is_checked_against_the_goal() {
        let text = render_rss(&[
            ("engine shorthorn-2r".into(), Some(20 * 1024)),
            ("replica daemon 1".into(), Some(70 * 1024)),
            ("nbdkit file plugin".into(), None),
        ]);
        assert!(text.contains("| engine shorthorn-2r | 20.0 MiB "), "{text}");
        assert!(text.contains("70.0 MiB         | NO"), "{text}");
        assert!(text.contains("gone"));
    }
}
