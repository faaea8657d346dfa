//! Placing, keeping and moving one-GPU replicas: shares, down and failed nodes, stale plans, GPUs running short.

use super::*;

#[test]
fn places_replicas_without_overcommit_and_moves_them_off_down_nodes() {
    let (mut s, mut i) = (State::default(), 0);
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(inventory("a", &[("l4", 24), ("l4", 24)])),
    );
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(inventory("b", &[("h100-sxm", 80)])),
    );
    run(&mut s, &mut i, model("small", 10_000, 4));
    run(&mut s, &mut i, model("big", 40_000, 1));
    run(&mut s, &mut i, model("huge", 200_000, 1));
    converge(&mut s, &mut i);
    assert_eq!(
        s.replicas.values().filter(|r| r.model == "small").count(),
        4
    );
    let big: Vec<_> = s.replicas.values().filter(|r| r.model == "big").collect();
    assert_eq!(
        (big.len(), big[0].node_id.as_str()),
        (1, "b"),
        "only the H100 holds 40 GB"
    );
    assert!(!s.replicas.values().any(|r| r.model == "huge"));
    assert!(plan(&s)
        .unplaced
        .iter()
        .any(|(id, why)| id.starts_with("huge") && why.contains("200000 MiB")));
    for ((node, gpu), (milli, mem)) in gpu_load(&s) {
        let g = &s.nodes[&node].inventory.gpus[gpu as usize];
        assert!(
            milli <= 1000 && mem <= g.memory_bytes >> 20,
            "{node}/{gpu} overcommitted: {milli} milli, {mem} MiB"
        );
    }
    // Stable: planning again changes nothing.
    assert!(plan(&s).commands.is_empty());

    // Suspect (or cordoned): keeps its replicas, takes no new ones.
    run(
        &mut s,
        &mut i,
        Command::SetNodeState {
            node_id: "a".into(),
            state: NodeState::Suspect,
            reason: "t".into(),
        },
    );
    assert!(
        plan(&s).commands.is_empty(),
        "a suspect node keeps its replicas"
    );
    run(&mut s, &mut i, model("more", 1_000, 2));
    converge(&mut s, &mut i);
    assert!(
        s.replicas
            .values()
            .filter(|r| r.model == "more")
            .all(|r| r.node_id == "b"),
        "no new work on a suspect node"
    );
    run(
        &mut s,
        &mut i,
        Command::DeleteModel {
            name: "more".into(),
            version: None,
        },
    );
    converge(&mut s, &mut i);

    // Node a goes down: its replicas move to b if they fit, the rest wait.
    let before: Vec<String> = s
        .replicas
        .values()
        .filter(|r| r.node_id == "b")
        .map(|r| r.id.clone())
        .collect();
    run(
        &mut s,
        &mut i,
        Command::SetNodeState {
            node_id: "a".into(),
            state: NodeState::Down,
            reason: "t".into(),
        },
    );
    converge(&mut s, &mut i);
    assert!(s.replicas.values().all(|r| r.node_id == "b"));
    for id in before {
        assert_eq!(
            s.replicas[&id].node_id, "b",
            "{id} was on a healthy node and must not move"
        );
    }
    for ((_, _), (milli, _)) in gpu_load(&s) {
        assert!(milli <= 1000);
    }
    // A deleted model loses its replicas.
    run(
        &mut s,
        &mut i,
        Command::DeleteModel {
            name: "big".into(),
            version: None,
        },
    );
    converge(&mut s, &mut i);
    assert!(!s.replicas.values().any(|r| r.model == "big"));
}

