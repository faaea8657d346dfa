//! Trust against real coordinator processes: every service refuses a call
//! without a credential or with the wrong role, agents act only as their own
//! node, poisonous registrations are refused without harm, revocation holds
//! on every coordinator, and the audit log names the credential's principal.

use std::time::Duration;

use talon_client::{ClientError, Code};
use talon_proto::v1 as pb;
use talon_proto::v1::agent_service_client::AgentServiceClient;
use talon_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

use crate::harness::{wait_for, Cluster};

const TOKEN: &str = "it-join-token-trust-0123";

fn code(e: ClientError) -> Code {
    e.code()
        .unwrap_or_else(|| panic!("expected a gRPC status, got {e}"))
}

fn agents(addr: &str) -> AgentServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_lazy();
    AgentServiceClient::new(channel)
}

fn with_bearer<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if !key.is_empty() {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ascii"),
        );
    }
    r
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("talon-join-token", token.parse().expect("ascii"));
    r
}

fn inventory(node_id: &str, addr: &str) -> pb::NodeInventory {
    pb::NodeInventory {
        node_id: node_id.into(),
        addr: addr.into(),
        cpu_cores: 8,
        host_memory_bytes: 64 << 30,
        cost_per_hour: 1.0,
        probe: "simulated".into(),
        gpus: vec![pb::GpuInventory {
            index: 0,
            uuid: format!("GPU-{node_id}"),
            name: "NVIDIA L4".into(),
            gpu_type: "l4".into(),
            memory_bytes: 24 << 30,
            compute_major: 8,
            compute_minor: 9,
            power_limit_watts: 72,
            calibration: Some(pb::Calibration {
                sgemm_tflops: 30.0,
                hgemm_tflops: 120.0,
                copy_gbps: 250.0,
                skipped: String::new(),
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn join(addr: &str, node_id: &str) -> pb::JoinResponse {
    agents(addr)
        .join(with_token(
            pb::JoinRequest {
                node_id: node_id.into(),
            },
            TOKEN,
        ))
        .await
        .expect("join")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_refuses_missing_credentials_and_wrong_roles() {
    let cluster = Cluster::form(1, &["--join-token", TOKEN]).await;
    let node = &cluster.nodes[0];
    let admin = cluster.client();
    admin
        .create_model(talon_tests::model_spec("m", "simulated", 1_000, 0))
        .await
        .expect("admin writes");

    // Admin API: nothing without a key, a garbled or unknown key is refused.
    let anonymous = node.client_as("");
    assert_eq!(
        code(anonymous.list_models(false).await.unwrap_err()),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            node.client_as("talon_0123456789abcdef_00")
                .list_models(false)
                .await
                .unwrap_err()
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            node.client_as(&format!("talon_0123456789abcdef_{}", "ab".repeat(32)))
                .list_models(false)
                .await
                .unwrap_err()
        ),
        Code::Unauthenticated
    );
    // The status call is open, by design (probes).
    assert!(anonymous.cluster_status().await.is_ok());

    // A viewer reads but cannot write; an operator writes models but cannot
    // mint credentials; an inference key cannot use the admin API at all.
    let viewer = admin
        .create_credential("val", "viewer", None)
        .await
        .expect("viewer")
        .key;
    let operator = admin
        .create_credential("oscar", "operator", None)
        .await
        .expect("op")
        .key;
    let app = admin
        .create_credential("app", "inference", None)
        .await
        .expect("app")
        .key;
    let as_viewer = node.client_as(&viewer);
    assert_eq!(
        as_viewer
            .list_models(false)
            .await
            .expect("viewer reads")
            .len(),
        1
    );
    let denied = as_viewer
        .create_model(talon_tests::model_spec("v", "simulated", 1_000, 0))
        .await
        .unwrap_err();
    assert_eq!(code(denied), Code::PermissionDenied);
    assert_eq!(
        code(
            as_viewer
                .set_node_scheduling("x", "cordon")
                .await
                .unwrap_err()
        ),
        Code::PermissionDenied
    );
    let as_operator = node.client_as(&operator);
    as_operator
        .create_model(talon_tests::model_spec("o", "simulated", 1_000, 0))
        .await
        .expect("operator writes models");
    assert_eq!(
        code(
            as_operator
                .create_credential("x", "admin", None)
                .await
                .unwrap_err()
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            as_operator
                .cluster_join(9, "127.0.0.1:1", false)
                .await
                .unwrap_err()
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node.client_as(&app).list_models(false).await.unwrap_err()),
        Code::PermissionDenied
    );

    // Inference over gRPC: no key → UNAUTHENTICATED, a viewer → PERMISSION_DENIED.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc))
        .expect("endpoint")
        .connect_lazy();
    let mut inference = InferenceClient::new(channel);
    let ask = talon_client::chat("m", "hi");
    let e = inference
        .infer(with_bearer(ask.clone(), ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = inference
        .infer(with_bearer(ask.clone(), &viewer))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // With the inference key the call gets past the door (no replica runs).
    let e = inference.infer(with_bearer(ask, &app)).await.unwrap_err();
    assert!(
        !matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied),
        "{e:?}"
    );

    // OpenAI HTTP: 401 with an OpenAI-style body, 403 for a viewer.
    let http = node.http.clone();
    let body = r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
    let (h, v) = (http.clone(), viewer.clone());
    let (status, answer) = tokio::task::spawn_blocking(move || {
        talon_tests::http_post(&h, "/v1/chat/completions", body, "")
    })
    .await
    .expect("post")
    .expect("answer");
    assert_eq!(status, 401, "{answer}");
    let json: serde_json::Value = serde_json::from_str(&answer).expect("json body");
    assert_eq!(json["error"]["code"], "invalid_api_key", "{json}");
    let (status, _) = tokio::task::spawn_blocking(move || {
        talon_tests::http_post(&http, "/v1/chat/completions", body, &v)
    })
    .await
    .expect("post")
    .expect("answer");
    assert_eq!(status, 403);

    // Agent API: nothing but Join works with the join token; Register needs
    // a node credential.
    let e = agents(&node.grpc)
        .register(with_token(
            pb::RegisterRequest {
                inventory: Some(inventory("a", "127.0.0.1:9001")),
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // An admin key is not an agent's.
    let e = agents(&node.grpc)
        .register(with_bearer(
            pb::RegisterRequest {
                inventory: Some(inventory("a", "127.0.0.1:9001")),
            },
            &cluster.admin_key(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = agents(&node.grpc)
        .join(with_token(
            pb::JoinRequest {
                node_id: "a".into(),
            },
            "wrong-token-0123456789",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_acts_only_as_its_own_node() {
    let cluster = Cluster::form(1, &["--join-token", TOKEN]).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let a = join(&grpc, "node-a").await;
    let b = join(&grpc, "node-b").await;
    let mut client = agents(&grpc);
    client
        .register(with_bearer(
            pb::RegisterRequest {
                inventory: Some(inventory("node-a", "127.0.0.1:9001")),
            },
            &a.key,
        ))
        .await
        .expect("a registers as a");
    client
        .register(with_bearer(
            pb::RegisterRequest {
                inventory: Some(inventory("node-b", "127.0.0.1:9002")),
            },
            &b.key,
        ))
        .await
        .expect("b registers as b");

    // A's credential cannot re-register B (say, with A's address, to draw
    // B's traffic), report for B, or watch B's assignments.
    let e = client
        .register(with_bearer(
            pb::RegisterRequest {
                inventory: Some(inventory("node-b", "127.0.0.1:9001")),
            },
            &a.key,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("cannot act as node \"node-b\""),
        "{e:?}"
    );
    let e = client
        .watch_assignments(with_bearer(
            pb::WatchAssignmentsRequest {
                node_id: "node-b".into(),
            },
            &a.key,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let report = pb::TelemetryReport {
        node_id: "node-b".into(),
        seq: 1,
        ..Default::default()
    };
    let e = client
        .report_telemetry(with_bearer(tokio_stream::iter(vec![report]), &a.key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let nodes = cluster.client().list_nodes().await.expect("nodes");
    let b_node = nodes
        .iter()
        .find(|n| n.inventory.as_ref().is_some_and(|i| i.node_id == "node-b"))
        .expect("b");
    assert_eq!(
        b_node.inventory.as_ref().expect("inventory").addr,
        "127.0.0.1:9002",
        "B's address is unchanged"
    );

    // A node id that holds a credential cannot join again; once an admin
    // revokes it, it can.
    let e = agents(&grpc)
        .join(with_token(
            pb::JoinRequest {
                node_id: "node-a".into(),
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    cluster
        .client()
        .revoke_credential(&a.credential_id)
        .await
        .expect("revoke");
    let e = client
        .register(with_bearer(
            pb::RegisterRequest {
                inventory: Some(inventory("node-a", "127.0.0.1:9001")),
            },
            &a.key,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    join(&grpc, "node-a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisonous_registrations_are_refused_and_the_cluster_restarts_cleanly() {
    let mut cluster = Cluster::form(3, &["--join-token", TOKEN]).await;
    let leader = cluster.leader(None).await;
    let grpc = cluster.node(leader).grpc.clone();
    let me = join(&grpc, "poison").await;
    let cases: Vec<(Box<dyn Fn(&mut pb::NodeInventory)>, &str)> = vec![
        (
            Box::new(|i| i.gpus[0].calibration.as_mut().unwrap().sgemm_tflops = f64::NAN),
            "calibration.sgemm_tflops",
        ),
        (
            Box::new(|i| i.gpus[0].calibration.as_mut().unwrap().copy_gbps = f64::INFINITY),
            "calibration.copy_gbps",
        ),
        (Box::new(|i| i.cost_per_hour = 1e300), "cost_per_hour"),
        (Box::new(|i| i.addr = "nowhere".into()), "addr"),
        (Box::new(|i| i.gpus[0].name = "x".repeat(100_000)), "name"),
    ];
    let mut client = agents(&grpc);
    for (poison, field) in &cases {
        let mut inv = inventory("poison", "127.0.0.1:9100");
        poison(&mut inv);
        let e = client
            .register(with_bearer(
                pb::RegisterRequest {
                    inventory: Some(inv),
                },
                &me.key,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    }
    // Telemetry that routing would trust: a NaN service time is refused too.
    client
        .register(with_bearer(
            pb::RegisterRequest {
                inventory: Some(inventory("poison", "127.0.0.1:9100")),
            },
            &me.key,
        ))
        .await
        .expect("a clean registration");
    let report = pb::TelemetryReport {
        node_id: "poison".into(),
        seq: 1,
        replicas: vec![pb::ReplicaStatus {
            id: "r".into(),
            state: "ready".into(),
            service_ms_one: f32::NAN,
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = client
        .report_telemetry(with_bearer(tokio_stream::iter(vec![report]), &me.key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("service_ms_one"), "{e:?}");

    // The cluster serves on, and every acknowledged write survives a stop
    // of all three coordinators.
    let admin = cluster.client();
    admin
        .create_model(crate::harness::spec("after-poison", "v1"))
        .await
        .expect("still serving");
    for id in 1..=3 {
        cluster.node(id).kill();
    }
    for id in 1..=3 {
        cluster.node(id).start();
    }
    cluster.leader(None).await;
    let admin = cluster.client();
    let models = wait_for(
        "the model after a full restart",
        Duration::from_secs(30),
        || async { admin.list_models(true).await.ok() },
    )
    .await;
    assert!(
        models.iter().any(|m| m.name == "after-poison"),
        "{models:?}"
    );
    let nodes = admin.list_nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_holds_on_every_coordinator_and_the_audit_names_the_principal() {
    let cluster = Cluster::form(3, &["--join-token", TOKEN]).await;
    let admin = cluster.client();
    let made = admin
        .create_credential("carol", "operator", None)
        .await
        .expect("credential");
    let carol = made.credential.expect("credential");
    // A claimed actor header changes nothing: the audit records carol.
    let mut spec = crate::harness::spec("by-carol", "v1");
    spec.min_replicas = 0;
    cluster
        .client_as(&made.key)
        .create_model(spec)
        .await
        .expect("carol writes");
    let audit = admin.list_audit(0, 1000).await.expect("audit");
    let entry = audit
        .iter()
        .find(|a| a.action == "model.create" && a.target == "by-carol")
        .expect("audited");
    assert_eq!(entry.actor, format!("carol ({})", carol.id));
    let created = audit
        .iter()
        .find(|a| a.action == "credential.create" && a.target == carol.id)
        .expect("credential creation audited");
    assert!(created.detail.contains("role=operator"), "{created:?}");
    assert!(
        !created.detail.contains(&made.key[20..]),
        "the secret never reaches the audit log"
    );

    admin.revoke_credential(&carol.id).await.expect("revoke");
    for node in &cluster.nodes {
        let client = node.client_as(&made.key);
        wait_for(
            &format!("node {} to refuse the revoked key", node.id),
            Duration::from_secs(5),
            || async {
                matches!(client.list_models(false).await, Err(e) if e.code() == Some(Code::Unauthenticated))
                    .then_some(())
            },
        )
        .await;
    }
    let listed = admin.list_credentials().await.expect("list");
    assert!(listed.iter().all(|c| c.id != carol.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrapping_node_beside_a_cluster_does_not_form_a_second_one() {
    let mut cluster = Cluster::form(1, &[]).await;
    let peer = cluster.nodes[0].grpc.clone();
    // Node 2 has an empty data directory and --bootstrap, as a coordinator
    // that lost its disk and restarted with its usual flags.
    let node = cluster.add_node(&["--bootstrap", "--bootstrap-peers", &peer]);
    let stray = node.client_as("");
    let (id, grpc) = (node.id, node.grpc.clone());
    let status = wait_for("node 2 to answer", Duration::from_secs(30), || async {
        stray.cluster_status().await.ok()
    })
    .await;
    assert!(
        !status.initialized,
        "node 2 formed a cluster of its own: {status:?}"
    );
    assert_eq!(status.leader_id, None);
    // It can still be joined to the real cluster.
    let joined = cluster
        .client()
        .cluster_join(id, &grpc, false)
        .await
        .expect("join");
    assert_eq!(joined.members.iter().filter(|m| m.voter).count(), 2);
}
