//! The protos are for every client, not only ours: the standard protoc
//! (Python's grpcio-tools) compiles them, and the generated Python client
//! calls every service with and without credentials.

use std::process::Command;

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
    let out_path = out_dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/python/grpc_client.py"
            ))
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto"))
            .arg(&out_path)
            .args([&addr, &key, TOKEN])
            .output()
            .expect("run python")
    })
    .await
    .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "protoc ok",
        "unauthenticated ok",
        "admin ok",
        "agent ok",
        "inference ok",
    ] {
        assert!(stdout.contains(check), "{check} missing: {stdout}");
    }
}
