//! Tests of the replicated state's `apply`: rules, rejections, invariants,
//! determinism.

use proptest::prelude::*;

use super::*;

fn spec(name: &str, version: &str) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        version: version.into(),
        engine: "vllm".into(),
        artifact_uri: "hf://org/model".into(),
        memory_mib: 1000,
        latency_slo_ms: 200,
        min_replicas: 0,
        max_replicas: 2,
        priority: "normal".into(),
        labels: BTreeMap::new(),
    }
}

fn req(at_ms: u64, command: Command) -> Request {
    Request {
        at_ms,
        actor: "test".into(),
        command,
    }
}

#[test]
fn create_then_new_version_then_delete_version() {
    let mut state = State::default();
    let (r, changes) = state.apply(3, &req(1000, Command::CreateModel(spec("m", "v1"))));
    assert!(matches!(r, Response::Model(ref m) if m.revision == 3 && m.created_at_ms == 1000));
    assert_eq!(
        changes,
        vec![Change::Model("m".into()), Change::Audit(first_audit_key(3))]
    );
    let (r, _) = state.apply(4, &req(2000, Command::CreateModel(spec("m", "v2"))));
    let Response::Model(m) = r else {
        panic!("{r:?}")
    };
    assert_eq!(m.versions.len(), 2);
    assert_eq!((m.created_at_ms, m.updated_at_ms), (1000, 2000));
    let (r, _) = state.apply(
        5,
        &req(
            3000,
            Command::DeleteModel {
                name: "m".into(),
                version: Some("v1".into()),
            },
        ),
    );
    assert_eq!(r, Response::Deleted { revision: 5 });
    assert_eq!(state.models["m"].versions[0].version, "v2");
    assert_eq!(state.audit.len(), 3);
    state.check_consistency().unwrap();
}

#[test]
fn rejections_change_nothing() {
    let mut state = State::default();
    state.apply(1, &req(10, Command::CreateModel(spec("m", "v1"))));
    let before = state.clone();
    let bad = [
        Command::CreateModel(spec("m", "v1")),
        Command::CreateModel(ModelSpec {
            min_replicas: 5,
            ..spec("n", "v1")
        }),
        Command::DeleteModel {
            name: "nope".into(),
            version: None,
        },
        Command::DeleteModel {
            name: "m".into(),
            version: Some("v9".into()),
        },
        Command::DeleteModel {
            name: "m".into(),
            version: Some("v1".into()),
        },
        Command::UpdateModelLabels {
            name: "m".into(),
            set: BTreeMap::new(),
            remove: vec![],
        },
        Command::UpdateModelLabels {
            name: "m".into(),
            set: [("a".to_string(), "1".to_string())].into(),
            remove: vec!["a".into()],
        },
    ];
    for (i, command) in bad.into_iter().enumerate() {
        let (r, changes) = state.apply(2 + i as u64, &req(20, command.clone()));
        assert!(matches!(r, Response::Rejected(_)), "{command:?} gave {r:?}");
        assert!(changes.is_empty());
        assert_eq!(state, before, "{command:?} changed the state");
    }
}

