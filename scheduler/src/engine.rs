//! One online decision: filter → score → pick, with an explanation.
//!
//! Hard constraints filter (CPU, memory, anti-affinity, GPU type, GPU fit);
//! the policy scores what is left; the highest [`Score`] wins. `Score` is an
//! `Ord` struct whose field order is the priority and whose last field is the
//! node id, so the choice is a deterministic function of the inputs. Policies
//! that emulate the Kubernetes scheduler (the FGD paper's baselines break ties
//! uniformly at random) fill `tie` from a key derived from the caller's seed:
//! randomness is a parameter, never ambient.
//!
//! With `explain` set, the decision carries an [`Explanation`]: why each node
//! was filtered out, and every feasible node's score and rank.

use std::cmp::Reverse;

use serde::Serialize;

use crate::policy::{Policy, PolicyScore};
use crate::rng::mix2;
use crate::state::{ClusterState, Demand, DemandKind, NodeState};
use crate::types::{Assignment, NodeId};

/// A node's total score; compare with `Ord`, highest wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Score {
    pub primary: i64,
    pub secondary: i64,
    pub tertiary: i64,
    /// Random key for policies that break ties at random; 0 otherwise.
    pub tie: u64,
    /// Lower node id wins the final tie.
    pub node: Reverse<NodeId>,
}

/// Why a node cannot host a demand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum FilterReason {
    Cpu {
        need: u64,
        free: u64,
    },
    Memory {
        need: u64,
        free: u64,
    },
    AntiAffinity,
    NoGpus,
    GpuType,
    /// No single allowed GPU has `need` milli free; `best` is the most any has.
    GpuShare {
        need: u32,
        best: u32,
    },
    /// Fewer than `need` allowed GPUs are wholly free in one NVLink domain.
    WholeGpus {
        need: u32,
        free: u32,
    },
    /// No allowed GPU has `need` MiB of memory with its share free; `best`
    /// is the largest memory of an allowed GPU.
    GpuMemory {
        need: u64,
        best: u64,
    },
    /// No allowed MIG GPU has a legal free position for the profile.
    MigSlot {
        profile: String,
    },
    /// Excluded by the caller (e.g. re-plan kept the workload where it was).
    Excluded,
}

impl std::fmt::Display for FilterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FilterReason::Cpu { need, free } => write!(f, "cpu: needs {need}m, {free}m free"),
            FilterReason::Memory { need, free } => {
                write!(f, "memory: needs {need} MiB, {free} MiB free")
            }
            FilterReason::AntiAffinity => write!(f, "anti-affinity: group already on node"),
            FilterReason::NoGpus => write!(f, "no GPUs on node"),
            FilterReason::GpuType => write!(f, "no GPU of an allowed type"),
            FilterReason::GpuShare { need, best } => {
                write!(
                    f,
                    "gpu share: needs {need}m on one GPU, best has {best}m free"
                )
            }
            FilterReason::WholeGpus { need, free } => {
                write!(
                    f,
                    "whole gpus: needs {need} in one NVLink domain, {free} wholly free there"
                )
            }
            FilterReason::GpuMemory { need, best } => write!(
                f,
                "gpu memory: needs {need} MiB on one GPU, none with its share free (largest allowed GPU {best} MiB)"
            ),
            FilterReason::MigSlot { profile } => {
                write!(f, "mig: no legal free position for {profile}")
            }
            FilterReason::Excluded => write!(f, "excluded by caller"),
        }
    }
}

/// The node has GPUs, and some of a type the demand allows.
fn gpus_of_allowed_type(n: &NodeState, d: &Demand) -> Result<(), FilterReason> {
    if n.gpu_free.is_empty() {
        return Err(FilterReason::NoGpus);
    }
    if n.type_mask & d.type_mask == 0 {
        return Err(FilterReason::GpuType);
    }
    Ok(())
}

