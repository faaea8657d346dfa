//! A three-coordinator cluster: formation and replication, leader loss under
//! load, restart from disk, catch-up through a snapshot, and a node cut off
//! from its peers.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::{bin, model_names, spec, wait_for, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forms_replicates_and_follows_the_leader() {
    let cluster = Cluster::form(3, &[]).await;
    let (leader, follower) = cluster.follower().await;

    // A write sent to a follower is forwarded to the leader.
    let model = follower
        .client()
        .create_model(spec("llama-8b", "v1"))
        .await
        .expect("write through a follower");
    assert_eq!(model.versions.len(), 1);
    let model = cluster
        .client()
        .create_model(spec("llama-8b", "v2"))
        .await
        .expect("second version");
    assert_eq!(model.versions.len(), 2);

    // Linearizable reads see it from any node; every node applies it.
    for node in &cluster.nodes {
        let m = node
            .client()
            .get_model("llama-8b", true)
            .await
            .expect("linearizable read");
        assert_eq!(m.versions.len(), 2);
        wait_for(
            "replication to every node",
            Duration::from_secs(30),
            || async { model_names(node).await.filter(|n| n.contains("llama-8b")) },
        )
        .await;
    }

    let status = follower.client().cluster_status().await.expect("status");
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3);
    assert_eq!(status.leader_id, Some(leader));

    // The audit log names who did what.
    let audit = cluster.client().list_audit(0, 100).await.expect("audit");
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert!(
        actions.contains(&"cluster.init") && actions.contains(&"model.create"),
        "{actions:?}"
    );
    assert!(
        audit
            .iter()
            .any(|a| a.action == "model.create" && a.actor.starts_with("admin (")),
        "{audit:?}"
    );
    assert!(
        audit.iter().all(|a| a.at_ms > 0 && !a.actor.is_empty()),
        "{audit:?}"
    );

    // The CLI: a table for people and JSON for scripts.
    let endpoints = cluster
        .nodes
        .iter()
        .map(|n| n.grpc.clone())
        .collect::<Vec<_>>()
        .join(",");
    // The key from the environment, then from a file.
    let out = std::process::Command::new(bin("talon"))
        .args([
            "--endpoints",
            &endpoints,
            "--json",
            "model",
            "get",
            "llama-8b",
            "--linearizable",
        ])
        .env("TALON_KEY", cluster.admin_key())
        .output()
        .expect("run talon");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(json["versions"].as_array().map(Vec::len), Some(2));
    let key_dir = tempfile::tempdir().expect("temp dir");
    let key_file = key_dir.path().join("key");
    std::fs::write(&key_file, format!("{}\n", cluster.admin_key())).expect("key file");
    let out = std::process::Command::new(bin("talon"))
        .args(["--endpoints", &endpoints, "model", "list", "--key-file"])
        .arg(&key_file)
        .env_remove("TALON_KEY")
        .output()
        .expect("run talon");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("NAME") && table.contains("llama-8b  v1,v2"),
        "{table}"
    );

    // Metrics are exported.
    let term = follower
        .metric("talon_coordinator_raft_term")
        .await
        .expect("term metric");
    assert!(term >= 1.0);
    let leader_node = cluster
        .nodes
        .iter()
        .find(|n| n.id == leader)
        .expect("leader");
    assert_eq!(
        leader_node.metric("talon_coordinator_raft_is_leader").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::form(3, &[]).await;
    let old_leader = cluster.leader(None).await;
    let client = Arc::new(cluster.client());
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));

    // A continuous writer: every name that was acknowledged is recorded.
    let writer = {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("m-{n}");
                if client.create_model(spec(&name, "v1")).await.is_ok() {
                    acked.lock().unwrap().insert(name);
                }
                n += 1;
            }
        })
    };
    wait_for(
        "writes before the kill",
        Duration::from_secs(40),
        || async { (acked.lock().unwrap().len() >= 30).then_some(()) },
    )
    .await;
    cluster.node(old_leader).kill();
    let before_kill = acked.lock().unwrap().len();
    let new_leader = cluster.leader(Some(old_leader)).await;
    assert_ne!(new_leader, old_leader);
    wait_for(
        "writes after the failover",
        Duration::from_secs(30),
        || async { (acked.lock().unwrap().len() >= before_kill + 30).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    let acked = acked.lock().unwrap().clone();

    // Every acknowledged write is on every survivor.
    for node in cluster.nodes.iter().filter(|n| n.is_running()) {
        wait_for(
            &format!("node {} to hold every acknowledged write", node.id),
            Duration::from_secs(40),
            || async {
                model_names(node)
                    .await
                    .filter(|names| acked.is_subset(names))
            },
        )
        .await;
    }

    // The killed node restarts from its disk and catches up.
    cluster.node(old_leader).start();
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.id == old_leader)
        .expect("restarted node");
    wait_for(
        "the restarted node to catch up",
        Duration::from_secs(30),
        || async {
            model_names(node)
                .await
                .filter(|names| acked.is_subset(names))
        },
    )
    .await;
    let status = node.client().cluster_status().await.expect("status");
    assert_eq!(status.leader_id, Some(new_leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_through_a_snapshot() {
    let args = ["--snapshot-logs", "40", "--keep-logs-after-snapshot", "5"];
    let mut cluster = Cluster::form(3, &args).await;
    let leader = cluster.leader(None).await;
    let lagging = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|id| *id != leader)
        .expect("a follower");
    cluster.node(lagging).kill();

    let client = cluster.client();
    for i in 0..150 {
        client
            .create_model(spec(&format!("s-{i}"), "v1"))
            .await
            .expect("write while a node is down");
    }
    // The leader has snapshotted and purged past anything the lagging node has.
    let leader_node = cluster
        .nodes
        .iter()
        .find(|n| n.id == leader)
        .expect("leader");
    let status = wait_for(
        "the leader to purge its log",
        Duration::from_secs(40),
        || async {
            let s = leader_node.client().cluster_status().await.ok()?;
            (s.purged_index.unwrap_or(0) > 100).then_some(s)
        },
    )
    .await;
    assert!(status.snapshot_index.unwrap_or(0) > 100, "{status:?}");

    cluster.node(lagging).start();
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.id == lagging)
        .expect("lagging node");
    wait_for(
        "the lagging node to catch up",
        Duration::from_secs(30),
        || async {
            model_names(node)
                .await
                .filter(|names| (0..150).all(|i| names.contains(&format!("s-{i}"))))
        },
    )
    .await;
    let installed = node
        .metric("talon_coordinator_snapshots_installed_total")
        .await;
    assert!(
        installed.unwrap_or(0.0) >= 1.0,
        "the node caught up without installing a snapshot: {installed:?}"
    );
    // And it keeps following: a later write reaches it through the log.
    client
        .create_model(spec("after-snapshot", "v1"))
        .await
        .expect("write");
    wait_for(
        "a write after the snapshot",
        Duration::from_secs(30),
        || async {
            model_names(node)
                .await
                .filter(|n| n.contains("after-snapshot"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_cannot_commit_and_rejoins_cleanly() {
    let cluster = Cluster::form(3, &["--write-timeout-ms", "1500"]).await;
    let old = cluster.leader(None).await;
    let old_node = cluster.nodes.iter().find(|n| n.id == old).expect("leader");
    cluster
        .client()
        .create_model(spec("before", "v1"))
        .await
        .expect("write before the partition");

    old_node
        .client()
        .set_isolated(true)
        .await
        .expect("isolate the leader");
    // A write on the cut-off leader cannot reach a quorum.
    let err = old_node
        .client()
        .create_model(spec("lost", "v1"))
        .await
        .expect_err("no quorum");
    assert!(
        matches!(
            err.code(),
            Some(talon_client::Code::DeadlineExceeded) | Some(talon_client::Code::Unavailable)
        ),
        "{err}"
    );

    // The majority elects a new leader and keeps committing.
    let majority: Vec<_> = cluster.nodes.iter().filter(|n| n.id != old).collect();
    let new = wait_for(
        "a new leader among the majority",
        Duration::from_secs(40),
        || async {
            let s = majority[0].client().cluster_status().await.ok()?;
            s.leader_id.filter(|l| *l != old)
        },
    )
    .await;
    let majority_client = talon_client::Client::new(majority.iter().map(|n| n.grpc.clone()))
        .expect("client")
        .with_key(cluster.admin_key());
    majority_client
        .create_model(spec("during", "v1"))
        .await
        .expect("the majority commits");

    // Healed: the old leader follows the new one and converges; the write it
    // could not commit is gone.
    old_node.client().set_isolated(false).await.expect("heal");
    wait_for(
        "the old leader to rejoin",
        Duration::from_secs(40),
        || async {
            let s = old_node.client().cluster_status().await.ok()?;
            let names = model_names(old_node).await?;
            (s.leader_id == Some(new) && names.contains("during")).then_some(())
        },
    )
    .await;
    for node in &cluster.nodes {
        let names = wait_for("convergence", Duration::from_secs(30), || async {
            model_names(node).await.filter(|n| n.contains("during"))
        })
        .await;
        assert!(
            names.contains("before") && !names.contains("lost"),
            "node {}: {names:?}",
            node.id
        );
    }
}

/// Group commit: many writers at once get every write answered and
/// applied, each with its own audit entry, fewer log entries than writes,
/// and the audit pages (by log index) miss none and repeat none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_label_writes_are_group_committed_each_answered_and_audited() {
    let cluster = Cluster::form(3, &[]).await;
    let leader = cluster.leader(None).await;
    let client = cluster.client();
    client.create_model(spec("gc", "v1")).await.expect("create");
    const WRITERS: usize = 48;
    const EACH: usize = 10;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = cluster.client();
        tasks.push(tokio::spawn(async move {
            for j in 0..EACH {
                let set = std::collections::HashMap::from([(format!("w{w}"), j.to_string())]);
                let model = client
                    .update_model_labels("gc", set, vec![])
                    .await
                    .expect("every write is answered");
                // the answer is this write's own, applied
                assert_eq!(model.labels.get(&format!("w{w}")), Some(&j.to_string()));
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    for node in &cluster.nodes {
        let m = node.client().get_model("gc", true).await.expect("read");
        for w in 0..WRITERS {
            assert_eq!(
                m.labels.get(&format!("w{w}")).map(String::as_str),
                Some("9")
            );
        }
    }
    let leader_node = cluster
        .nodes
        .iter()
        .find(|n| n.id == leader)
        .expect("leader");
    let writes = leader_node
        .metric("talon_coordinator_group_commit_writes_total")
        .await
        .expect("group commit writes metric");
    let entries = leader_node
        .metric("talon_coordinator_group_commit_entries_total")
        .await
        .expect("group commit entries metric");
    assert!(writes >= (WRITERS * EACH) as f64, "{writes}");
    assert!(
        entries < writes,
        "{WRITERS} writers at once went through {entries} entries for {writes} writes"
    );
    // Paging the audit log 7 entries at a time (pages end at a log index
    // boundary) finds exactly what one big page does.
    let all = client.list_audit(0, 10_000).await.expect("audit");
    let labels = all.iter().filter(|a| a.action == "model.labels").count();
    assert_eq!(labels, WRITERS * EACH);
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = client.list_audit(after, 7).await.expect("audit page");
        let Some(last) = page.last() else { break };
        after = last.index;
        paged.extend(page);
    }
    assert_eq!(paged, all);
}

/// A leader restarts leading its own term, with a state machine that was
/// not yet flushed: its first linearizable reads must still see every
/// write it acknowledged before the crash (the restart fence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_killed_right_after_writes_reads_them_linearizably_after_restart() {
    let mut cluster = Cluster::form(3, &[]).await;
    let leader = cluster.leader(None).await;
    let client = cluster.client();
    let mut acked = BTreeSet::new();
    for i in 0..5 {
        let name = format!("before-crash-{i}");
        client.create_model(spec(&name, "v1")).await.expect("write");
        acked.insert(name);
    }
    // Followers first, so that the leader's committed vote survives; all
    // within milliseconds of the last acknowledgement, well inside the
    // state machine's background flush.
    let followers: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != leader)
        .collect();
    for id in &followers {
        cluster.node(*id).kill();
    }
    cluster.node(leader).kill();

    // The leader alone: it comes back leading its term at once, and a
    // linearizable read waits there for a quorum.
    cluster.node(leader).start();
    let restarted = cluster.node(leader).client();
    wait_for(
        "the leader restored in its term",
        Duration::from_secs(30),
        || async {
            let status = restarted.cluster_status().await.ok()?;
            (status.leader_id == Some(leader)).then_some(())
        },
    )
    .await;
    let reads = {
        let restarted = cluster.node(leader).client();
        tokio::spawn(async move {
            let seen = Mutex::new(Vec::<BTreeSet<String>>::new());
            // no quorum yet: answered at once, and polled again
            wait_for(
                "three linearizable reads after the restart",
                Duration::from_secs(60),
                || async {
                    if let Ok(models) = restarted.list_models(true).await {
                        let mut seen = seen.lock().unwrap();
                        seen.push(models.into_iter().map(|m| m.name).collect());
                    }
                    (seen.lock().unwrap().len() >= 3).then_some(())
                },
            )
            .await;
            seen.into_inner().unwrap()
        })
    };
    for id in &followers {
        cluster.node(*id).start();
    }
    let seen = reads.await.expect("reader");
    assert_eq!(
        seen.len(),
        3,
        "fewer than three linearizable reads succeeded within 60 s of the restart"
    );
    for names in &seen {
        assert!(
            acked.is_subset(names),
            "a linearizable read after the restart lacked acknowledged writes: {names:?}"
        );
    }
}
