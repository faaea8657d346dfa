//! The reconciler's plans on states built command by command.
use std::collections::BTreeMap;

use super::*;
use crate::state::node::Gpu as NodeGpu;
use crate::state::node::MigDevice;
use crate::state::{ModelSpec, NodeInventory, NodeState, Request};

fn inventory(id: &str, gpus: &[(&str, u64)]) -> NodeInventory {
    NodeInventory {
        node_id: id.into(),
        addr: format!("{id}:1"),
        cpu_cores: 32,
        host_memory_bytes: 256 << 30,
        labels: BTreeMap::new(),
        cost_per_hour: 1.0,
        probe: "simulated".into(),
        driver_version: "sim".into(),
        agent_version: "0".into(),
        gpus: gpus
            .iter()
            .enumerate()
            .map(|(i, (t, gib))| NodeGpu {
                index: i as u32,
                uuid: format!("GPU-{id}-{i}"),
                name: t.to_string(),
                gpu_type: t.to_string(),
                memory_bytes: gib << 30,
                compute_capability: (8, 0),
                mig_enabled: false,
                mig_devices: vec![],
                nvlink_peers: vec![],
                pci_bus_id: String::new(),
                ecc_enabled: None,
                power_limit_watts: 300,
                calibration: None,
            })
            .collect(),
    }
}

fn model(name: &str, memory_mib: u64, replicas: u32) -> Command {
    Command::CreateModel(ModelSpec {
        name: name.into(),
        version: "v1".into(),
        engine: "simulated".into(),
        artifact_uri: "file:///m".into(),
        memory_mib,
        latency_slo_ms: 100,
        min_replicas: replicas,
        max_replicas: replicas.max(1),
        priority: "normal".into(),
        labels: BTreeMap::new(),
    })
}

fn run(state: &mut State, index: &mut u64, command: Command) {
    *index += 1;
    state.apply(
        *index,
        &Request {
            at_ms: *index,
            actor: "t".into(),
            command,
        },
    );
}

/// Applies plans until nothing changes; returns how many rounds it took.
fn converge(state: &mut State, index: &mut u64) -> usize {
    for round in 0..5 {
        let p = plan(state);
        if p.commands.is_empty() {
            return round;
        }
        for c in p.commands {
            run(state, index, c);
        }
    }
    panic!("no convergence");
}

fn gpu_load(state: &State) -> BTreeMap<(String, u32), (u32, u64)> {
    let mut load = BTreeMap::new();
    for r in state.replicas.values() {
        let e = load.entry((r.node_id.clone(), r.gpu)).or_insert((0, 0));
        e.0 += r.milli;
        e.1 += r.memory_mib;
    }
    load
}

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
fn nvlink_domains_follow_links_and_switches() {
    let mut inv = inventory("n", &[("h100", 80), ("h100", 80), ("l4", 24), ("l4", 24)]);
    for (i, g) in inv.gpus.iter_mut().enumerate() {
        g.pci_bus_id = format!("0000:0{i}:00.0");
    }
    // the two H100s reach one NVSwitch; the L4s have no NVLink
    inv.gpus[0].nvlink_peers = vec!["0000:f0:00.0".into()];
    inv.gpus[1].nvlink_peers = vec!["0000:f0:00.0".into()];
    let d = nvlink_domains(&inv.gpus);
    assert_eq!(d[0], d[1]);
    assert!(d[2] != d[0] && d[3] != d[0] && d[2] != d[3], "{d:?}");
    // a direct bridge between the L4s joins them
    inv.gpus[2].nvlink_peers = vec!["0000:03:00.0".into()];
    let d = nvlink_domains(&inv.gpus);
    assert_eq!(d[2], d[3]);
}

/// Two H100s on one NVSwitch, or (`nvlink: false`) on PCIe only.
fn h100_pair(id: &str, nvlink: bool) -> NodeInventory {
    let mut inv = inventory(id, &[("h100", 80), ("h100", 80)]);
    if nvlink {
        for g in &mut inv.gpus {
            g.nvlink_peers = vec![format!("switch-{id}")];
        }
    }
    inv
}