/// Hard constraints. Cheap: O(GPUs on the node).
pub fn filter(n: &NodeState, d: &Demand) -> Result<(), FilterReason> {
    if n.cpu_free < d.cpu_milli {
        return Err(FilterReason::Cpu {
            need: d.cpu_milli,
            free: n.cpu_free,
        });
    }
    if n.mem_free < d.memory_mib {
        return Err(FilterReason::Memory {
            need: d.memory_mib,
            free: n.mem_free,
        });
    }
    if let Some(g) = d.group {
        if n.groups.iter().any(|(k, _)| *k == g) {
            return Err(FilterReason::AntiAffinity);
        }
    }
    match &d.kind {
        DemandKind::None => Ok(()),
        DemandKind::Share { milli } => {
            gpus_of_allowed_type(n, d)?;
            let mut best = 0;
            for i in 0..n.gpu_free.len() {
                if n.gpu_allowed(i, d.type_mask) {
                    let f = n.gpu_free[i];
                    if f >= *milli {
                        return Ok(());
                    }
                    best = best.max(f);
                }
            }
            Err(FilterReason::GpuShare { need: *milli, best })
        }
        DemandKind::Whole { count } => {
            gpus_of_allowed_type(n, d)?;
            let free = if *count <= 1 || d.any_domain {
                // one GPU is always inside one domain; stages need none
                n.whole_free(d.type_mask)
            } else {
                n.whole_free_in_domain(d.type_mask)
            };
            if free >= *count {
                Ok(())
            } else {
                Err(FilterReason::WholeGpus { need: *count, free })
            }
        }
        DemandKind::Memory { mib } => {
            gpus_of_allowed_type(n, d)?;
            let mut best = 0;
            for i in 0..n.gpu_free.len() {
                if n.gpu_allowed(i, d.type_mask) {
                    best = best.max(n.gpu_mem[i]);
                }
                if let Some(m) = d.milli_on(n, i) {
                    if n.gpu_free[i] >= m {
                        return Ok(());
                    }
                }
            }
            Err(FilterReason::GpuMemory { need: *mib, best })
        }
        DemandKind::Mig { profile } => {
            if n.mig.is_empty() {
                return Err(FilterReason::NoGpus);
            }
            for (i, m) in n.mig.iter().enumerate() {
                if let Some((model, occ)) = m {
                    if (d.type_mask >> n.gpu_type[i]) & 1 == 0 {
                        continue;
                    }
                    if let Some(p) = model.profile_index(profile) {
                        if occ.first_fit(*model, p).is_some() {
                            return Ok(());
                        }
                    }
                }
            }
            Err(FilterReason::MigSlot {
                profile: profile.clone(),
            })
        }
    }
}

/// Options of one decision.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecideOptions {
    /// Seed of the random node order used to break ties (only policies
    /// that ask for random ties use it). Keep it fixed across the decisions
    /// of one run: the Kubernetes scheduler the FGD artifact ran in takes the
    /// first top-scored node in its (randomly named, then sorted) node list.
    pub seed: u64,
    /// Per-decision randomness for policies that are random by design
    /// (Random's node pick, random GPU selection).
    pub nonce: u64,
    /// Collect an [`Explanation`].
    pub explain: bool,
}

/// What happened to one node in a decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Outcome {
    Filtered(FilterReason),
    Scored { score: Score, rank: usize },
}

/// One node's line in an explanation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub node: NodeId,
    pub name: String,
    pub outcome: Outcome,
}

/// Why the chosen node, and why not each other node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub policy: String,
    /// What the score fields mean for this policy.
    pub score_fields: [&'static str; 3],
    pub chosen: Option<NodeId>,
    pub candidates: Vec<Candidate>,
}

impl Explanation {
    /// Human-readable summary: the winner, the runners-up, and the filter
    /// reasons grouped by kind.
    pub fn render(&self, max_lines: usize) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let [fa, fb, fc] = self.score_fields;
        match self.chosen {
            Some(id) => {
                let cand = self.candidates.iter().find(|c| c.node == id);
                let _ = writeln!(
                    out,
                    "policy {}: chose node {} ({})",
                    self.policy,
                    cand.map(|c| c.name.as_str()).unwrap_or("?"),
                    id
                );
            }
            None => {
                let _ = writeln!(out, "policy {}: no node fits", self.policy);
            }
        }
        let mut scored: Vec<&Candidate> = self
            .candidates
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Scored { .. }))
            .collect();
        scored.sort_by_key(|c| match c.outcome {
            Outcome::Scored { rank, .. } => rank,
            _ => usize::MAX,
        });
        for c in scored.iter().take(max_lines) {
            if let Outcome::Scored { score, rank } = &c.outcome {
                let _ = writeln!(
                    out,
                    "  #{rank} {} : {fa}={} {fb}={} {fc}={} tie={}",
                    c.name, score.primary, score.secondary, score.tertiary, score.tie
                );
            }
        }
        let mut reasons: Vec<(String, usize)> = Vec::new();
        for cand in &self.candidates {
            if let Outcome::Filtered(r) = &cand.outcome {
                let key = format!("{r:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap_or("")
                    .to_string();
                match reasons.iter_mut().find(|(k, _)| *k == key) {
                    Some(e) => e.1 += 1,
                    None => reasons.push((key, 1)),
                }
            }
        }
        for (k, n) in reasons {
            let _ = writeln!(out, "  filtered {n} nodes: {k}");
        }
        out
    }
}

