//! Records through the envelope and the store: every command round-trips,
//! apply → persist → reopen gives the same state, and snapshots travel as
//! bytes that decode to the state they were built from.

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

use super::{codec, DataDir, StateMachineStore};
use crate::metrics::Metrics;
use crate::raft_types::Entry;
use crate::state::node::{Calibration, Gpu, MigDevice};
use crate::state::*;

fn finite() -> impl Strategy<Value = f64> {
    0.0f64..1e6
}

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9.-]{1,12}"
}

fn arb_inventory() -> impl Strategy<Value = NodeInventory> {
    (
        text(),
        finite(),
        finite(),
        1u32..64,
        prop::option::of(0u32..8),
        any::<bool>(),
    )
        .prop_map(|(id, cost, tflops, cores, start, mig)| NodeInventory {
            node_id: format!("n{id}"),
            addr: "10.0.0.1:7600".into(),
            cpu_cores: cores,
            host_memory_bytes: 1 << 34,
            labels: BTreeMap::from([("k".to_string(), id.clone())]),
            cost_per_hour: cost,
            probe: "simulated".into(),
            driver_version: String::new(),
            gpus: vec![Gpu {
                index: 0,
                uuid: format!("GPU-{id}"),
                name: "NVIDIA L4".into(),
                gpu_type: "l4".into(),
                memory_bytes: 24 << 30,
                compute_capability: (8, 9),
                mig_enabled: mig,
                mig_devices: if mig {
                    vec![MigDevice {
                        uuid: "MIG-x".into(),
                        profile: "1g.6gb".into(),
                        start,
                        memory_bytes: 6 << 30,
                    }]
                } else {
                    Vec::new()
                },
                nvlink_peers: Vec::new(),
                pci_bus_id: String::new(),
                ecc_enabled: start.map(|s| s % 2 == 0),
                power_limit_watts: 72,
                calibration: Some(Calibration {
                    sgemm_tflops: tflops,
                    hgemm_tflops: tflops * 2.0,
                    copy_gbps: cost,
                    skipped: String::new(),
                }),
            }],
            agent_version: "0.1.0".into(),
        })
}

fn arb_credential() -> impl Strategy<Value = Credential> {
    (
        "[0-9a-f]{16}",
        any::<[u8; 32]>(),
        0usize..5,
        prop::option::of(text()),
    )
        .prop_map(|(id, secret_sha256, role, node)| {
            let role = Role::ALL[role];
            Credential {
                id,
                principal: "p".into(),
                role,
                secret_sha256,
                node_id: (role == Role::Agent).then(|| node.unwrap_or_else(|| "n1".into())),
                created_at_ms: 0,
                created_by: "admin".into(),
                revision: 0,
            }
        })
}

