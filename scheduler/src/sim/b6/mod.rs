//! B6: predictive capacity on real traces, in virtual time.
//!
//! `talon-sim b6 --trace FILE --format azure|mooncake --out DIR` replays the
//! trace (and a multi-day trace built from it, see [`trace::diurnal`])
//! against a simulated mixed fleet of H100 and A100-80GB nodes serving one
//! 70B-class model, under each scaling and routing policy, and writes
//! `DIR/b6_summary.json`. What is simulated: the replicas (continuous
//! batching, chunked prefill, KV cache, prefix cache, load time), from the
//! performance model. What is not: the forecaster, planner, autoscaler,
//! placement engine and router, which are the production code.

pub mod calibrate;
pub mod replica;
pub mod run;
#[cfg(test)]
mod tests;
pub mod trace;

use std::path::Path;

use serde_json::{json, Value};

use crate::capacity::forecast::ForecastSettings;
use crate::capacity::planner::{ReplicaOption, Slo};
use crate::capacity::ScaleSettings;
use crate::perf::{GpuSpeed, ModelShape};
use crate::types::{Gpu, Node};

pub use run::{Outcome, Policy, Routing, Scaling, Setup};
pub use trace::{Diurnal, Format, Trace};

/// GPU types of the simulated fleet: (name, nodes, $ per GPU-hour).
pub const FLEET: &[(&str, u32, f64)] = &[("h100-sxm", 16, 4.00), ("a100-80gb", 16, 2.20)];

/// The default B6 deployment: Llama-2-70B-class in FP16 on the fleet, TP2
/// or TP4 replicas of either type; TTFT ≤ 1 s + 0.25 s per 1k prompt
/// tokens, ≤ 100 ms per output token.
pub fn default_setup() -> Setup {
    let mut fleet = Vec::new();
    let mut options = Vec::new();
    for &(gpu, nodes, cost) in FLEET {
        for n in 0..nodes {
            fleet.push(Node {
                name: format!("{gpu}-{n}"),
                cpu_milli: 128_000,
                memory_mib: 1024 * 1024,
                gpus: (0..8)
                    .map(|_| Gpu {
                        model: gpu.to_string(),
                        milli: 1000,
                        memory_mib: 80 * 1024,
                        mig: None,
                        nvlink_domain: 0,
                    })
                    .collect(),
                cost_per_hour: cost * 8.0,
            });
        }
        for tp in [2, 4, 8] {
            options.push(ReplicaOption {
                gpu_type: gpu.to_string(),
                speed: GpuSpeed::of_model(gpu),
                gpu_memory_mib: 80 * 1024,
                tp,
                gpu_cost_per_hour: cost,
            });
        }
    }
    Setup {
        model: "llama-70b".into(),
        shape: ModelShape {
            params: 70e9,
            bytes_per_param: 2.0,
        },
        slo: Slo {
            ttft_ms: 1000.0,
            ttft_ms_per_1k: 250.0,
            tpot_ms: 100.0,
            attainment: 0.99,
        },
        options,
        fleet,
        scale: ScaleSettings::default(),
        forecast: ForecastSettings {
            bucket_secs: 60.0,
            seasons: vec![1440],
            max_history: 3 * 1440,
            level: 0.8,
        },
        max_replicas: 64,
    }
}

/// The default SLO for a trace format. Chat (azure): TTFT ≤ 1 s + 0.25 s
/// per 1k prompt tokens, ≤ 100 ms per output token. Long-context (mooncake,
/// median prompt 7k tokens, p99 85k): prompts queue behind long prefills on
/// any colocated engine, so TTFT ≤ 5 s + 0.25 s per 1k and ≤ 150 ms per
/// token. Both for 99 % of requests.
pub fn default_slo(format: Format) -> Slo {
    match format {
        Format::Azure => Slo {
            ttft_ms: 1000.0,
            ttft_ms_per_1k: 250.0,
            tpot_ms: 100.0,
            attainment: 0.99,
        },
        Format::Mooncake => Slo {
            ttft_ms: 5000.0,
            ttft_ms_per_1k: 250.0,
            tpot_ms: 150.0,
            attainment: 0.99,
        },
    }
}

