//! How many replicas of which GPU type each model needs for a forecast rate,
//! at the lowest cost per hour, against the capacity that exists.
//!
//! A replica option is a GPU type and a tensor-parallel degree. Its capacity
//! under an SLO comes from the performance model and the model's token mix:
//! at arrival rate λ a replica holds `b = λ·O·t` sequences (Little's law,
//! `O` the mean output, `t` the time per output token), a decode step of `b`
//! takes `step(b)`, and prefills stall decoding for a fraction `λ·P` of the
//! time (`P` the mean prefill), so `t = step(b) / (1 − λ·P)`. Prompts wait
//! for the prefills ahead of them as in an M/G/1 queue. The highest λ at
//! which the per-token target holds, the time-to-first-token target holds
//! for 99 % of the mix, and the sequences fit the KV cache, times a headroom,
//! is the replica's capacity.
//!
//! Models are planned in priority order (highest first) against one shared
//! [`CapacityOracle`], so a higher class gets GPUs first and every model
//! sees what the ones before it took. Within a model, replicas are added one
//! at a time, each of the option that would cover the remaining rate at the
//! lowest cost per hour on its own, among options within 1.5× of the best
//! cost per request/second.

use std::collections::BTreeMap;

use crate::perf::{self, GpuSpeed, ModelShape};

/// Fraction of the computed capacity a plan may use.
pub const HEADROOM: f64 = 0.95;
/// Fraction of a replica's GPU memory the KV cache may take after weights.
const KV_FRACTION: f64 = 0.9;

/// A model's latency targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    /// Time to first token, plus `ttft_ms_per_1k` per thousand prompt tokens
    /// (a long prompt takes long to read on any GPU).
    pub ttft_ms: f64,
    pub ttft_ms_per_1k: f64,
    /// Mean time per output token after the first.
    pub tpot_ms: f64,
    /// Fraction of requests that must meet both (0.99).
    pub attainment: f64,
}

impl Slo {
    pub fn ttft_target_ms(&self, prompt_tokens: u32) -> f64 {
        self.ttft_ms + self.ttft_ms_per_1k * f64::from(prompt_tokens) / 1000.0
    }
}

/// One way to run a replica.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaOption {
    /// GPU model name as the fleet reports it.
    pub gpu_type: String,
    pub speed: GpuSpeed,
    pub gpu_memory_mib: u64,
    /// GPUs per replica (tensor parallel inside one NVLink domain).
    pub tp: u32,
    /// Cost of one GPU of this type per hour.
    pub gpu_cost_per_hour: f64,
}

impl ReplicaOption {
    pub fn cost_per_hour(&self) -> f64 {
        self.gpu_cost_per_hour * f64::from(self.tp)
    }

    /// "a100-80gb×2".
    pub fn label(&self) -> String {
        format!("{}×{}", self.gpu_type, self.tp)
    }
}

/// What one replica of an option sustains under an SLO.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplicaCapacity {
    /// Requests per second, headroom applied.
    pub rps: f64,
    /// Sequences in flight at that rate.
    pub batch: f64,
    /// Predicted time per output token at that rate.
    pub tpot_ms: f64,
}

/// KV-cache bytes per token: about 38 KiB × √(billions of parameters) for
/// grouped-query-attention models (Llama-3-8B: 128 KiB, Llama-2-70B: 320 KiB).
pub fn kv_bytes_per_token(shape: ModelShape) -> f64 {
    38.0 * 1024.0 * (shape.params / 1e9).max(0.1).sqrt()
}

/// Tokens of KV cache one replica of `option` holds for `shape` (0 when the
/// weights alone do not fit).
pub fn kv_tokens(shape: ModelShape, option: &ReplicaOption) -> f64 {
    let memory = option.gpu_memory_mib as f64 * 1024.0 * 1024.0 * f64::from(option.tp);
    let free = memory - shape.params * shape.bytes_per_param;
    (free * KV_FRACTION / kv_bytes_per_token(shape)).max(0.0)
}

