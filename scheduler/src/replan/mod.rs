//! Re-plan: problem + previous solution → new solution that moves little.
//!
//! Named phases, each followed by a post-condition check (after Quickwit's
//! control-plane scheduler):
//!
//! 1. **keep** — every workload whose previous assignment is still valid
//!    (node still there, resources still free, constraints still met) keeps
//!    it, in the problem's workload order;
//! 2. **place** — the others (new workloads, and those whose assignment
//!    became invalid) are placed by the policy, largest GPU demand first;
//! 3. **check** — the final state has no overcommit and every assignment
//!    passes [`ClusterState::check_assignment`] against the state without it.
//!
//! Re-planning an unchanged problem with its own solution moves nothing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::engine::{decide_among, DecideOptions, FilterReason, Outcome};
use crate::policy::Policy;
use crate::state::{ClusterState, StateError};
use crate::types::{Assignment, Node, Workload};

mod runs;
use runs::Runs;

/// What to place, and where.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub nodes: Vec<Node>,
    pub workloads: Vec<Workload>,
    /// Nodes (by name) a workload must not be placed on anew, e.g. the node
    /// where it failed, or those its node selector rules out (one set shared
    /// by the workloads it applies to). A previous assignment there is not
    /// kept either.
    pub avoid: BTreeMap<String, Arc<HashSet<String>>>,
}

/// Where each workload runs, by workload name (absent: not placed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Solution {
    pub assignments: BTreeMap<String, Assignment>,
}

/// The outcome of a re-plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Replan {
    pub solution: Solution,
    /// Workloads whose assignment changed (moved or newly placed).
    pub moved: Vec<String>,
    /// Workloads kept where they were.
    pub kept: usize,
    /// Workloads that fit nowhere, with the most common reason.
    pub unplaced: Vec<(String, String)>,
}

/// Errors that are bugs or bad input, not "does not fit".
#[derive(Debug, Clone, PartialEq)]
pub enum ReplanError {
    State(StateError),
    DuplicateWorkload(String),
    PostCondition(String),
}

impl std::fmt::Display for ReplanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplanError::State(e) => write!(f, "{e}"),
            ReplanError::DuplicateWorkload(n) => write!(f, "workload name {n:?} appears twice"),
            ReplanError::PostCondition(m) => write!(f, "post-condition failed: {m}"),
        }
    }
}

impl std::error::Error for ReplanError {}

impl From<StateError> for ReplanError {
    fn from(e: StateError) -> Self {
        ReplanError::State(e)
    }
}

/// Solve `problem` starting from `previous`.
pub fn replan(
    problem: &Problem,
    previous: &Solution,
    policy: &mut dyn Policy,
    seed: u64,
) -> Result<Replan, ReplanError> {
    solve(problem, previous, policy, seed, true)
}

