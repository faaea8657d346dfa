//! Properties of the planner on random small fleets (1–4 nodes of 1–8 GPUs
//! of four types, random NVLink domains, some MIG GPUs) and random models.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::pipeline::split_layers;
use super::*;
use crate::mig::MigModel;
use crate::types::Gpu;

const TYPES: [(&str, u64); 4] = [
    ("H100-80GB", 81_559),
    ("A100-80GB", 81_920),
    ("L4", 23_034),
    ("T4", 15_360),
];
const HEADS: [u32; 7] = [0, 8, 20, 32, 40, 64, 96];

/// (type, domain, MIG) per GPU; cost per node.
type NodeSpec = (Vec<(usize, u32, bool)>, u8);

fn arb_fleet() -> impl Strategy<Value = Vec<NodeSpec>> {
    let gpu = (0usize..TYPES.len(), 0u32..3, prop::bool::weighted(0.05));
    prop::collection::vec((prop::collection::vec(gpu, 1..=8), 1u8..4), 1..=4)
}

fn build_fleet(spec: &[NodeSpec]) -> Vec<Node> {
    spec.iter()
        .enumerate()
        .map(|(i, (gpus, cost))| Node {
            name: format!("n{i}"),
            cpu_milli: 64_000,
            memory_mib: 512_000,
            gpus: gpus
                .iter()
                .map(|&(t, domain, mig)| Gpu {
                    memory_mib: TYPES[t].1,
                    nvlink_domain: domain,
                    mig: mig.then_some(MigModel::A100_80GB),
                    ..Gpu::new(TYPES[t].0)
                })
                .collect(),
            cost_per_hour: *cost as f64,
        })
        .collect()
}

fn arb_model() -> impl Strategy<Value = ModelSpec> {
    (
        1u32..=96,
        0usize..HEADS.len(),
        0usize..8,
        prop::bool::ANY,
        0.1f64..300.0,
        prop::sample::select(vec![0.5, 1.0, 2.0]),
        128u32..=16_384,
        1u32..=32,
    )
        .prop_map(
            |(layers, h, kv, wide, params_b, dtype_bytes, context_len, batch)| {
                let heads = HEADS[h];
                let divisors: Vec<u32> = (1..=heads)
                    .filter(|d| heads.checked_rem(*d) == Some(0))
                    .collect();
                let kv_heads = if heads == 0 {
                    0
                } else {
                    divisors[kv % divisors.len()]
                };
                ModelSpec {
                    name: "m".into(),
                    params_b,
                    weights_mib: None,
                    layers,
                    attention_heads: heads,
                    kv_heads,
                    head_dim: if heads == 0 {
                        0
                    } else if wide {
                        128
                    } else {
                        64
                    },
                    dtype_bytes,
                    kv_dtype_bytes: 2.0,
                    context_len,
                    batch,
                }
            },
        )
}