/// The capacity of one replica of `option` for requests shaped like `mix`
/// (prompt, output tokens), or `None` when it cannot meet `slo` at any rate.
pub fn replica_capacity(
    shape: ModelShape,
    option: &ReplicaOption,
    slo: &Slo,
    mix: &[(u32, u32)],
) -> Option<ReplicaCapacity> {
    if mix.is_empty() {
        return None;
    }
    let kv = kv_tokens(shape, option);
    if kv <= 0.0 {
        return None;
    }
    let n = mix.len() as f64;
    let prefills: Vec<f64> = mix
        .iter()
        .map(|&(p, _)| {
            perf::prefill(shape, option.speed, option.tp, u64::from(p.max(1))).as_secs_f64()
        })
        .collect();
    let mean_prefill = prefills.iter().sum::<f64>() / n;
    let mean_prefill_sq = prefills.iter().map(|s| s * s).sum::<f64>() / n;
    let mean_output = mix.iter().map(|&(_, o)| f64::from(o.max(1))).sum::<f64>() / n;
    // A sequence reserves its prompt and its whole output in the KV cache.
    let mean_tokens = mix
        .iter()
        .map(|&(p, o)| f64::from(p) + f64::from(o))
        .sum::<f64>()
        / n;
    let mean_tokens_sq = mix
        .iter()
        .map(|&(p, o)| (f64::from(p) + f64::from(o)).powi(2))
        .sum::<f64>()
        / n;
    let reserve_by_output = mix
        .iter()
        .map(|&(p, o)| (f64::from(p) + f64::from(o)) * f64::from(o))
        .sum::<f64>()
        / n;
    let reserve_by_prefill = mix
        .iter()
        .zip(&prefills)
        .map(|(&(p, o), s)| (f64::from(p) + f64::from(o)) * s)
        .sum::<f64>()
        / n;
    let step = |b: f64| {
        perf::decode_step(shape, option.speed, option.tp, b.ceil().max(1.0) as u32).as_secs_f64()
    };

    let target = slo.attainment.clamp(0.5, 0.9999);
    let tpot_target = slo.tpot_ms / 1000.0;
    // Does rate `lambda` meet the SLO for `target` of requests? Returns
    // (batch, mean time per token) if so. Per request, both latencies are
    // random: the prompt waits for the prefills ahead (M/G/1: busy with
    // probability ρ, then about exponential), and decoding stalls for the
    // prefills that arrive meanwhile (compound Poisson, normal-approximated).
    let meets = |lambda: f64| -> Option<(f64, f64)> {
        let rho = lambda * mean_prefill;
        if rho >= 0.95 {
            return None;
        }
        let mut t = step(1.0) / (1.0 - rho);
        let mut b = 1.0;
        for _ in 0..30 {
            b = (lambda * mean_output * t).max(1.0);
            t = step(b) / (1.0 - rho);
        }
        let decode = step(b);
        let wait = lambda * mean_prefill_sq / (2.0 * (1.0 - rho));
        // KV tokens in use (Little's law, weighted by how long each
        // reservation is held: prefill, then its output at t per token),
        // with three standard deviations of room: a full cache stalls admission
        // and the queue it builds outlasts the peak.
        let kv_mean = lambda * (t * reserve_by_output + reserve_by_prefill + wait * mean_tokens);
        let kv_sd = (kv_mean * mean_tokens_sq / mean_tokens).sqrt();
        if kv_mean + 3.0 * kv_sd > kv {
            return None;
        }
        let attained: f64 = mix
            .iter()
            .zip(&prefills)
            .map(|(&(p, o), &s)| {
                let slack = slo.ttft_target_ms(p) / 1000.0 - s - decode;
                let p_ttft = if slack < 0.0 {
                    0.0
                } else if wait <= 0.0 {
                    1.0
                } else {
                    1.0 - rho * (-rho * slack / wait).exp()
                };
                let o = f64::from(o.max(2) - 1);
                let decoding = o * decode;
                let stall_mean = decoding * rho / (1.0 - rho);
                let stall_sd = (lambda * (decoding + stall_mean) * mean_prefill_sq).sqrt();
                let room = o * tpot_target - decoding - stall_mean;
                let p_tpot = if stall_sd <= 0.0 {
                    if room >= 0.0 {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    normal_cdf(room / stall_sd)
                };
                p_ttft * p_tpot
            })
            .sum::<f64>()
            / n;
        (attained >= target).then_some((b, t))
    };

    // The lightest load must meet the targets, or no rate does.
    let floor = 1e-6;
    meets(floor)?;
    let (mut lo, mut hi) = (floor, 1.0);
    while meets(hi).is_some() && hi < 1e6 {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if meets(mid).is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (batch, tpot) = meets(lo)?;
    Some(ReplicaCapacity {
        rps: lo * HEADROOM,
        batch,
        tpot_ms: tpot * 1000.0,
    })
}

/// Standard normal distribution function (Abramowitz–Stegun 7.1.26,
/// error below 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// Where replicas can go: the placement engine (or, in tests, a count of
/// free GPUs) answers whether one more replica of an option fits, and
/// takes its GPUs if so.
pub trait CapacityOracle {
    fn try_take(&mut self, model: &str, option: &ReplicaOption) -> bool;
}

/// Free whole GPUs per type, NVLink domains ignored.
#[derive(Clone, Debug, Default)]
pub struct FreeGpus(pub BTreeMap<String, u32>);

impl CapacityOracle for FreeGpus {
    fn try_take(&mut self, _model: &str, option: &ReplicaOption) -> bool {
        match self.0.get_mut(&option.gpu_type) {
            Some(free) if *free >= option.tp => {
                *free -= option.tp;
                true
            }
            _ => false,
        }
    }
}

/// One model's demand for the planner.
#[derive(Clone, Debug)]
pub struct ModelDemand {
    pub model: String,
    /// Higher first.
    pub priority: i32,
    pub shape: ModelShape,
    pub slo: Slo,
    /// Requests per second to plan for (the forecast's upper band).
    pub rate: f64,
    /// Recent (prompt, output) tokens.
    pub mix: Vec<(u32, u32)>,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub options: Vec<ReplicaOption>,
    /// How far the model's capacity estimate is trusted (0–1], learnt from
    /// the SLO attainment observed (see `autoscale::Trust`).
    pub trust: f64,
}

/// The plan for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelPlan {
    pub model: String,
    /// Replicas per option label, with the option.
    pub replicas: Vec<(ReplicaOption, u32)>,
    pub rate: f64,
    /// Requests per second the planned replicas sustain.
    pub capacity_rps: f64,
    pub cost_per_hour: f64,
    /// Why: one line per choice, for `talon model show`.
    pub reasons: Vec<String>,
}

impl ModelPlan {
    pub fn total(&self) -> u32 {
        self.replicas.iter().map(|(_, n)| n).sum()
    }

    /// Replicas planned on `option`.
    pub fn count_of(&self, option: &ReplicaOption) -> u32 {
        self.replicas
            .iter()
            .filter(|(o, _)| o == option)
            .map(|(_, n)| n)
            .sum()
    }

    fn add(&mut self, option: &ReplicaOption, cap: ReplicaCapacity) {
        self.capacity_rps += cap.rps;
        self.cost_per_hour += option.cost_per_hour();
        match self.replicas.iter_mut().find(|(o, _)| o == option) {
            Some((_, n)) => *n += 1,
            None => self.replicas.push((option.clone(), 1)),
        }
    }
}

/// Plans every model, highest priority first, against `oracle`.
pub fn plan(demands: &[ModelDemand], oracle: &mut dyn CapacityOracle) -> Vec<ModelPlan> {
    let mut order: Vec<&ModelDemand> = demands.iter().collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.model.cmp(&b.model)));
    order.into_iter().map(|d| plan_model(d, oracle)).collect()
}

