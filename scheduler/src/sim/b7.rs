//! Benchmark B7: MIG plans for the ParvaGPU scenarios on A100-80GB.
//!
//! For each scenario, Talon chooses per model a multiset of GPU *segments*
//! (MIG instance size × batch × MPS processes) whose summed throughput meets
//! the model's request rate and whose batch latency meets the latency SLO
//! under ParvaGPU's own rule (latency < SLO/2 × 0.9: a request may wait one
//! batch and be served in the next), then packs all segments into as few
//! A100s as legal MIG layouts allow ([`crate::mig`]). Several cost models for
//! the per-model choice are tried (GPCs, memory slices, and mixes) and a
//! local search swaps one model's choice at a time; the plan with the fewest
//! GPUs (then fewest GPCs) wins. Every plan is validated before it is
//! returned: legal layouts, every rate met, every latency within the rule.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::parvagpu::{load, ParvaData, ProfilePoint, Slo};
use crate::mig::{plan_layout_tagged, validate_layout, MigInstance, MigModel};

/// ParvaGPU's published GPU counts for scenarios 1–6.
pub const PARVAGPU_GPUS: [usize; 6] = [2, 3, 5, 7, 13, 16];
/// Instance sizes (GPCs) of the A100-80GB profiles used.
pub const SIZES: [u8; 5] = [1, 2, 3, 4, 7];

/// ParvaGPU's latency rule: a segment is admissible if its batch latency is
/// below 45 % of the SLO.
pub fn admissible(p: &ProfilePoint, slo_ms: f64) -> bool {
    p.latency_ms < slo_ms / 2.0 * 0.9
}

/// One placed segment.
#[derive(Clone, Debug, Serialize)]
pub struct Segment {
    pub model: String,
    pub gpcs: u8,
    pub batch: u32,
    pub procs: u32,
    pub throughput: f64,
    pub latency_ms: f64,
    pub gpu: usize,
    pub profile: String,
    pub start: u8,
}

/// A scenario's plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub scenario: usize,
    pub gpus: usize,
    pub gpcs_used: u32,
    pub lower_bound_gpus: usize,
    pub segments: Vec<Segment>,
    pub planning_us: f64,
}

/// Best point per instance size for one model under its SLO.
fn best_points(data: &ParvaData, slo: &Slo) -> Vec<Option<ProfilePoint>> {
    SIZES
        .iter()
        .map(|&s| {
            data.models[slo.model]
                .points
                .iter()
                .filter(|p| p.gpcs == s && admissible(p, slo.latency_ms) && p.throughput > 0.0)
                .max_by(|a, b| {
                    a.throughput
                        .total_cmp(&b.throughput)
                        .then(b.batch.cmp(&a.batch))
                        .then(b.procs.cmp(&a.procs))
                })
                .cloned()
        })
        .collect()
}

/// Min-cost multiset of sizes covering `rate` (unbounded knapsack over
/// integer req/s with throughput rounded down, so the cover is conservative).
fn cover(points: &[Option<ProfilePoint>], rate: f64, cost: &[f64; 5]) -> Option<[u32; 5]> {
    let r = rate.ceil().max(0.0) as usize;
    let thr: Vec<usize> = points
        .iter()
        .map(|p| {
            p.as_ref()
                .map(|p| p.throughput.floor() as usize)
                .unwrap_or(0)
        })
        .collect();
    let mut dp = vec![f64::INFINITY; r + 1];
    let mut choice = vec![usize::MAX; r + 1];
    dp[0] = 0.0;
    for x in 1..=r {
        for s in 0..5 {
            if thr[s] == 0 {
                continue;
            }
            let prev = x.saturating_sub(thr[s]);
            let c = dp[prev] + cost[s];
            if c < dp[x] - 1e-12 {
                dp[x] = c;
                choice[x] = s;
            }
        }
    }
    if !dp[r].is_finite() {
        return None;
    }
    let mut counts = [0u32; 5];
    let mut x = r;
    while x > 0 {
        let s = choice[x];
        counts[s] += 1;
        x = x.saturating_sub(thr[s]);
    }
    Some(counts)
}