#[test]
fn a_model_no_gpu_holds_runs_as_a_tensor_parallel_group_in_one_nvlink_domain() {
    let (mut s, mut i) = (State::default(), 0);
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(h100_pair("pcie", false)),
    );
    run(&mut s, &mut i, model("big", 120_000, 1));
    // no NVLink: a pipeline of two stages, one per PCIe card
    converge(&mut s, &mut i);
    let r = s
        .replicas
        .values()
        .find(|r| r.model == "big")
        .unwrap()
        .clone();
    assert_eq!(
        (r.node_id.as_str(), r.gpus.as_slice(), r.stages, r.milli),
        ("pcie", &[0, 1][..], 2, 1000),
        "{r:?}"
    );
    assert_eq!(r.place(), "pcie/0>1");
    // an NVLink pair joins: the model runs better as a TP2 group and moves
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(h100_pair("nvl", true)),
    );
    converge(&mut s, &mut i);
    let big: Vec<&Replica> = s.replicas.values().filter(|r| r.model == "big").collect();
    assert_eq!(big.len(), 1);
    let r = big[0];
    assert_eq!(
        (r.node_id.as_str(), r.gpus.as_slice(), r.milli),
        ("nvl", &[0, 1][..], 1000),
        "{r:?}"
    );
    assert_eq!(r.memory_mib, 60_000, "half the model on each GPU");
    assert_eq!(r.stages, 0);
    // a small model fills the PCIe node, never a GPU of the group
    run(&mut s, &mut i, model("small", 30_000, 2));
    converge(&mut s, &mut i);
    assert!(s
        .replicas
        .values()
        .filter(|r| r.model == "small")
        .all(|r| r.node_id == "pcie"));
    assert!(plan(&s).commands.is_empty(), "stable");

    // the group's node drains: with nowhere to go it waits, named
    run(
        &mut s,
        &mut i,
        Command::SetNodeScheduling {
            node_id: "nvl".into(),
            action: crate::state::Scheduling::Drain,
        },
    );
    converge(&mut s, &mut i);
    assert!(!s.replicas.values().any(|r| r.model == "big"));
    // a second NVLink node takes it
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(h100_pair("nvl2", true)),
    );
    converge(&mut s, &mut i);
    let r = s.replicas.values().find(|r| r.model == "big").unwrap();
    assert_eq!((r.node_id.as_str(), r.gpus.len()), ("nvl2", 2));

    run(&mut s, &mut i, model("huge", 900_000, 1));
    let p = plan(&s);
    let (_, why) = p
        .unplaced
        .iter()
        .find(|(id, _)| id.starts_with("huge"))
        .unwrap();
    assert!(why.contains("Sharding cannot help"), "{why}");
    s.check_consistency().unwrap();
}

/// An A100 in MIG mode with two 3g.40gb devices (and its memory).
fn mig_node(id: &str) -> NodeInventory {
    let mut inv = inventory(id, &[("a100-80gb", 80)]);
    let g = &mut inv.gpus[0];
    g.mig_enabled = true;
    g.mig_devices = (0..2)
        .map(|k| MigDevice {
            uuid: format!("MIG-{id}-{k}"),
            profile: "3g.40gb".into(),
            start: Some(4 * k),
            memory_bytes: 40 << 30,
        })
        .collect();
    inv
}

#[test]
fn replicas_land_on_mig_devices_at_the_devices_share() {
    let (mut s, mut i) = (State::default(), 0);
    run(&mut s, &mut i, Command::RegisterNode(mig_node("m")));
    run(&mut s, &mut i, model("slice", 30_000, 2));
    converge(&mut s, &mut i);
    let mut on: Vec<(&str, u32, u32)> = s
        .replicas
        .values()
        .map(|r| (r.mig_device.as_str(), r.gpu, r.milli))
        .collect();
    on.sort();
    // 30000 of 40960 MiB: 733 milli of each device; one replica per device
    assert_eq!(on, vec![("MIG-m-0", 0, 733), ("MIG-m-1", 0, 733)]);
    // one that no device holds is not put on the GPU under them
    run(&mut s, &mut i, model("whole", 60_000, 1));
    let p = plan(&s);
    assert!(
        p.unplaced.iter().any(|(id, _)| id.starts_with("whole")),
        "{p:?}"
    );
    // the layout changes (one 7g.80gb device): the replicas on the old
    // devices are placed again, one fits
    let mut inv = mig_node("m");
    inv.gpus[0].mig_devices = vec![MigDevice {
        uuid: "MIG-m-7g".into(),
        profile: "7g.80gb".into(),
        start: Some(0),
        memory_bytes: 80 << 30,
    }];
    run(&mut s, &mut i, Command::RegisterNode(inv));
    converge(&mut s, &mut i);
    let devices: Vec<&str> = s.replicas.values().map(|r| r.mig_device.as_str()).collect();
    assert!(
        !devices.is_empty() && devices.iter().all(|d| *d == "MIG-m-7g"),
        "{devices:?}"
    );
    s.check_consistency().unwrap();
}

