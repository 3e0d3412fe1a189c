//! `bench/RESULTS.md`: each run is one section, newest first, inserted under
//! a marker line so the file's introduction stays on top and earlier runs
//! stay below.

use std::path::Path;

use anyhow::Context;

pub const MARKER: &str = "<!-- shorthorn bench inserts each new run below this line -->";

const INTRODUCTION: &str = "# shorthorn benchmark results\n\
\n\
Written by `shorthorn bench` (see the README's \"Benchmarks\" section), newest run first.\n\
Each run measures targets of the same size in one work directory, one fio job at a\n\
time: the raw disk (a file, fio `libaio`, `direct=1`), nbdkit's `file` plugin over a unix\n\
socket, and shorthorn 1- and 2-replica volumes (replica daemons and engines on loopback;\n\
fio's `nbd` engine for all three NBD targets). For the write rows, newer runs also\n\
measure `raw-2-copies`: two raw files written at once, the figure per file, which is the\n\
most shorthorn-2r can write here with both replicas on this one disk. Newer runs also\n\
time socket round trips, which with the raw latency give the floor for the depth-1 rows.\n\
Absolute figures on shared 2-core machines are noise; the ratios to the raw disk within\n\
one run are the result. Runs made with `--rounds N` ran every job N times: each cell is\n\
the median, its ratio the median of per-round ratios, with the lowest and highest beside it.\n";

/// Inserts `section` as the newest run in the results file at `path`,
/// creating the file if needed.
pub fn add_run(path: &Path, section: &str) -> anyhow::Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let text = with_run(&existing, section);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Replace, never truncate in place: an interrupted write keeps the old runs.
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn with_run(existing: &str, section: &str) -> String {
    let section = format!("{}\n", section.trim_end());
    if existing.trim().is_empty() {
        return format!("{INTRODUCTION}\n{MARKER}\n\n{section}");
    }
    match existing.find(MARKER) {
        Some(at) => {
            let after = at + MARKER.len();
            let rest = existing[after..].trim_start_matches('\n');
            let sep = if rest.is_empty() { "" } else { "\n" };
            format!("{}\n\n{section}{sep}{rest}", &existing[..after])
        }
        // A file written by hand: the new run goes on top of it.
        None => format!("{MARKER}\n\n{section}\n{existing}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_run_goes_first_and_earlier_runs_stay() {
        let one = with_run("", "## run 1\n\nfigures 1\n");
        assert!(one.starts_with("# shorthorn benchmark results"));
        let two = with_run(&one, "## run 2\n\nfigures 2");
        let three = with_run(&two, "## run 3\n");
        let at = |s: &str| three.find(s).unwrap();
        assert!(at(MARKER) < at("## run 3"));
        assert!(at("## run 3") < at("## run 2"));
        assert!(at("## run 2") < at("## run 1"));
        assert_eq!(three.matches("# shorthorn benchmark results").count(), 1);
        assert!(three.contains("figures 2\n\n## run 1"), "{three}");
        assert!(three.ends_with("figures 1\n"), "{three:?}");
    }

    #[test]
    fn writes_the_file() {
        let dir =
            std::env::temp_dir().join(format!("shorthorn-bench-results-{}", std::process::id()));
        let path = dir.join("RESULTS.md");
        add_run(&path, "## a").unwrap();
        add_run(&path, "## b").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.find("## b").unwrap() < text.find("## a").unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