/// [`replan`]; `use_runs`: decide like workloads from the scores kept
/// across them ([`Runs`]) where the policy allows, else every decision over
/// every node (the reference the runs are tested against).
fn solve(
    problem: &Problem,
    previous: &Solution,
    policy: &mut dyn Policy,
    seed: u64,
    use_runs: bool,
) -> Result<Replan, ReplanError> {
    let mut state = ClusterState::new(&problem.nodes)?;
    let mut names = std::collections::BTreeSet::new();
    let mut demands = Vec::with_capacity(problem.workloads.len());
    for w in &problem.workloads {
        if !names.insert(w.name.clone()) {
            return Err(ReplanError::DuplicateWorkload(w.name.clone()));
        }
        demands.push(state.compile(w)?);
    }
    // phase 1: keep
    let mut solution = Solution::default();
    let mut pending = Vec::new();
    for (k, w) in problem.workloads.iter().enumerate() {
        let avoided = |a: &Assignment| {
            problem.avoid.get(&w.name).is_some_and(|v| {
                state
                    .names
                    .get(a.node as usize)
                    .is_some_and(|n| v.contains(n))
            })
        };
        match previous.assignments.get(&w.name) {
            Some(a) if !avoided(a) && state.check_assignment(a, &demands[k]).is_ok() => {
                state.apply(a, &demands[k])?;
                solution.assignments.insert(w.name.clone(), a.clone());
            }
            _ => pending.push(k),
        }
    }
    let kept = solution.assignments.len();
    state
        .check_consistency()
        .map_err(ReplanError::PostCondition)?;
    // phase 2: place, largest first (GPU, then CPU, then name for determinism)
    let gpu_mib = |d: &crate::state::Demand| match d.kind {
        crate::state::DemandKind::Memory { mib } => mib,
        _ => 0,
    };
    pending.sort_by(|&a, &b| {
        let (da, db) = (&demands[a], &demands[b]);
        (db.total_milli(), gpu_mib(db), db.cpu_milli, db.memory_mib)
            .cmp(&(da.total_milli(), gpu_mib(da), da.cpu_milli, da.memory_mib))
            .then_with(|| problem.workloads[a].name.cmp(&problem.workloads[b].name))
    });
    let mut moved = Vec::new();
    let mut unplaced = Vec::new();
    let mut runs = Runs::default();
    for k in pending {
        let w = &problem.workloads[k];
        let opts = DecideOptions {
            seed,
            nonce: crate::rng::mix2(seed, k as u64),
            explain: false,
        };
        let avoid = problem.avoid.get(&w.name);
        let allowed = |i: usize| avoid.is_none_or(|v| !v.contains(&state.names[i]));
        let keeps = policy.local_scores(&demands[k]) || policy.charged_by_class(&demands[k]);
        let assignment = if use_runs && keeps {
            runs.pick(&state, &demands[k], avoid, policy, opts, allowed)
        } else {
            decide_among(&state, &demands[k], policy, opts, allowed).assignment
        };
        match assignment {
            Some(a) => {
                state.apply(&a, &demands[k])?;
                runs.placed(a.node as usize);
                solution.assignments.insert(w.name.clone(), a);
                moved.push(w.name.clone());
            }
            None => {
                let why = crate::engine::decide(
                    &state,
                    &demands[k],
                    policy,
                    DecideOptions {
                        explain: true,
                        ..opts
                    },
                )
                .explanation
                .map(|e| most_common_reason(&e.candidates))
                .unwrap_or_default();
                unplaced.push((w.name.clone(), why));
            }
        }
    }
    // phase 3: check
    state
        .check_consistency()
        .map_err(ReplanError::PostCondition)?;
    // each assignment must be valid on the state without it: released,
    // checked and applied again in place (a copy of the state per workload
    // would make this quadratic in the fleet)
    for (k, w) in problem.workloads.iter().enumerate() {
        if let Some(a) = solution.assignments.get(&w.name) {
            state
                .release(a, &demands[k])
                .map_err(|e| ReplanError::PostCondition(e.to_string()))?;
            state
                .check_assignment(a, &demands[k])
                .map_err(|e| ReplanError::PostCondition(format!("{}: {e}", w.name)))?;
            state
                .apply(a, &demands[k])
                .map_err(|e| ReplanError::PostCondition(e.to_string()))?;
        }
    }
    Ok(Replan {
        solution,
        moved,
        kept,
        unplaced,
    })
}

