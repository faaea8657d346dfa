//! Property tests of the placement engine on small synthetic clusters:
//! no overcommit, constraints honoured, determinism, stable re-plan.

use std::sync::Arc;

use proptest::prelude::*;
use talon_scheduler::engine::{decide, filter, DecideOptions};
use talon_scheduler::frag::{TaskShape, TypicalTasks};
use talon_scheduler::policy::PolicyKind;
use talon_scheduler::replan::{replan, Problem, Solution};
use talon_scheduler::state::ClusterState;
use talon_scheduler::types::{Gpu, GpuRequest, Node, Workload};

const TYPES: [&str; 3] = ["A100", "T4", "V100"];
const MEMORY: [u64; 3] = [81_920, 16_384, 32_768];

fn arb_node() -> impl Strategy<Value = (u64, u64, usize, usize)> {
    (1u64..=16, 1u64..=64, 0usize..=8, 0usize..3)
}

fn arb_workload() -> impl Strategy<Value = (u64, u64, u32, u32, u8, bool)> {
    (
        0u64..=8,
        0u64..=16,
        0u32..5,
        1u32..1000,
        0u8..4,
        any::<bool>(),
    )
}

fn build_nodes(spec: &[(u64, u64, usize, usize)]) -> Vec<Node> {
    spec.iter()
        .enumerate()
        .map(|(i, &(cpu, mem, g, t))| Node {
            name: format!("n{i}"),
            cpu_milli: cpu * 1000,
            memory_mib: mem * 1024,
            // odd nodes: NVLink pairs (domains 0,0,1,1,..); even: one domain
            gpus: (0..g)
                .map(|k| Gpu {
                    memory_mib: MEMORY[t],
                    nvlink_domain: if i % 2 == 1 { k as u32 / 2 } else { 0 },
                    ..Gpu::new(TYPES[t])
                })
                .collect(),
            cost_per_hour: 1.0,
        })
        .collect()
}

fn build_workloads(spec: &[(u64, u64, u32, u32, u8, bool)]) -> Vec<Workload> {
    spec.iter()
        .enumerate()
        .map(|(i, &(cpu, mem, kind, milli, ty, aa))| {
            let gpu = match kind {
                0 => GpuRequest::None,
                1 => GpuRequest::Fraction { milli },
                4 => GpuRequest::Memory {
                    mib: milli as u64 * 40,
                },
                _ => GpuRequest::Whole {
                    count: 1 + milli % 4,
                },
            };
            let mut w = Workload::new(&format!("w{i}"), cpu * 1000, mem * 512, gpu);
            if ty < 3 && kind != 0 {
                w.gpu_types = vec![TYPES[ty as usize].to_string()];
            }
            if aa {
                w.anti_affinity = Some(format!("g{}", i % 3));
            }
            w
        })
        .collect()
}

fn typical(state: &ClusterState, ws: &[Workload]) -> Arc<TypicalTasks> {
    TypicalTasks::from_shapes(
        ws.iter().map(|w| {
            let (milli, count) = match w.gpu {
                GpuRequest::Fraction { milli } => (milli, 1),
                GpuRequest::Whole { count } => (1000, count),
                _ => (0, 0),
            };
            TaskShape {
                cpu_milli: w.cpu_milli,
                milli,
                count,
                gpu_spec: w.gpu_types.join("|"),
            }
        }),
        0.95,
        state,
    )
}