#[test]
fn a_share_is_the_memory_on_the_gpu_it_lands_on_and_a_small_node_moves_nobody() {
    let (mut s, mut i) = (State::default(), 0);
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(inventory("big", &[("h100-sxm", 80)])),
    );
    run(&mut s, &mut i, model("m", 20_480, 4));
    converge(&mut s, &mut i);
    // 20 GiB of an 80 GiB GPU: 250 milli each (sizing against a smaller
    // GPU elsewhere in the fleet would have taken more)
    assert!(
        s.replicas.values().all(|r| r.milli == 250),
        "{:?}",
        s.replicas
    );
    let before = s.replicas.clone();
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(inventory("small", &[("l4", 24)])),
    );
    assert!(
        plan(&s).commands.is_empty(),
        "a small GPU joining changes no replica's share or place"
    );
    // another model's replica: only the L4 has room, at its own share
    run(&mut s, &mut i, model("n", 20_480, 1));
    converge(&mut s, &mut i);
    for (id, r) in &before {
        assert_eq!(
            (&s.replicas[id].node_id, s.replicas[id].milli),
            (&r.node_id, r.milli)
        );
    }
    let on_small: Vec<_> = s
        .replicas
        .values()
        .filter(|r| r.node_id == "small")
        .collect();
    assert_eq!(on_small.len(), 1);
    assert_eq!(on_small[0].milli, 834, "ceil(20480 * 1000 / 24576)");
}

#[test]
fn a_replica_its_agent_reports_failed_is_placed_on_another_node() {
    let (mut s, mut i) = (State::default(), 0);
    for n in ["a", "b"] {
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory(n, &[("l4", 24)])),
        );
    }
    run(&mut s, &mut i, model("m", 10_000, 1));
    converge(&mut s, &mut i);
    let r = s.replicas.values().next().unwrap().clone();
    let failed = BTreeMap::from([(r.id.clone(), r.node_id.clone())]);
    let p = plan_with(
        &s,
        &Observed {
            failed,
            ..Default::default()
        },
    );
    assert_eq!(p.commands.len(), 1, "{p:?}");
    for c in p.commands {
        run(&mut s, &mut i, c);
    }
    let moved = s.replicas[&r.id].clone();
    assert_ne!(moved.node_id, r.node_id, "placed elsewhere");
    // with nowhere else to go it stays unplaced, with the reason
    run(
        &mut s,
        &mut i,
        Command::SetNodeState {
            node_id: r.node_id.clone(),
            state: NodeState::Down,
            reason: "t".into(),
        },
    );
    let failed = BTreeMap::from([(r.id.clone(), moved.node_id.clone())]);
    let p = plan_with(
        &s,
        &Observed {
            failed,
            ..Default::default()
        },
    );
    assert!(
        p.unplaced.iter().any(|(id, _)| *id == r.id),
        "{:?}",
        p.unplaced
    );
}

#[test]
fn a_plan_made_before_the_model_changed_is_refused() {
    let (mut s, mut i) = (State::default(), 0);
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(inventory("a", &[("l4", 24)])),
    );
    run(&mut s, &mut i, model("m", 10_000, 1));
    let stale = plan(&s);
    assert_eq!(stale.commands.len(), 1);
    // a new version lands before the plan commits
    let mut v2 = model("m", 10_000, 1);
    if let Command::CreateModel(spec) = &mut v2 {
        spec.version = "v2".into();
    }
    run(&mut s, &mut i, v2);
    let before = s.replicas.clone();
    i += 1;
    let response = s.apply(
        i,
        &Request {
            at_ms: i,
            actor: "reconciler".into(),
            command: stale.commands[0].clone(),
        },
    );
    match response.0 {
        crate::state::Response::Rejected(r) => {
            assert!(r.message.contains("stale placement"), "{}", r.message)
        }
        other => panic!("stale plan applied: {other:?}"),
    }
    assert_eq!(s.replicas, before, "nothing changed");
    // planning again places the new version
    converge(&mut s, &mut i);
    assert!(s.replicas.values().all(|r| r.version == "v2"));
}