const COSTS: [[f64; 5]; 5] = [
    [1.0, 2.0, 3.0, 4.0, 7.0],
    [1.0, 2.0, 4.0, 4.0, 8.0],
    [1.0, 2.0, 3.5, 4.0, 7.0],
    [1.0, 2.0, 3.5, 4.0, 8.0],
    [1.1, 2.05, 3.5, 4.0, 7.0],
];

/// Plan one scenario (pure: a function of the data).
pub fn plan_scenario(data: &ParvaData, scenario: usize) -> Result<Plan, String> {
    let t0 = Instant::now();
    let slos = &data.scenarios[scenario];
    let model = MigModel::A100_80GB;
    let prof: Vec<u8> = SIZES
        .iter()
        .map(|&s| model.profile_by_compute(s).expect("A100 has every size"))
        .collect();
    let points: Vec<Vec<Option<ProfilePoint>>> =
        slos.iter().map(|s| best_points(data, s)).collect();
    // candidate covers per model
    let mut cands: Vec<Vec<[u32; 5]>> = Vec::new();
    for (k, slo) in slos.iter().enumerate() {
        let mut c: Vec<[u32; 5]> = Vec::new();
        for cost in &COSTS {
            if let Some(v) = cover(&points[k], slo.rate, cost) {
                if !c.contains(&v) {
                    c.push(v);
                }
            }
        }
        if c.is_empty() {
            return Err(format!(
                "scenario {}: model {} has no MIG segment within its latency SLO ({} ms)",
                scenario + 1,
                data.models[slo.model].name,
                slo.latency_ms
            ));
        }
        cands.push(c);
    }
    let evaluate = |pick: &[usize]| -> (usize, u32, Vec<Vec<((usize, usize), MigInstance)>>) {
        let mut items = Vec::new();
        let mut gpcs = 0u32;
        for (k, &ci) in pick.iter().enumerate() {
            for (s, &n) in cands[k][ci].iter().enumerate() {
                for _ in 0..n {
                    items.push(((k, s), prof[s]));
                    gpcs += SIZES[s] as u32;
                }
            }
        }
        let layout = plan_layout_tagged(model, &items);
        (layout.len(), gpcs, layout)
    };
    // start from each uniform cost model, then improve one model at a time
    let mut best: Option<(usize, u32, Vec<usize>)> = None;
    for ci in 0..COSTS.len() {
        let mut pick: Vec<usize> = cands.iter().map(|c| ci.min(c.len() - 1)).collect();
        let (mut g, mut p, _) = evaluate(&pick);
        let mut improved = true;
        while improved {
            improved = false;
            for k in 0..pick.len() {
                for alt in 0..cands[k].len() {
                    if alt == pick[k] {
                        continue;
                    }
                    let old = pick[k];
                    pick[k] = alt;
                    let (g2, p2, _) = evaluate(&pick);
                    if (g2, p2) < (g, p) {
                        g = g2;
                        p = p2;
                        improved = true;
                    } else {
                        pick[k] = old;
                    }
                }
            }
        }
        if best.as_ref().is_none_or(|b| (g, p) < (b.0, b.1)) {
            best = Some((g, p, pick));
        }
    }
    let (_, gpcs_used, pick) = best.ok_or("no plan")?;
    let (gpus, _, layout) = evaluate(&pick);
    let mut segments = Vec::new();
    for (gi, gpu) in layout.iter().enumerate() {
        for ((k, s), inst) in gpu {
            let p = points[*k][*s].as_ref().ok_or("segment without point")?;
            segments.push(Segment {
                model: data.models[slos[*k].model].name.clone(),
                gpcs: SIZES[*s],
                batch: p.batch,
                procs: p.procs,
                throughput: p.throughput,
                latency_ms: p.latency_ms,
                gpu: gi,
                profile: model.profiles()[inst.profile as usize].name.to_string(),
                start: inst.start,
            });
        }
    }
    let mem: u32 = layout
        .iter()
        .flatten()
        .map(|(_, i)| model.profiles()[i.profile as usize].mem_slices as u32)
        .sum();
    let lower = (gpcs_used.div_ceil(7)).max(mem.div_ceil(8)) as usize;
    let plan = Plan {
        scenario: scenario + 1,
        gpus,
        gpcs_used,
        lower_bound_gpus: lower,
        segments,
        planning_us: t0.elapsed().as_secs_f64() * 1e6,
    };
    validate_plan(data, scenario, &plan)?;
    Ok(plan)
}