fn plan_model(d: &ModelDemand, oracle: &mut dyn CapacityOracle) -> ModelPlan {
    let mut plan = ModelPlan {
        model: d.model.clone(),
        replicas: Vec::new(),
        rate: d.rate,
        capacity_rps: 0.0,
        cost_per_hour: 0.0,
        reasons: Vec::new(),
    };
    let mut usable: Vec<(ReplicaOption, ReplicaCapacity)> = Vec::new();
    for option in &d.options {
        match replica_capacity(d.shape, option, &d.slo, &d.mix) {
            Some(cap) => usable.push((
                option.clone(),
                ReplicaCapacity {
                    rps: cap.rps * d.trust.clamp(0.1, 1.0),
                    ..cap
                },
            )),
            None if !d.mix.is_empty() => plan.reasons.push(format!(
                "{} cannot meet the SLO for this token mix",
                option.label()
            )),
            None => {}
        }
    }
    if usable.is_empty() {
        // No mix yet (no traffic): keep the minimum on the cheapest option.
        if let Some(cheapest) = d
            .options
            .iter()
            .min_by(|a, b| a.cost_per_hour().total_cmp(&b.cost_per_hour()))
        {
            let nominal = ReplicaCapacity {
                rps: 0.0,
                batch: 0.0,
                tpot_ms: 0.0,
            };
            for _ in 0..d.min_replicas {
                if !oracle.try_take(&d.model, cheapest) {
                    plan.reasons
                        .push(format!("no room for {}", cheapest.label()));
                    break;
                }
                plan.add(cheapest, nominal);
            }
            plan.reasons.push(format!(
                "no usable capacity estimate: {} replica(s) kept at the minimum",
                plan.total()
            ));
        }
        return plan;
    }
    usable.sort_by(|(a, ca), (b, cb)| {
        (a.cost_per_hour() / ca.rps)
            .total_cmp(&(b.cost_per_hour() / cb.rps))
            .then(a.label().cmp(&b.label()))
    });
    let mut full: Vec<bool> = vec![false; usable.len()];
    while plan.total() < d.max_replicas {
        let remaining = d.rate - plan.capacity_rps;
        if remaining <= 0.0 && plan.total() >= d.min_replicas {
            break;
        }
        // One more replica of the option that covers what remains at the
        // lowest cost per hour on its own, among the options within 1.5× of
        // the best cost per request/second: a slow replica bought to cover
        // a sliver would draw more than its share from the router.
        let need = remaining.max(f64::EPSILON);
        let best_unit = usable
            .iter()
            .enumerate()
            .filter(|(i, _)| !full[*i])
            .map(|(_, (o, cap))| o.cost_per_hour() / cap.rps)
            .fold(f64::INFINITY, f64::min);
        let pick = usable
            .iter()
            .enumerate()
            .filter(|(i, (o, cap))| !full[*i] && o.cost_per_hour() / cap.rps <= 1.5 * best_unit)
            .map(|(i, (o, cap))| (i, (need / cap.rps).ceil() * o.cost_per_hour()))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        let Some(i) = pick else {
            plan.reasons.push(format!(
                "short of capacity: {:.2} req/s planned, {:.2} req/s fits",
                d.rate, plan.capacity_rps
            ));
            break;
        };
        let (option, cap) = &usable[i];
        if oracle.try_take(&d.model, option) {
            plan.add(option, *cap);
        } else {
            full[i] = true;
        }
    }
    if plan.total() >= d.max_replicas && plan.capacity_rps < d.rate {
        plan.reasons.push(format!(
            "capped at max_replicas {}: {:.2} req/s planned, {:.2} req/s covered",
            d.max_replicas, d.rate, plan.capacity_rps
        ));
    }
    for (option, n) in &plan.replicas {
        if let Some((_, cap)) = usable.iter().find(|(o, _)| o == option) {
            plan.reasons.push(format!(
                "{n}× {}: {:.2} req/s each at {:.0} ms/token, ${:.2}/h each",
                option.label(),
                cap.rps,
                cap.tpot_ms,
                option.cost_per_hour()
            ));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA70: ModelShape = ModelShape {
        params: 70e9,
        bytes_per_param: 2.0,
    };

    fn option(gpu: &str, tp: u32, cost: f64) -> ReplicaOption {
        ReplicaOption {
            gpu_type: gpu.into(),
            speed: GpuSpeed::of_model(gpu),
            gpu_memory_mib: 80 * 1024,
            tp,
            gpu_cost_per_hour: cost,
        }
    }

    fn chat_mix() -> Vec<(u32, u32)> {
        (0..200)
            .map(|i| (500 + (i * 37) % 2000, 50 + (i * 13) % 300))
            .collect()
    }

    fn demand(rate: f64, slo: Slo, options: Vec<ReplicaOption>) -> ModelDemand {
        ModelDemand {
            model: "llama-70b".into(),
            priority: 0,
            shape: LLAMA70,
            slo,
            rate,
            mix: chat_mix(),
            min_replicas: 1,
            max_replicas: 64,
            options,
            trust: 1.0,
        }
    }

    fn plenty() -> FreeGpus {
        FreeGpus(
            [("a100-80gb".to_string(), 64), ("h100-sxm".to_string(), 64)]
                .into_iter()
                .collect(),
        )
    }

    #[test]
    fn capacity_grows_with_a_faster_gpu_and_a_looser_slo() {
        let slo = Slo {
            ttft_ms: 2000.0,
            ttft_ms_per_1k: 500.0,
            tpot_ms: 120.0,
            attainment: 0.99,
        };
        let a100 = replica_capacity(LLAMA70, &option("a100-80gb", 2, 2.0), &slo, &chat_mix());
        let h100 = replica_capacity(LLAMA70, &option("h100-sxm", 2, 4.0), &slo, &chat_mix());
        let (Some(a100), Some(h100)) = (a100, h100) else {
            panic!("both meet a loose SLO: {a100:?} {h100:?}");
        };
        assert!(h100.rps > a100.rps, "{h100:?} vs {a100:?}");
        assert!(a100.tpot_ms <= 120.0 && h100.tpot_ms <= 120.0);
        let tighter = Slo {
            tpot_ms: 80.0,
            attainment: 0.99,
            ..slo
        };
        let a100_tight =
            replica_capacity(LLAMA70, &option("a100-80gb", 2, 2.0), &tighter, &chat_mix());
        assert!(a100_tight.map_or(0.0, |c| c.rps) < a100.rps);
        // A 70B model does not fit one 80 GB GPU at all.
        assert_eq!(
            replica_capacity(LLAMA70, &option("a100-80gb", 1, 2.0), &slo, &chat_mix()),
            None
        );
    }

    #[test]
    fn the_cheaper_type_is_chosen_when_both_meet_the_slo() {
        let slo = Slo {
            ttft_ms: 2000.0,
            ttft_ms_per_1k: 500.0,
            tpot_ms: 120.0,
            attainment: 0.99,
        };
        // H100 costs four times the A100 here: it is faster, but not four
        // times, so the A100 is cheaper per request/second.
        let options = vec![option("h100-sxm", 2, 8.0), option("a100-80gb", 2, 2.0)];
        let plans = plan(&[demand(3.0, slo, options.clone())], &mut plenty());
        let p = &plans[0];
        assert!(p.capacity_rps >= 3.0, "{p:?}");
        assert_eq!(p.count_of(&options[0]), 0, "{p:?}");
        assert!(p.count_of(&options[1]) >= 1, "{p:?}");
    }

    #[test]
    fn the_faster_type_is_chosen_when_only_it_meets_the_slo() {
        // An A100 pair's decode step alone is over 50 ms/token; an H100
        // pair's is not.
        let slo = Slo {
            ttft_ms: 2000.0,
            ttft_ms_per_1k: 500.0,
            tpot_ms: 50.0,
            attainment: 0.99,
        };
        let options = vec![option("h100-sxm", 2, 8.0), option("a100-80gb", 2, 2.0)];
        let plans = plan(&[demand(3.0, slo, options.clone())], &mut plenty());
        let p = &plans[0];
        assert_eq!(p.count_of(&options[1]), 0, "{p:?}");
        assert!(p.count_of(&options[0]) >= 1, "{p:?}");
        assert!(
            p.reasons
                .iter()
                .any(|r| r.contains("a100-80gb×2 cannot meet")),
            "{p:?}"
        );
    }

    #[test]
    fn higher_priority_gets_scarce_capacity_first_and_bounds_hold() {
        let slo = Slo {
            ttft_ms: 2000.0,
            ttft_ms_per_1k: 500.0,
            tpot_ms: 120.0,
            attainment: 0.99,
        };
        let options = vec![option("a100-80gb", 2, 2.0)];
        let mut low = demand(50.0, slo, options.clone());
        low.model = "batch".into();
        low.priority = 0;
        let mut high = demand(50.0, slo, options.clone());
        high.model = "chat".into();
        high.priority = 10;
        let mut scarce = FreeGpus([("a100-80gb".to_string(), 8)].into_iter().collect());
        let plans = plan(&[low.clone(), high.clone()], &mut scarce);
        assert_eq!(plans[0].model, "chat");
        assert_eq!(plans[0].total(), 4);
        assert_eq!(plans[1].total(), 0);
        assert!(plans[0]
            .reasons
            .iter()
            .any(|r| r.contains("short of capacity")));
        // max_replicas caps; min_replicas holds with no demand.
        let mut capped = demand(50.0, slo, options.clone());
        capped.max_replicas = 2;
        assert_eq!(plan(&[capped], &mut plenty())[0].total(), 2);
        let mut idle = demand(0.0, slo, options);
        idle.min_replicas = 2;
        assert_eq!(plan(&[idle], &mut plenty())[0].total(), 2);
    }
}