/// Every kind of command, with names drawn from small sets so that
/// sequences hit existing records.
fn arb_command() -> impl Strategy<Value = Command> {
    let model = prop::sample::select(vec!["a", "b"]);
    let version = prop::sample::select(vec!["v1", "v2"]);
    prop_oneof![
        (model.clone(), version.clone()).prop_map(|(m, v)| Command::CreateModel(ModelSpec {
            name: m.into(),
            version: v.into(),
            engine: "simulated".into(),
            artifact_uri: "file:///m".into(),
            memory_mib: 100,
            latency_slo_ms: 100,
            min_replicas: 1,
            max_replicas: 2,
            priority: "normal".into(),
            labels: BTreeMap::new(),
        })),
        (model.clone(), prop::option::of(version.clone())).prop_map(|(m, v)| {
            Command::DeleteModel {
                name: m.into(),
                version: v.map(Into::into),
            }
        }),
        model.clone().prop_map(|m| Command::UpdateModelLabels {
            name: m.into(),
            set: [("x".to_string(), "1".to_string())].into(),
            remove: vec![],
        }),
        (model.clone(), text()).prop_map(|(m, v)| Command::UpdateModelLabelsIf {
            name: m.into(),
            set: [("x".to_string(), v.clone())].into(),
            remove: vec![],
            expect: [("x".to_string(), v)].into(),
        }),
        arb_inventory().prop_map(Command::RegisterNode),
        (text(), 0usize..3).prop_map(|(n, s)| Command::SetNodeState {
            node_id: format!("n{n}"),
            state: [NodeState::Ready, NodeState::Suspect, NodeState::Down][s],
            reason: "r".into(),
        }),
        (text(), 0usize..3).prop_map(|(n, a)| Command::SetNodeScheduling {
            node_id: format!("n{n}"),
            action: [Scheduling::Cordon, Scheduling::Uncordon, Scheduling::Drain][a],
        }),
        (model.clone(), version.clone(), text(), 1u32..1001).prop_map(|(m, v, n, milli)| {
            Command::SetReplicas {
                model: m.into(),
                replicas: vec![Replica {
                    id: format!("{m}@{v}-0"),
                    model: m.into(),
                    version: v.into(),
                    node_id: format!("n{n}"),
                    gpu: 0,
                    milli,
                    memory_mib: 100,
                    created_at_ms: 0,
                    revision: 0,
                    gpus: vec![0],
                    mig_device: format!("MIG-{n}"),
                    mig_slice: String::new(),
                    stages: 0,
                    pipeline: None,
                }],
            }
        }),
        (model.clone(), version, text(), 0u64..20).prop_map(|(m, v, n, model_revision)| {
            Command::SetReplicasChecked {
                model: m.into(),
                model_revision,
                replicas: vec![Replica {
                    id: format!("{m}@{v}-0"),
                    model: m.into(),
                    version: v.into(),
                    node_id: format!("n{n}"),
                    gpu: 0,
                    milli: 1000,
                    memory_mib: 100,
                    created_at_ms: 0,
                    revision: 0,
                    gpus: vec![0],
                    mig_device: String::new(),
                    mig_slice: format!("3g.40gb@{}", 4 * (model_revision % 2)),
                    stages: (model_revision % 3) as u32,
                    pipeline: (model_revision % 2 == 1).then(|| PipelineStage {
                        head: format!("{m}@{v}-0"),
                        index: (model_revision % 3) as u32,
                        count: 3,
                        first_layer: 40,
                        layers: 40,
                    }),
                }],
            }
        }),
        (arb_credential(), any::<[u8; 32]>()).prop_map(|(admin, cluster_secret)| {
            Command::InitAuth {
                admin,
                cluster_secret,
            }
        }),
        arb_credential().prop_map(Command::CreateCredential),
        "[0-9a-f]{16}".prop_map(|id| Command::RevokeCredential { id }),
        text().prop_map(|n| Command::RemoveNode {
            node_id: format!("n{n}")
        }),
        (0u64..40).prop_map(|before_index| Command::TrimAudit { before_index }),
        text().prop_map(|t| Command::Audit {
            action: "a".into(),
            target: t,
            detail: "d".into()
        }),
        arb_tenancy(),
        arb_rule(),
        // group commit: label writes to either model, one refused or not
        prop::collection::vec((model.clone(), text()), 1..4).prop_map(|writes| {
            Command::Batch(
                writes
                    .into_iter()
                    .map(|(m, v)| Request {
                        at_ms: 5,
                        actor: "b".into(),
                        command: Command::UpdateModelLabels {
                            name: m.into(),
                            set: BTreeMap::from([("k".to_string(), v)]),
                            remove: vec![],
                        },
                    })
                    .collect(),
            )
        }),
    ]
}

/// The chain's commands, over two rule names and every action.
fn arb_rule() -> impl Strategy<Value = Command> {
    use crate::state::chain::{Action, Conditions, Rule, Window};
    let name = prop::sample::select(vec!["r1", "r2"]);
    let action = prop_oneof![
        Just(Action::Route { model: "b".into() }),
        (1u32..=100).prop_map(|percent| Action::Split {
            model: "b".into(),
            percent
        }),
        Just(Action::Fallback {
            models: vec!["b".into(), "a".into()]
        }),
        (1u32..10, 1u32..60).prop_map(|(failures, open_s)| Action::Breaker { failures, open_s }),
        Just(Action::Deny {
            message: "closed".into()
        }),
        Just(Action::CapPriority {
            priority: Priority::Normal
        }),
        Just(Action::MaskPii),
    ];
    prop_oneof![
        (name.clone(), 0u32..100, action, 0u16..1440, -720i16..840).prop_map(
            |(n, priority, action, from, offset)| Command::PutRule(Rule {
                name: n.into(),
                priority,
                when: Conditions {
                    models: vec!["a".into()],
                    tenants: vec!["t1".into()],
                    priorities: vec![Priority::Low],
                    header: Some(("x-team".into(), "ads".into())),
                    hours: Some(Window {
                        from_minute: from,
                        to_minute: (from + 60) % 1440,
                        utc_offset_minutes: offset,
                    }),
                },
                action,
                created_at_ms: 0,
                revision: 0,
            })
        ),
        name.prop_map(|n| Command::DeleteRule { name: n.into() }),
    ]
}

