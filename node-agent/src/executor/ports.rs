//! Ports for engine processes, without a race.
//!
//! An engine is told its port on its command line, so the agent cannot hand
//! it a bound socket. Instead the agent owns a range of ports
//! (`engine_ports`, default 20000–20999; keep it out of the kernel's
//! ephemeral range, e.g. with `net.ipv4.ip_local_reserved_ports`, so that no
//! outgoing connection takes one): a port is leased to one replica until its
//! engine is gone, leases go round the range (a port just given back is the
//! last to be taken again), and a port another process is listening on is
//! skipped. Once the engine answers its health check, the agent checks that
//! the listening socket on its port belongs to the engine's own process tree
//! ([`listener_owned_by`]): an answer from some other server is never taken
//! for the engine's.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// The agent's engine ports.
#[derive(Debug)]
pub struct Ports {
    first: u16,
    last: u16,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    held: BTreeSet<u16>,
    next: u16,
}

/// A port leased to one engine; given back when dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    ports: Arc<Ports>,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.ports
            .state
            .lock()
            .expect("ports lock poisoned")
            .held
            .remove(&self.port);
    }
}

/// Parses `first-last` (inclusive).
pub fn parse_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!("engine_ports {text:?} is not a range of ports such as 20000-20999 (1024 to 65535, first ≤ last)")
    };
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let (first, last): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if first < 1024 || first > last {
        return Err(bad());
    }
    Ok((first, last))
}

impl Ports {
    pub fn new(first: u16, last: u16) -> Arc<Ports> {
        Arc::new(Ports {
            first,
            last,
            state: Mutex::new(State {
                held: BTreeSet::new(),
                next: first,
            }),
        })
    }

    /// Leases the next port of the range that no replica holds and nothing
    /// listens on.
    pub fn lease(self: &Arc<Self>) -> Result<PortLease, String> {
        let mut state = self.state.lock().expect("ports lock poisoned");
        let size = u32::from(self.last - self.first) + 1;
        for _ in 0..size {
            let port = state.next;
            state.next = if port == self.last {
                self.first
            } else {
                port + 1
            };
            if state.held.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            state.held.insert(port);
            return Ok(PortLease {
                port,
                ports: self.clone(),
            });
        }
        Err(format!(
            "no free engine port in {}-{} ({} held by replicas, the rest in use): widen engine_ports",
            self.first,
            self.last,
            state.held.len()
        ))
    }
}

/// Whether the socket listening on loopback `port` belongs to one of
/// `pids` (Linux: `/proc/net/tcp{,6}` and the processes' file
/// descriptors). `None` where that cannot be told (no `/proc`).
pub fn listener_owned_by(port: u16, pids: &[u32]) -> Option<bool> {
    let mut inodes = Vec::new();
    let mut readable = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        readable = true;
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "0A" {
                continue;
            }
            let local_port = fields[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    if !readable {
        return None;
    }
    if inodes.is_empty() {
        return Some(false);
    }
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(true);
                }
            }
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_go_round_the_range_and_skip_held_and_busy_ports() {
        // a range of three free ports in a row is not guaranteed; take what
        // the kernel gives and build the range around a busy one
        let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let b = busy.local_addr().expect("addr").port();
        let (first, last) = (b.saturating_sub(1).max(1024), b.saturating_add(2));
        let ports = Ports::new(first, last);
        let mut leased = Vec::new();
        while let Ok(l) = ports.lease() {
            leased.push(l);
        }
        let numbers: Vec<u16> = leased.iter().map(PortLease::port).collect();
        assert!(
            !numbers.contains(&b),
            "a port in use is skipped: {numbers:?}"
        );
        let mut unique = numbers.clone();
        unique.dedup();
        assert_eq!(unique, numbers, "no port is leased twice");
        let err = ports.lease().expect_err("all held");
        assert!(err.contains("widen engine_ports"), "{err}");
        // the one given back is the one leased next
        let back = leased.remove(0);
        let number = back.port();
        drop(back);
        assert_eq!(ports.lease().expect("one is free").port(), number);
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(parse_range("20000-20999"), Ok((20000, 20999)));
        for bad in ["20000", "80-90", "3000-2000", "a-b", "1024-70000"] {
            let e = parse_range(bad).expect_err(bad);
            assert!(e.contains("engine_ports"), "{e}");
        }
    }

    #[test]
    fn a_listener_is_told_apart_from_other_processes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let me = std::process::id();
        if let Some(owned) = listener_owned_by(port, &[me]) {
            assert!(owned, "this process listens on {port}");
            assert_eq!(listener_owned_by(port, &[1]), Some(false));
        }
        drop(l);
        if let Some(owned) = listener_owned_by(port, &[me]) {
            assert!(!owned, "nothing listens on {port} now");
        }
    }
}
