//! Models no GPU holds (tensor-parallel groups, pipelines), the replica checks of PlaceReplicas, and the label selectors.

use super::*;

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
    let big: Vec<&Replica> = s
        .replicas
        .values()
        .map(|r| &**r)
        .filter(|r| r.model == "big")
        .collect();
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
    run(
        &mut s,
        &mut i,
        gpu_typed("on-mig", 10_000, 2, "a100-80gb/3g.40gb"),
    );
    run(&mut s, &mut i, gpu_typed("on-h100", 10_000, 1, "h100, l4"));
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
        gpu_typed("too-big", 50_000, 1, "a100-80gb/3g.40gb"),
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
    run(&mut s, &mut i, node_selected("west", 2, "zone=west"));
    run(&mut s, &mut i, node_selected("nowhere", 1, "zone=north"));
    run(&mut s, &mut i, node_selected("broken", 1, "zone"));
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

/// `model(...)` served by `engine`.
fn on_engine(name: &str, replicas: u32, engine: &str) -> Command {
    let mut c = model(name, 10_000, replicas);
    if let Command::CreateModel(spec) = &mut c {
        spec.engine = engine.into();
    }
    c
}

#[test]
fn replicas_go_only_to_nodes_whose_agent_runs_their_engine() {
    let (mut s, mut i) = (State::default(), 0);
    // "old" has no talon-engines label (an agent from before profiles: any)
    for (id, engines) in [
        ("llama", Some("llamacpp")),
        ("both", Some("vllm,llamacpp")),
        ("sim", Some("*")),
        ("none", Some("")),
        ("old", None),
    ] {
        let mut inv = inventory(id, &[("l4", 24)]);
        if let Some(e) = engines {
            inv.labels.insert("talon-engines".into(), e.into());
        }
        run(&mut s, &mut i, Command::RegisterNode(inv));
    }
    run(&mut s, &mut i, on_engine("gguf", 3, "llamacpp"));
    run(&mut s, &mut i, on_engine("hf", 3, "vllm"));
    run(&mut s, &mut i, on_engine("tgi-only", 1, "tgi"));
    converge(&mut s, &mut i);
    let nodes_of = |m: &str| {
        let mut n: Vec<&str> = s
            .replicas
            .values()
            .filter(|r| r.model == m)
            .map(|r| r.node_id.as_str())
            .collect();
        n.sort();
        n
    };
    assert!(
        nodes_of("gguf")
            .iter()
            .all(|n| ["llama", "both", "sim", "old"].contains(n)),
        "{:?}",
        nodes_of("gguf")
    );
    assert!(
        nodes_of("hf")
            .iter()
            .all(|n| ["both", "sim", "old"].contains(n)),
        "{:?}",
        nodes_of("hf")
    );
    assert_eq!(nodes_of("gguf").len(), 3);
    assert_eq!(nodes_of("hf").len(), 3);
    assert!(!nodes_of("tgi-only").contains(&"none"));

    // With only nodes that do not run it, a model is unplaced and told why.
    let (mut s, mut i) = (State::default(), 0);
    let mut inv = inventory("llama", &[("l4", 24)]);
    inv.labels.insert("talon-engines".into(), "llamacpp".into());
    run(&mut s, &mut i, Command::RegisterNode(inv));
    run(&mut s, &mut i, on_engine("hf", 1, "vllm"));
    converge(&mut s, &mut i);
    assert!(s.replicas.is_empty());
    let p = plan(&s);
    let (_, why) = p
        .unplaced
        .iter()
        .find(|(id, _)| id.starts_with("hf@"))
        .unwrap();
    assert!(
        why.contains("runs engine \"vllm\"") && why.contains("talon-engines"),
        "{why}"
    );
}

