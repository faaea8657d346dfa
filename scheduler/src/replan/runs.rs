//! Kept scores: the place phase's decisions for like workloads without a
//! scan of every node per workload (see [`Run`]).

use std::collections::HashSet;
use std::sync::Arc;

use crate::engine::DecideOptions;
use crate::policy::Policy;
use crate::state::ClusterState;
use crate::types::Assignment;

/// Scores kept across the workloads of one shape (a demand but for its
/// anti-affinity group) that avoid the same nodes, for a policy whose
/// scores are local, or local but for a charge per class of node
/// ([`Policy::charged_by_class`]): every allowed node that passes the
/// shape's filter is scored once, into its class's heap, with the version
/// of the node it was scored at. Before a decision, the nodes that
/// placements changed since the run last decided (its own and every other
/// workload's) are scored again and pushed anew; an entry older than its
/// node's newest is dropped when it comes up. A decision takes the best of
/// the classes' best entries, each less its class's charge now. A node
/// that already holds the group being placed is set aside while that
/// group's workloads follow one another, and goes back when another
/// group's turn comes. Same decisions as a scan of every node per workload
/// (a node's local score changes only with its own state, a charge is the
/// same for a whole class, and phase 2 only ever takes capacity, so a node
/// that fails the shape's filter never passes it again), in time linear in
/// nodes per shape plus placements times the classes and a logarithm: the
/// reconciler's first plan of a fleet of models of a few sizes, or of a
/// model of many replicas.
struct Run<'p> {
    shape: crate::state::Demand,
    avoid: Option<&'p Arc<HashSet<String>>>,
    /// Whether the classes pay charges (else one heap, no charge).
    charged: bool,
    /// Per class of node, the kept scores (without the charge).
    heaps: Vec<std::collections::BinaryHeap<(crate::engine::Score, u64)>>,
    /// Per node, its class and the version of its newest entry ([`GONE`]:
    /// none).
    class: Vec<u32>,
    newest: Vec<u64>,
    /// Entries of nodes that hold `group`, out of the heaps while it is
    /// the group placed.
    aside: Vec<(crate::engine::Score, u64)>,
    group: Option<u64>,
    /// How much of [`Runs::touched`] it has scored again.
    seen: usize,
    /// When it last served a pick (for keeping the most recent runs).
    used: u64,
}

/// Node versions are never 0; an entry-less node is marked with it.
const GONE: u64 = 0;

/// The runs kept during one plan, the most recently used ones, and the
/// nodes every placement of the plan landed on, in order.
#[derive(Default)]
pub(super) struct Runs<'p> {
    runs: Vec<Run<'p>>,
    touched: Vec<usize>,
    clock: u64,
}

/// Runs kept at once: a plan's pending workloads come largest first, so
/// the workloads of one shape mostly follow one another.
const KEPT_RUNS: usize = 8;