/// Check a plan: legal MIG layout on every GPU, every rate met, every
/// segment within the latency rule.
pub fn validate_plan(data: &ParvaData, scenario: usize, plan: &Plan) -> Result<(), String> {
    let model = MigModel::A100_80GB;
    for g in 0..plan.gpus {
        let insts: Vec<MigInstance> = plan
            .segments
            .iter()
            .filter(|s| s.gpu == g)
            .map(|s| MigInstance {
                profile: model.profile_index(&s.profile).unwrap_or(u8::MAX),
                start: s.start,
            })
            .collect();
        validate_layout(model, &insts).map_err(|e| format!("gpu {g}: {e}"))?;
    }
    for slo in &data.scenarios[scenario] {
        let name = &data.models[slo.model].name;
        let segs: Vec<&Segment> = plan.segments.iter().filter(|s| &s.model == name).collect();
        let thr: f64 = segs.iter().map(|s| s.throughput).sum();
        if thr < slo.rate {
            return Err(format!("{name}: throughput {thr:.1} < rate {}", slo.rate));
        }
        for s in segs {
            if s.latency_ms >= slo.latency_ms / 2.0 * 0.9 || s.latency_ms > slo.latency_ms {
                return Err(format!(
                    "{name}: segment latency {} ms breaks SLO {} ms",
                    s.latency_ms, slo.latency_ms
                ));
            }
        }
    }
    Ok(())
}

/// `talon-sim b7`.
pub fn run_cli(data_dir: &Path, out: Option<&Path>) -> Result<(), String> {
    let data = load(&data_dir.join("parvagpu")).map_err(|e| e.to_string())?;
    let mut plans = Vec::new();
    println!("## B7: A100-80GB GPUs per ParvaGPU scenario");
    println!("| scenario | models | Talon GPUs | ParvaGPU GPUs | lower bound | GPCs used | planning ms | valid |");
    println!("|---|---|---|---|---|---|---|---|");
    for sc in 0..data.scenarios.len() {
        let plan = plan_scenario(&data, sc)?;
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | yes |",
            sc + 1,
            data.scenarios[sc].len(),
            plan.gpus,
            PARVAGPU_GPUS
                .get(sc)
                .map(|g| g.to_string())
                .unwrap_or("-".into()),
            plan.lower_bound_gpus,
            plan.gpcs_used,
            plan.planning_us / 1e3
        );
        plans.push(plan);
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut csv = String::from(
            "scenario,models,talon_gpus,parvagpu_gpus,lower_bound,gpcs_used,planning_us\n",
        );
        for (sc, p) in plans.iter().enumerate() {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{:.1}\n",
                p.scenario,
                data.scenarios[sc].len(),
                p.gpus,
                PARVAGPU_GPUS.get(sc).copied().unwrap_or(0),
                p.lower_bound_gpus,
                p.gpcs_used,
                p.planning_us
            ));
        }
        let w = |name: &str, body: String| {
            let p = dir.join(name);
            std::fs::write(&p, body).map_err(|e| format!("{}: {e}", p.display()))
        };
        w("b7_summary.csv", csv)?;
        w(
            "b7_plans.json",
            serde_json::to_string_pretty(&plans).map_err(|e| e.to_string())?,
        )?;
    }
    Ok(())
}