/// The tenant, key and usage commands, over two tenants and two keys.
fn arb_tenancy() -> impl Strategy<Value = Command> {
    use crate::state::{
        ContentFilter, FilterAction, KeyPolicy, Limits, Priority, Tenant, Usage, UsageKey,
    };
    let tenant = prop::sample::select(vec!["t1", "t2"]);
    let key = prop::sample::select(vec!["k1", "k2"]);
    prop_oneof![
        (
            tenant.clone(),
            prop::option::of(1u32..100),
            any::<bool>(),
            0u32..100
        )
            .prop_map(
                |(t, rpm, mask_pii, cache_ttl_s)| Command::PutTenant(Tenant {
                    name: t.into(),
                    models: vec!["a".into()],
                    limits: Limits {
                        requests_per_minute: rpm,
                        daily_budget_usd: rpm.map(f64::from),
                        ..Default::default()
                    },
                    created_at_ms: 0,
                    revision: 0,
                    mask_pii,
                    cache_ttl_s,
                    filters: vec![ContentFilter {
                        pattern: "(?i)x".into(),
                        action: if mask_pii {
                            FilterAction::Mask
                        } else {
                            FilterAction::Block
                        },
                    }],
                })
            ),
        tenant
            .clone()
            .prop_map(|t| Command::DeleteTenant { name: t.into() }),
        (arb_credential(), tenant.clone(), key.clone()).prop_map(|(mut c, t, k)| {
            c.role = Role::Inference;
            c.node_id = None;
            Command::CreateKey {
                credential: c,
                policy: KeyPolicy {
                    tenant: t.into(),
                    name: k.into(),
                    models: vec![],
                    max_priority: Priority::High,
                    limits: Limits::default(),
                    revision: 0,
                },
            }
        }),
        (arb_credential(), "[0-9a-f]{16}").prop_map(|(mut c, old)| {
            c.role = Role::Inference;
            c.node_id = None;
            Command::RotateKey { old, credential: c }
        }),
        (tenant, key, 0u32..3, 0u64..1000).prop_map(|(t, k, day, n)| Command::RecordUsage {
            rows: vec![(
                UsageKey {
                    day: 20_000 + day,
                    tenant: t.into(),
                    key: k.into(),
                    model: "a".into(),
                },
                Usage {
                    requests: 1,
                    prompt_tokens: n,
                    completion_tokens: n / 2,
                    gpu_seconds: n as f64 / 8.0,
                    cost_usd: n as f64 / 1024.0,
                },
            )],
        }),
    ]
}

