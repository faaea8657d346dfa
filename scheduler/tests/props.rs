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

fn arb_node() -> impl Strategy<Value = (u64, u64, usize, usize)> {
    (1u64..=16, 1u64..=64, 0usize..=8, 0usize..3)
}

fn arb_workload() -> impl Strategy<Value = (u64, u64, u32, u32, u8, bool)> {
    (
        0u64..=8,
        0u64..=16,
        0u32..4,
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
            gpus: (0..g).map(|_| Gpu::new(TYPES[t])).collect(),
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
    let mut pol = kind.build(&tt, &tt);
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
        let problem = Problem { nodes: build_nodes(&nodes), workloads: build_workloads(&ws) };
        let state = ClusterState::new(&problem.nodes).unwrap();
        let tt = typical(&state, &problem.workloads);
        let mut pol = PolicyKind::Talon.build(&tt, &tt);
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
    let mut pol = PolicyKind::Talon.build(&tt, &tt);
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
