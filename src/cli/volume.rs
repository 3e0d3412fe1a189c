//! `shorthorn volume ...`: volume management on replica daemons.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use shorthorn_engine::attach::preview_start;
use shorthorn_engine::error::{VolumeOptions, DEFAULT_CLEAN_AFTER};
use shorthorn_proto::{ErrorCode, MemberState, Reply, Request, VolumeName};

use super::admin_call;
use super::size::{human, parse_size};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume's replica on each named replica daemon. Creating it
    /// again with the same size does nothing; another size is an error.
    Create(CreateArgs),
    /// List the volumes a replica daemon keeps.
    List(ListArgs),
    /// Delete a volume's replica from each named replica daemon.
    Delete(DeleteArgs),
    /// Show a running volume's replicas: state, and rebuild progress.
    Status(super::engine_ctl::StatusArgs),
    /// Add a replica on another daemon to a running volume; it is rebuilt
    /// while the volume serves.
    #[command(mut_arg("replica", |a| {
        a.help("Replica daemon (HOST:PORT) to add; the volume is created there if it is not")
    }))]
    AddReplica(super::engine_ctl::ReplicaChangeArgs),
    /// Remove a replica from a running volume.
    #[command(mut_arg("replica", |a| {
        a.help("Replica daemon (HOST:PORT) to take out of the volume, as the volume names it")
    }))]
    RemoveReplica(super::engine_ctl::ReplicaChangeArgs),
    /// Show what each replica of a volume says about it (its id, generation,
    /// the membership it last saved, its dirty regions) and what an engine
    /// started with exactly these replicas would do: serve from which,
    /// rebuild which, or refuse and why. Changes nothing; works with the
    /// engine stopped. Exit 0 when such a start would serve, 1 when it
    /// would be refused.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct InspectArgs {
    /// The volume to look at.
    pub name: VolumeName,
    /// Replica daemon (HOST:PORT) holding a replica; give the ones an
    /// engine would be started with.
    #[arg(long = "replica", value_name = "HOST:PORT", required = true)]
    pub replicas: Vec<String>,
    /// Judge the start as if `engine serve --allow-missing-replicas` were
    /// given.
    #[arg(long)]
    pub allow_missing_replicas: bool,
    /// How long to wait for each daemon, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

