//! Figures for the planner on named fleets.

use super::*;
use crate::types::Gpu;

/// Device memory as `nvidia-smi` reports it (what an agent sends).
const A100_80GB_MIB: u64 = 81_920;
const H100_80GB_MIB: u64 = 81_559;
const L4_MIB: u64 = 23_034;

/// A node whose `n` GPUs share one NVLink domain (NVSwitch / SXM board).
fn nvlink_node(name: &str, ty: &str, n: usize, mem: u64) -> Node {
    node(name, ty, n, mem, |_| 0)
}

/// A node of PCIe cards: each card its own domain.
fn pcie_node(name: &str, ty: &str, n: usize, mem: u64) -> Node {
    node(name, ty, n, mem, |i| i as u32)
}

fn node(name: &str, ty: &str, n: usize, mem: u64, domain: impl Fn(usize) -> u32) -> Node {
    Node {
        name: name.into(),
        cpu_milli: 128_000,
        memory_mib: 1_024_000,
        gpus: (0..n)
            .map(|i| Gpu {
                memory_mib: mem,
                nvlink_domain: domain(i),
                ..Gpu::new(ty)
            })
            .collect(),
        cost_per_hour: 1.0,
    }
}

fn opts() -> ShardOptions {
    ShardOptions::default()
}

fn a100_pair_of_nodes() -> [Node; 2] {
    [
        nvlink_node("a0", "A100-80GB", 8, A100_80GB_MIB),
        nvlink_node("a1", "A100-80GB", 8, A100_80GB_MIB),
    ]
}