/// The invariants, checked here independently of [`validate`].
fn check_plan(p: &ShardPlan, model: &ModelSpec, nodes: &[Node]) -> Result<(), TestCaseError> {
    let mut covered = vec![0u32; model.layers as usize];
    for s in &p.stages {
        for l in s.first_layer..s.first_layer + s.layers {
            covered[l as usize] += 1;
        }
        let node = &nodes[s.node as usize];
        let first = &node.gpus[s.gpus[0] as usize];
        prop_assert!(model.allows_tp(s.tensor_parallel));
        prop_assert_eq!(s.gpus.len(), s.tensor_parallel as usize);
        for &g in &s.gpus {
            let gpu = &node.gpus[g as usize];
            prop_assert!(gpu.mig.is_none());
            prop_assert_eq!(gpu.nvlink_domain, first.nvlink_domain, "TP spans domains");
            prop_assert_eq!(&gpu.model, &first.model);
            prop_assert!(s.mib_per_gpu <= gpu.memory_mib as f64 * 0.9 * (1.0 + 1e-9));
        }
    }
    prop_assert!(covered.iter().all(|&c| c == 1), "layers {:?}", covered);
    let devices: Vec<_> = p.devices().collect();
    let distinct: BTreeSet<_> = devices.iter().copied().collect();
    prop_assert_eq!(devices.len(), distinct.len(), "a GPU used twice");
    prop_assert!(p.stages.len() <= ShardOptions::default().max_stages as usize);
    prop_assert!(p.est_tokens_per_s.is_finite() && p.est_tokens_per_s > 0.0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plans_validate_and_repeat(spec in arb_fleet(), model in arb_model()) {
        let nodes = build_fleet(&spec);
        let opts = ShardOptions::default();
        let first = plan(&model, &nodes, &opts);
        prop_assert_eq!(&first, &plan(&model, &nodes, &opts), "not deterministic");
        let shapes = replica_shapes(&model, &nodes, &opts);
        prop_assert_eq!(&shapes, &replica_shapes(&model, &nodes, &opts));
        match &first {
            Ok(p) => {
                validate(p, &model, &nodes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                check_plan(p, &model, &nodes)?;
                let shapes = shapes.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(!shapes.is_empty() && shapes.len() <= MAX_SHAPES);
                prop_assert!(shapes.contains(&ReplicaShape::of(p)), "plan's shape not listed");
                prop_assert_eq!(shapes[0].layout, p.layout);
                for shape in &shapes {
                    let mut next = 0;
                    for s in &shape.stages {
                        prop_assert_eq!(s.first_layer, next);
                        next += s.layers;
                    }
                    prop_assert_eq!(next, model.layers);
                }
            }
            Err(e) => {
                prop_assert!(
                    matches!(e, PlanError::DoesNotFit { .. } | PlanError::NoUsableGpu { .. }),
                    "{}", e
                );
                prop_assert!(shapes.is_err());
            }
        }
    }

    #[test]
    fn replicas_never_share_a_gpu(spec in arb_fleet(), model in arb_model()) {
        let nodes = build_fleet(&spec);
        let opts = ShardOptions::default();
        let single = plan(&model, &nodes, &opts);
        let set = plan_replicas(&model, &nodes, &opts, ReplicaTarget::AsManyAsFit);
        prop_assert_eq!(single.is_ok(), set.is_ok());
        let Ok(set) = set else { return Ok(()) };
        prop_assert_eq!(Some(&set.replicas[0]), single.as_ref().ok());
        prop_assert!(set.shortfall.is_none());
        let mut used = BTreeSet::new();
        for r in &set.replicas {
            check_plan(r, &model, &nodes)?;
            for d in r.devices() {
                prop_assert!(used.insert(d), "GPU {:?} in two replicas", d);
            }
        }
        validate_replicas(&set, &model, &nodes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // as many as fit: nothing more fits on what is left
        let taken: BTreeSet<(usize, u8)> = used.iter().map(|&(n, g)| (n as usize, g)).collect();
        prop_assert!(plan_free(&model, &nodes, &taken, &opts).is_err());

        let three = plan_replicas(&model, &nodes, &opts, ReplicaTarget::Count(3)).unwrap();
        prop_assert_eq!(three.replicas.len(), set.replicas.len().min(3));
        prop_assert_eq!(three.shortfall.is_some(), set.replicas.len() < 3);
        prop_assert_eq!(&three.replicas[..], &set.replicas[..three.replicas.len()]);
    }

    #[test]
    fn layer_split_is_exact_and_capped(
        stages in prop::collection::vec((0.01f64..100.0, 0u32..50), 1..8),
        total in 1u32..200,
    ) {
        let capacity: u32 = stages.iter().map(|s| s.1).sum();
        match split_layers(total, &stages) {
            None => prop_assert!(capacity < total),
            Some(out) => {
                prop_assert_eq!(out.iter().sum::<u32>(), total);
                for (o, s) in out.iter().zip(&stages) {
                    prop_assert!(*o <= s.1);
                }
            }
        }
    }
}