#[test]
fn label_compare_and_set_applies_only_on_the_expected_value() {
    let mut state = State::default();
    let mut labelled = spec("m", "v1");
    labelled.labels.insert("owner".into(), "a".into());
    state.apply(2, &req(10, Command::CreateModel(labelled)));
    let cas = |expect: &str, to: &str| Command::UpdateModelLabelsIf {
        name: "m".into(),
        set: [("owner".to_string(), to.to_string())].into(),
        remove: vec![],
        expect: [("owner".to_string(), expect.to_string())].into(),
    };
    let (r, _) = state.apply(3, &req(11, cas("a", "b")));
    assert!(matches!(r, Response::Model(ref m) if m.labels["owner"] == "b" && m.revision == 3));
    let before = state.clone();
    let (r, changes) = state.apply(4, &req(12, cas("a", "c")));
    let Response::Rejected(rejection) = r else {
        panic!("a stale compare-and-set was applied: {r:?}")
    };
    assert_eq!(rejection.kind, RejectionKind::Conflict);
    assert!(
        rejection
            .message
            .contains("\"owner\" is \"b\", not the expected \"a\""),
        "{}",
        rejection.message
    );
    assert!(changes.is_empty());
    assert_eq!(state, before);
    let absent = Command::UpdateModelLabelsIf {
        name: "m".into(),
        set: [("x".to_string(), "1".to_string())].into(),
        remove: vec![],
        expect: [("missing".to_string(), String::new())].into(),
    };
    let (r, _) = state.apply(5, &req(13, absent));
    assert!(matches!(r, Response::Rejected(ref j) if j.message.contains("no such label")));
    assert_eq!(state, before);
    state.check_consistency().unwrap();
}

#[test]
fn a_leader_whose_clock_is_behind_does_not_move_a_model_back_in_time() {
    // Found by the state_apply fuzzer: a label update proposed by a new
    // leader whose wall clock is behind the old one's.
    let mut state = State::default();
    state.apply(2, &req(5_000, Command::CreateModel(spec("m", "v1"))));
    let labels = Command::UpdateModelLabels {
        name: "m".into(),
        set: [("a".to_string(), "1".to_string())].into(),
        remove: vec![],
    };
    let (r, _) = state.apply(3, &req(4_000, labels));
    assert!(
        matches!(r, Response::Model(ref m) if m.updated_at_ms == 5_000),
        "{r:?}"
    );
    state.apply(4, &req(3_000, Command::CreateModel(spec("m", "v2"))));
    assert_eq!(state.models["m"].updated_at_ms, 5_000);
    state.check_consistency().unwrap();
}

fn node(id: &str) -> NodeInventory {
    NodeInventory {
        node_id: id.into(),
        addr: "10.0.0.1:7600".into(),
        cpu_cores: 8,
        host_memory_bytes: 1 << 34,
        labels: BTreeMap::new(),
        cost_per_hour: 1.0,
        probe: "simulated".into(),
        driver_version: String::new(),
        gpus: vec![node::Gpu {
            index: 0,
            uuid: format!("GPU-{id}"),
            name: "NVIDIA L4".into(),
            gpu_type: "l4".into(),
            memory_bytes: 24 << 30,
            compute_capability: (8, 9),
            mig_enabled: false,
            mig_devices: vec![],
            nvlink_peers: vec![],
            pci_bus_id: String::new(),
            ecc_enabled: None,
            power_limit_watts: 72,
            calibration: Some(node::Calibration {
                sgemm_tflops: 30.0,
                hgemm_tflops: 120.0,
                copy_gbps: 300.0,
                skipped: String::new(),
            }),
        }],
        agent_version: "0.1.0".into(),
    }
}

#[test]
fn poisonous_registrations_are_refused_naming_the_field() {
    let mut state = State::default();
    let cases: Vec<(Box<dyn Fn(&mut NodeInventory)>, &str)> = vec![
        (
            Box::new(|n| n.gpus[0].calibration.as_mut().unwrap().sgemm_tflops = f64::NAN),
            "calibration.sgemm_tflops",
        ),
        (
            Box::new(|n| n.gpus[0].calibration.as_mut().unwrap().hgemm_tflops = f64::INFINITY),
            "calibration.hgemm_tflops",
        ),
        (
            Box::new(|n| n.gpus[0].calibration.as_mut().unwrap().copy_gbps = -1.0),
            "calibration.copy_gbps",
        ),
        (
            Box::new(|n| n.gpus[0].calibration.as_mut().unwrap().copy_gbps = 1e300),
            "calibration.copy_gbps",
        ),
        (Box::new(|n| n.cost_per_hour = f64::NAN), "cost_per_hour"),
        (Box::new(|n| n.addr = "not an address".into()), "addr"),
        (Box::new(|n| n.gpus[0].name = "x".repeat(10_000)), "name"),
        (
            Box::new(|n| n.gpus[0].gpu_type = "H100 SXM".into()),
            "gpu_type",
        ),
        (Box::new(|n| n.gpus[0].memory_bytes = u64::MAX), "memory"),
        (
            Box::new(|n| n.gpus[0].nvlink_peers = vec!["p".into(); 1000]),
            "NVLink peers",
        ),
        (Box::new(|n| n.cpu_cores = u32::MAX), "cpu_cores"),
    ];
    for (i, (poison, field)) in cases.iter().enumerate() {
        let mut inventory = node("n1");
        poison(&mut inventory);
        let (r, changes) = state.apply(i as u64 + 1, &req(1, Command::RegisterNode(inventory)));
        let Response::Rejected(rejection) = r else {
            panic!("case {i} accepted")
        };
        assert!(
            rejection.message.contains(field),
            "case {i}: {}",
            rejection.message
        );
        assert!(changes.is_empty());
    }
    assert_eq!(state, State::default());
}