#[test]
fn a_model_no_node_holds_runs_as_a_pipeline_across_nodes_or_not_at_all() {
    let (mut s, mut i) = (State::default(), 0);
    for id in ["a", "b"] {
        run(&mut s, &mut i, Command::RegisterNode(h100_pair(id, true)));
    }
    // 250 GB: more than one node's 2 × 80 GB, so two stages of TP2
    run(
        &mut s,
        &mut i,
        with_label(model("huge", 250_000, 1), "layers", "80"),
    );
    converge(&mut s, &mut i);
    let mut stages: Vec<&Replica> = s.replicas.values().map(|r| &**r).collect();
    stages.sort_by_key(|r| r.pipeline.as_ref().map(|p| p.index));
    assert_eq!(stages.len(), 2, "{stages:?}");
    let (head, tail) = (stages[0], stages[1]);
    assert_eq!(head.id, "huge@v1-0");
    assert_eq!(tail.id, "huge@v1-0.stage1");
    assert_ne!(head.node_id, tail.node_id, "one node holds no stage pair");
    let (hp, tp) = (
        head.pipeline.clone().unwrap(),
        tail.pipeline.clone().unwrap(),
    );
    assert_eq!((hp.index, hp.count, hp.head.as_str()), (0, 2, "huge@v1-0"));
    assert_eq!((tp.index, tp.count, tp.head.as_str()), (1, 2, "huge@v1-0"));
    assert_eq!(hp.first_layer, 0);
    assert_eq!(tp.first_layer, hp.layers);
    assert_eq!(hp.layers + tp.layers, 80, "every layer once");
    for r in [head, tail] {
        assert_eq!((r.gpus.as_slice(), r.milli), (&[0, 1][..], 1000), "{r:?}");
        assert!(r.memory_mib < 80 * 1024, "{r:?}");
    }
    assert!(head.takes_requests() && !tail.takes_requests());
    assert!(plan(&s).commands.is_empty(), "stable");
    s.check_consistency().unwrap();

    // a stage's node drains and no other can take it: the whole pipeline
    // leaves, named, rather than half of it holding GPUs
    let tail_node = tail.node_id.clone();
    run(
        &mut s,
        &mut i,
        Command::SetNodeScheduling {
            node_id: tail_node.clone(),
            action: crate::state::Scheduling::Drain,
        },
    );
    let p = plan(&s);
    assert!(
        p.unplaced.iter().any(|(id, _)| id.starts_with("huge@v1-0")),
        "{:?}",
        p.unplaced
    );
    converge(&mut s, &mut i);
    assert!(s.replicas.is_empty(), "{:?}", s.replicas);
    // another node joins: the pipeline runs again
    run(&mut s, &mut i, Command::RegisterNode(h100_pair("c", true)));
    converge(&mut s, &mut i);
    assert_eq!(s.replicas.len(), 2);
    assert!(s.replicas.values().all(|r| r.node_id != tail_node));
    s.check_consistency().unwrap();
}

#[test]
fn place_replicas_refuses_an_incomplete_pipeline() {
    let (mut s, mut i) = (State::default(), 0);
    for id in ["a", "b"] {
        run(&mut s, &mut i, Command::RegisterNode(h100_pair(id, true)));
    }
    run(&mut s, &mut i, model("x", 1_000, 1));
    let revision = s.models["x"].revision;
    let stage = |id: &str, node: &str, index: u32, first_layer: u32, layers: u32| Replica {
        pipeline: Some(crate::state::PipelineStage {
            head: "x@v1-0".into(),
            index,
            count: 2,
            first_layer,
            layers,
        }),
        ..Replica::on_gpu(id, "x", "v1", node, 0)
    };
    let cases: Vec<(Vec<Replica>, &str)> = vec![
        (
            vec![stage("x@v1-0", "a", 0, 0, 16)],
            "has 1 of its 2 stages",
        ),
        (
            vec![
                stage("x@v1-0", "a", 0, 0, 16),
                stage("x@v1-0.stage1", "b", 1, 20, 12),
            ],
            "starts at layer 20, not 16",
        ),
        (
            vec![
                stage("x@v1-0", "a", 0, 0, 16),
                stage("x@v1-0.stage1", "b", 0, 16, 16),
            ],
            "the first stage, and only it",
        ),
        (
            vec![
                stage("x@v1-0", "a", 0, 0, 0),
                stage("x@v1-0.stage1", "b", 1, 0, 16),
            ],
            "each with at least one layer",
        ),
    ];
    for (replicas, expected) in cases {
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
                    replicas,
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
    // complete, it applies
    run(
        &mut s,
        &mut i,
        Command::PlaceReplicas {
            model: "x".into(),
            model_revision: revision,
            replicas: vec![
                stage("x@v1-0", "a", 0, 0, 16),
                stage("x@v1-0.stage1", "b", 1, 16, 16),
            ],
        },
    );
    assert_eq!(s.replicas.len(), 2);
    s.check_consistency().unwrap();
}