fn most_common_reason(c: &[crate::engine::Candidate]) -> String {
    // (kind, nodes filtered for it, the first such node's full reason)
    let mut counts: Vec<(String, usize, String)> = Vec::new();
    for cand in c {
        if let Outcome::Filtered(r) = &cand.outcome {
            let key = match r {
                FilterReason::Cpu { .. } => "cpu",
                FilterReason::Memory { .. } => "memory",
                FilterReason::AntiAffinity => "anti-affinity",
                FilterReason::NoGpus => "no gpus",
                FilterReason::GpuType => "gpu type",
                FilterReason::GpuShare { .. } => "gpu share",
                FilterReason::WholeGpus { .. } => "whole gpus",
                FilterReason::GpuMemory { .. } => "gpu memory",
                FilterReason::MigSlot { .. } => "mig slot",
                FilterReason::Excluded => "excluded",
            };
            match counts.iter_mut().find(|(k, _, _)| k == key) {
                Some(e) => e.1 += 1,
                None => counts.push((key.to_string(), 1, r.to_string())),
            }
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts
        .first()
        .map(|(_, n, why)| format!("{why} ({n} nodes)"))
        .unwrap_or_else(|| "no nodes".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frag::TypicalTasks;
    use crate::policy::talon::Talon;
    use crate::types::{Gpu, GpuRequest};
    use std::sync::Arc;

    fn problem() -> Problem {
        let node = |i: usize| Node {
            name: format!("n{i}"),
            cpu_milli: 32_000,
            memory_mib: 65_536,
            gpus: vec![Gpu::new("A100"); 4],
            cost_per_hour: 1.0,
        };
        let mut ws = Vec::new();
        for i in 0..6 {
            let mut w = Workload::new(
                &format!("w{i}"),
                4000,
                8192,
                GpuRequest::Fraction { milli: 500 },
            );
            if i % 2 == 0 {
                w.anti_affinity = Some("g".into());
            }
            ws.push(w);
        }
        ws.push(Workload::new(
            "big",
            8000,
            8192,
            GpuRequest::Whole { count: 4 },
        ));
        Problem {
            nodes: (0..4).map(node).collect(),
            workloads: ws,
            avoid: BTreeMap::new(),
        }
    }

    #[test]
    fn stages_span_pcie_gpus_where_a_gang_cannot() {
        // four PCIe cards: each its own NVLink domain
        let gpus = (0..4)
            .map(|d| Gpu {
                nvlink_domain: d,
                ..Gpu::new("L4")
            })
            .collect();
        let p = Problem {
            nodes: vec![Node {
                name: "pcie".into(),
                cpu_milli: 32_000,
                memory_mib: 65_536,
                gpus,
                cost_per_hour: 1.0,
            }],
            workloads: vec![
                Workload::new("gang", 0, 0, GpuRequest::Whole { count: 2 }),
                Workload::new("pipe", 0, 0, GpuRequest::Stages { count: 3 }),
            ],
            avoid: BTreeMap::new(),
        };
        let mut pol = Talon::new(Arc::new(TypicalTasks::default()));
        let r = replan(&p, &Solution::default(), &mut pol, 1).unwrap();
        assert_eq!(r.unplaced.len(), 1, "{:?}", r.unplaced);
        assert_eq!(r.unplaced[0].0, "gang");
        let pipe = &r.solution.assignments["pipe"];
        let mut used: Vec<u8> = pipe.gpus.iter().map(|s| s.gpu).collect();
        used.dedup();
        assert_eq!(used.len(), 3);
        assert!(pipe.gpus.iter().all(|s| s.milli == 1000));
        // kept as it is on a second plan
        let again = replan(&p, &r.solution, &mut pol, 1).unwrap();
        assert_eq!(again.solution.assignments["pipe"], *pipe);
    }

    /// Like memory asks, decided from kept scores, land exactly where a
    /// scan of every node per ask puts them: random fleets of cards of
    /// several memories, models of many replicas and of a few sizes (some
    /// spread by anti-affinity, some kept off nodes by a selection that
    /// other models share), other asks between them.
    #[test]
    fn runs_of_like_asks_decide_as_a_scan_of_every_node_does() {
        use crate::rng::Rng;
        let (mut mig_placed, mut others_placed) = (0, 0);
        for seed in 0..12u64 {
            let mut rng = Rng::new(seed);
            let nodes: Vec<Node> = (0..40)
                .map(|i| {
                    let count = 1 + rng.below(8) as usize;
                    let (model, mib) = [
                        ("A100", 81_920),
                        ("L4", 24_576),
                        ("H100", 81_920),
                        ("T4", 16_384),
                    ][rng.below(4) as usize];
                    let pcie = rng.below(3) == 0;
                    // some A100 nodes in MIG mode
                    let mig = model == "A100" && rng.below(2) == 0;
                    Node {
                        name: format!("n{i}"),
                        cpu_milli: [32_000, 64_000][rng.below(2) as usize],
                        memory_mib: 1 << 20,
                        gpus: (0..count)
                            .map(|g| Gpu {
                                memory_mib: mib,
                                nvlink_domain: if pcie { g as u32 } else { 0 },
                                mig: mig.then_some(crate::mig::MigModel::A100_80GB),
                                ..Gpu::new(model)
                            })
                            .collect(),
                        cost_per_hour: 1.0,
                    }
                })
                .collect();
            let mut workloads = Vec::new();
            let mut avoid = BTreeMap::new();
            // node selections shared by several models, as the reconciler
            // shares one set per selector
            let selections: Vec<Arc<HashSet<String>>> = (0..2)
                .map(|_| {
                    Arc::new(
                        (0..5)
                            .map(|_| format!("n{}", rng.below(40)))
                            .collect::<HashSet<_>>(),
                    )
                })
                .collect();
            for m in 0..16 {
                let mib = [4_000, 12_000, 20_000, 30_000, 70_000][rng.below(5) as usize];
                let spread = rng.below(2) == 0;
                let kept_off =
                    (rng.below(3) == 0).then(|| Arc::clone(&selections[rng.below(2) as usize]));
                for r in 0..(2 + rng.below(20)) {
                    let mut w =
                        Workload::new(&format!("m{m}-{r}"), 0, 0, GpuRequest::Memory { mib });
                    if spread {
                        w.anti_affinity = Some(format!("m{m}"));
                    }
                    if let Some(off) = &kept_off {
                        avoid.insert(w.name.clone(), Arc::clone(off));
                    }
                    workloads.push(w);
                }
                // gangs of one, two and four GPUs (some kept to a type,
                // some spread), pipeline stages, shares and MIG instances,
                // several of each
                for g in 0..rng.below(4) {
                    let mut w = Workload::new(
                        &format!("g{m}-{g}"),
                        4_000,
                        0,
                        GpuRequest::Whole {
                            count: [1, 2, 4][rng.below(3) as usize],
                        },
                    );
                    if rng.below(3) == 0 {
                        w.gpu_types = vec!["H100".into()];
                    }
                    if rng.below(3) == 0 {
                        w.anti_affinity = Some(format!("g{m}"));
                    }
                    workloads.push(w);
                }
                let request = match rng.below(3) {
                    0 => GpuRequest::Stages { count: 2 },
                    1 => GpuRequest::Fraction {
                        milli: [250, 500][rng.below(2) as usize],
                    },
                    _ => GpuRequest::Mig {
                        profile: ["1g.10gb", "3g.40gb"][rng.below(2) as usize].into(),
                    },
                };
                for k in 0..rng.below(4) {
                    workloads.push(Workload::new(
                        &format!("x{m}-{k}"),
                        2_000,
                        0,
                        request.clone(),
                    ));
                }
            }
            let p = Problem {
                nodes,
                workloads,
                avoid,
            };
            let st = ClusterState::new(&p.nodes).unwrap();
            let typical = crate::policy::talon::talon_typical(
                // gangs of four and CPU-heavy tasks only some nodes can
                // host: the gangs pay a host-pressure charge per class
                vec![
                    crate::frag::TaskShape {
                        cpu_milli: 0,
                        milli: 500,
                        count: 1,
                        gpu_spec: String::new(),
                    },
                    crate::frag::TaskShape {
                        cpu_milli: 16_000,
                        milli: 1000,
                        count: 4,
                        gpu_spec: String::new(),
                    },
                    crate::frag::TaskShape {
                        cpu_milli: 40_000,
                        milli: 1000,
                        count: 1,
                        gpu_spec: String::new(),
                    },
                ],
                &st,
            );
            // Talon as the reconciler runs it, and with random ties
            let random_ties = crate::policy::talon::TalonConfig {
                pack_ties: false,
                ..Default::default()
            };
            for cfg in [crate::policy::talon::TalonConfig::default(), random_ties] {
                let policy = || Talon::configured(typical.clone(), cfg, true);
                let fast = solve(&p, &Solution::default(), &mut policy(), seed, true).unwrap();
                let scan = solve(&p, &Solution::default(), &mut policy(), seed, false).unwrap();
                assert_eq!(fast, scan, "seed {seed}, {cfg:?}");
                assert!(
                    fast.moved.len() > 50,
                    "seed {seed}: {} placed",
                    fast.moved.len()
                );
                for (name, a) in &fast.solution.assignments {
                    if a.gpus.iter().any(|g| g.mig.is_some()) {
                        mig_placed += 1;
                    } else if name.starts_with('x') {
                        others_placed += 1;
                    }
                }
            }
        }
        // the MIG instances, shares and stages were decided too
        assert!(
            mig_placed > 10 && others_placed > 20,
            "{mig_placed} MIG, {others_placed} others"
        );
    }

    #[test]
    fn unchanged_problem_moves_nothing() {
        let p = problem();
        let mut pol = Talon::new(Arc::new(TypicalTasks::default()));
        let first = replan(&p, &Solution::default(), &mut pol, 1).unwrap();
        assert_eq!(first.solution.assignments.len(), 7);
        assert!(first.unplaced.is_empty());
        let second = replan(&p, &first.solution, &mut pol, 1).unwrap();
        assert!(second.moved.is_empty(), "{:?}", second.moved);
        assert_eq!(second.solution, first.solution);
    }

    #[test]
    fn node_loss_moves_only_its_workloads() {
        let p = problem();
        let mut pol = Talon::new(Arc::new(TypicalTasks::default()));
        let first = replan(&p, &Solution::default(), &mut pol, 1).unwrap();
        let lost = first.solution.assignments["w0"].node;
        let mut p2 = p.clone();
        // replace the lost node by an empty-named different node: its id is kept
        p2.nodes[lost as usize].gpus.clear();
        let second = replan(&p2, &first.solution, &mut pol, 1).unwrap();
        for (name, a) in &first.solution.assignments {
            if a.node != lost {
                assert!(!second.moved.contains(name), "{name} moved");
            }
        }
    }
}