#[test]
fn gpu_types_in_the_fleet_are_bounded() {
    let mut state = State::default();
    for i in 0..node::MAX_GPU_TYPES {
        let mut n = node(&format!("n{i}"));
        n.gpus[0].gpu_type = format!("type-{i}");
        let (r, _) = state.apply(i as u64 + 1, &req(1, Command::RegisterNode(n)));
        assert!(matches!(r, Response::Node(_)), "{r:?}");
    }
    let mut n = node("one-too-many");
    n.gpus[0].gpu_type = "type-new".into();
    let (r, _) = state.apply(1000, &req(1, Command::RegisterNode(n)));
    assert!(
        matches!(r, Response::Rejected(ref x) if x.message.contains("distinct GPU types")),
        "{r:?}"
    );
}

fn credential(id: &str, role: Role, node: Option<&str>) -> Credential {
    Credential {
        id: id.into(),
        principal: "p".into(),
        role,
        secret_sha256: [1; 32],
        node_id: node.map(Into::into),
        created_at_ms: 0,
        created_by: "t".into(),
        revision: 0,
    }
}

#[test]
fn credentials_init_once_bind_one_node_and_go_with_it() {
    let mut state = State::default();
    let admin = credential("00000000000000aa", Role::Admin, None);
    let init = Command::InitAuth {
        admin: admin.clone(),
        cluster_secret: [9; 32],
    };
    assert!(matches!(
        state.apply(1, &req(5, init.clone())).0,
        Response::Credential(_)
    ));
    assert!(
        matches!(state.apply(2, &req(5, init)).0, Response::Rejected(ref r) if r.kind == RejectionKind::AlreadyExists)
    );
    let agent = credential("00000000000000bb", Role::Agent, Some("n1"));
    assert!(matches!(
        state.apply(3, &req(5, Command::CreateCredential(agent))).0,
        Response::Credential(_)
    ));
    let twice = credential("00000000000000cc", Role::Agent, Some("n1"));
    let (r, _) = state.apply(4, &req(5, Command::CreateCredential(twice)));
    assert!(
        matches!(r, Response::Rejected(ref x) if x.message.contains("already holds agent credential")),
        "{r:?}"
    );
    let unbound = credential("00000000000000dd", Role::Agent, None);
    assert!(matches!(
        state
            .apply(5, &req(5, Command::CreateCredential(unbound)))
            .0,
        Response::Rejected(_)
    ));
    // A node is removed only when down or draining; its credential goes with it.
    state.apply(6, &req(5, Command::RegisterNode(node("n1"))));
    let remove = Command::RemoveNode {
        node_id: "n1".into(),
    };
    assert!(matches!(
        state.apply(7, &req(5, remove.clone())).0,
        Response::Rejected(_)
    ));
    state.apply(
        8,
        &req(
            5,
            Command::SetNodeScheduling {
                node_id: "n1".into(),
                action: Scheduling::Drain,
            },
        ),
    );
    assert!(matches!(
        state.apply(9, &req(5, remove)).0,
        Response::NodeRemoved { .. }
    ));
    assert!(state.nodes.is_empty());
    assert_eq!(
        state.credentials.keys().collect::<Vec<_>>(),
        vec!["00000000000000aa"]
    );
    state.check_consistency().unwrap();
}