#[derive(Args)]
pub struct CreateArgs {
    /// Volume name: letters, digits, '-', '_' or '.'.
    pub name: VolumeName,
    /// Size, e.g. 512MiB or 10GiB (a multiple of 4 KiB).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Replica daemon (HOST:PORT) to keep a replica; give it once or twice.
    #[arg(long = "replica", value_name = "HOST:PORT", required = true)]
    pub replicas: Vec<String>,
    /// How long to wait for each daemon, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

#[derive(Args)]
pub struct ListArgs {
    /// Replica daemon (HOST:PORT) to ask; repeat for several.
    #[arg(long = "replica", value_name = "HOST:PORT", required = true)]
    pub replicas: Vec<String>,
    /// How long to wait for each daemon, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

#[derive(Args)]
pub struct DeleteArgs {
    /// Volume to delete, with its data. Refused while an engine serves it:
    /// stop the engine first.
    pub name: VolumeName,
    /// Replica daemon (HOST:PORT) holding a replica; repeat for several.
    #[arg(long = "replica", value_name = "HOST:PORT", required = true)]
    pub replicas: Vec<String>,
    /// How long to wait for each daemon, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

pub async fn run(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create(a) => {
            create(
                &a.name,
                a.size,
                &a.replicas,
                Duration::from_millis(a.timeout_ms),
            )
            .await
        }
        VolumeCommand::Status(a) => super::engine_ctl::status(a).await,
        VolumeCommand::AddReplica(a) => super::engine_ctl::add_replica(a).await,
        VolumeCommand::RemoveReplica(a) => super::engine_ctl::remove_replica(a).await,
        VolumeCommand::List(a) => list(&a.replicas, Duration::from_millis(a.timeout_ms)).await,
        VolumeCommand::Inspect(a) => inspect(a).await,
        VolumeCommand::Delete(a) => {
            let timeout = Duration::from_millis(a.timeout_ms);
            for addr in &a.replicas {
                let request = Request::DeleteVolume {
                    name: a.name.to_string(),
                };
                match admin_call(addr, request, timeout).await? {
                    Reply::Done => println!("deleted {} from {addr}", a.name),
                    other => bail!("{addr}: unexpected answer {other:?}"),
                }
            }
            Ok(())
        }
    }
}

/// Refuses a size no volume can have, before anything is started.
pub fn check_size(size: u64) -> anyhow::Result<()> {
    if size == 0 || !size.is_multiple_of(4096) {
        bail!(
            "size must be a positive multiple of 4 KiB, got {size} bytes; sizes in KiB, \
             MiB and GiB always are (10GB is 10^10 bytes, 10GiB is 10 x 2^30)"
        );
    }
    Ok(())
}

/// Creates the volume on every replica daemon; used by `volume create` and `dev`.
pub async fn create(
    name: &VolumeName,
    size: u64,
    replicas: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    if replicas.is_empty() || replicas.len() > 2 {
        bail!("a volume has 1 or 2 replicas; {} given", replicas.len());
    }
    check_size(size)?;
    super::distinct_replicas(replicas).await?;
    // Every daemon is asked first, so a size clash or an unreachable daemon
    // leaves nothing half-created.
    for addr in replicas {
        check_can_create(name, size, addr, timeout)
            .await
            .with_context(|| format!("creating {name} on {addr}"))?;
    }
    // A daemon can still refuse (its disk has no room for the volume):
    // then the replicas this call created, new and empty, are removed again.
    let mut created_here: Vec<&str> = Vec::new();
    for addr in replicas {
        let request = Request::CreateVolume {
            name: name.to_string(),
            size,
        };
        let reply = match admin_call(addr, request, timeout).await {
            Ok(reply) => reply,
            Err(e) => {
                let e = e.context(format!("creating {name} on {addr}"));
                return Err(undo_create(name, &created_here, timeout, e).await);
            }
        };
        match reply {
            Reply::Created { created: true, .. } => {
                created_here.push(addr);
                println!("created {name} ({}) on {addr}", human(size))
            }
            Reply::Created { created: false, .. } => {
                println!("{name} ({}) already exists on {addr}", human(size))
            }
            other => bail!("{addr}: unexpected answer {other:?}"),
        }
    }
    Ok(())
}

/// Deletes the replicas of `name` just created on `addrs`, and returns
/// `error` saying what became of them.
async fn undo_create(
    name: &VolumeName,
    addrs: &[&str],
    timeout: Duration,
    error: anyhow::Error,
) -> anyhow::Error {
    let mut left = Vec::new();
    for addr in addrs {
        let request = Request::DeleteVolume {
            name: name.to_string(),
        };
        match admin_call(addr, request, timeout).await {
            Ok(_) => println!("removed {name} from {addr} again"),
            Err(e) => left.push(format!("{addr} ({e})")),
        }
    }
    if left.is_empty() {
        anyhow::anyhow!("{error:#}; nothing was left created")
    } else {
        anyhow::anyhow!(
            "{error:#}; {name} is still created on {}: delete it there with `shorthorn volume delete`",
            left.join(", ")
        )
    }
}

/// Fails when `addr` is unreachable or holds `name` with another size.
async fn check_can_create(
    name: &VolumeName,
    size: u64,
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let request = Request::GetVolume {
        name: name.to_string(),
    };
    match super::admin_try(addr, request, timeout).await? {
        Ok(Reply::Volume(info)) if info.size != size => bail!(
            "{name} already exists there with size {} ({} bytes), not {} ({size} bytes); \
             nothing was created",
            human(info.size),
            info.size,
            human(size)
        ),
        Ok(Reply::Volume(_)) => Ok(()),
        Ok(other) => bail!("unexpected answer {other:?}"),
        Err(e) if e.remote().is_some_and(|r| r.code == ErrorCode::NotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let options = VolumeOptions {
        io_timeout: Duration::from_millis(a.timeout_ms),
        clean_after: DEFAULT_CLEAN_AFTER,
        client_id: VolumeOptions::unique_client_id(a.name.as_str()),
        allow_missing_replicas: a.allow_missing_replicas,
    };
    let preview = preview_start(&a.name, &a.replicas, &options).await?;
    println!(
        "{:<22} {:<20} {:>10} {:>6} {:>9}  MEMBERSHIP IT LAST SAVED",
        "REPLICA", "REPLICA ID", "GENERATION", "EPOCH", "DIRTY"
    );
    for r in &preview.replicas {
        let members = r
            .membership
            .members
            .iter()
            .map(|m| match m.id.is_empty() {
                true => format!("{} {} (to rebuild in full)", m.addr, m.state.as_str()),
                false => format!("{} {}", m.addr, m.state.as_str()),
            })
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:<22} {:<20} {:>10} {:>6} {:>9}  {}",
            r.addr,
            r.replica_id,
            r.generation.to_string(),
            r.membership.epoch,
            human(r.dirty_bytes),
            if members.is_empty() {
                "(none: never attached)".to_string()
            } else {
                members
            }
        );
    }
    for (addr, why) in &preview.unreachable {
        println!("{addr:<22} cannot be reached: {why}");
    }
    println!();
    match preview.verdict {
        Ok(parts) => {
            let list = |want: MemberState| {
                parts
                    .iter()
                    .filter(|(_, state, _)| *state == want)
                    .map(|(addr, _, full)| match (want, full) {
                        (MemberState::Healthy, _) => addr.clone(),
                        (_, true) => format!("{addr} (in full)"),
                        (_, false) => format!("{addr} (what it missed)"),
                    })
                    .collect::<Vec<_>>()
            };
            let (serve, rebuild) = (list(MemberState::Healthy), list(MemberState::Out));
            print!(
                "An engine started with these replicas would serve from {}",
                serve.join(" and ")
            );
            if rebuild.is_empty() {
                println!(".");
            } else {
                println!(", and rebuild {} when it answers.", rebuild.join(" and "));
            }
            Ok(())
        }
        Err(e) => {
            println!("An engine started with these replicas would refuse: {e}");
            std::process::exit(1);
        }
    }
}

async fn list(replicas: &[String], timeout: Duration) -> anyhow::Result<()> {
    // Every daemon is asked before anything is printed: no table is shown
    // half-filled above an error.
    let mut answers = Vec::new();
    for addr in replicas {
        match admin_call(addr, Request::ListVolumes, timeout).await? {
            Reply::Volumes(list) => answers.push((addr, list)),
            other => bail!("{addr}: unexpected answer {other:?}"),
        }
    }
    println!(
        "{:<22} {:<40} {:>12} {:>10}",
        "REPLICA", "VOLUME", "SIZE", "GENERATION"
    );
    for (addr, list) in answers {
        for v in list {
            println!(
                "{:<22} {:<40} {:>12} {:>10}",
                addr,
                v.name,
                human(v.size),
                v.generation.0
            );
        }
    }
    Ok(())
}