fn entry(index: u64, command: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request {
            at_ms: index * 10,
            actor: "t".into(),
            command,
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Anything that encodes decodes to the same value.
    #[test]
    fn every_command_round_trips(command in arb_command(), index in 1u64..1_000_000) {
        let e = entry(index, command);
        let bytes = codec::encode(&e).unwrap();
        let back: Entry = codec::decode(&bytes).unwrap();
        prop_assert_eq!(format!("{back:?}"), format!("{e:?}"));
    }

    /// The state kept on disk is the state in memory: applying a log,
    /// persisting the changed records and reopening the directory gives the
    /// same `State`, and the invariants hold throughout.
    #[test]
    fn apply_persist_reopen_gives_the_same_state(commands in prop::collection::vec(arb_command(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let data = DataDir::open(dir.path(), 1).unwrap();
            let mut sm = StateMachineStore::open(data.clone(), Arc::new(Metrics::new())).unwrap();
            let entries: Vec<Entry> = commands
                .into_iter()
                .enumerate()
                .map(|(i, c)| entry(i as u64 + 1, c))
                .collect();
            // Two batches, as openraft hands them over.
            let half = entries.len() / 2;
            sm.apply(entries[..half].to_vec()).await.unwrap();
            sm.apply(entries[half..].to_vec()).await.unwrap();
            let before = sm.shared().read().unwrap().state.clone();
            before.check_consistency().unwrap();
            drop(sm);
            data.state.flush().unwrap();
            let reopened = StateMachineStore::open(data, Arc::new(Metrics::new())).unwrap();
            let after = reopened.shared().read().unwrap().state.clone();
            assert_eq!(after, before);
        });
    }
}

/// The state machine store's snapshot travels as bytes that decode to the
/// state it was built from.
#[tokio::test]
async fn snapshots_round_trip() {
    use openraft::RaftSnapshotBuilder;
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path(), 1).unwrap();
    let mut sm = StateMachineStore::open(data, Arc::new(Metrics::new())).unwrap();
    let (admin, _) = crate::admin::new_credential("admin", Role::Admin, None, "t");
    sm.apply(vec![
        entry(
            1,
            Command::InitAuth {
                admin,
                cluster_secret: [3; 32],
            },
        ),
        entry(
            2,
            Command::RegisterNode(NodeInventory {
                node_id: "n1".into(),
                ..arb_inventory_fixed()
            }),
        ),
    ])
    .await
    .unwrap();
    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = StateMachineStore::open(
        DataDir::open(other_dir.path(), 2).unwrap(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    other
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    let a = sm.shared().read().unwrap().state.clone();
    let b = other.shared().read().unwrap().state.clone();
    assert_eq!(a, b);
    assert_eq!(b.cluster_secret, Some([3; 32]));
    assert_eq!(b.credentials.len(), 1);
}

fn arb_inventory_fixed() -> NodeInventory {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    arb_inventory().new_tree(&mut runner).unwrap().current()
}

/// A snapshot install cut short after its first batch of records (as a
/// crash would leave it: some records of the new state written, the old
/// ones gone) is finished when the store opens again: the same state as
/// the snapshot's, none of the old records, the snapshot's log id.
#[tokio::test]
async fn a_snapshot_install_cut_short_is_finished_when_the_store_opens() {
    use openraft::RaftSnapshotBuilder;
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(
        DataDir::open(dir.path(), 1).unwrap(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    // more records than one install batch
    let entries: Vec<Entry> = (0..super::state_machine::INSTALL_BATCH as u64 + 200)
        .map(|i| {
            let inventory =
                crate::reconcile::tests::inventory(&format!("n{i:05}"), &[("l4", 24), ("l4", 24)]);
            entry(i + 1, Command::RegisterNode(inventory))
        })
        .collect();
    let responses = sm.apply(entries).await.unwrap();
    assert!(
        !responses
            .iter()
            .any(|r| matches!(r, crate::state::Response::Rejected(_))),
        "{:?}",
        responses
            .iter()
            .find(|r| matches!(r, crate::state::Response::Rejected(_)))
    );
    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let want = sm.shared().read().unwrap().clone();

    let other_dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(other_dir.path(), 2).unwrap();
    let mut other = StateMachineStore::open(data.clone(), Arc::new(Metrics::new())).unwrap();
    other
        .apply(vec![entry(
            1,
            Command::RegisterNode(NodeInventory {
                node_id: "only-here".into(),
                ..arb_inventory_fixed()
            }),
        )])
        .await
        .unwrap();
    other.stop_installs_after(1);
    other
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .expect_err("stopped in the middle");
    drop(other);
    data.state.flush().unwrap();
    // what a reader of the records alone would see now: a partial state
    assert!(data.sm.len() < want.state.nodes.len() + want.state.audit.len());

    let reopened = StateMachineStore::open(data.clone(), Arc::new(Metrics::new())).unwrap();
    let got = reopened.shared().read().unwrap().clone();
    assert!(
        got.state == want.state,
        "{} nodes and {} audit entries read back, of {} and {}",
        got.state.nodes.len(),
        got.state.audit.len(),
        want.state.nodes.len(),
        want.state.audit.len()
    );
    assert!(!got.state.nodes.contains_key("only-here"));
    assert_eq!(got.last_applied, snapshot.meta.last_log_id);
    drop(reopened);
    // finished for good: opening again reads the same
    let again = StateMachineStore::open(data, Arc::new(Metrics::new())).unwrap();
    assert!(again.shared().read().unwrap().state == want.state);
}
