//! TLS end to end: `talon cert` makes a CA and certificates, three
//! coordinators run with TLS on every port and Raft on its own mutual-TLS
//! listener, and each port refuses what it must.

use std::time::Duration;

use talon_client::{Client, Code};
use talon_proto::v1 as pb;
use talon_proto::v1::raft_service_client::RaftServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::harness::{bin, free_port, wait_for, Cluster};

fn talon(args: &[&str]) {
    let out = std::process::Command::new(bin("talon"))
        .args(args)
        .output()
        .expect("run talon");
    assert!(
        out.status.success(),
        "talon {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the Raft port says to a caller with `identity` (none: no client
/// certificate) over TLS, or over plaintext when `ca` is `None`.
async fn raft_call(
    addr: &str,
    ca: Option<&[u8]>,
    identity: Option<Identity>,
) -> Result<(), tonic::Status> {
    let endpoint = match ca {
        Some(ca) => {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some(id) = identity {
                tls = tls.identity(id);
            }
            Endpoint::from_shared(format!("https://{addr}"))
                .expect("endpoint")
                .tls_config(tls)
                .expect("tls")
        }
        None => Endpoint::from_shared(format!("http://{addr}")).expect("endpoint"),
    };
    let mut client = RaftServiceClient::new(
        endpoint
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy(),
    );
    let mut request = tonic::Request::new(pb::RaftPayload {
        data: b"not a raft message".to_vec(),
    });
    request.set_timeout(Duration::from_secs(5));
    client.vote(request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_every_port_and_mutual_tls_between_coordinators() {
    let certs = tempfile::tempdir().expect("temp dir");
    let dir = certs.path().to_str().expect("utf-8").to_string();
    talon(&["cert", "init", "--dir", &dir]);
    for i in 1..=3 {
        talon(&[
            "cert",
            "issue",
            "--dir",
            &dir,
            "--kind",
            "coordinator",
            "--name",
            &format!("c{i}"),
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
        ]);
    }
    talon(&[
        "cert",
        "issue",
        "--dir",
        &dir,
        "--kind",
        "node",
        "--name",
        "gpu-1",
        "--host",
        "127.0.0.1",
    ]);
    let ca = std::fs::read(certs.path().join("ca.pem")).expect("ca");

    let mut cluster = Cluster::start(0, &[]);
    let mut raft_ports = Vec::new();
    for i in 1..=3 {
        let raft = format!("127.0.0.1:{}", free_port());
        let (cert, key) = (format!("{dir}/c{i}.pem"), format!("{dir}/c{i}.key"));
        cluster.add_node(&[
            "--tls-ca-file",
            &format!("{dir}/ca.pem"),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--raft-listen",
            &raft,
        ]);
        raft_ports.push(raft);
    }
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.grpc.clone()).collect();
    let first = Client::pinned(addrs[0].clone())
        .expect("client")
        .with_tls(ca.clone());
    let init = wait_for(
        "node 1 to accept init over TLS",
        Duration::from_secs(30),
        || async { first.cluster_init(vec![]).await.ok() },
    )
    .await;
    let key = init.admin_key;
    let admin = Client::new(addrs.clone())
        .expect("client")
        .with_tls(ca.clone())
        .with_key(&key)
        .with_timeout(Duration::from_secs(15));
    for node in &cluster.nodes[1..] {
        let (id, grpc) = (node.id, node.grpc.clone());
        wait_for(
            &format!("node {id} to join"),
            Duration::from_secs(30),
            || {
                let (admin, grpc) = (&admin, grpc.clone());
                async move { admin.cluster_join(id, &grpc, false).await.ok() }
            },
        )
        .await;
    }
    let status = admin.cluster_status().await.expect("status");
    assert_eq!(status.members.len(), 3);
    assert!(
        status.members.iter().all(|m| !m.raft_addr.is_empty()),
        "{status:?}"
    );

    // Replication runs over the mutual-TLS Raft port.
    admin
        .create_model(crate::harness::spec("over-tls", "v1"))
        .await
        .expect("write");
    for addr in &addrs {
        let c = Client::pinned(addr.clone())
            .expect("client")
            .with_tls(ca.clone())
            .with_key(&key);
        wait_for(
            "the write on every node",
            Duration::from_secs(20),
            || async {
                c.list_models(false)
                    .await
                    .ok()?
                    .iter()
                    .any(|m| m.name == "over-tls")
                    .then_some(())
            },
        )
        .await;
    }

    // The Raft port: no plaintext, no TLS without a client certificate,
    // and a node certificate of the same CA is not a coordinator's.
    let raft = &raft_ports[0];
    assert!(
        raft_call(raft, None, None).await.is_err(),
        "plaintext reached Raft"
    );
    assert!(
        raft_call(raft, Some(&ca), None).await.is_err(),
        "no client certificate reached Raft"
    );
    let node_id = Identity::from_pem(
        std::fs::read(format!("{dir}/gpu-1.pem")).expect("pem"),
        std::fs::read(format!("{dir}/gpu-1.key")).expect("key"),
    );
    let e = raft_call(raft, Some(&ca), Some(node_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The Raft service is not on the API port at all.
    let api_raft = raft_call(&addrs[0], Some(&ca), None).await.unwrap_err();
    assert_eq!(api_raft.code(), Code::Unimplemented, "{api_raft:?}");

    // The API port speaks only TLS; over TLS a key is still needed.
    let plain = Client::pinned(addrs[0].clone())
        .expect("client")
        .with_key(&key)
        .with_timeout(Duration::from_secs(2));
    assert!(plain.list_models(false).await.is_err());
    let anonymous = Client::pinned(addrs[0].clone())
        .expect("client")
        .with_tls(ca.clone());
    assert_eq!(
        anonymous.list_models(false).await.unwrap_err().code(),
        Some(Code::Unauthenticated)
    );

    // The HTTP gateway over HTTPS, trusting the cluster CA.
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca"))
        .build()
        .expect("client");
    let url = format!("https://{}/v1/models", cluster.nodes[0].http);
    let r = https
        .get(&url)
        .bearer_auth(&key)
        .send()
        .await
        .expect("https");
    assert_eq!(r.status(), 200);
    let r = https.get(&url).send().await.expect("https");
    assert_eq!(r.status(), 401);
    let plain_http = reqwest::Client::new()
        .get(format!("http://{}/v1/models", cluster.nodes[0].http))
        .bearer_auth(&key)
        .send()
        .await;
    assert!(
        plain_http.map(|r| !r.status().is_success()).unwrap_or(true),
        "plaintext HTTP was served"
    );

    // A whole-cluster restart keeps the data, still over TLS.
    for id in 1..=3 {
        cluster.node(id).kill();
    }
    for id in 1..=3 {
        cluster.node(id).start();
    }
    let models = wait_for(
        "the cluster back over TLS",
        Duration::from_secs(40),
        || async { admin.list_models(true).await.ok() },
    )
    .await;
    assert!(models.iter().any(|m| m.name == "over-tls"));
}