/// The policies of the one-hour comparison.
pub fn hour_policies(prefixes: bool) -> Vec<Policy> {
    let mut p = vec![
        Policy {
            scaling: Scaling::Static,
            routing: Routing::Talon,
        },
        Policy {
            scaling: Scaling::Hpa,
            routing: Routing::Talon,
        },
        Policy {
            scaling: Scaling::Reactive,
            routing: Routing::Talon,
        },
        Policy {
            scaling: Scaling::Forecast,
            routing: Routing::RoundRobin,
        },
        Policy {
            scaling: Scaling::Forecast,
            routing: Routing::LeastLoaded,
        },
        Policy {
            scaling: Scaling::Forecast,
            routing: Routing::Talon,
        },
    ];
    if prefixes {
        p.push(Policy {
            scaling: Scaling::Forecast,
            routing: Routing::TalonPrefix,
        });
        // Routing at equal capacity: the static fleet under each router.
        p.push(Policy {
            scaling: Scaling::Static,
            routing: Routing::LeastLoaded,
        });
        p.push(Policy {
            scaling: Scaling::Static,
            routing: Routing::TalonPrefix,
        });
    }
    p
}

/// The policies of the multi-day comparison: the three scaling policies
/// under Talon's routing (with prefixes where the trace has them).
pub fn diurnal_policies(prefixes: bool) -> Vec<Policy> {
    let routing = if prefixes {
        Routing::TalonPrefix
    } else {
        Routing::Talon
    };
    [
        Scaling::Static,
        Scaling::Hpa,
        Scaling::Reactive,
        Scaling::Forecast,
    ]
    .into_iter()
    .map(|scaling| Policy { scaling, routing })
    .collect()
}

fn summary(o: &Outcome, prefixes: bool) -> Value {
    let mut v = json!({
        "requests": o.requests,
        "slo_attainment": o.slo_attainment(),
        "ttft_misses": o.ttft_misses,
        "tpot_misses": o.tpot_misses,
        "gpu_hours": o.gpu_hours(),
        "cost": o.cost,
        "cold_starts": o.cold_starts,
        "p99_ttft_ms": o.p99_ttft_ms(),
    });
    if prefixes {
        v["cache_hit_rate"] = json!(o.cache_hit_rate());
    }
    v
}

/// A table of outcomes, with GPU-hours relative to the first row (static).
pub fn table(title: &str, outcomes: &[Outcome], prefixes: bool) -> String {
    let mut s = format!("{title}\n");
    s += &format!(
        "{:<28} {:>8} {:>9} {:>13} {:>9} {:>9} {:>8} {:>6} {:>11}{}\n",
        "policy",
        "requests",
        "SLO %",
        "miss TTFT/TPOT",
        "GPU-h",
        "vs static",
        "cost $",
        "cold",
        "p99 TTFT ms",
        if prefixes { "  hit %" } else { "" }
    );
    let base = outcomes.first().map_or(1.0, |o| o.gpu_hours().max(1e-9));
    for o in outcomes {
        s += &format!(
            "{:<28} {:>8} {:>9.2} {:>13} {:>9.1} {:>8.0}% {:>8.0} {:>6} {:>11.0}{}\n",
            o.policy,
            o.requests,
            o.slo_attainment() * 100.0,
            format!("{}/{}", o.ttft_misses, o.tpot_misses),
            o.gpu_hours(),
            (o.gpu_hours() / base - 1.0) * 100.0,
            o.cost,
            o.cold_starts,
            o.p99_ttft_ms(),
            if prefixes {
                format!("  {:>5.1}", o.cache_hit_rate() * 100.0)
            } else {
                String::new()
            }
        );
    }
    s
}

/// Runs `policies` on `trace`, in order, reporting each as it ends.
pub fn run_all(setup: &Setup, trace: &Trace, policies: &[Policy]) -> Result<Vec<Outcome>, String> {
    policies
        .iter()
        .map(|&p| {
            let began = std::time::Instant::now();
            let o = run::run(setup, trace, p)?;
            eprintln!(
                "b6: {} on {} ({} requests) in {:.1}s",
                o.policy,
                trace.name,
                o.requests,
                began.elapsed().as_secs_f64()
            );
            Ok(o)
        })
        .collect()
}

