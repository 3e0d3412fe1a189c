//! `shorthorn replica verify`: compares a volume's replicas, byte for byte.
//!
//! It only looks. Each session says hello with generation 0, which a replica
//! daemon serves reads on, refuses every change through, and which fences no
//! engine; so this never alters a replica and may run next to a serving
//! engine. Writes in flight while it reads do show up as differences,
//! though: for a verdict, stop the engine (or keep the volume idle) first.
//!
//! Exit status: 0 when the replicas are identical, 1 when they differ (the
//! differing ranges are listed), 2 when they could not be compared.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use futures::future::join_all;
use futures::{stream, StreamExt};
use serde::Serialize;
use shorthorn_engine::{ClientError, ReplicaClient};
use shorthorn_proto::{ErrorCode, Generation, Reply, Request, VolumeName, MAX_IO_LEN};

use super::size::{human, parse_size};

/// Differences are found and reported in whole sectors, the smallest unit
/// a block device writes: a range never splits where a new byte happens to
/// equal the old one.
const SECTOR: u64 = 512;
/// Differing ranges listed in the text report.
const SHOWN_RANGES: usize = 20;
/// Differing ranges kept (and listed in the JSON); beyond this they are
/// only counted, so a wholly different volume cannot exhaust memory.
const KEPT_RANGES: usize = 10_000;
/// How often a progress line goes to stderr (so only long runs print one).
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Args)]
pub struct VerifyArgs {
    /// The volume whose replicas to compare.
    pub name: VolumeName,
    /// Replica daemon (HOST:PORT) holding a replica of the volume; give
    /// two or more.
    #[arg(long = "replica", value_name = "HOST:PORT", required = true)]
    pub replicas: Vec<String>,
    /// Bytes per read request (a multiple of 512, at most 4 MiB). 1 MiB
    /// reads measured about twice as fast as 4 MiB ones.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Read requests in flight at once on each replica, 1 to 64.
    #[arg(long, default_value_t = 4)]
    pub chunks_in_flight: usize,
    /// How long to wait for any one answer from a replica daemon.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Print a JSON summary on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the check, prints the verdict and exits with its status (0, 1 or
/// 2); it returns only if stdout cannot be written.
pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut summary = Summary {
        volume: args.name.to_string(),
        result: "error",
        error: None,
        size: None,
        chunk_size: args.chunk_size,
        bytes_compared: 0,
        differing_bytes: 0,
        differing_range_count: 0,
        differing_ranges: Vec::new(),
        ranges_truncated: false,
        elapsed_s: 0.0,
        replicas: Vec::new(),
    };
    let outcome = compare(&args, &mut summary).await;
    summary.elapsed_s = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    let code = match outcome {
        Ok(()) if summary.differing_range_count == 0 => {
            summary.result = "identical";
            0
        }
        Ok(()) => {
            summary.result = "different";
            1
        }
        Err(e) => {
            eprintln!("shorthorn: verify {}: {e:#}", args.name);
            summary.error = Some(format!("{e:#}"));
            2
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &summary)?;
        writeln!(out)?;
    } else if code != 2 {
        print_text(&mut out, &summary)?;
    }
    out.flush()?;
    drop(out);
    std::process::exit(code)
}

/// What `--json` prints; the text report says the same for people.
#[derive(Serialize)]
struct Summary {
    volume: String,
    /// `identical`, `different` or `error`.
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The volume size every replica reported; absent if they disagree or
    /// were not all reached.
    size: Option<u64>,
    chunk_size: u64,
    bytes_compared: u64,
    differing_bytes: u64,
    differing_range_count: u64,
    /// Merged, in offset order; the first `KEPT_RANGES` only.
    differing_ranges: Vec<ByteRange>,
    ranges_truncated: bool,
    elapsed_s: f64,
    replicas: Vec<ReplicaSummary>,
}

