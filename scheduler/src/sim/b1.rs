//! Benchmark B1: placement quality and decision time on the openb cluster.
//!
//! The protocol of BENCHMARKS.md (and of the FGD artifact):
//! 1. the 1,213-node cluster of `openb_node_list_gpu_node.csv`;
//! 2. a task list: the trace's tasks, plus tasks sampled uniformly with
//!    replacement while the total GPU request stays within 130 % of capacity
//!    (or minus random tasks when the trace alone exceeds it), then shuffled;
//! 3. tasks arrive one at a time, never leave; one decision each over every
//!    node; a task that fits nowhere fails for good;
//! 4. after each arrival, arrived % (rounded) and allocated %; per integer
//!    arrived % the mean allocated %, a ±1 window when a value has no event;
//!    unallocated % = 100 − that, median over seeds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::csv::LoadError;
use super::openb::{load_nodes, load_tasks, scale_nodes, OpenbTask};
use crate::engine::{decide, DecideOptions};
use crate::frag::TypicalTasks;
use crate::policy::talon::{typical_for, TalonConfig};
use crate::policy::PolicyKind;
use crate::rng::{mix2, Rng};
use crate::state::{ClusterState, Demand};

/// Traces B1 knows, in the order of the paper's table.
pub const TRACES: [&str; 12] = [
    "default",
    "gpushare20",
    "gpushare40",
    "gpushare60",
    "gpushare80",
    "gpushare100",
    "multigpu20",
    "multigpu50",
    "cpu050",
    "cpu100",
    "gpuspec33",
    "gpuspec20",
];

/// Published medians of unallocated GPU % (BENCHMARKS.md): trace, arrived %,
/// Random, DotProd, GpuClustering, GpuPacking, BestFit, FGD.
pub const PUBLISHED: [(&str, u32, [f64; 6]); 10] = [
    ("default", 100, [13.75, 9.45, 8.42, 8.20, 7.09, 4.77]),
    ("default", 110, [13.23, 9.37, 8.34, 8.12, 7.02, 4.68]),
    ("default", 130, [12.62, 9.20, 8.21, 7.94, 6.89, 4.60]),
    ("gpushare40", 100, [15.04, 10.66, 10.18, 10.19, 8.53, 6.05]),
    (
        "gpushare80",
        100,
        [19.35, 15.89, 15.45, 15.28, 13.27, 10.91],
    ),
    (
        "gpushare100",
        100,
        [21.07, 17.93, 17.70, 17.78, 15.40, 13.36],
    ),
    ("multigpu20", 100, [13.16, 8.19, 6.62, 6.49, 6.27, 4.47]),
    ("multigpu50", 100, [18.61, 5.24, 4.36, 3.93, 4.42, 2.91]),
    ("cpu050", 100, [11.02, 6.94, 6.52, 6.47, 6.42, 5.00]),
    ("cpu100", 100, [12.56, 8.22, 7.46, 7.45, 6.72, 4.79]),
];

/// The published median for (trace, arrived, policy), if the table has it.
pub fn published(trace: &str, arrived: u32, p: PolicyKind) -> Option<f64> {
    let col = match p {
        PolicyKind::Random => 0,
        PolicyKind::DotProduct => 1,
        PolicyKind::GpuClustering => 2,
        PolicyKind::GpuPacking => 3,
        PolicyKind::BestFit => 4,
        PolicyKind::Fgd => 5,
        PolicyKind::Talon => return None,
    };
    PUBLISHED
        .iter()
        .find(|(t, a, _)| *t == trace && *a == arrived)
        .map(|(_, _, v)| v[col])
}

/// Highest arrived % tracked.
pub const MAX_ARRIVED: usize = 140;

/// Everything one trace needs, loaded and compiled once.
pub struct Prepared {
    pub trace: String,
    pub state0: ClusterState,
    pub tasks: Vec<OpenbTask>,
    pub demands: Vec<Demand>,
    pub typical: Arc<TypicalTasks>,
    pub talon_typical: Arc<TypicalTasks>,
    pub talon: TalonConfig,
    pub capacity: u64,
}