#[test]
fn a_gpu_running_short_of_memory_sheds_the_replicas_that_no_longer_fit() {
    let (mut s, mut i) = (State::default(), 0);
    for n in ["a", "b"] {
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory(n, &[("l4", 24)])),
        );
    }
    run(&mut s, &mut i, model("m", 10_000, 1));
    converge(&mut s, &mut i);
    let r = s.replicas.values().next().unwrap().clone();
    let short = |mib: u64| Observed {
        foreign_mib: BTreeMap::from([((r.node_id.clone(), 0), mib)]),
        ..Default::default()
    };
    // 10 GB more in use: 24576 - 10000 - 1228 headroom = 13348 MiB for it
    assert!(
        plan_with(&s, &short(10_000)).commands.is_empty(),
        "still fits"
    );
    // 14 GB more: it would leave less than the headroom free, so it moves
    let p = plan_with(&s, &short(14_000));
    assert_eq!(p.commands.len(), 1, "{p:?}");
    for c in p.commands {
        run(&mut s, &mut i, c);
    }
    assert_ne!(s.replicas[&r.id].node_id, r.node_id);
    // nor does a new replica land on the short GPU, and with nowhere to go
    // the second one waits
    run(&mut s, &mut i, model("n", 12_000, 2));
    let p = plan_with(&s, &short(14_000));
    for c in p.commands {
        run(&mut s, &mut i, c);
    }
    assert!(
        s.replicas.values().all(|x| x.node_id != r.node_id),
        "{:?}",
        s.replicas
    );
}

#[test]
fn a_replica_that_outgrows_one_gpu_is_planned_again_with_more_shards() {
    let (mut s, mut i) = (State::default(), 0);
    run(&mut s, &mut i, Command::RegisterNode(h100_pair("n", true)));
    run(&mut s, &mut i, model("grow", 60_000, 1));
    converge(&mut s, &mut i);
    let before = s.replicas["grow@v1-0"].clone();
    assert_eq!(before.gpus, vec![0]);

    // the agent measures 78 GB in use, sustained: the model's record gets
    // what a replica needs (with a 10 % margin), and nothing is placed
    // until it is committed
    let telemetry = crate::telemetry::TelemetryStore::new(16);
    for seq in 0..SUSTAINED_SAMPLES as u64 {
        telemetry.record(
            talon_proto::v1::TelemetryReport {
                node_id: "n".into(),
                seq,
                sampled_at_ms: seq,
                gpus: vec![],
                replicas: vec![talon_proto::v1::ReplicaStatus {
                    id: before.id.clone(),
                    state: "ready".into(),
                    memory_used_bytes: 78_000 << 20,
                    ..Default::default()
                }],
            },
            std::time::Instant::now(),
        );
    }
    let observed = observe(&s, &telemetry);
    assert_eq!(
        observed.outgrown.get("grow"),
        Some(&("v1".to_string(), 85_800))
    );
    let p = plan_with(&s, &observed);
    assert!(
        matches!(&p.commands[..], [Command::UpdateModelLabels { set, .. }] if set[OBSERVED_MEMORY_LABEL] == "v1:85800"),
        "{p:?}"
    );
    for c in p.commands {
        run(&mut s, &mut i, c);
    }
    // more than one 80 GB GPU: a TP2 group over the NVLinked pair
    converge(&mut s, &mut i);
    let after = &s.replicas["grow@v1-0"];
    assert_eq!(
        (after.gpus.as_slice(), after.milli),
        (&[0, 1][..], 1000),
        "{after:?}"
    );
    assert_eq!(after.memory_mib, 42_900, "half of what it needs on each");
    // once recorded, the same measurement asks nothing more
    assert!(plan_with(&s, &observed).commands.is_empty());

    // a measurement within the slack, or of an older version, is no growth
    let within = Observed {
        outgrown: BTreeMap::from([("grow".to_string(), ("v0".to_string(), 200_000))]),
        ..Default::default()
    };
    assert!(plan_with(&s, &within).commands.is_empty());
    // a new version is planned from its own spec
    let Command::CreateModel(mut spec) = model("grow", 60_000, 1) else {
        unreachable!()
    };
    spec.version = "v2".into();
    spec.labels = s.models["grow"].labels.clone();
    run(&mut s, &mut i, Command::CreateModel(spec));
    converge(&mut s, &mut i);
    let v2 = s.replicas.values().find(|r| r.model == "grow").unwrap();
    assert_eq!((v2.version.as_str(), v2.gpus.len()), ("v2", 1), "{v2:?}");
}

