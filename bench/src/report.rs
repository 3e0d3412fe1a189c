//! The results table (workloads × targets, each cell the figure and its
//! ratio to the raw disk) and the peak-RSS table, as Markdown that also
//! reads well in a terminal. Pure formatting: no IO.

use crate::targets::TargetKind;
use crate::workload::{Metric, Workload};

/// Figures of one run, by workload and target.
#[derive(Clone, Debug)]
pub struct Table {
    pub targets: Vec<TargetKind>,
    pub rows: Vec<(Workload, Vec<Option<f64>>)>,
}

/// The peak-RSS goal for the engine and each replica daemon (issue 3).
pub const RSS_GOAL_KIB: u64 = 64 * 1024;

impl Table {
    pub fn new(workloads: &[Workload], targets: &[TargetKind]) -> Table {
        Table {
            targets: targets.to_vec(),
            rows: workloads
                .iter()
                .map(|&w| (w, vec![None; targets.len()]))
                .collect(),
        }
    }

    pub fn set(&mut self, workload: Workload, target: TargetKind, figure: f64) {
        let col = self.targets.iter().position(|&t| t == target);
        let row = self.rows.iter_mut().find(|(w, _)| *w == workload);
        if let (Some(col), Some((_, figures))) = (col, row) {
            figures[col] = Some(figure);
        }
    }

    pub fn get(&self, workload: Workload, target: TargetKind) -> Option<f64> {
        let col = self.targets.iter().position(|&t| t == target)?;
        let (_, figures) = self.rows.iter().find(|(w, _)| *w == workload)?;
        figures[col]
    }

    /// The figure's ratio to the raw disk's in the same row.
    pub fn ratio(&self, workload: Workload, target: TargetKind) -> Option<f64> {
        let raw = self.get(workload, TargetKind::Raw)?;
        let v = self.get(workload, target)?;
        (raw > 0.0).then(|| v / raw)
    }

    /// The Markdown table, columns padded to line up.
    pub fn render(&self) -> String {
        let mut header = vec!["workload".to_string()];
        header.extend(self.targets.iter().map(|t| t.name().to_string()));
        let mut lines = vec![header];
        for (w, figures) in &self.rows {
            let mut line = vec![w.label().to_string()];
            for (&t, figure) in self.targets.iter().zip(figures) {
                line.push(match (figure, self.ratio(*w, t)) {
                    (None, _) => "—".to_string(),
                    (Some(v), _) if t == TargetKind::Raw => format_figure(w.metric(), *v),
                    (Some(v), Some(r)) => {
                        format!("{} ({})", format_figure(w.metric(), *v), format_ratio(r))
                    }
                    (Some(v), None) => format_figure(w.metric(), *v),
                });
            }
            lines.push(line);
        }
        markdown(&lines)
    }
}

/// The legend printed under the table.
pub const LEGEND: &str = "Each cell: the figure, and in brackets its ratio to the raw disk in \
the same run. IOPS and MiB/s: higher is better. Latency rows (mean completion latency, µs): \
the ratio is latency / raw latency, so lower is better. raw-2-copies: two files on the same \
disk written at once, each by its own fio job; the cell is what one of them got. Both of \
shorthorn-2r's replicas live on this disk, so that is the most its writes can get here (on a \
cluster each replica has a node's disk to itself).";

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
        t.set(Workload::SeedRandrw, TargetKind::Raw, 20_460.0);
        t.set(Workload::SeedRandrw, TargetKind::NbdkitFile, 10_230.0);
        t.set(Workload::SeedRandrw, TargetKind::Shorthorn2r, 12_700.0);
        t.set(Workload::RandwriteLat, TargetKind::Raw, 50.0);
        t.set(Workload::RandwriteLat, TargetKind::Shorthorn1r, 75.0);
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
    fn without_raw_there_are_no_ratios() {
        let mut t = Table::new(&[Workload::RandreadIops], &[TargetKind::Shorthorn1r]);
        t.set(Workload::RandreadIops, TargetKind::Shorthorn1r, 40_000.0);
        assert!(t.render().contains("| 40.0k "));
        assert!(!t.render().contains("x)"));
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