#[test]
fn audit_retention_cuts_the_same_everywhere() {
    let mut state = State::default();
    for i in 1..=10 {
        state.apply(
            i,
            &req(
                i,
                Command::Audit {
                    action: "a".into(),
                    target: "t".into(),
                    detail: String::new(),
                },
            ),
        );
    }
    let mut other = state.clone();
    let trim = req(11, Command::TrimAudit { before_index: 8 });
    let (r, changes) = state.apply(11, &trim);
    assert_eq!(r, Response::Trimmed { removed: 7 });
    assert_eq!(changes.len(), 7);
    other.apply(11, &trim);
    assert_eq!(state, other);
    assert_eq!(
        state.audit.values().map(|a| a.index).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
}

fn label(name: &str, value: &str) -> Command {
    Command::UpdateModelLabels {
        name: name.into(),
        set: BTreeMap::from([("k".to_string(), value.to_string())]),
        remove: vec![],
    }
}

#[test]
fn a_batch_applies_its_writes_in_order_each_with_its_answer_and_audit_entry() {
    let mut state = State::default();
    state.apply(3, &req(1000, Command::CreateModel(spec("m", "v1"))));
    let mut one_by_one = state.clone();
    let writes = vec![
        req(2000, label("m", "a")),
        Request {
            actor: "someone-else".into(),
            ..req(2001, label("missing", "x"))
        },
        req(
            2002,
            Command::UpdateModelLabelsIf {
                name: "m".into(),
                set: BTreeMap::from([("k".to_string(), "b".to_string())]),
                remove: vec![],
                expect: BTreeMap::from([("k".to_string(), "a".to_string())]),
            },
        ),
        req(
            2003,
            Command::UpdateModelLabelsIf {
                name: "m".into(),
                set: BTreeMap::from([("k".to_string(), "c".to_string())]),
                remove: vec![],
                expect: BTreeMap::from([("k".to_string(), "a".to_string())]),
            },
        ),
    ];
    let (r, changes) = state.apply(4, &req(2003, Command::Batch(writes.clone())));
    let Response::Batch(answers) = r else {
        panic!("{r:?}")
    };
    assert_eq!(answers.len(), 4);
    assert!(matches!(&answers[0], Response::Model(m) if m.labels["k"] == "a" && m.revision == 4));
    assert!(
        matches!(&answers[1], Response::Rejected(r) if r.kind == RejectionKind::NotFound),
        "{:?}",
        answers[1]
    );
    assert!(matches!(&answers[2], Response::Model(m) if m.labels["k"] == "b"));
    assert!(
        matches!(&answers[3], Response::Rejected(r) if r.kind == RejectionKind::Conflict),
        "{:?}",
        answers[3]
    );
    assert_eq!(state.models["m"].labels["k"], "b");
    // one audit entry per applied write, at the entry's index, in order
    let audited: Vec<(u64, u64, String)> = state
        .audit
        .iter()
        .map(|(k, a)| (*k, a.index, a.at_ms.to_string()))
        .collect();
    assert_eq!(
        audited,
        vec![
            (first_audit_key(3), 3, "1000".into()),
            (audit_key(4, 0).unwrap(), 4, "2000".into()),
            (audit_key(4, 2).unwrap(), 4, "2002".into()),
        ]
    );
    assert!(changes.contains(&Change::Audit(audit_key(4, 2).unwrap())));
    state.check_consistency().unwrap();
    // the same as the writes one after another, but for where the audit
    // entries are kept and the revision
    for (i, w) in writes.iter().enumerate() {
        one_by_one.apply(10 + i as u64, w);
    }
    assert_eq!(one_by_one.models["m"].labels, state.models["m"].labels);
}

#[test]
fn a_batch_with_a_write_that_is_proposed_alone_is_refused_whole() {
    let mut state = State::default();
    state.apply(3, &req(1000, Command::CreateModel(spec("m", "v1"))));
    let before = state.clone();
    for bad in [
        vec![
            req(2000, label("m", "a")),
            req(2000, Command::CreateModel(spec("n", "v1"))),
        ],
        vec![req(2000, Command::Batch(vec![req(2000, label("m", "a"))]))],
        (0..=MAX_BATCH)
            .map(|_| req(2000, label("m", "a")))
            .collect(),
    ] {
        let (r, changes) = state.apply(4, &req(2000, Command::Batch(bad)));
        assert!(
            matches!(&r, Response::Rejected(r) if r.kind == RejectionKind::Invalid),
            "{r:?}"
        );
        assert!(changes.is_empty());
        assert_eq!(state, before);
    }
    // the most a batch may hold is applied
    let full: Vec<Request> = (0..MAX_BATCH).map(|_| req(2000, label("m", "a"))).collect();
    let (r, _) = state.clone().apply(4, &req(2000, Command::Batch(full)));
    assert!(
        matches!(&r, Response::Batch(a) if a.len() == MAX_BATCH),
        "{r:?}"
    );
    // an index so high that the batch's audit keys would not fit in u64
    let (r, _) = state.apply(
        u64::MAX / 2,
        &req(2000, Command::Batch(vec![req(2000, label("m", "a"))])),
    );
    assert!(
        matches!(&r, Response::Rejected(r) if r.kind == RejectionKind::Invalid),
        "{r:?}"
    );
    assert_eq!(state, before);
}

fn arb_command() -> impl Strategy<Value = Command> {
    let name = prop::sample::select(vec!["a", "b", "c", "Bad"]);
    let version = prop::sample::select(vec!["v1", "v2", "v3"]);
    prop_oneof![
        (name.clone(), version.clone(), 0u32..4, 0u32..4).prop_map(|(n, v, min, max)| {
            Command::CreateModel(ModelSpec {
                min_replicas: min,
                max_replicas: max,
                ..spec(n, v)
            })
        }),
        (name.clone(), prop::option::of(version)).prop_map(|(n, v)| Command::DeleteModel {
            name: n.into(),
            version: v.map(Into::into)
        }),
        (name, prop::sample::select(vec!["x", "y"]), any::<bool>()).prop_map(|(n, k, set)| {
            if set {
                Command::UpdateModelLabels {
                    name: n.into(),
                    set: [(k.to_string(), "1".into())].into(),
                    remove: vec![],
                }
            } else {
                Command::UpdateModelLabels {
                    name: n.into(),
                    set: BTreeMap::new(),
                    remove: vec![k.into()],
                }
            }
        }),
    ]
}

proptest! {
    /// Any sequence of commands keeps the invariants, a rejected command
    /// changes nothing, and replaying the same log gives the same state.
    #[test]
    fn apply_is_deterministic_and_consistent(commands in prop::collection::vec(arb_command(), 0..60)) {
        let mut state = State::default();
        for (i, command) in commands.iter().enumerate() {
            let before = state.clone();
            let (response, changes) = state.apply(i as u64 + 1, &req(i as u64 * 7, command.clone()));
            if matches!(response, Response::Rejected(_)) {
                prop_assert_eq!(&state, &before);
                prop_assert!(changes.is_empty());
            }
            prop_assert!(state.check_consistency().is_ok(), "{:?}", state.check_consistency());
        }
        let mut again = State::default();
        for (i, command) in commands.iter().enumerate() {
            again.apply(i as u64 + 1, &req(i as u64 * 7, command.clone()));
        }
        prop_assert_eq!(state, again);
    }
}