#[test]
fn place_replicas_refuses_gpus_and_devices_the_node_lacks() {
    let (mut s, mut i) = (State::default(), 0);
    run(&mut s, &mut i, Command::RegisterNode(mig_node("m")));
    run(&mut s, &mut i, Command::RegisterNode(h100_pair("n", true)));
    run(&mut s, &mut i, model("x", 1_000, 1));
    let revision = s.models["x"].revision;
    let base = Replica::on_gpu("x@v1-0", "x", "v1", "n", 0);
    let cases: Vec<(Replica, &str)> = vec![
        (
            Replica {
                gpus: vec![0, 0],
                ..base.clone()
            },
            "GPU 0 twice",
        ),
        (
            Replica {
                gpus: vec![1, 0],
                ..base.clone()
            },
            "must start with its GPU 0",
        ),
        (
            Replica {
                gpus: vec![0, 2],
                ..base.clone()
            },
            "has no GPU 2",
        ),
        (
            Replica {
                gpus: vec![0, 1],
                milli: 500,
                ..base.clone()
            },
            "holds each of them whole",
        ),
        (
            Replica {
                mig_device: "MIG-m-0".into(),
                ..base.clone()
            },
            "not in MIG mode",
        ),
        (
            Replica {
                node_id: "m".into(),
                ..base.clone()
            },
            "name one of its MIG devices",
        ),
        (
            Replica {
                node_id: "m".into(),
                mig_device: "MIG-other".into(),
                ..base.clone()
            },
            "no MIG device \"MIG-other\"",
        ),
    ];
    for (replica, expected) in cases {
        let before = s.clone();
        i += 1;
        let (response, _) = s.apply(
            i,
            &Request {
                at_ms: i,
                actor: "t".into(),
                command: Command::PlaceReplicas {
                    model: "x".into(),
                    model_revision: revision,
                    replicas: vec![replica],
                },
            },
        );
        match response {
            crate::state::Response::Rejected(r) => {
                assert!(r.message.contains(expected), "{expected}: {}", r.message)
            }
            other => panic!("{expected}: applied {other:?}"),
        }
        assert_eq!(s.replicas, before.replicas);
    }
    // the older command keeps its one-GPU rule
    i += 1;
    let (response, _) = s.apply(
        i,
        &Request {
            at_ms: i,
            actor: "t".into(),
            command: Command::SetReplicasChecked {
                model: "x".into(),
                model_revision: revision,
                replicas: vec![Replica {
                    gpus: vec![0, 1],
                    ..base.clone()
                }],
            },
        },
    );
    assert!(
        matches!(response, crate::state::Response::Rejected(r) if r.message.contains("PlaceReplicas"))
    );
}

#[test]
fn the_gpu_types_label_keeps_replicas_to_those_types() {
    let (mut s, mut i) = (State::default(), 0);
    run(&mut s, &mut i, Command::RegisterNode(mig_node("m")));
    run(&mut s, &mut i, Command::RegisterNode(h100_pair("n", true)));
    let labelled = |name: &str, mem: u64, replicas: u32, types: &str| {
        let mut c = model(name, mem, replicas);
        if let Command::CreateModel(spec) = &mut c {
            spec.labels.insert("gpu-types".into(), types.into());
        }
        c
    };
    run(
        &mut s,
        &mut i,
        labelled("on-mig", 10_000, 2, "a100-80gb/3g.40gb"),
    );
    run(&mut s, &mut i, labelled("on-h100", 10_000, 1, "h100, l4"));
    converge(&mut s, &mut i);
    for r in s.replicas.values() {
        match r.model.as_str() {
            "on-mig" => assert!(r.node_id == "m" && !r.mig_device.is_empty(), "{r:?}"),
            _ => assert!(r.node_id == "n" && r.mig_device.is_empty(), "{r:?}"),
        }
    }
    // no allowed slot is large enough: the reason names the label
    run(
        &mut s,
        &mut i,
        labelled("too-big", 50_000, 1, "a100-80gb/3g.40gb"),
    );
    let p = plan(&s);
    let (_, why) = p
        .unplaced
        .iter()
        .find(|(id, _)| id.starts_with("too-big"))
        .unwrap();
    assert!(
        why.contains("of its gpu-types (a100-80gb/3g.40gb) on a live node has 40960 MiB"),
        "{why}"
    );
}

