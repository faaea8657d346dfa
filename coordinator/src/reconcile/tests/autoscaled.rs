//! The autoscaler's plan in the reconciler: how many replicas, and on
//! which GPU types.

use super::*;

fn types_of(state: &State, model: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = state
        .replicas
        .values()
        .filter(|r| r.model == model)
        .map(|r| {
            let node = &state.nodes[&r.node_id];
            let t = node.inventory.gpus[r.gpu as usize].gpu_type.clone();
            (r.id.clone(), t)
        })
        .collect();
    out.sort();
    out
}

fn observed(desired: u32, types: &[&str]) -> Observed {
    Observed {
        desired: [("auto".to_string(), desired)].into(),
        types: [(
            "auto".to_string(),
            types.iter().map(|t| t.to_string()).collect(),
        )]
        .into(),
        ..Default::default()
    }
}

/// Four single-GPU nodes, two H100s and two A100s, and a model of
/// 30 GB that scales from one to four replicas.
fn fleet() -> (State, u64) {
    let (mut s, mut i) = (State::default(), 0);
    for (id, t) in [
        ("h1", "h100"),
        ("h2", "h100"),
        ("a1", "a100-80gb"),
        ("a2", "a100-80gb"),
    ] {
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory(id, &[(t, 80)])),
        );
    }
    let mut spec = model("auto", 30_000, 1);
    if let Command::CreateModel(m) = &mut spec {
        m.max_replicas = 4;
    }
    run(&mut s, &mut i, spec);
    (s, i)
}

fn count(placed: &[(String, String)], t: &str) -> usize {
    placed.iter().filter(|(_, x)| x == t).count()
}

#[test]
fn new_replicas_land_on_the_planned_gpu_types_and_serving_ones_stay() {
    // two plans with opposite mixes: each is followed (both cannot be
    // where the policy alone would put them)
    for (mix, h100s) in [
        (["a100-80gb", "a100-80gb", "h100"], 1),
        (["h100", "h100", "a100-80gb"], 2),
    ] {
        let (mut s, mut i) = fleet();
        converge_with(&mut s, &mut i, &observed(3, &mix));
        let placed = types_of(&s, "auto");
        assert_eq!(placed.len(), 3, "{placed:?}");
        assert_eq!(count(&placed, "h100"), h100s, "{mix:?}: {placed:?}");
    }

    // The plan turns to H100s only: the serving replicas stay where they
    // run (no restart for a preference); the fourth goes to an H100.
    let (mut s, mut i) = fleet();
    converge_with(
        &mut s,
        &mut i,
        &observed(3, &["a100-80gb", "a100-80gb", "h100"]),
    );
    let before = types_of(&s, "auto");
    let turned = observed(4, &["h100", "h100", "h100", "h100"]);
    converge_with(&mut s, &mut i, &turned);
    let placed = types_of(&s, "auto");
    assert_eq!(placed.len(), 4);
    assert_eq!(placed[..3], before[..], "the serving replicas moved");
    assert_eq!(placed[3], ("auto@v1-3".to_string(), "h100".to_string()));
    assert!(plan_with(&s, &turned).commands.is_empty(), "settled");

    // A planned type with no room left (one H100, and a 50 GB replica per
    // GPU): the replica that finds none there is placed on any type its
    // need allows rather than left out.
    let (mut s, mut i) = (State::default(), 0);
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(inventory("a", &[("a100-80gb", 80)])),
    );
    run(
        &mut s,
        &mut i,
        Command::RegisterNode(inventory("h", &[("h100", 80)])),
    );
    let mut spec = model("auto", 50_000, 1);
    if let Command::CreateModel(m) = &mut spec {
        m.max_replicas = 2;
    }
    run(&mut s, &mut i, spec);
    let full = observed(2, &["h100", "h100"]);
    converge_with(&mut s, &mut i, &full);
    let placed = types_of(&s, "auto");
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert_eq!(count(&placed, "h100"), 1, "{placed:?}");
    assert!(plan_with(&s, &full).unplaced.is_empty());
}