/// Load the cluster (scaled `scale` times) and a trace.
pub fn prepare(
    data_dir: &Path,
    trace: &str,
    scale: usize,
    talon: TalonConfig,
) -> Result<Prepared, LoadError> {
    let nodes = load_nodes(&data_dir.join("openb/openb_node_list_gpu_node.csv"))?;
    let nodes = scale_nodes(&nodes, scale);
    let path = data_dir.join(format!("openb/openb_pod_list_{trace}.csv"));
    let mut tasks = load_tasks(&path)?;
    tasks.sort_by(|a, b| a.name.cmp(&b.name));
    prepare_from(trace, &nodes, tasks, talon).map_err(|msg| LoadError { path, line: 0, msg })
}

/// Build a [`Prepared`] from in-memory nodes and tasks (tests use this).
pub fn prepare_from(
    trace: &str,
    nodes: &[crate::types::Node],
    tasks: Vec<OpenbTask>,
    talon: TalonConfig,
) -> Result<Prepared, String> {
    let state0 = ClusterState::new(nodes).map_err(|e| e.to_string())?;
    let demands = tasks
        .iter()
        .map(|t| state0.compile(&t.to_workload()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let typical = TypicalTasks::from_shapes(tasks.iter().map(|t| t.shape()), 0.95, &state0);
    let talon_typical = typical_for(&talon, tasks.iter().map(|t| t.shape()), &state0);
    let capacity = state0.gpu_capacity_milli();
    if capacity == 0 {
        return Err("cluster has no GPU capacity".into());
    }
    Ok(Prepared {
        trace: trace.to_string(),
        state0,
        tasks,
        demands,
        typical,
        talon_typical,
        talon,
        capacity,
    })
}

/// The arrival order for one seed: tuned to `ratio` × capacity, shuffled.
pub fn workload_order(tasks: &[OpenbTask], capacity: u64, ratio: f64, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let target = ratio * capacity as f64;
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    let mut total: u64 = tasks.iter().map(|t| t.gpu_request_milli()).sum();
    if (total as f64) < target && !tasks.is_empty() {
        loop {
            let i = rng.below(tasks.len() as u64) as usize;
            let r = tasks[i].gpu_request_milli();
            if (total + r) as f64 > target {
                break;
            }
            total += r;
            order.push(i);
        }
    } else {
        while total as f64 > target && !order.is_empty() {
            let k = rng.below(order.len() as u64) as usize;
            total -= tasks[order[k]].gpu_request_milli();
            order.remove(k);
        }
    }
    rng.shuffle(&mut order);
    order
}

/// One (trace, policy, seed) run.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub trace: String,
    pub policy: PolicyKind,
    pub seed: u64,
    /// Unallocated % at arrived 0..=MAX_ARRIVED (`None`: no event near it).
    pub unallocated: Vec<Option<f64>>,
    pub decisions: usize,
    pub failed: usize,
    /// Decision time percentiles over this run, nanoseconds.
    pub decision_p50_ns: u64,
    pub decision_p99_ns: u64,
    pub decision_max_ns: u64,
    /// Whole run (all decisions and state updates), nanoseconds.
    pub run_ns: u64,
}

impl Serialize for PolicyKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let k = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[k]
}