#[test]
fn the_node_selector_label_keeps_replicas_on_matching_nodes() {
    let (mut s, mut i) = (State::default(), 0);
    for (id, zone) in [("a", "east"), ("b", "west"), ("c", "west")] {
        let mut inv = inventory(id, &[("l4", 24)]);
        inv.labels.insert("zone".into(), zone.into());
        run(&mut s, &mut i, Command::RegisterNode(inv));
    }
    let selected = |name: &str, replicas: u32, selector: &str| {
        let mut c = model(name, 10_000, replicas);
        if let Command::CreateModel(spec) = &mut c {
            spec.labels.insert("node-selector".into(), selector.into());
        }
        c
    };
    run(&mut s, &mut i, selected("west", 2, "zone=west"));
    run(&mut s, &mut i, selected("nowhere", 1, "zone=north"));
    run(&mut s, &mut i, selected("broken", 1, "zone"));
    converge(&mut s, &mut i);
    let west: Vec<&str> = s.replicas.values().map(|r| r.node_id.as_str()).collect();
    assert_eq!(west.len(), 2);
    assert!(west.iter().all(|n| *n == "b" || *n == "c"), "{west:?}");
    let p = plan(&s);
    let why = |m: &str| {
        p.unplaced
            .iter()
            .find(|(id, _)| id.starts_with(m))
            .map(|(_, w)| w.clone())
            .unwrap()
    };
    assert!(
        why("nowhere").contains("node-selector (zone=north)"),
        "{}",
        why("nowhere")
    );
    assert!(
        why("broken").contains("must be key=value pairs"),
        "{}",
        why("broken")
    );
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

/// An A100 in MIG mode on a node whose agent manages MIG, with one unused
/// instance the operator left.
fn managed_mig_node(id: &str) -> NodeInventory {
    let mut inv = mig_node(id);
    inv.labels.insert(
        crate::state::node::MANAGED_MIG_LABEL.0.into(),
        crate::state::node::MANAGED_MIG_LABEL.1.into(),
    );
    inv.gpus[0].mig_devices.truncate(1);
    inv
}

#[test]
fn on_a_managed_mig_gpu_the_plan_lays_out_instances() {
    let (mut s, mut i) = (State::default(), 0);
    run(&mut s, &mut i, Command::RegisterNode(managed_mig_node("m")));
    let sliced = |name: &str, mem: u64, replicas: u32, types: &str| {
        let mut c = model(name, mem, replicas);
        if let Command::CreateModel(spec) = &mut c {
            spec.labels.insert("gpu-types".into(), types.into());
        }
        c
    };
    run(
        &mut s,
        &mut i,
        sliced("three", 30_000, 1, "a100-80gb/3g.40gb"),
    );
    run(
        &mut s,
        &mut i,
        sliced("twos", 15_000, 2, "a100-80gb/2g.20gb"),
    );
    converge(&mut s, &mut i);
    let mut slices: Vec<String> = s.replicas.values().map(|r| r.mig_slice.clone()).collect();
    slices.sort();
    // 3g takes slices 0-3 or 4-7; the two 2g the other half
    assert_eq!(slices.len(), 3, "{:?}", s.replicas);
    let three = s
        .replicas
        .values()
        .find(|r| r.model == "three")
        .unwrap()
        .clone();
    assert!(
        three.mig_slice == "3g.40gb@0" || three.mig_slice == "3g.40gb@4",
        "{three:?}"
    );
    assert_eq!(three.milli, 428, "3 of 7 GPCs");
    assert!(s
        .replicas
        .values()
        .all(|r| r.mig_device.is_empty() && r.node_id == "m"));
    assert!(plan(&s).commands.is_empty(), "stable");
    // a fourth instance does not fit: 3 + 2 + 2 GPCs of 7 are taken
    run(&mut s, &mut i, sliced("one", 5_000, 1, "a100-80gb/1g.10gb"));
    let p = plan(&s);
    assert!(
        p.unplaced.iter().any(|(id, _)| id.starts_with("one")),
        "{p:?}"
    );
    // a profile the GPU lacks, and too little memory, are explained
    run(&mut s, &mut i, sliced("odd", 5_000, 1, "a100-80gb/3g.47gb"));
    run(
        &mut s,
        &mut i,
        sliced("small", 30_000, 1, "a100-80gb/1g.10gb"),
    );
    let p = plan(&s);
    let why = |m: &str| {
        p.unplaced
            .iter()
            .find(|(id, _)| id.starts_with(m))
            .map(|(_, w)| w.clone())
            .unwrap()
    };
    assert!(why("odd").contains("does not have"), "{}", why("odd"));
    assert!(
        why("small").contains("name a larger profile"),
        "{}",
        why("small")
    );
    // overlapping instances are refused by the state machine
    let mut clash = three.clone();
    clash.id = "twos@v1-9".into();
    clash.model = "twos".into();
    i += 1;
    let (response, _) = s.apply(
        i,
        &Request {
            at_ms: i,
            actor: "t".into(),
            command: Command::PlaceReplicas {
                model: "twos".into(),
                model_revision: s.models["twos"].revision,
                replicas: vec![clash],
            },
        },
    );
    assert!(
        matches!(&response, crate::state::Response::Rejected(r) if r.message.contains("overlaps")),
        "{response:?}"
    );
    // a cordoned node keeps its instances but gets no new one
    run(
        &mut s,
        &mut i,
        Command::SetNodeScheduling {
            node_id: "m".into(),
            action: crate::state::Scheduling::Cordon,
        },
    );
    run(
        &mut s,
        &mut i,
        Command::DeleteModel {
            name: "one".into(),
            version: None,
        },
    );
    run(
        &mut s,
        &mut i,
        sliced("late", 5_000, 1, "a100-80gb/1g.10gb"),
    );
    let before = s.replicas.clone();
    converge(&mut s, &mut i);
    assert_eq!(s.replicas, before);
    s.check_consistency().unwrap();
}

#[test]
fn instances_in_the_way_move_to_other_slices_when_a_new_layout_holds_them_all() {
    let (mut s, mut i) = (State::default(), 0);
    run(&mut s, &mut i, Command::RegisterNode(managed_mig_node("m")));
    let sliced = |name: &str, mem: u64, profile: &str| {
        let mut c = model(name, mem, 1);
        if let Command::CreateModel(spec) = &mut c {
            spec.labels
                .insert("gpu-types".into(), format!("a100-80gb/{profile}"));
        }
        c
    };
    run(&mut s, &mut i, sliced("a", 15_000, "2g.20gb"));
    // an instance at slice 4: a 3g then fits only at 0, and a second 2g
    // nowhere, unless the first one moves
    let mut r = Replica::on_gpu("a@v1-0", "a", "v1", "m", 0);
    r.mig_slice = "2g.20gb@4".into();
    r.milli = 285;
    r.memory_mib = 15_000;
    let model_revision = s.models["a"].revision;
    run(
        &mut s,
        &mut i,
        Command::PlaceReplicas {
            model: "a".into(),
            model_revision,
            replicas: vec![r],
        },
    );
    assert_eq!(s.replicas["a@v1-0"].mig_slice, "2g.20gb@4");
    run(&mut s, &mut i, sliced("b", 30_000, "3g.40gb"));
    converge(&mut s, &mut i);
    run(&mut s, &mut i, sliced("c", 15_000, "2g.20gb"));
    converge(&mut s, &mut i);
    let mut slices: Vec<String> = s.replicas.values().map(|r| r.mig_slice.clone()).collect();
    slices.sort();
    assert_eq!(
        slices,
        vec!["2g.20gb@0", "2g.20gb@2", "3g.40gb@4"],
        "{:?}",
        s.replicas
    );
    assert!(plan(&s).commands.is_empty(), "stable");
    s.check_consistency().unwrap();
}