#[test]
fn a_new_version_rolls_out_beside_the_old_one_until_it_serves() {
    let (mut s, mut i) = (State::default(), 0);
    for n in ["a", "b"] {
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory(n, &[("l4", 24)])),
        );
    }
    run(&mut s, &mut i, model("m", 10_000, 2));
    converge(&mut s, &mut i);
    let v1: HashSet<String> = s.replicas.keys().cloned().collect();
    assert_eq!(v1.len(), 2);
    let Command::CreateModel(mut spec) = model("m", 10_000, 2) else {
        unreachable!()
    };
    spec.version = "v2".into();
    run(&mut s, &mut i, Command::CreateModel(spec));
    let ready = |ids: &HashSet<String>| Observed {
        ready: Some(ids.clone()),
        ..Default::default()
    };
    // v2 is placed beside v1, which keeps serving
    for c in plan_with(&s, &ready(&v1)).commands {
        run(&mut s, &mut i, c);
    }
    let versions = |s: &State| {
        let mut v: Vec<String> = s.replicas.values().map(|r| r.version.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(versions(&s), ["v1", "v1", "v2", "v2"], "{:?}", s.replicas);
    // until v2 is ready nothing changes
    assert!(plan_with(&s, &ready(&v1)).commands.is_empty());
    let one_v2: HashSet<String> = v1.iter().cloned().chain(["m@v2-0".to_string()]).collect();
    assert!(plan_with(&s, &ready(&one_v2)).commands.is_empty());
    // both v2 replicas ready: v1 goes
    let all: HashSet<String> = s.replicas.keys().cloned().collect();
    for c in plan_with(&s, &ready(&all)).commands {
        run(&mut s, &mut i, c);
    }
    assert_eq!(versions(&s), ["v2", "v2"]);
    s.check_consistency().unwrap();

    // no room beside the old replicas: they make way at once
    let Command::CreateModel(mut spec) = model("m", 20_000, 2) else {
        unreachable!()
    };
    spec.version = "v3".into();
    run(&mut s, &mut i, Command::CreateModel(spec));
    let all: HashSet<String> = s.replicas.keys().cloned().collect();
    for c in plan_with(&s, &ready(&all)).commands {
        run(&mut s, &mut i, c);
    }
    assert_eq!(versions(&s), ["v3", "v3"], "{:?}", s.replicas);
}

#[test]
fn a_canary_share_below_100_keeps_the_old_version_serving_beside_the_new() {
    let (mut s, mut i) = (State::default(), 0);
    for n in ["a", "b"] {
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory(n, &[("l4", 24)])),
        );
    }
    run(
        &mut s,
        &mut i,
        with_label(model("m", 10_000, 1), "canary-percent", "10"),
    );
    converge(&mut s, &mut i);
    let Command::CreateModel(mut spec) = model("m", 10_000, 1) else {
        unreachable!()
    };
    spec.version = "v2".into();
    // a new version's spec carries the model's labels
    spec.labels.insert("canary-percent".into(), "10".into());
    run(&mut s, &mut i, Command::CreateModel(spec));
    let ready = |s: &State| Observed {
        ready: Some(s.replicas.keys().cloned().collect()),
        ..Default::default()
    };
    for _ in 0..3 {
        let ready = ready(&s);
        for c in plan_with(&s, &ready).commands {
            run(&mut s, &mut i, c);
        }
    }
    let versions = |s: &State| {
        let mut v: Vec<String> = s.replicas.values().map(|r| r.version.clone()).collect();
        v.sort();
        v
    };
    // every replica ready, and still both versions: the canary holds
    assert_eq!(versions(&s), ["v1", "v2"], "{:?}", s.replicas);
    // at 100 % the rollout completes
    run(
        &mut s,
        &mut i,
        Command::UpdateModelLabels {
            name: "m".into(),
            set: [("canary-percent".to_string(), "100".to_string())].into(),
            remove: vec![],
        },
    );
    let ready = ready(&s);
    for c in plan_with(&s, &ready).commands {
        run(&mut s, &mut i, c);
    }
    assert_eq!(versions(&s), ["v2"]);
}
