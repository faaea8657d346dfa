//! Hosts in network namespaces on one machine, for tests of what crosses a
//! network: each host is a namespace with its own address on a bridge in
//! the test's namespace, so the test reaches every host while the hosts
//! can be partitioned from each other for real.
//!
//! A partition is a blackhole route in each host for the addresses of the
//! hosts on the other side: packets between them are dropped in the
//! kernel (new connections fail, established ones stall and time out),
//! while the test process — on the bridge — still reaches both sides, as a
//! client beside each node would. Needs root (`ip netns`, iproute2).

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

/// A set of hosts on one bridge; removed when dropped.
pub struct NetLab {
    tag: String,
    subnet: String,
    hosts: usize,
    /// Routes currently blackholed, as (host, peer) pairs.
    cut: BTreeSet<(usize, usize)>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2); the network lab needs it")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetLab {
    /// Makes `hosts` namespaces (at most 250) with addresses `.1` to `.N`
    /// of a /24 private to this lab; the bridge is `.254`.
    pub fn new(hosts: usize) -> anyhow::Result<NetLab> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("tl{}{}", pid % 100_000, n);
        let octet = (pid + n * 37) % 250;
        let lab = NetLab {
            tag,
            subnet: format!("10.213.{octet}"),
            hosts,
            cut: BTreeSet::new(),
        };
        lab.build().with_context(|| {
            format!(
                "building the network lab ({hosts} namespaces on a bridge) — needs root and iproute2"
            )
        })?;
        Ok(lab)
    }

    fn bridge(&self) -> String {
        format!("{}b", self.tag)
    }

    /// The namespace of host `i` (0-based).
    pub fn namespace(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    pub fn hosts(&self) -> usize {
        self.hosts
    }

    fn build(&self) -> anyhow::Result<()> {
        let bridge = self.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["link", "set", &bridge, "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}.254/24", self.subnet),
            "dev",
            &bridge,
        ])?;
        for i in 0..self.hosts {
            let ns = self.namespace(i);
            let outside = format!("{}v{i}", self.tag);
            let inside = format!("{}p{i}", self.tag);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "set", &inside, "name", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.addr(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// The command prefix that runs a program inside host `i`.
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.namespace(i)]
    }

    /// Cuts every host in `side` off from every host not in it (both ways);
    /// earlier cuts stay.
    pub fn partition(&mut self, side: &[usize]) -> anyhow::Result<()> {
        for a in 0..self.hosts {
            for b in 0..self.hosts {
                if a != b && side.contains(&a) != side.contains(&b) && !self.cut.contains(&(a, b)) {
                    let peer = format!("{}/32", self.addr(b));
                    ip(&["-n", &self.namespace(a), "route", "add", "blackhole", &peer])?;
                    self.cut.insert((a, b));
                }
            }
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for (a, b) in std::mem::take(&mut self.cut) {
            let peer = format!("{}/32", self.addr(b));
            ip(&["-n", &self.namespace(a), "route", "del", "blackhole", &peer])?;
        }
        Ok(())
    }

    /// Whether host `a` can currently reach host `b`.
    pub fn connected(&self, a: usize, b: usize) -> bool {
        !self.cut.contains(&(a, b))
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            let _ = ip(&["netns", "del", &self.namespace(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}
