//! How well the planner's per-replica capacity matches the simulated
//! engine: for each replica option, the highest steady Poisson rate at
//! which one simulated replica meets the SLO for 99 % of requests, beside
//! what the planner assumes (before its headroom).

use crate::capacity::planner::{self, HEADROOM};
use crate::rng::Rng;

use super::run::{self, Policy, Routing, Scaling, Setup};
use super::trace::Trace;

/// Seconds of each steady run.
const STEADY_S: f64 = 1200.0;

/// A steady Poisson trace at `rate` per second with shapes drawn from `mix`.
pub fn steady(mix: &Trace, rate: f64, seconds: f64, seed: u64) -> Trace {
    let mut rng = Rng::new(seed);
    let mut arrivals = Vec::new();
    let mut t = 0.0;
    loop {
        t += rng.exp() / rate.max(1e-6);
        if t >= seconds {
            break;
        }
        let pick = mix.arrivals[rng.below(mix.arrivals.len() as u64) as usize].1;
        arrivals.push((t, pick));
    }
    Trace {
        name: format!("{}-steady", mix.name),
        shapes: mix.shapes.clone(),
        arrivals,
        block_tokens: mix.block_tokens,
    }
}

/// (option label, planner req/s without headroom, simulated req/s at 99 %).
pub fn calibrate(setup: &Setup, mix: &Trace) -> Result<Vec<(String, f64, f64)>, String> {
    let sample: Vec<(u32, u32)> = mix
        .mix()
        .into_iter()
        .step_by((mix.arrivals.len() / 512).max(1))
        .collect();
    let mut rows = Vec::new();
    for (o, option) in setup.options.iter().enumerate() {
        let planned = planner::replica_capacity(setup.shape, option, &setup.slo, &sample)
            .map_or(0.0, |c| c.rps / HEADROOM);
        let meets = |rate: f64| -> Result<bool, String> {
            let trace = steady(mix, rate, STEADY_S, 7);
            let policy = Policy {
                scaling: Scaling::Fixed {
                    option: o,
                    replicas: 1,
                },
                routing: Routing::Talon,
            };
            Ok(run::run(setup, &trace, policy)?.slo_attainment() >= 0.99)
        };
        let (mut lo, mut hi) = (0.0, planned.max(0.5) * 2.0);
        for _ in 0..10 {
            let mid = (lo + hi) / 2.0;
            if meets(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        rows.push((option.label(), planned, lo));
    }
    Ok(rows)
}
