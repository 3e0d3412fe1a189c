//! Network namespaces joined by veth pairs, for partition tests (issue 4):
//! each test makes namespaces of its own, links them with veth pairs on /30
//! addresses of their own, runs processes inside, and cuts and restores
//! links. Dropping the guards removes every namespace and veth, and ends
//! every process still inside, also when the test fails. Needs root.
//!
//! Names carry the test process's pid: namespaces are `sh-<pid>-<n>-<tag>`,
//! veth ends `sh<pid>-<n>a` / `b`. [`leftovers`] lists what the calling
//! test (thread) made that still exists, so a test can prove it cleaned up
//! while others run beside it. Namespaces left by a test process that was
//! killed outright (its guards never ran) are removed the next time a test
//! makes one.
//!
//! A cut is a blackhole, the way a pulled cable looks to the other side:
//! established TCP connections stall and retransmit (never a reset), and new
//! connections from the near end hang until their timeout. See
//! [`Veth::cut`] for how.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

use super::{run, wait_until, Proc};

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

thread_local! {
    /// Namespaces and root-namespace veth ends this thread (one test) made.
    static MADE: RefCell<Made> = RefCell::default();
}

#[derive(Default)]
struct Made {
    namespaces: Vec<String>,
    root_links: Vec<String>,
}

/// `ip ARGS`, panicking with its output if it fails.
fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// `ip ARGS` for cleanup paths: never panics, reports what went wrong.
fn ip_quiet(args: &[&str]) -> bool {
    match Command::new("ip").args(args).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("ip {}: {e}", args.join(" "));
            false
        }
    }
}

/// `ip [-n NS] ARGS...`: in namespace `ns`, or the root namespace for `None`.
fn ip_in(ns: Option<&str>, args: &[&str]) -> Output {
    let mut all = Vec::new();
    if let Some(ns) = ns {
        all.extend(["-n", ns]);
    }
    all.extend_from_slice(args);
    ip(&all)
}

fn ip_in_quiet(ns: Option<&str>, args: &[&str]) -> bool {
    let mut all = Vec::new();
    if let Some(ns) = ns {
        all.extend(["-n", ns]);
    }
    all.extend_from_slice(args);
    ip_quiet(&all)
}

