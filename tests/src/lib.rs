//! Support for Talon's multi-process tests (`it/`) and the benchmark driver
//! (`talon-bench`): starting real Talon and etcd clusters on loopback.

pub mod clusters;

/// etcd's gRPC messages, the subset the benchmarks use.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
