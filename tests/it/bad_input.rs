//! Bad input of every kind gets a precise error and changes nothing.

use std::process::Command;
use std::time::Duration;

use crate::harness::{bin, spec, wait_for, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_specs_and_unknown_members_change_nothing() {
    let cluster = Cluster::form(3, &[]).await;
    let client = cluster.client();
    client
        .create_model(spec("good", "v1"))
        .await
        .expect("a good spec");
    let models_before = client.list_models(true).await.expect("list");
    let audit_before = client.list_audit(0, 1000).await.expect("audit");

    let cases = [
        (
            talon_client::ModelSpec {
                name: "Has Spaces".into(),
                ..spec("x", "v1")
            },
            "model name",
        ),
        (
            talon_client::ModelSpec {
                min_replicas: 5,
                max_replicas: 2,
                ..spec("x", "v1")
            },
            "min_replicas (5) is greater than max_replicas (2)",
        ),
        (
            talon_client::ModelSpec {
                engine: "pytorch".into(),
                ..spec("x", "v1")
            },
            "engine \"pytorch\" is unknown",
        ),
        (
            talon_client::ModelSpec {
                memory_mib: 0,
                ..spec("x", "v1")
            },
            "memory_mib",
        ),
        (
            talon_client::ModelSpec {
                artifact_uri: "weights.bin".into(),
                ..spec("x", "v1")
            },
            "artifact_uri",
        ),
        (
            talon_client::ModelSpec {
                priority: "urgent".into(),
                ..spec("x", "v1")
            },
            "priority",
        ),
        (spec("good", "v1"), "already has version"),
    ];
    for (bad, needle) in cases {
        let err = client.create_model(bad).await.expect_err("refused");
        let talon_client::ClientError::Status(status) = &err else {
            panic!("{err}")
        };
        assert!(
            status.message().contains(needle),
            "{:?} should mention {needle:?}",
            status.message()
        );
        assert!(
            matches!(
                status.code(),
                talon_client::Code::InvalidArgument | talon_client::Code::AlreadyExists
            ),
            "{status:?}"
        );
    }
    let err = client
        .delete_model("absent", None)
        .await
        .expect_err("absent");
    assert_eq!(err.code(), Some(talon_client::Code::NotFound));
    let err = client.cluster_remove(42).await.expect_err("unknown member");
    assert_eq!(err.code(), Some(talon_client::Code::NotFound));
    assert!(
        err.to_string()
            .contains("node 42 is not a member; the members are 1, 2, 3"),
        "{err}"
    );
    let err = client
        .cluster_join(4, "no-port", false)
        .await
        .expect_err("bad address");
    assert_eq!(err.code(), Some(talon_client::Code::InvalidArgument));
    let err = cluster.nodes[1]
        .client()
        .cluster_init(vec![])
        .await
        .expect_err("already initialized");
    assert_eq!(err.code(), Some(talon_client::Code::FailedPrecondition));
    let err = cluster.nodes[0].client().set_isolated(true).await;
    assert!(err.is_ok(), "tests start nodes with fault injection on");
    cluster.nodes[0]
        .client()
        .set_isolated(false)
        .await
        .expect("heal");

    assert_eq!(client.list_models(true).await.expect("list"), models_before);
    let audit_after = client.list_audit(0, 1000).await.expect("audit");
    assert_eq!(
        audit_after, audit_before,
        "a refused request left an audit entry"
    );
}

fn coordinator(args: &[&str]) -> std::process::Output {
    Command::new(bin("talon-coordinator"))
        .args(args)
        .output()
        .expect("run talon-coordinator")
}

#[test]
fn invalid_config_files_and_flags_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.toml");
    let cfg = path.to_str().expect("utf-8 path");

    std::fs::write(&path, "node_id = 1\nlisen = \"127.0.0.1:1\"\n").expect("write");
    let out = coordinator(&["--config", cfg, "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `lisen`"));

    std::fs::write(&path, "node_id = 1\n[raft]\nheartbeat_ms = 300\n").expect("write");
    let out = coordinator(&["--config", cfg, "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than twice raft.heartbeat_ms"));

    // Flags override the file; the check prints the result.
    let out = coordinator(&["--config", cfg, "--check", "--heartbeat-ms", "100"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("heartbeat_ms = 100"));
    let out = coordinator(&["--check", "--node-id", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node_id must be 1 or more"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_corrupt_or_misassigned_data_dirs_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |data: &std::path::Path, node_id: &str| {
        let port = crate::harness::free_port().to_string();
        let http = crate::harness::free_port().to_string();
        Command::new(bin("talon-coordinator"))
            .args([
                "--node-id",
                node_id,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .arg("--data-dir")
            .arg(data)
            .output()
            .expect("run talon-coordinator")
    };

    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::write(foreign.join("postgresql.conf"), "x").expect("write");
    let out = run(&foreign, "1");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a Talon coordinator directory") && err.contains("postgresql.conf"),
        "{err}"
    );

    // A directory written by node 1 is not node 2's.
    let mut cluster = Cluster::start(1, &[]);
    let node = &cluster.nodes[0];
    let client = node.client();
    wait_for("init", Duration::from_secs(40), || async {
        client.cluster_init(vec![]).await.ok()
    })
    .await;
    let data = node.data_dir.clone();
    cluster.node(1).kill();
    let out = run(&data, "2");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to node 1"));

    // A damaged database is refused, not reused.
    let db = data.join("db");
    for entry in std::fs::read_dir(&db).expect("db dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::write(&path, b"garbage that is not a sled file").expect("corrupt");
        }
    }
    let out = run(&data, "1");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be opened") || err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn example_config_in_deploy_is_valid() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/coordinator.example.toml"
    );
    let out = coordinator(&["--config", path, "--check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