/// The result of one decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub assignment: Option<Assignment>,
    pub score: Option<Score>,
    pub explanation: Option<Explanation>,
}

/// Place one demand now, over every node of the cluster.
pub fn decide(
    state: &ClusterState,
    d: &Demand,
    policy: &mut dyn Policy,
    opts: DecideOptions,
) -> Decision {
    decide_among(state, d, policy, opts, |_| true)
}

/// Node `i`'s score for `d`, as a decision ranks it (`random`: the
/// policy's random ties, keyed by `seed`).
pub(crate) fn node_score(
    state: &ClusterState,
    i: usize,
    d: &Demand,
    policy: &mut dyn Policy,
    random: bool,
    seed: u64,
) -> Score {
    ranked(policy.score(state, i, d), i, random, seed)
}

/// Node `i`'s [`Score`] from its policy's score: the random tie key where
/// the policy breaks ties at random, then the lower node id.
pub(crate) fn ranked(p: PolicyScore, i: usize, random: bool, seed: u64) -> Score {
    let PolicyScore {
        primary,
        secondary,
        tertiary,
    } = p;
    Score {
        primary,
        secondary,
        tertiary,
        tie: if random { mix2(seed, i as u64) } else { 0 },
        node: Reverse(i as NodeId),
    }
}

/// Place one demand over the nodes `allowed` accepts.
pub fn decide_among(
    state: &ClusterState,
    d: &Demand,
    policy: &mut dyn Policy,
    opts: DecideOptions,
    allowed: impl Fn(usize) -> bool,
) -> Decision {
    policy.begin(state, d, opts.nonce);
    let random = policy.random_ties();
    let mut best: Option<Score> = None;
    let mut cands: Vec<Candidate> = Vec::new();
    for (i, n) in state.nodes.iter().enumerate() {
        let verdict = if allowed(i) {
            filter(n, d)
        } else {
            Err(FilterReason::Excluded)
        };
        match verdict {
            Ok(()) => {
                let s = node_score(state, i, d, policy, random, opts.seed);
                if best.is_none_or(|b| s > b) {
                    best = Some(s);
                }
                if opts.explain {
                    cands.push(Candidate {
                        node: i as NodeId,
                        name: state.names[i].clone(),
                        outcome: Outcome::Scored { score: s, rank: 0 },
                    });
                }
            }
            Err(r) => {
                if opts.explain {
                    cands.push(Candidate {
                        node: i as NodeId,
                        name: state.names[i].clone(),
                        outcome: Outcome::Filtered(r),
                    });
                }
            }
        }
    }
    let assignment = best.map(|s| {
        let node = s.node.0 as usize;
        Assignment {
            node: node as NodeId,
            gpus: policy.assign(state, node, d, opts.nonce),
        }
    });
    let explanation = opts.explain.then(|| {
        let mut ranked: Vec<(Score, usize)> = cands
            .iter()
            .enumerate()
            .filter_map(|(k, c)| match c.outcome {
                Outcome::Scored { score, .. } => Some((score, k)),
                _ => None,
            })
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0));
        for (rank, (_, k)) in ranked.iter().enumerate() {
            if let Outcome::Scored { rank: r, .. } = &mut cands[*k].outcome {
                *r = rank + 1;
            }
        }
        Explanation {
            policy: policy.name().to_string(),
            score_fields: policy.score_fields(),
            chosen: best.map(|s| s.node.0),
            candidates: cands,
        }
    });
    Decision {
        assignment,
        score: best,
        explanation,
    }
}