/// A network namespace of this test, with `lo` up. Dropping it kills
/// (SIGKILL, by pid) every process still inside — only this test puts
/// processes there — and deletes it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static REAP: Once = Once::new();
        REAP.call_once(reap_stale);
        let name = format!("sh-{}-{}-{tag}", std::process::id(), next_id());
        ip(&["netns", "add", &name]);
        MADE.with(|m| m.borrow_mut().namespaces.push(name.clone()));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS`, panicking if it fails.
    pub fn ip(&self, args: &[&str]) -> Output {
        ip_in(Some(&self.name), args)
    }

    /// A command running `program` inside this namespace (through
    /// `ip netns exec`, which execs it: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Starts `program ARGS` inside, as a [`Proc`] logging to `log`.
    pub fn spawn<I, S>(&self, name: &str, program: impl AsRef<OsStr>, args: I, log: PathBuf) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::spawn(name, self.command(program).args(args), log)
    }

    /// Pids of the processes inside right now.
    pub fn pids(&self) -> Vec<i32> {
        netns_pids(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_inside(&self.name);
        ip_quiet(&["netns", "delete", &self.name]);
    }
}

fn netns_pids(name: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in namespace `name` until none is left (a
/// process may fork while we look), for at most a few seconds.
fn kill_inside(name: &str) {
    for _ in 0..100 {
        let pids = netns_pids(name);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("processes still alive in network namespace {name}");
}

/// Removes namespaces named like ours whose test process is gone (it was
/// killed before its guards ran), with whatever still runs inside them.
/// A namespace whose pid is alive is never touched.
fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.splitn(4, '-');
        let (Some("sh"), Some(pid), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u32>()) else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing network namespace {name} left by dead test process {pid}");
        kill_inside(name);
        ip_quiet(&["netns", "delete", name]);
    }
}

/// One end of a veth pair.
#[derive(Clone, Debug)]
pub struct VethEnd {
    /// The namespace it lives in; `None` for the root namespace.
    pub netns: Option<String>,
    pub dev: String,
    pub ip: Ipv4Addr,
    pub mac: String,
}

/// A veth pair (a virtual cable) between two namespaces, or a namespace and
/// the root namespace, addressed as a /30 of its own in 10.0.0.0/8: end `a`
/// has `.1`, end `b` `.2`. Deleted when dropped.
pub struct Veth {
    pub a: VethEnd,
    pub b: VethEnd,
    cut: bool,
}

impl Veth {
    /// A link between two namespaces of this test.
    pub fn between(a: &Netns, b: &Netns) -> Veth {
        Veth::new(Some(&a.name), Some(&b.name))
    }

    /// A link from the root namespace (end `a`) to `ns` (end `b`, the end a
    /// [`cut`](Self::cut) unplugs).
    pub fn to_root(ns: &Netns) -> Veth {
        Veth::new(None, Some(&ns.name))
    }

    fn new(a_ns: Option<&str>, b_ns: Option<&str>) -> Veth {
        let pid = std::process::id();
        let n = next_id();
        // A /30 per link: 14 bits of the pid and 8 of the counter, so tests
        // running at once get distinct subnets (only links ending in the
        // root namespace could clash; the others are private to theirs).
        let block = ((pid & 0x3fff) << 8) | (n & 0xff);
        let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) | (block << 2);
        let end = |ns: Option<&str>, side: char, host: u32| {
            let ip = Ipv4Addr::from(base + host);
            let [_, x, y, z] = ip.octets();
            VethEnd {
                netns: ns.map(str::to_string),
                dev: format!("sh{pid}-{n}{side}"),
                ip,
                mac: format!("02:00:0a:{x:02x}:{y:02x}:{z:02x}"),
            }
        };
        let a = end(a_ns, 'a', 1);
        let b = end(b_ns, 'b', 2);

        let mut add = vec!["link", "add", &a.dev, "address", &a.mac];
        if let Some(ns) = &a.netns {
            add.extend(["netns", ns]);
        }
        add.extend(["type", "veth", "peer", "name", &b.dev, "address", &b.mac]);
        if let Some(ns) = &b.netns {
            add.extend(["netns", ns]);
        }
        ip(&add);
        for end in [&a, &b] {
            if end.netns.is_none() {
                MADE.with(|m| m.borrow_mut().root_links.push(end.dev.clone()));
            }
        }
        // From here on the guard exists, so a failing step still deletes it.
        let link = Veth { a, b, cut: false };
        for (me, peer) in [(&link.a, &link.b), (&link.b, &link.a)] {
            let ns = me.netns.as_deref();
            ip_in(
                ns,
                &["addr", "add", &format!("{}/30", me.ip), "dev", &me.dev],
            );
            ip_in(ns, &["link", "set", &me.dev, "up"]);
            set_neighbour(me, peer);
        }
        link
    }

    /// Unplugs the cable at end `b`: that end goes administratively down.
    ///
    /// End `a` keeps its address and route (marked linkdown) and, through
    /// its permanent neighbour entry, keeps sending frames, which the veth
    /// drops because its peer is down: a blackhole. Taking both ends down
    /// would not do: the near end's route would go, and connecting would
    /// fail at once with ENETUNREACH instead of hanging, which is not what
    /// a partition looks like. End `b`'s own sends fail locally (its route
    /// goes with its link), and its TCP stalls and retransmits likewise.
    pub fn cut(&mut self) {
        ip_in(
            self.b.netns.as_deref(),
            &["link", "set", &self.b.dev, "down"],
        );
        self.cut = true;
    }

    /// Plugs the cable back in; established connections resume at their
    /// next retransmission.
    pub fn restore(&mut self) {
        ip_in(self.b.netns.as_deref(), &["link", "set", &self.b.dev, "up"]);
        // Taking the link down flushed end b's neighbour entries.
        set_neighbour(&self.b, &self.a);
        let (a_ns, a_dev) = (self.a.netns.clone(), self.a.dev.clone());
        wait_until(
            "the veth to have carrier again",
            Duration::from_secs(5),
            || {
                let out = ip_in(a_ns.as_deref(), &["link", "show", &a_dev]);
                !String::from_utf8_lossy(&out.stdout).contains("NO-CARRIER")
            },
        );
        self.cut = false;
    }

    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Makes the cable slow from end `a` to end `b`: what `a` sends leaves
    /// at `rate` (tc's spelling: `8mbit`), and the rest waits in a queue of
    /// up to 32 MiB instead of being dropped, like a slow Wi-Fi hop behind
    /// a deep buffer. The other direction keeps its speed. Goes with the
    /// link.
    pub fn limit_rate(&self, rate: &str) {
        self.tc(&[
            "replace", "root", "tbf", "rate", rate, "burst", "32kb", "limit", "32mb",
        ]);
    }

    /// Gives end `a`'s sending its full speed back (undoes
    /// [`limit_rate`](Self::limit_rate)); what was queued goes at once.
    pub fn full_speed(&self) {
        self.tc(&["delete", "root"]);
    }

    /// `tc qdisc VERB dev A ARGS...` on end `a`'s device, in its namespace.
    fn tc(&self, args: &[&str]) {
        let mut tc = Command::new("tc");
        if let Some(ns) = &self.a.netns {
            tc.args(["-n", ns]);
        }
        tc.args(["qdisc", args[0], "dev", &self.a.dev])
            .args(&args[1..]);
        run(&mut tc);
    }
}

/// A permanent ARP entry on `me` for `peer`: with it, the near end of a
/// cut link still sends (into the void) instead of failing address
/// resolution with EHOSTUNREACH after a few seconds.
fn set_neighbour(me: &VethEnd, peer: &VethEnd) {
    let peer_ip = peer.ip.to_string();
    ip_in(
        me.netns.as_deref(),
        &[
            "neigh",
            "replace",
            &peer_ip,
            "lladdr",
            &peer.mac,
            "dev",
            &me.dev,
            "nud",
            "permanent",
        ],
    );
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. If the namespace holding end a
        // is already gone, the kernel took the pair with it.
        if !ip_in_quiet(self.a.netns.as_deref(), &["link", "del", &self.a.dev]) {
            ip_in_quiet(self.b.netns.as_deref(), &["link", "del", &self.b.dev]);
        }
    }
}

/// The namespaces and root-namespace veth ends this test (thread) made
/// that still exist: empty once every guard has dropped.
pub fn leftovers() -> Vec<String> {
    let (namespaces, root_links) = MADE.with(|m| {
        let m = m.borrow();
        (m.namespaces.clone(), m.root_links.clone())
    });
    let mut left = Vec::new();
    let listed = ip(&["netns", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    // Lines are `NAME` or `NAME (id: N)`.
    let listed: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for ns in namespaces {
        if listed.contains(&ns.as_str()) {
            left.push(format!("namespace {ns}"));
        }
    }
    let links = ip(&["-o", "link", "show"]);
    let links = String::from_utf8_lossy(&links.stdout);
    // `7: sh123-4a@if6: <...`: the name is the second field.
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|n| n.trim_end_matches(':').split('@').next().unwrap_or(n))
        .collect();
    for dev in root_links {
        if names.contains(&dev.as_str()) {
            left.push(format!("link {dev}"));
        }
    }
    left
}

/// Waits until [`leftovers`] is empty (a namespace's links vanish a moment
/// after the namespace does), panicking with what is left otherwise.
pub fn assert_all_cleaned_up() {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftovers();
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "network namespaces or links left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
