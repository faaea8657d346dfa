//! Support for Talon's multi-process tests (`it/`) and the benchmark driver
//! (`talon-bench`): starting real Talon and etcd clusters on loopback.

pub mod clusters;

/// etcd's gRPC messages, the subset the benchmarks use.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// A model spec for tests and benchmarks: one version `v1` of `name` with
/// `replicas` replicas of `memory_mib` each.
pub fn model_spec(
    name: &str,
    engine: &str,
    memory_mib: u64,
    replicas: u32,
) -> talon_client::ModelSpec {
    talon_client::ModelSpec {
        name: name.into(),
        version: "v1".into(),
        engine: engine.into(),
        artifact_uri: format!("file:///models/{name}"),
        memory_mib,
        latency_slo_ms: 1_000,
        min_replicas: replicas,
        max_replicas: replicas.max(1),
        priority: "normal".into(),
        labels: Default::default(),
    }
}

/// POSTs a JSON `body` to `http://addr/path` over HTTP/1.0 (the connection
/// closes after the answer): the status code and the body, or `None` when
/// the connection failed or nothing came back within 60 s.
pub fn http_post(addr: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .ok()?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}