/// One node of 2 × H100 on NVLink, one of 8 × L4 on PCIe.
fn h100_and_l4s() -> [Node; 2] {
    [
        nvlink_node("h", "H100-80GB", 2, H100_80GB_MIB),
        pcie_node("l", "L4", 8, L4_MIB),
    ]
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

fn layers_of(p: &ShardPlan) -> Vec<u32> {
    p.stages.iter().map(|s| s.layers).collect()
}

// Llama-3 70B in bf16: 70.6e9 × 2 B = 134 658.8 MiB of weights; KV per
// token 2 × 80 layers × 8 KV heads × 128 × 2 B = 320 KiB. An A100-80GB
// holds 81 920 × 0.9 = 73 728 MiB.

#[test]
fn seventy_b_on_two_a100_nodes_is_four_tp4_replicas() {
    // context 8192 × batch 16 = 131 072 tokens → KV 40 960 MiB, total
    // 175 618.8 MiB: TP2 needs 87 809 MiB per GPU (> 73 728), TP4 43 904.7
    // (fits), so each replica is TP4 and the 16 GPUs hold 4 of them.
    let model = ModelSpec::llama3_70b().with_serving(8192, 16);
    assert!(close(model.memory_mib(), 175_618.8, 0.1));
    let nodes = a100_pair_of_nodes();
    let one = plan(&model, &nodes, &opts()).unwrap();
    assert_eq!(one.layout, Layout::SingleDomain);
    assert_eq!(one.stages[0].tensor_parallel, 4, "not TP8: {one:?}");
    assert_eq!(one.stages[0].gpus, vec![0, 1, 2, 3]);

    let set = plan_replicas(&model, &nodes, &opts(), ReplicaTarget::AsManyAsFit).unwrap();
    assert_eq!(set.replicas.len(), 4);
    assert!(set.shortfall.is_none());
    let placed: Vec<(NodeId, Vec<u8>)> = set
        .replicas
        .iter()
        .map(|r| (r.stages[0].node, r.stages[0].gpus.clone()))
        .collect();
    assert_eq!(
        placed,
        vec![
            (0, vec![0, 1, 2, 3]),
            (0, vec![4, 5, 6, 7]),
            (1, vec![0, 1, 2, 3]),
            (1, vec![4, 5, 6, 7]),
        ]
    );
    for r in &set.replicas {
        assert_eq!(r.stages.len(), 1);
        assert_eq!(r.stages[0].tensor_parallel, 4);
        assert_eq!(r.stages[0].layers, 80);
        assert!(close(r.stages[0].mib_per_gpu, 43_904.7, 0.1));
        // 43 904.7 MiB per GPU read at 2039 GB/s × 0.9: 25.09 ms per step,
        // 16 sequences → 637.8 tokens/s
        assert!(
            close(r.est_tokens_per_s, 637.8, 0.1),
            "{}",
            r.est_tokens_per_s
        );
    }
    assert!(close(set.est_tokens_per_s, 4.0 * 637.8, 0.5));
}

#[test]
fn seventy_b_with_a_short_context_is_eight_tp2_replicas() {
    // context 4096 × batch 8 → KV 10 240 MiB, total 144 898.8 MiB: TP2
    // needs 72 449.4 MiB per GPU (≤ 73 728), so 8 replicas of TP2.
    let model = ModelSpec::llama3_70b().with_serving(4096, 8);
    let set = plan_replicas(
        &model,
        &a100_pair_of_nodes(),
        &opts(),
        ReplicaTarget::AsManyAsFit,
    )
    .unwrap();
    assert_eq!(set.replicas.len(), 8);
    for r in &set.replicas {
        assert_eq!(r.stages.len(), 1);
        assert_eq!(r.stages[0].tensor_parallel, 2);
        assert!(close(r.stages[0].mib_per_gpu, 72_449.4, 0.1));
    }
    // a count target below what fits stops there
    let two = plan_replicas(
        &model,
        &a100_pair_of_nodes(),
        &opts(),
        ReplicaTarget::Count(2),
    )
    .unwrap();
    assert_eq!(two.replicas.len(), 2);
    assert!(two.shortfall.is_none());
}

#[test]
fn cheaper_node_wins_between_equal_domains() {
    let mut nodes = a100_pair_of_nodes();
    nodes[1].cost_per_hour = 0.5;
    let model = ModelSpec::llama3_70b().with_serving(8192, 16);
    let p = plan(&model, &nodes, &opts()).unwrap();
    assert_eq!(p.stages[0].node, 1);
}

#[test]
fn h100_pair_takes_what_its_memory_allows_and_l4s_the_rest() {
    // 70B at context 8192 × batch 16: 2195.2 MiB per layer. The H100 pair
    // holds 2 × 81 559 × 0.9 = 146 806 MiB: 66 layers at 1097.6 MiB per
    // GPU (67 would need 73 539 > 73 403). An L4 holds 23 034 × 0.9 =
    // 20 730.6 MiB: 9 layers, so the L4 node alone holds 72 < 80 and a
    // pipeline across both nodes is needed. By speed the H100 pair (2 ×
    // 3350 GB/s × 0.9) would take 72.8 of 80 layers; it is capped at 66
    // and the remaining 14 go to the fewest L4 stages that hold them (two),
    // 7 each.
    let model = ModelSpec::llama3_70b().with_serving(8192, 16);
    let nodes = h100_and_l4s();
    let p = plan(&model, &nodes, &opts()).unwrap();
    assert_eq!(p.layout, Layout::CrossNode);
    assert_eq!(layers_of(&p), vec![66, 7, 7]);
    let h100 = &p.stages[0];
    assert_eq!(
        (h100.gpu_type.as_str(), h100.tensor_parallel),
        ("H100-80GB", 2)
    );
    assert!(close(h100.mib_per_gpu, 72_442.8, 0.1));
    assert!(p.stages[1..]
        .iter()
        .all(|s| s.gpu_type == "L4" && s.tensor_parallel == 1 && s.layers < h100.layers));
    assert_eq!(p.stages.iter().map(|s| s.layers).sum::<u32>(), 80);
    // 25.19 ms on the H100s + 2 × 53.71 ms on the L4s → 120.6 tokens/s
    assert!(
        close(p.est_tokens_per_s, 120.6, 0.1),
        "{}",
        p.est_tokens_per_s
    );

    // neither node alone holds it
    for alone in [&nodes[0..1], &nodes[1..2]] {
        let e = plan(&model, alone, &opts()).unwrap_err();
        assert!(matches!(e, PlanError::DoesNotFit { .. }), "{e}");
        assert!(e.to_string().contains("short by"), "{e}");
    }

    let shapes = replica_shapes(&model, &nodes, &opts()).unwrap();
    assert_eq!(shapes, vec![ReplicaShape::of(&p)]);
    let slots: Vec<u32> = shapes[0].stages.iter().map(|s| s.node_slot).collect();
    assert_eq!(slots, vec![0, 1, 1]);
    assert_eq!(shapes[0].stages[0].mib_per_gpu, 72_443);
    assert_eq!(shapes[0].stages[0].min_gpu_memory_mib, 80_492);
}

#[test]
fn eight_b_prefers_an_h100_then_fills_the_l4s() {
    // 8B in bf16: 15 316.0 MiB of weights; KV at context 4096 × batch 8 is
    // 32 768 tokens × 128 KiB = 4096 MiB; 19 412.0 MiB fit one L4 (20 730.6
    // usable) as well as one H100.
    let model = ModelSpec::llama3_8b().with_serving(4096, 8);
    assert!(close(model.memory_mib(), 19_412.0, 0.1));
    let nodes = h100_and_l4s();

    let shapes = replica_shapes(&model, &nodes, &opts()).unwrap();
    let summary: Vec<(&str, u32)> = shapes
        .iter()
        .map(|s| (s.stages[0].gpu_type.as_str(), s.stages[0].tensor_parallel))
        .collect();
    // TP2 on the L4s is impossible: PCIe cards are one domain each
    assert_eq!(summary, vec![("H100-80GB", 1), ("L4", 1), ("H100-80GB", 2)]);
    assert!(shapes.iter().all(|s| s.layout == Layout::SingleDomain));

    let p = plan(&model, &nodes, &opts()).unwrap();
    assert_eq!((p.stages[0].node, p.stages[0].gpus.clone()), (0, vec![0]));
    // 19 412 MiB at 3350 GB/s: 6.08 ms per step, 8 sequences → 1316.6 tokens/s
    assert!(
        close(p.est_tokens_per_s, 1316.6, 0.1),
        "{}",
        p.est_tokens_per_s
    );

    let set = plan_replicas(&model, &nodes, &opts(), ReplicaTarget::Count(10)).unwrap();
    assert_eq!(set.replicas.len(), 10);
    assert!(set.shortfall.is_none());
    let types: Vec<&str> = set
        .replicas
        .iter()
        .map(|r| r.stages[0].gpu_type.as_str())
        .collect();
    assert_eq!(&types[..2], ["H100-80GB"; 2]);
    assert_eq!(&types[2..], ["L4"; 8]);
    // an L4 replica: 19 412 MiB at 300 GB/s → 117.9 tokens/s
    assert!(close(set.replicas[9].est_tokens_per_s, 117.9, 0.1));
    assert!(close(
        set.est_tokens_per_s,
        2.0 * 1316.63 + 8.0 * 117.91,
        0.5
    ));

    // 12 replicas do not fit: 10 planned and a shortfall that says why
    let short = plan_replicas(&model, &nodes, &opts(), ReplicaTarget::Count(12)).unwrap();
    assert_eq!(short.replicas.len(), 10);
    let shortfall = short.shortfall.as_ref().unwrap();
    assert_eq!(shortfall.planned, 10);
    assert!(matches!(shortfall.reason, PlanError::NoUsableGpu { .. }));
    let text = shortfall.to_string();
    assert!(text.contains("target 12 replicas not reached"), "{text}");
    assert!(text.contains("10 are taken by earlier replicas"), "{text}");

    // 3000 tokens/s: 2 H100 replicas (2633.3) + 4 L4 replicas (471.6)
    let fast = plan_replicas(
        &model,
        &nodes,
        &opts(),
        ReplicaTarget::TokensPerSecond(3000.0),
    )
    .unwrap();
    assert_eq!(fast.replicas.len(), 6);
    assert!(fast.est_tokens_per_s >= 3000.0 && close(fast.est_tokens_per_s, 3104.9, 0.5));
    assert!(fast.shortfall.is_none());
}

#[test]
fn four_oh_five_b_is_two_tp8_stages_across_two_h100_nodes() {
    // 405B in bf16: weights 774 192.8 MiB, KV at context 8192 × batch 8
    // (516 096 B per token) 32 256 MiB, total 806 448.8 MiB. One node holds
    // 8 × 81 559 × 0.9 = 587 224.8 MiB: too little. Two TP8 stages of equal
    // speed split the 126 layers 63/63: 50 403.1 MiB per GPU.
    let model = ModelSpec::llama3_405b();
    assert!(close(model.memory_mib(), 806_448.8, 0.1));
    let nodes = [
        nvlink_node("h0", "H100-80GB", 8, H100_80GB_MIB),
        nvlink_node("h1", "H100-80GB", 8, H100_80GB_MIB),
    ];
    let p = plan(&model, &nodes, &opts()).unwrap();
    assert_eq!(p.layout, Layout::CrossNode);
    assert_eq!(layers_of(&p), vec![63, 63]);
    assert!(p.stages.iter().all(|s| s.tensor_parallel == 8));
    assert_eq!((p.stages[0].node, p.stages[1].node), (0, 1));
    assert!(close(p.stages[0].mib_per_gpu, 50_403.1, 0.1));
    // 2 × 17.53 ms per step, 8 sequences → 228.2 tokens/s
    assert!(
        close(p.est_tokens_per_s, 228.2, 0.1),
        "{}",
        p.est_tokens_per_s
    );

    // one stage at most: the same fleet is not enough, and the error says so
    let one_stage = ShardOptions {
        max_stages: 1,
        ..opts()
    };
    let e = plan(&model, &nodes, &one_stage).unwrap_err().to_string();
    assert!(
        e.contains("it needs 2 pipeline stages, more than max_stages 1"),
        "{e}"
    );
}

#[test]
fn a_model_that_fits_nowhere_says_need_capacity_and_what_to_change() {
    let model = ModelSpec::llama3_405b();
    let nodes = [nvlink_node("h0", "H100-80GB", 8, H100_80GB_MIB)];
    let e = plan(&model, &nodes, &opts()).unwrap_err();
    match &e {
        PlanError::DoesNotFit {
            need_mib,
            capacity_mib,
            ..
        } => {
            assert_eq!(*need_mib, 806_449);
            assert_eq!(*capacity_mib, 587_224);
        }
        other => panic!("{other:?}"),
    }
    let text = e.to_string();
    for part in [
        "model llama-3.1-405b needs 787.5 GiB (weights 756.0 GiB + KV 31.5 GiB at context 8192 × batch 8)",
        "the largest tensor-parallel group holds 573.5 GiB (8 × H100-80GB in one NVLink domain",
        "all free GPUs together 573.5 GiB",
        "short by 214.1 GiB",
        "lower context_len or batch, quantize",
    ] {
        assert!(text.contains(part), "{part:?} not in {text}");
    }
    assert_eq!(
        plan_replicas(&model, &nodes, &opts(), ReplicaTarget::Count(1)),
        Err(e)
    );

    // the hint works: in fp8 (weights and KV) the node holds it with TP8
    let fp8 = ModelSpec::llama3_405b().with_dtype(1.0, 1.0);
    let p = plan(&fp8, &nodes, &opts()).unwrap();
    assert_eq!((p.stages.len(), p.stages[0].tensor_parallel), (1, 8));

    // enough memory in total but not in whole layers: a 1-layer model on
    // two PCIe L4s (no tensor parallelism across PCIe)
    let blob = ModelSpec::from_memory("blob", 30_000, 1);
    let l4s = [pcie_node("l", "L4", 2, L4_MIB)];
    let text = plan(&blob, &l4s, &opts()).unwrap_err().to_string();
    assert!(
        text.contains("in whole layers (29.3 GiB each) the free GPUs hold only 0 of 1 layers"),
        "{text}"
    );
}

#[test]
fn tensor_parallelism_divides_the_heads() {
    // 100B in bf16 (190 734.9 MiB), 60 layers, KV 960 MiB, on 8 × A100-40GB
    // (36 864 MiB usable each, one NVLink domain). TP4 needs 47 924 MiB per
    // GPU: too much. With 20 heads TP8 is not allowed (20 % 8 ≠ 0), so the
    // domain is carved into two TP4 groups: a 2-stage pipeline, 30/30.
    let model = |heads: u32| ModelSpec {
        name: format!("m{heads}"),
        params_b: 100.0,
        weights_mib: None,
        layers: 60,
        attention_heads: heads,
        kv_heads: 4,
        head_dim: 128,
        dtype_bytes: 2.0,
        kv_dtype_bytes: 2.0,
        context_len: 2048,
        batch: 4,
    };
    let nodes = [nvlink_node("a", "A100-40GB", 8, 40_960)];
    let m20 = model(20);
    assert!(!m20.allows_tp(8) && m20.allows_tp(4));
    let p = plan(&m20, &nodes, &opts()).unwrap();
    assert_eq!(p.layout, Layout::SingleNode);
    assert_eq!(layers_of(&p), vec![30, 30]);
    assert!(p
        .stages
        .iter()
        .all(|s| s.tensor_parallel == 4 && 20 % s.tensor_parallel == 0));
    assert_eq!(p.stages[0].gpus, vec![0, 1, 2, 3]);
    assert_eq!(p.stages[1].gpus, vec![4, 5, 6, 7]);

    // with 16 heads one TP8 group holds it; weights split 8 ways, the KV
    // of 4 KV heads 4 ways (replicated twice)
    let m16 = model(16);
    let p16 = plan(&m16, &nodes, &opts()).unwrap();
    assert_eq!((p16.stages.len(), p16.stages[0].tensor_parallel), (1, 8));
    let per_gpu = m16.weight_memory_mib() / 8.0 + m16.kv_memory_mib() / 4.0;
    assert!(close(p16.stages[0].mib_per_gpu, per_gpu, 1e-6));

    // that TP8 plan is rejected for the 20-head model
    let mut wrong = p16.clone();
    wrong.model = m20.name.clone();
    let e = validate(&wrong, &m20, &nodes).unwrap_err().to_string();
    assert!(e.contains("TP 8 does not split 20 heads"), "{e}");
}

#[test]
fn heads_unknown_allow_any_degree() {
    // 150 000 MiB, heads unknown: TP2 needs 75 000 per GPU (> 73 728), TP4 fits
    let model = ModelSpec::from_memory("opaque", 150_000, 80);
    model.validate().unwrap();
    assert!(model.allows_tp(8) && model.kv_memory_mib() == 0.0);
    let p = plan(&model, &a100_pair_of_nodes(), &opts()).unwrap();
    assert_eq!(p.stages[0].tensor_parallel, 4);
    assert!(close(p.stages[0].mib_per_gpu, 37_500.0, 1e-6));
}

#[test]
fn model_validation_says_what_to_change() {
    let cases: [(ModelSpec, &str); 6] = [
        (
            ModelSpec {
                layers: 0,
                ..ModelSpec::llama3_8b()
            },
            "0 layers",
        ),
        (
            ModelSpec {
                kv_heads: 6,
                ..ModelSpec::llama3_70b()
            },
            "kv_heads 6 does not divide attention_heads 64",
        ),
        (
            ModelSpec {
                kv_heads: 0,
                ..ModelSpec::llama3_70b()
            },
            "kv_heads is 0 with 64 attention heads",
        ),
        (
            ModelSpec::llama3_8b().with_serving(0, 8),
            "context_len is 0",
        ),
        (ModelSpec::llama3_8b().with_serving(4096, 0), "batch is 0"),
        (
            ModelSpec::llama3_8b().with_dtype(0.0, 2.0),
            "dtype_bytes is 0",
        ),
    ];
    for (model, expect) in cases {
        let e = model.validate().unwrap_err();
        assert!(matches!(e, PlanError::InvalidModel { .. }));
        assert!(e.to_string().contains(expect), "{expect:?} not in {e}");
        assert_eq!(plan(&model, &a100_pair_of_nodes(), &opts()), Err(e));
    }
    let opaque = ModelSpec {
        kv_heads: 8,
        ..ModelSpec::from_memory("x", 1000, 4)
    };
    assert!(opaque
        .validate()
        .unwrap_err()
        .to_string()
        .contains("attention_heads is 0"));
    let bad = ShardOptions {
        reserve: 1.0,
        ..opts()
    };
    assert!(matches!(
        plan(&ModelSpec::llama3_8b(), &a100_pair_of_nodes(), &bad),
        Err(PlanError::InvalidOptions { .. })
    ));
}

#[test]
fn kv_math_matches_the_formula() {
    let m = ModelSpec::llama3_70b().with_serving(8192, 16);
    // 2 × 80 × 8 × 128 × 2 B
    assert_eq!(m.kv_bytes_per_token(), 327_680.0);
    assert_eq!(m.kv_memory_mib(), 40_960.0);
    let q4 = ModelSpec::llama3_8b().with_dtype(0.5, 1.0);
    assert!(close(q4.weight_memory_mib(), 8.03e9 * 0.5 / MIB, 1e-9));
    assert_eq!(q4.kv_bytes_per_token(), 2.0 * 32.0 * 8.0 * 128.0);
}

#[test]
fn mig_and_memoryless_gpus_are_left_out() {
    let mut nodes = [nvlink_node("a", "A100-80GB", 2, A100_80GB_MIB)];
    nodes[0].gpus[0].mig = Some(crate::mig::MigModel::A100_80GB);
    nodes[0].gpus[1].memory_mib = 0;
    let e = plan(&ModelSpec::llama3_8b(), &nodes, &opts()).unwrap_err();
    assert!(matches!(e, PlanError::NoUsableGpu { .. }));
    assert!(e.to_string().contains("1 are in MIG mode"), "{e}");
    assert!(e.to_string().contains("1 report no memory"), "{e}");
}

#[test]
fn validate_catches_broken_plans() {
    let model = ModelSpec::llama3_70b().with_serving(8192, 16);
    let nodes = h100_and_l4s();
    let good = plan(&model, &nodes, &opts()).unwrap();
    validate(&good, &model, &nodes).unwrap();
    let check = |edit: &dyn Fn(&mut ShardPlan), expect: &str| {
        let mut p = good.clone();
        edit(&mut p);
        let e = validate(&p, &model, &nodes).unwrap_err().to_string();
        assert!(e.contains(expect), "{expect:?} not in {e}");
    };
    check(
        &|p| p.stages[2].first_layer += 1,
        "stage 2 starts at layer 74 instead of 73",
    );
    check(
        &|p| p.stages.truncate(2),
        "the stages cover 73 of 80 layers",
    );
    check(
        &|p| {
            p.stages[2].gpus = vec![0];
            p.stages[2].nvlink_domain = 0;
        },
        "GPU 0 of l is used twice",
    );
    check(
        &|p| {
            p.stages[1].gpus = vec![0, 1];
            p.stages[1].tensor_parallel = 2;
            p.stages[1].mib_per_gpu = 7.0 * LayerCost::of(&model).mib_per_gpu(2);
        },
        "outside the group's NVLink domain",
    );
    check(
        &|p| {
            p.stages[0].layers += 1;
            p.stages[0].mib_per_gpu = 67.0 * LayerCost::of(&model).mib_per_gpu(2);
            p.stages[1].first_layer += 1;
            p.stages[1].layers -= 1;
            p.stages[1].mib_per_gpu = 6.0 * LayerCost::of(&model).mib_per_gpu(1);
            p.stages[2].first_layer += 1;
            p.stages[2].layers -= 1;
            p.stages[2].mib_per_gpu = 6.0 * LayerCost::of(&model).mib_per_gpu(1);
        },
        "within the 10 % reserve",
    );
    check(
        &|p| p.stages[0].mib_per_gpu = 1.0,
        "records 1.0 MiB per GPU",
    );
    check(&|p| p.layout = Layout::SingleNode, "layout SingleNode");
}

#[test]
fn bandwidth_and_tflops_tables() {
    for (name, gbs) in [
        ("H200", 4800.0),
        ("H100-80GB", 3350.0),
        ("H100-PCIe", 2000.0),
        ("A100-80GB", 2039.0),
        ("A100-SXM4-40GB", 1555.0),
        ("NVIDIA L40S", 864.0),
        ("L4", 300.0),
        ("A10G", 600.0),
        ("RTX4090", 1008.0),
        ("RTX 3090", 936.0),
        ("V100", 900.0),
        ("Tesla T4", 320.0),
        ("A30", 933.0),
        ("P100", 732.0),
        ("G2", 500.0),
    ] {
        assert_eq!(gpu_bandwidth_gbs(name), gbs, "{name}");
    }
    assert_eq!(gpu_tflops("H100-80GB"), 989.0);
    assert_eq!(gpu_tflops("L40S"), 362.0);
    assert_eq!(gpu_tflops("unknown"), 100.0);
}
