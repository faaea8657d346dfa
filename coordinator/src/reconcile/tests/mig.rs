//! MIG: fixed devices, layouts Talon manages, and the re-layout of a managed GPU.

use super::*;

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
fn on_a_managed_mig_gpu_the_plan_lays_out_instances() {
    let (mut s, mut i) = (State::default(), 0);
    run(&mut s, &mut i, Command::RegisterNode(managed_mig_node("m")));
    run(
        &mut s,
        &mut i,
        gpu_typed("three", 30_000, 1, "a100-80gb/3g.40gb"),
    );
    run(
        &mut s,
        &mut i,
        gpu_typed("twos", 15_000, 2, "a100-80gb/2g.20gb"),
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
    run(
        &mut s,
        &mut i,
        gpu_typed("one", 5_000, 1, "a100-80gb/1g.10gb"),
    );
    let p = plan(&s);
    assert!(
        p.unplaced.iter().any(|(id, _)| id.starts_with("one")),
        "{p:?}"
    );
    // a profile the GPU lacks, and too little memory, are explained
    run(
        &mut s,
        &mut i,
        gpu_typed("odd", 5_000, 1, "a100-80gb/3g.47gb"),
    );
    run(
        &mut s,
        &mut i,
        gpu_typed("small", 30_000, 1, "a100-80gb/1g.10gb"),
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
    let mut clash = (*three).clone();
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
        gpu_typed("late", 5_000, 1, "a100-80gb/1g.10gb"),
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
    run(&mut s, &mut i, one_slice("a", 15_000, "2g.20gb"));
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
    run(&mut s, &mut i, one_slice("b", 30_000, "3g.40gb"));
    converge(&mut s, &mut i);
    run(&mut s, &mut i, one_slice("c", 15_000, "2g.20gb"));
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