/// Run one policy over one arrival order.
pub fn run_one(
    prep: &Prepared,
    order: &[usize],
    kind: PolicyKind,
    seed: u64,
) -> Result<RunResult, String> {
    let mut state = prep.state0.clone();
    let mut policy = kind.build(&prep.typical, &prep.talon_typical, prep.talon);
    let cap = prep.capacity as f64;
    let mut sums = vec![(0.0f64, 0u32); MAX_ARRIVED + 2];
    let mut arrived = 0u64;
    let mut alloc = 0u64;
    let mut failed = 0;
    let mut times = Vec::with_capacity(order.len());
    // one random node order per run (see DecideOptions::seed); TIES=decision
    // draws a fresh order per decision instead, for comparison
    let per_decision = std::env::var("TALON_B1_TIES").is_ok_and(|v| v == "decision");
    let start = Instant::now();
    for (k, &ti) in order.iter().enumerate() {
        let d = &prep.demands[ti];
        arrived += d.total_milli();
        let tie_seed = if per_decision {
            mix2(seed, k as u64)
        } else {
            mix2(seed, 0x6e6f_6465)
        };
        let t0 = Instant::now();
        let dec = decide(
            &state,
            d,
            policy.as_mut(),
            DecideOptions {
                seed: tie_seed,
                nonce: mix2(seed, k as u64),
                explain: false,
            },
        );
        times.push(t0.elapsed().as_nanos() as u64);
        match dec.assignment {
            Some(a) => {
                state
                    .apply(&a, d)
                    .map_err(|e| format!("{} chose an invalid assignment: {e}", kind.name()))?;
                alloc += d.total_milli();
            }
            None => failed += 1,
        }
        let a_pct = (100.0 * arrived as f64 / cap).round() as usize;
        if a_pct <= MAX_ARRIVED + 1 {
            sums[a_pct].0 += 100.0 * alloc as f64 / cap;
            sums[a_pct].1 += 1;
        }
    }
    let run_ns = start.elapsed().as_nanos() as u64;
    debug_assert!(state.check_consistency().is_ok());
    let mut unallocated = vec![None; MAX_ARRIVED + 1];
    for (a, slot) in unallocated.iter_mut().enumerate() {
        let (s, c) = sums[a];
        let v = if c > 0 {
            Some(s / c as f64)
        } else {
            let lo = a.saturating_sub(1);
            let (s, c) =
                (lo..=a + 1).fold((0.0, 0u32), |acc, i| (acc.0 + sums[i].0, acc.1 + sums[i].1));
            (c > 0).then(|| s / c as f64)
        };
        *slot = v.map(|alloc| 100.0 - alloc);
    }
    times.sort_unstable();
    Ok(RunResult {
        trace: prep.trace.clone(),
        policy: kind,
        seed,
        unallocated,
        decisions: order.len(),
        failed,
        decision_p50_ns: percentile(&times, 0.5),
        decision_p99_ns: percentile(&times, 0.99),
        decision_max_ns: times.last().copied().unwrap_or(0),
        run_ns,
    })
}

/// B1 settings.
#[derive(Clone, Debug)]
pub struct B1Config {
    pub data_dir: PathBuf,
    pub traces: Vec<String>,
    pub seeds: u64,
    pub seed_base: u64,
    pub policies: Vec<PolicyKind>,
    pub scale: usize,
    pub ratio: f64,
    pub jobs: usize,
    /// Talon's ingredients (the default, or an ablation step).
    pub talon: TalonConfig,
}

/// Median of the present values.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Run every (trace, policy, seed); `progress` is told of each finished run.
pub fn run_all(
    cfg: &B1Config,
    progress: &(dyn Fn(&RunResult) + Sync),
) -> Result<Vec<RunResult>, String> {
    let mut results = Vec::new();
    for trace in &cfg.traces {
        let prep =
            prepare(&cfg.data_dir, trace, cfg.scale, cfg.talon).map_err(|e| e.to_string())?;
        let orders: Vec<(u64, Vec<usize>)> = (0..cfg.seeds)
            .map(|s| {
                let seed = cfg.seed_base + s;
                (
                    seed,
                    workload_order(&prep.tasks, prep.capacity, cfg.ratio, seed),
                )
            })
            .collect();
        let jobs: Vec<(PolicyKind, usize)> = cfg
            .policies
            .iter()
            .flat_map(|p| (0..orders.len()).map(move |k| (*p, k)))
            .collect();
        let next = AtomicUsize::new(0);
        let out: Mutex<Vec<Result<RunResult, String>>> = Mutex::new(Vec::new());
        std::thread::scope(|sc| {
            for _ in 0..cfg.jobs.max(1) {
                sc.spawn(|| loop {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    let Some((p, k)) = jobs.get(j) else { break };
                    let (seed, order) = &orders[*k];
                    let r = run_one(&prep, order, *p, *seed);
                    if let Ok(r) = &r {
                        progress(r);
                    }
                    out.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                });
            }
        });
        let mut rs = out.into_inner().unwrap_or_else(|e| e.into_inner());
        for r in rs.drain(..) {
            results.push(r?);
        }
    }
    results.sort_by(|a, b| (&a.trace, a.policy, a.seed).cmp(&(&b.trace, b.policy, b.seed)));
    Ok(results)
}

/// Median unallocated % over seeds for (trace, policy) at `arrived`.
pub fn median_at(results: &[RunResult], trace: &str, p: PolicyKind, arrived: usize) -> Option<f64> {
    median(
        results
            .iter()
            .filter(|r| r.trace == trace && r.policy == p)
            .filter_map(|r| r.unallocated.get(arrived).copied().flatten())
            .collect(),
    )
}
