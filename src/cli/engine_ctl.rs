//! `shorthorn volume status|add-replica|remove-replica`: talking to a
//! running engine through its control socket.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use shorthorn_proto::{Reply, Request, VolumeName};

use super::size::human;

#[derive(Args)]
pub struct StatusArgs {
    /// Volume whose running engine to ask.
    pub name: VolumeName,
    /// The engine's run directory (where NAME.ctl is).
    #[arg(long, default_value = super::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Print the engine's JSON answer as it is.
    #[arg(long)]
    pub json: bool,
    /// Keep printing every N milliseconds (0: once).
    #[arg(long, default_value_t = 0)]
    pub watch_ms: u64,
}

#[derive(Args)]
pub struct ReplicaChangeArgs {
    /// Volume whose running engine makes the change.
    pub name: VolumeName,
    /// Replica daemon (HOST:PORT); each command says its part.
    #[arg(long, value_name = "HOST:PORT")]
    pub replica: String,
    /// The engine's run directory (where NAME.ctl is).
    #[arg(long, default_value = super::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
}

fn socket(run_dir: &Path, name: &VolumeName) -> PathBuf {
    run_dir.join(format!("{name}.ctl"))
}

async fn ask(run_dir: &Path, name: &VolumeName, req: Value) -> anyhow::Result<Value> {
    let path = socket(run_dir, name);
    let answer = shorthorn_engine::control::request(&path, &req)
        .await
        .with_context(|| {
            format!(
                "no engine for volume {name} answers at {} (is it running? is --run-dir right? An \
                 engine answers once it has reached its replicas; until then its log says what \
                 it waits for)",
                path.display()
            )
        })?;
    if answer.get("ok") != Some(&Value::Bool(true)) {
        bail!(
            "engine refused: {}",
            answer.get("error").and_then(Value::as_str).unwrap_or("?")
        );
    }
    Ok(answer)
}

pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    loop {
        let s = ask(&a.run_dir, &a.name, json!({"op": "status"})).await?;
        let text = if a.json {
            format!("{s}\n")
        } else {
            status_text(&s)
        };
        // A reader that went away (`| head -1`) ends the watch quietly.
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.context("writing to stdout")?,
        }
        if a.watch_ms == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(a.watch_ms)).await;
    }
}

fn status_text(s: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let _ = writeln!(
        out,
        "volume {} ({}), generation {}, {} healthy",
        s["volume"].as_str().unwrap_or("?"),
        human(n(s, "size")),
        n(s, "generation"),
        n(s, "healthy")
    );
    if s["starting"] == Value::Bool(true) {
        let r = &s["reconcile"];
        let total = n(r, "bytes_total");
        if total > 0 {
            let _ = writeln!(
                out,
                "starting: comparing the replicas where writes may have been in flight when the \
                 last engine stopped: {} of {} compared, {} copied; serving once done",
                human(n(r, "bytes_compared")),
                human(total),
                human(n(r, "bytes_copied"))
            );
        } else {
            let _ = writeln!(out, "starting: serving in a moment");
        }
    }
    let _ = writeln!(
        out,
        "{:<24} {:<20} {:<11} REBUILD",
        "REPLICA", "ID", "STATE"
    );
    for r in s["replicas"].as_array().into_iter().flatten() {
        let rb = &r["rebuild"];
        let total = n(rb, "bytes_total");
        let progress = if total > 0 {
            format!(
                "{} of {} compared, {} copied, {:.1} MiB/s",
                human(n(rb, "bytes_scanned")),
                human(total),
                human(n(rb, "bytes_copied")),
                rb["mib_per_s"].as_f64().unwrap_or(0.0)
            )
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<24} {:<20} {:<11} {}",
            r["addr"].as_str().unwrap_or("?"),
            r["id"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or("?"),
            progress
        );
        if let Some(e) = r["last_error"].as_str() {
            let _ = writeln!(out, "    last error: {e}");
        }
    }
    out
}

pub async fn add_replica(a: ReplicaChangeArgs) -> anyhow::Result<()> {
    let s = ask(&a.run_dir, &a.name, json!({"op": "status"})).await?;
    let size = s["size"].as_u64().unwrap_or(0);
    // The new daemon needs the volume first; creating it again is a no-op.
    let reply = super::admin_call(
        &a.replica,
        Request::CreateVolume {
            name: a.name.to_string(),
            size,
        },
        Duration::from_secs(10),
    )
    .await?;
    if !matches!(reply, Reply::Created { .. }) {
        bail!("{}: unexpected answer {reply:?}", a.replica);
    }
    ask(
        &a.run_dir,
        &a.name,
        json!({"op": "add-replica", "addr": a.replica}),
    )
    .await?;
    println!(
        "added {} to {}; it is being rebuilt (see `shorthorn volume status {}`)",
        a.replica, a.name, a.name
    );
    Ok(())
}

pub async fn remove_replica(a: ReplicaChangeArgs) -> anyhow::Result<()> {
    ask(
        &a.run_dir,
        &a.name,
        json!({"op": "remove-replica", "addr": a.replica}),
    )
    .await?;
    println!(
        "removed {} from {} (its data stays on that daemon until `shorthorn volume delete`)",
        a.replica, a.name
    );
    Ok(())
}