#[derive(Serialize)]
struct ReplicaSummary {
    addr: String,
    server: String,
    size: u64,
    generation: u64,
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
struct ByteRange {
    offset: u64,
    len: u64,
}

async fn compare(args: &VerifyArgs, summary: &mut Summary) -> anyhow::Result<()> {
    check_args(args)?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let volume = args.name.as_str();
    let client_id = format!("shorthorn replica verify pid {}", std::process::id());

    let sessions = join_all(
        args.replicas
            .iter()
            .map(|addr| open_session(addr, &client_id, volume, timeout)),
    )
    .await;
    let mut clients = Vec::new();
    let mut failures = Vec::new();
    for result in sessions {
        match result {
            Ok(c) => clients.push(c),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    for c in &clients {
        let info = c.volume().expect("a volume session names its volume");
        summary.replicas.push(ReplicaSummary {
            addr: c.addr().to_string(),
            server: c.welcome().server.clone(),
            size: info.size,
            generation: info.generation.0,
        });
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    let size = summary.replicas[0].size;
    if summary.replicas.iter().any(|r| r.size != size) {
        let sizes: Vec<String> = summary
            .replicas
            .iter()
            .map(|r| format!("{} has {} ({} bytes)", r.addr, human(r.size), r.size))
            .collect();
        bail!(
            "the replicas disagree on the volume's size: {}; nothing compared",
            sizes.join(", ")
        );
    }
    summary.size = Some(size);
    let generations: Vec<String> = summary
        .replicas
        .iter()
        .map(|r| format!("{} {}", r.addr, Generation(r.generation)))
        .collect();
    eprintln!(
        "verify {volume}: {} on {} replicas ({}), reading {} at a time",
        human(size),
        clients.len(),
        generations.join(", "),
        human(args.chunk_size)
    );

    let mut diffs = Differences::default();
    let mut progress = Progress::new(volume, size);
    let chunk = args.chunk_size;
    let reads = stream::iter((0..size).step_by(chunk as usize))
        .map(|offset| read_everywhere(&clients, offset, chunk.min(size - offset) as u32))
        .buffered(args.chunks_in_flight);
    tokio::pin!(reads);
    let result = async {
        while let Some(read) = reads.next().await {
            let (offset, copies) = read?;
            diffs.compare(offset, &copies);
            summary.bytes_compared += copies[0].len() as u64;
            progress.tick(summary.bytes_compared);
        }
        anyhow::Ok(())
    }
    .await;
    progress.finish();
    for c in &clients {
        c.close("verify done");
    }
    diffs.close();
    summary.differing_bytes = diffs.bytes;
    summary.differing_range_count = diffs.count;
    summary.ranges_truncated = diffs.count > diffs.kept.len() as u64;
    summary.differing_ranges = diffs.kept;
    result.with_context(|| {
        format!(
            "stopped after comparing {} of {}",
            human(summary.bytes_compared),
            human(size)
        )
    })
}

fn check_args(args: &VerifyArgs) -> anyhow::Result<()> {
    if args.replicas.len() < 2 {
        bail!(
            "give at least two --replica to compare; {} given",
            args.replicas.len()
        );
    }
    for (i, a) in args.replicas.iter().enumerate() {
        if args.replicas[..i].contains(a) {
            bail!("replica {a} is named twice; comparing it with itself proves nothing");
        }
    }
    let chunk = args.chunk_size;
    if chunk == 0 || !chunk.is_multiple_of(SECTOR) || chunk > MAX_IO_LEN as u64 {
        bail!(
            "--chunk-size must be a multiple of {SECTOR} bytes up to {}, got {chunk} bytes",
            human(MAX_IO_LEN as u64)
        );
    }
    if !(1..=64).contains(&args.chunks_in_flight) {
        bail!("--chunks-in-flight must be 1 to 64");
    }
    Ok(())
}

/// A look-only session (generation 0) on one replica of the volume.
async fn open_session(
    addr: &str,
    client_id: &str,
    volume: &str,
    timeout: Duration,
) -> anyhow::Result<ReplicaClient> {
    match ReplicaClient::connect(addr, client_id, volume, Generation(0), timeout).await {
        Ok(c) if c.volume().is_some() => Ok(c),
        Ok(_) => bail!("replica daemon {addr} opened no volume session for {volume}"),
        Err(ClientError::Remote { error, .. }) if error.code == ErrorCode::NotFound => {
            Err(anyhow!(
                "replica daemon {addr} has no volume {volume} ({})",
                error.message
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads one chunk from every replica at once.
async fn read_everywhere(
    clients: &[ReplicaClient],
    offset: u64,
    len: u32,
) -> anyhow::Result<(u64, Vec<Bytes>)> {
    let copies = join_all(clients.iter().map(|c| read(c, offset, len))).await;
    Ok((offset, copies.into_iter().collect::<Result<_, _>>()?))
}

async fn read(client: &ReplicaClient, offset: u64, len: u32) -> anyhow::Result<Bytes> {
    let addr = client.addr();
    match client.call(Request::Read { offset, len }).await {
        Ok(Reply::Data(data)) if data.len() == len as usize => Ok(data),
        Ok(Reply::Data(data)) => bail!(
            "replica {addr} returned {} bytes for a read of {len} at offset {offset}",
            data.len()
        ),
        Ok(other) => Err(client.unexpected(&other).into()),
        Err(e) => Err(anyhow!(e).context(format!("reading {len} bytes at offset {offset}"))),
    }
}

/// The sectors where the replicas disagree, merged into ranges as the
/// chunks arrive in offset order.
#[derive(Default)]
struct Differences {
    kept: Vec<ByteRange>,
    /// Ranges closed so far (kept or not).
    count: u64,
    bytes: u64,
    /// The range still growing: the next differing sector may extend it.
    open: Option<ByteRange>,
}

impl Differences {
    /// Compares the copies of the chunk at `offset` (one per replica, all
    /// the same length) against the first.
    fn compare(&mut self, offset: u64, copies: &[Bytes]) {
        let first = &copies[0];
        if copies[1..].iter().all(|c| c == first) {
            return;
        }
        let len = first.len();
        for start in (0..len).step_by(SECTOR as usize) {
            let end = (start + SECTOR as usize).min(len);
            if copies[1..]
                .iter()
                .any(|c| c[start..end] != first[start..end])
            {
                self.add(offset + start as u64, (end - start) as u64);
            }
        }
    }

    fn add(&mut self, offset: u64, len: u64) {
        self.bytes += len;
        match &mut self.open {
            Some(r) if r.offset + r.len == offset => r.len += len,
            _ => {
                self.close();
                self.open = Some(ByteRange { offset, len });
            }
        }
    }

    fn close(&mut self) {
        if let Some(r) = self.open.take() {
            self.count += 1;
            if self.kept.len() < KEPT_RANGES {
                self.kept.push(r);
            }
        }
    }
}

/// Progress lines on stderr, every `PROGRESS_EVERY`: rewritten in place on a
/// terminal, one per line otherwise (logs).
struct Progress {
    volume: String,
    total: u64,
    started: Instant,
    last: Instant,
    tty: bool,
    printed: bool,
}

impl Progress {
    fn new(volume: &str, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            volume: volume.to_string(),
            total,
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
            printed: false,
        }
    }

    fn tick(&mut self, done: u64) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        let line = format!(
            "verify {}: {} of {} compared ({:.0}%), {:.0} MiB/s",
            self.volume,
            human(done),
            human(self.total),
            done as f64 * 100.0 / self.total.max(1) as f64,
            done as f64 / (1 << 20) as f64 / secs
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        self.printed = true;
    }

    fn finish(&self) {
        if self.tty && self.printed {
            eprintln!();
        }
    }
}

fn print_text(out: &mut impl Write, s: &Summary) -> std::io::Result<()> {
    let rate = s.bytes_compared as f64 / (1 << 20) as f64 / s.elapsed_s.max(1e-3);
    if s.differing_range_count == 0 {
        return writeln!(
            out,
            "identical: {} bytes compared ({}, {} replicas, {:.1} s, {rate:.0} MiB/s)",
            s.bytes_compared,
            human(s.bytes_compared),
            s.replicas.len(),
            s.elapsed_s
        );
    }
    let plural = if s.differing_range_count == 1 {
        ""
    } else {
        "s"
    };
    writeln!(
        out,
        "different: {} bytes ({}) differ in {} range{plural}, of {} bytes compared",
        s.differing_bytes,
        human(s.differing_bytes),
        s.differing_range_count,
        s.bytes_compared
    )?;
    for r in s.differing_ranges.iter().take(SHOWN_RANGES) {
        writeln!(
            out,
            "  offset {} len {} ({:#x}..{:#x}, {})",
            r.offset,
            r.len,
            r.offset,
            r.offset + r.len,
            human(r.len)
        )?;
    }
    let shown = s.differing_ranges.len().min(SHOWN_RANGES) as u64;
    if s.differing_range_count > shown {
        writeln!(
            out,
            "  ... and {} more range{} (--json lists up to {KEPT_RANGES})",
            s.differing_range_count - shown,
            if s.differing_range_count - shown == 1 {
                ""
            } else {
                "s"
            }
        )?;
    }
    writeln!(
        out,
        "(if an engine was writing to the volume meanwhile, writes in flight differ for a \
         moment: stop it and compare again)"
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(d: &Differences) -> Vec<(u64, u64)> {
        d.kept.iter().map(|r| (r.offset, r.len)).collect()
    }

    #[test]
    fn equal_chunks_have_no_difference() {
        let mut d = Differences::default();
        let a = Bytes::from(vec![7u8; 8192]);
        d.compare(0, &[a.clone(), a.clone(), a]);
        d.close();
        assert_eq!((d.count, d.bytes), (0, 0));
    }

    #[test]
    fn differences_are_whole_sectors_merged_across_chunks() {
        let mut d = Differences::default();
        let a = vec![0u8; 4096];
        // Chunk 0: one byte in sector 1, and the last byte of the chunk.
        let mut b = a.clone();
        b[600] = 1;
        b[4095] = 1;
        d.compare(0, &[Bytes::from(a.clone()), Bytes::from(b)]);
        // Chunk 1 continues the last range in its first sector, then a gap.
        let mut b = a.clone();
        b[0] = 9;
        b[3000] = 9;
        d.compare(4096, &[Bytes::from(a.clone()), Bytes::from(b)]);
        // A short last chunk, differing in its tail.
        let mut b = a[..1000].to_vec();
        b[999] = 5;
        d.compare(8192, &[Bytes::from(a[..1000].to_vec()), Bytes::from(b)]);
        d.close();
        assert_eq!(
            ranges(&d),
            vec![
                (512, 512),
                (3584, 1024),
                (4096 + 2560, 512),
                (8192 + 512, 488)
            ]
        );
        assert_eq!(d.count, 4);
        assert_eq!(d.bytes, 512 + 1024 + 512 + 488);
    }

    #[test]
    fn any_replica_disagreeing_counts() {
        let mut d = Differences::default();
        let a = Bytes::from(vec![0u8; 2048]);
        let mut c = vec![0u8; 2048];
        c[1500] = 1;
        d.compare(0, &[a.clone(), a, Bytes::from(c)]);
        d.close();
        assert_eq!(ranges(&d), vec![(1024, 512)]);
    }

    #[test]
    fn kept_ranges_are_capped_but_all_counted() {
        let mut d = Differences::default();
        let n = KEPT_RANGES as u64 + 5;
        for i in 0..n {
            d.add(i * 2 * SECTOR, SECTOR);
        }
        d.close();
        assert_eq!(d.count, n);
        assert_eq!(d.kept.len(), KEPT_RANGES);
        assert_eq!(d.bytes, n * SECTOR);
    }
}
