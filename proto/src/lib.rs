//! Talon's wire protocol.
//!
//! The `.proto` files under `proto/` are compiled at build time by protox (a
//! pure-Rust protobuf compiler) and tonic-prost-build, so building needs no
//! system `protoc`. Conversions between these wire types and the domain types
//! live beside the domain types' owners, at the boundary.

/// Version 1 of the protocol: `talon.v1`.
pub mod v1 {
    tonic::include_proto!("talon.v1");
}

/// Response metadata key that carries the leader's gRPC address when a call
/// reached a node that is not the leader and could not forward it.
pub const LEADER_METADATA_KEY: &str = "talon-leader";

/// Request metadata key set by a coordinator on a call it forwards to the
/// leader, so that a call is forwarded at most once.
pub const FORWARDED_METADATA_KEY: &str = "talon-forwarded";

/// Request metadata key that names who makes an admin change; recorded in the
/// audit log.
pub const ACTOR_METADATA_KEY: &str = "talon-actor";

/// Whether `addr` is `host:port` with a non-empty host (no scheme or path)
/// and a non-zero port: the form every Talon address takes on the wire.
pub fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_port() {
        for good in ["127.0.0.1:7400", "talon-0.talon:7400", "[::1]:7400"] {
            assert!(super::is_host_port(good), "{good}");
        }
        for bad in [
            "",
            "7400",
            ":7400",
            "host:",
            "host:0",
            "host:99999",
            "http://host:1",
        ] {
            assert!(!super::is_host_port(bad), "{bad}");
        }
    }
}