impl<'p> Runs<'p> {
    /// A placement landed on `node` (whatever decided it).
    pub(super) fn placed(&mut self, node: usize) {
        if !self.runs.is_empty() {
            self.touched.push(node);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn pick(
        &mut self,
        state: &ClusterState,
        d: &crate::state::Demand,
        avoid: Option<&'p Arc<HashSet<String>>>,
        policy: &mut dyn Policy,
        opts: DecideOptions,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<Assignment> {
        self.clock += 1;
        let found = self
            .runs
            .iter()
            .position(|r| same_shape(&r.shape, d) && same_avoid(r.avoid, avoid));
        let at = match found {
            Some(at) => at,
            None => {
                if self.runs.len() >= KEPT_RUNS {
                    let oldest = (0..self.runs.len())
                        .min_by_key(|&i| self.runs[i].used)
                        .unwrap_or(0);
                    self.runs.swap_remove(oldest);
                }
                let run = Run::scan(state, d, avoid, policy, opts, allowed, self.touched.len());
                self.runs.push(run);
                self.runs.len() - 1
            }
        };
        let run = &mut self.runs[at];
        run.used = self.clock;
        run.pick(state, d, &self.touched, policy, opts)
    }
}

/// Whether two demands are alike but for their anti-affinity group.
fn same_shape(a: &crate::state::Demand, b: &crate::state::Demand) -> bool {
    a.cpu_milli == b.cpu_milli
        && a.memory_mib == b.memory_mib
        && a.kind == b.kind
        && a.type_mask == b.type_mask
        && a.any_domain == b.any_domain
}

impl<'p> Run<'p> {
    fn scan(
        state: &ClusterState,
        d: &crate::state::Demand,
        avoid: Option<&'p Arc<HashSet<String>>>,
        policy: &mut dyn Policy,
        opts: DecideOptions,
        allowed: impl Fn(usize) -> bool,
        seen: usize,
    ) -> Run<'p> {
        let shape = crate::state::Demand {
            group: None,
            ..d.clone()
        };
        policy.begin(state, &shape, opts.nonce);
        let charged = !policy.local_scores(&shape);
        let mut run = Run {
            shape,
            avoid,
            charged,
            heaps: Vec::new(),
            class: vec![0; state.nodes.len()],
            newest: vec![GONE; state.nodes.len()],
            aside: Vec::new(),
            group: None,
            seen,
            used: 0,
        };
        let random = policy.random_ties();
        for i in 0..state.nodes.len() {
            if charged {
                run.class[i] = policy.node_class(i) as u32;
            }
            if allowed(i) && crate::engine::filter(&state.nodes[i], &run.shape).is_ok() {
                run.push(state, i, policy, random, opts.seed);
            }
        }
        run
    }

    /// Scores node `i` at its current version, into its class's heap.
    fn push(
        &mut self,
        state: &ClusterState,
        i: usize,
        policy: &mut dyn Policy,
        random: bool,
        seed: u64,
    ) {
        let local = if self.charged {
            policy.local_score(state, i, &self.shape)
        } else {
            policy.score(state, i, &self.shape)
        };
        let c = self.class[i] as usize;
        if self.heaps.len() <= c {
            self.heaps.resize_with(c + 1, Default::default);
        }
        let version = state.nodes[i].version;
        self.heaps[c].push((crate::engine::ranked(local, i, random, seed), version));
        self.newest[i] = version;
    }

    /// The place of the next workload (`d`: this run's shape, with its
    /// group): the best node, scored at its current version and charged
    /// its class's charge now, that does not hold the group.
    fn pick(
        &mut self,
        state: &ClusterState,
        d: &crate::state::Demand,
        touched: &[usize],
        policy: &mut dyn Policy,
        opts: DecideOptions,
    ) -> Option<Assignment> {
        if self.group != d.group {
            for (score, version) in std::mem::take(&mut self.aside) {
                let c = self.class[score.node.0 as usize] as usize;
                self.heaps[c].push((score, version));
            }
            self.group = d.group;
        }
        policy.begin(state, &self.shape, opts.nonce);
        let random = policy.random_ties();
        for &i in &touched[self.seen..] {
            let n = &state.nodes[i];
            // a node without an entry failed the filter (or is not
            // allowed) and cannot come back
            if self.newest[i] == GONE || self.newest[i] == n.version {
                continue;
            }
            if crate::engine::filter(n, &self.shape).is_ok() {
                self.push(state, i, policy, random, opts.seed);
            } else {
                self.newest[i] = GONE;
            }
        }
        self.seen = touched.len();
        // each class's best current entry, less the class's charge
        let mut best: Option<crate::engine::Score> = None;
        for c in 0..self.heaps.len() {
            while let Some(&(score, version)) = self.heaps[c].peek() {
                let i = score.node.0 as usize;
                if self.newest[i] != version {
                    self.heaps[c].pop(); // superseded
                    continue;
                }
                if d.group.is_some() && crate::engine::filter(&state.nodes[i], d).is_err() {
                    // passes the shape's filter at this version: the group
                    // is what it fails
                    self.heaps[c].pop();
                    self.aside.push((score, version));
                    continue;
                }
                let charged = crate::engine::Score {
                    primary: score.primary - policy.class_charge(c, &self.shape),
                    ..score
                };
                if best.is_none_or(|b| charged > b) {
                    best = Some(charged);
                }
                break;
            }
        }
        // the entry stays in: the placement makes it stale, and the next
        // pick scores it again
        let i = best?.node.0 as usize;
        Some(Assignment {
            node: i as crate::types::NodeId,
            gpus: policy.assign(state, i, d, opts.nonce),
        })
    }
}

/// Whether two workloads avoid the same nodes (the reconciler shares one
/// set among the replicas of a model).
fn same_avoid(a: Option<&Arc<HashSet<String>>>, b: Option<&Arc<HashSet<String>>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        _ => false,
    }
}
