//! The protos are for every client, not only ours: the standard protoc
//! (Python's grpcio-tools) compiles them, and the generated Python client
//! calls every service with and without credentials.

use crate::harness::{python_venv, Cluster};

const TOKEN: &str = "it-join-token-protos-0123";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_by_protoc_calls_every_service() {
    let python = tokio::task::spawn_blocking(|| {
        python_venv(
            "grpc-venv",
            "grpc_tools",
            &["grpcio", "grpcio-tools", "protobuf"],
        )
    })
    .await
    .expect("venv");
    let cluster = Cluster::form(1, &["--join-token", TOKEN]).await;
    let out_dir = tempfile::tempdir().expect("temp dir");
    let (addr, key) = (cluster.nodes[0].grpc.clone(), cluster.admin_key());
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto");
    let out_path = out_dir.path().to_str().expect("utf-8").to_string();
    crate::harness::run_python_checks(
        python,
        "grpc_client.py",
        vec![proto.into(), out_path, addr, key, TOKEN.into()],
        &[
            "protoc ok",
            "unauthenticated ok",
            "admin ok",
            "agent ok",
            "inference ok",
        ],
    )
    .await;
}