fn add_timeline(csv: &mut String, run: &str, outcomes: &[Outcome]) {
    for o in outcomes {
        for &(t, desired, ready, observed, planned, trust) in &o.timeline {
            csv.push_str(&format!(
                "{run},{},{t:.0},{desired},{ready},{observed:.3},{planned:.3},{trust:.3}\n",
                o.policy
            ));
        }
    }
}

/// The `talon-sim b6` command.
pub fn run_cli(
    path: &Path,
    format: Format,
    out: Option<&Path>,
    days: f64,
    seed: u64,
    slo: Slo,
) -> Result<(), String> {
    if !(slo.ttft_ms > 0.0 && slo.ttft_ms_per_1k >= 0.0 && slo.tpot_ms > 0.0) {
        return Err("--ttft-ms and --tpot-ms must be > 0, --ttft-per-1k-ms ≥ 0".into());
    }
    if !(days >= 0.0 && days <= 30.0) {
        return Err(format!("--days {days}: expected 0 (none) to 30"));
    }
    let setup = Setup {
        slo,
        ..default_setup()
    };
    let hour = trace::load(path, format)?;
    let prefixes = hour.has_prefixes();
    let hour_outcomes = run_all(&setup, &hour, &hour_policies(prefixes))?;
    println!(
        "{}",
        table(
            &format!(
                "B6 {} ({} requests, {:.0} min)",
                hour.name,
                hour.arrivals.len(),
                hour.duration_s() / 60.0
            ),
            &hour_outcomes,
            prefixes
        )
    );
    let calibration = calibrate::calibrate(&setup, &hour)?;
    println!(
        "B6 calibration: one replica, steady Poisson load with the trace's mix, SLO met for 99 %"
    );
    println!(
        "{:<16} {:>14} {:>14} {:>8}",
        "option", "planner req/s", "simulated", "ratio"
    );
    for (label, planned, simulated) in &calibration {
        let ratio = if *planned >= 0.01 {
            format!("{:.2}", simulated / planned)
        } else {
            "—".into()
        };
        println!("{label:<16} {planned:>14.2} {simulated:>14.2} {ratio:>8}");
    }
    println!();
    let mut timeline =
        String::from("run,policy,t_s,desired,ready,observed_rps,planned_rps,trust\n");
    add_timeline(&mut timeline, "hour", &hour_outcomes);
    let mut doc = json!({
        "trace": path.display().to_string(),
        "format": if prefixes { "mooncake" } else { "azure" },
        "slo": {
            "ttft_ms": setup.slo.ttft_ms,
            "ttft_ms_per_1k_prompt_tokens": setup.slo.ttft_ms_per_1k,
            "tpot_ms": setup.slo.tpot_ms,
            "attainment": setup.slo.attainment,
        },
        "fleet": FLEET.iter().map(|(g, n, c)| json!({"gpu": g, "nodes": n, "gpus_per_node": 8, "usd_per_gpu_hour": c})).collect::<Vec<_>>(),
        "calibration": calibration.iter().map(|(l, p, s)| json!({"option": l, "planner_rps": p, "simulated_rps": s})).collect::<Vec<_>>(),
        "policies": hour_outcomes.iter().map(|o| (o.policy.clone(), summary(o, prefixes))).collect::<serde_json::Map<_, _>>(),
    });
    if days > 0.0 {
        let long = trace::diurnal(
            &hour,
            Diurnal {
                days,
                amplitude: 0.6,
                seed,
            },
        );
        let outcomes = run_all(&setup, &long, &diurnal_policies(prefixes))?;
        println!(
            "{}",
            table(
                &format!(
                    "B6 {} ({} requests, {days} days, rate ×(1 ± 0.6) daily)",
                    long.name,
                    long.arrivals.len()
                ),
                &outcomes,
                prefixes
            )
        );
        add_timeline(&mut timeline, "diurnal", &outcomes);
        doc["diurnal"] = json!({
            "days": days,
            "amplitude": 0.6,
            "seed": seed,
            "requests": long.arrivals.len(),
            "policies": outcomes.iter().map(|o| (o.policy.clone(), summary(o, prefixes))).collect::<serde_json::Map<_, _>>(),
        });
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = dir.join("b6_summary.json");
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
        let lines = dir.join("b6_timeline.csv");
        std::fs::write(&lines, timeline).map_err(|e| format!("{}: {e}", lines.display()))?;
        eprintln!("b6: wrote {} and {}", file.display(), lines.display());
    }
    Ok(())
}