/// Place every workload in order; return the decisions.
fn run(kind: PolicyKind, nodes: &[Node], ws: &[Workload], seed: u64) -> Vec<Option<u32>> {
    let mut state = ClusterState::new(nodes).unwrap();
    let tt = typical(&state, ws);
    let mut pol = kind.build(&tt, &tt, Default::default());
    let mut out = Vec::new();
    for (k, w) in ws.iter().enumerate() {
        let d = state.compile(w).unwrap();
        let dec = decide(
            &state,
            &d,
            pol.as_mut(),
            DecideOptions {
                seed,
                nonce: k as u64,
                explain: false,
            },
        );
        match &dec.assignment {
            Some(a) => {
                // the chosen node passed the filter, and the assignment is exact
                assert!(filter(&state.nodes[a.node as usize], &d).is_ok());
                state.check_assignment(a, &d).unwrap();
                // GPU type and anti-affinity honoured
                let n = &state.nodes[a.node as usize];
                for s in &a.gpus {
                    assert!(d.type_mask >> n.gpu_type[s.gpu as usize] & 1 == 1);
                }
                match w.gpu {
                    // a gang inside one NVLink domain
                    GpuRequest::Whole { count } => {
                        assert_eq!(a.gpus.len(), count as usize);
                        let dom = n.gpu_domain[a.gpus[0].gpu as usize];
                        assert!(a.gpus.iter().all(|s| n.gpu_domain[s.gpu as usize] == dom));
                    }
                    // the memory asked for, as a share of that GPU's memory
                    GpuRequest::Memory { mib } => {
                        let g = a.gpus[0].gpu as usize;
                        assert!(n.gpu_mem[g] >= mib);
                        assert_eq!(a.gpus[0].milli as u64, (mib * 1000).div_ceil(n.gpu_mem[g]));
                    }
                    _ => {}
                }
                if let Some(g) = d.group {
                    assert!(!n.groups.iter().any(|(k, _)| *k == g));
                }
                state.apply(a, &d).unwrap();
            }
            None => {
                // nothing fits: every node must be filtered out
                assert!(state.nodes.iter().all(|n| filter(n, &d).is_err()));
            }
        }
        state.check_consistency().unwrap();
        out.push(dec.assignment.map(|a| a.node));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn no_overcommit_and_constraints_hold(
        nodes in prop::collection::vec(arb_node(), 1..8),
        ws in prop::collection::vec(arb_workload(), 1..40),
        pi in 0usize..7,
        seed in any::<u64>(),
    ) {
        let nodes = build_nodes(&nodes);
        let ws = build_workloads(&ws);
        run(PolicyKind::ALL[pi], &nodes, &ws, seed);
    }

    #[test]
    fn same_input_same_output(
        nodes in prop::collection::vec(arb_node(), 1..8),
        ws in prop::collection::vec(arb_workload(), 1..30),
        pi in 0usize..7,
        seed in any::<u64>(),
    ) {
        let nodes = build_nodes(&nodes);
        let ws = build_workloads(&ws);
        let k = PolicyKind::ALL[pi];
        prop_assert_eq!(run(k, &nodes, &ws, seed), run(k, &nodes, &ws, seed));
    }

    #[test]
    fn replan_of_unchanged_problem_moves_nothing(
        nodes in prop::collection::vec(arb_node(), 1..8),
        ws in prop::collection::vec(arb_workload(), 1..30),
        seed in any::<u64>(),
    ) {
        let problem = Problem {
            nodes: build_nodes(&nodes),
            workloads: build_workloads(&ws),
            avoid: Default::default(),
        };
        let state = ClusterState::new(&problem.nodes).unwrap();
        let tt = typical(&state, &problem.workloads);
        let mut pol = PolicyKind::Talon.build(&tt, &tt, Default::default());
        let first = replan(&problem, &Solution::default(), pol.as_mut(), seed).unwrap();
        let second = replan(&problem, &first.solution, pol.as_mut(), seed).unwrap();
        prop_assert!(second.moved.is_empty());
        prop_assert_eq!(&second.solution, &first.solution);
    }
}

#[test]
fn explanation_names_every_node() {
    let nodes = build_nodes(&[(8, 16, 2, 0), (8, 16, 0, 0), (1, 16, 2, 1)]);
    let mut state = ClusterState::new(&nodes).unwrap();
    let w = Workload::new("w", 4000, 1024, GpuRequest::Fraction { milli: 500 });
    let d = state.compile(&w).unwrap();
    let tt = Arc::new(TypicalTasks::default());
    let mut pol = PolicyKind::Talon.build(&tt, &tt, Default::default());
    let dec = decide(
        &state,
        &d,
        pol.as_mut(),
        DecideOptions {
            explain: true,
            ..Default::default()
        },
    );
    let e = dec.explanation.unwrap();
    assert_eq!(e.candidates.len(), 3);
    assert_eq!(e.chosen, Some(0));
    let text = e.render(5);
    assert!(text.contains("NoGpus") && text.contains("Cpu"), "{text}");
    state.apply(&dec.assignment.unwrap(), &d).unwrap();
}

/// A cluster of a few node templates, each repeated (as in a real fleet and
/// the 10x benchmark cluster), plus a mixed-type node, a node with GPUs of
/// non-standard capacity and a node with a MIG GPU.
fn repeated_cluster() -> Vec<Node> {
    use talon_scheduler::mig::MigModel;
    let templates: [(u64, u64, usize, &str); 5] = [
        (96, 384, 8, "G2"),
        (104, 512, 2, "T4"),
        (16, 120, 2, "P100"),
        (32, 128, 4, "V100"),
        (8, 32, 1, "V100"),
    ];
    let mut nodes = Vec::new();
    for copy in 0..6 {
        for (t, &(cpu, mem, g, model)) in templates.iter().enumerate() {
            nodes.push(Node {
                name: format!("n{t}-{copy}"),
                cpu_milli: cpu * 1000,
                memory_mib: mem * 1024,
                gpus: (0..g)
                    .map(|k| Gpu {
                        // device memory (memory asks take a share sized by
                        // it): the later copies' V100s mix 16 and 32 GB
                        // cards, the same type with two memories
                        memory_mib: match model {
                            "G2" => 32_768,
                            "V100" if copy >= 3 && k % 2 == 1 => 32_768,
                            _ => 16_384,
                        },
                        ..Gpu::new(model)
                    })
                    .collect(),
                cost_per_hour: 1.0,
            });
        }
    }
    let mut mixed = vec![Gpu::new("T4"), Gpu::new("V100"), Gpu::new("T4")];
    mixed[1].milli = 1000;
    nodes.push(Node {
        name: "mixed".into(),
        cpu_milli: 48_000,
        memory_mib: 256 * 1024,
        gpus: mixed,
        cost_per_hour: 1.0,
    });
    // the same GPUs in the other order: "first wholly free GPU" differs
    for first in [0, 1] {
        let mut big = vec![Gpu::new("G3"), Gpu::new("G3")];
        big[first].milli = 2000;
        nodes.push(Node {
            name: format!("big{first}"),
            cpu_milli: 64_000,
            memory_mib: 256 * 1024,
            gpus: big,
            cost_per_hour: 1.0,
        });
    }
    let mut mig = vec![Gpu::new("A100"), Gpu::new("A100")];
    mig[0].mig = Some(MigModel::A100_40GB);
    nodes.push(Node {
        name: "mig".into(),
        cpu_milli: 64_000,
        memory_mib: 256 * 1024,
        gpus: mig,
        cost_per_hour: 1.0,
    });
    nodes
}

/// Place (and sometimes release) `n` random workloads with FGD or Talon,
/// with or without the shared score cache; return every decision, with every
/// node's score or filter reason (the explanation).
fn run_cached(
    kind: PolicyKind,
    cached: bool,
    nodes: &[Node],
    n: usize,
    seed: u64,
) -> Vec<talon_scheduler::Decision> {
    use talon_scheduler::policy::{fgd::Fgd, talon::Talon, Policy};
    use talon_scheduler::rng::Rng;
    let mut rng = Rng::new(seed);
    let specs = ["", "T4", "V100", "G2|G3", "P100|V100"];
    let ws: Vec<Workload> = (0..n)
        .map(|i| {
            // a few popular shapes and a long tail, as in the traces
            let cpu = [4000, 8000, 12_000, 1000, 32_000][rng.below(5) as usize]
                + if rng.below(4) == 0 {
                    500 * rng.below(20)
                } else {
                    0
                };
            let gpu = match rng.below(10) {
                0 => GpuRequest::None,
                1..=4 => GpuRequest::Fraction {
                    milli: [250, 500, 100, 700][rng.below(4) as usize],
                },
                5 if rng.below(8) == 0 => GpuRequest::Mig {
                    profile: "1g.5gb".into(),
                },
                9 => GpuRequest::Whole {
                    count: [2, 4, 8][rng.below(3) as usize],
                },
                // the live reconciler's asks: memory, on one GPU
                8 => GpuRequest::Memory {
                    mib: [4_000, 12_000, 20_000, 30_000][rng.below(4) as usize],
                },
                _ => GpuRequest::Whole { count: 1 },
            };
            let mut w = Workload::new(&format!("w{i}"), cpu, 1024 * (1 + rng.below(64)), gpu);
            if rng.below(6) == 0 {
                let s = specs[rng.below(specs.len() as u64) as usize];
                w.gpu_types = s
                    .split('|')
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect();
            }
            if rng.below(10) == 0 {
                w.anti_affinity = Some(format!("g{}", rng.below(3)));
            }
            w
        })
        .collect();
    let mut state = ClusterState::new(nodes).unwrap();
    let tt = typical(&state, &ws);
    let mut pol: Box<dyn Policy> = match kind {
        PolicyKind::Fgd => Box::new(Fgd::with_cache(tt, cached)),
        _ => Box::new(Talon::with_cache(tt, cached)),
    };
    let mut placed = Vec::new();
    let mut out = Vec::new();
    for (k, w) in ws.iter().enumerate() {
        let d = state.compile(w).unwrap();
        let dec = decide(
            &state,
            &d,
            pol.as_mut(),
            DecideOptions {
                seed,
                nonce: k as u64,
                explain: true,
            },
        );
        if let Some(a) = &dec.assignment {
            state.apply(a, &d).unwrap();
            placed.push((a.clone(), d));
        }
        // departures: nodes return to earlier states (and classes die)
        if !placed.is_empty() && rng.below(3) == 0 {
            let i = rng.below(placed.len() as u64) as usize;
            let (a, d) = placed.swap_remove(i);
            state.release(&a, &d).unwrap();
        }
        out.push(dec);
    }
    out
}

#[test]
fn cached_decisions_equal_uncached() {
    let nodes = repeated_cluster();
    for kind in [PolicyKind::Fgd, PolicyKind::Talon] {
        for seed in 0..4 {
            let a = run_cached(kind, true, &nodes, 600, seed);
            let b = run_cached(kind, false, &nodes, 600, seed);
            assert_eq!(a.len(), b.len());
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(x, y, "{kind:?} seed {seed}: decision {k} differs");
            }
            assert!(a.iter().filter(|x| x.assignment.is_some()).count() > 100);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn cache_changes_no_score_on_random_clusters(
        nodes in prop::collection::vec(arb_node(), 1..10),
        copies in 1usize..4,
        talon in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let spec: Vec<_> = (0..copies).flat_map(|_| nodes.iter().copied()).collect();
        let nodes = build_nodes(&spec);
        let kind = if talon { PolicyKind::Talon } else { PolicyKind::Fgd };
        prop_assert_eq!(
            run_cached(kind, true, &nodes, 80, seed),
            run_cached(kind, false, &nodes, 80, seed)
        );
    }
}
