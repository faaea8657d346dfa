//! `talon-sim`: run the placement benchmarks.
//!
//! ```text
//! talon-sim b1 [--trace default ...|all] [--seeds 10] [--policies all] [--out DIR] [--scale 10]
//! talon-sim b6 --trace FILE --format azure|mooncake [--days 3] [--out DIR]
//! talon-sim b7 [--out DIR]
//! talon-sim variant --from default --name gpuspec33-s7 --gpu-spec 0.33 [--multi-gpu 0.2] --seed 7 --out DIR
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use talon_scheduler::policy::talon::TalonConfig;
use talon_scheduler::policy::PolicyKind;
use talon_scheduler::sim::b1::{self, B1Config, RunResult};

#[derive(Parser)]
#[command(name = "talon-sim", about = "Talon placement benchmarks (B1, B7)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// B1: fragmentation on the openb traces (FGD, ATC'23) and decision time.
    B1 {
        /// Directory holding openb/ and parvagpu/.
        #[arg(long, default_value = "../shared/data")]
        data_dir: PathBuf,
        /// Trace name (openb_pod_list_<NAME>.csv); repeatable; `all` for every one present.
        #[arg(long, default_value = "default")]
        trace: Vec<String>,
        /// Number of seeds.
        #[arg(long, default_value_t = 10)]
        seeds: u64,
        /// First seed (the artifact used 42..=51).
        #[arg(long, default_value_t = 42)]
        seed_base: u64,
        /// Comma-separated policies, or `all`.
        #[arg(long, default_value = "all")]
        policies: String,
        /// Repeat the node list this many times (10 for the 10x timing).
        #[arg(long, default_value_t = 1)]
        scale: usize,
        /// Total GPU request of the workload as a fraction of capacity.
        #[arg(long, default_value_t = 1.3)]
        ratio: f64,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Talon's ingredients as key=value,... over the default (`fgd` first
        /// starts from FGD's choices): exact, pack_ties, coverage, lambda,
        /// kappa, alpha. For the ablation.
        #[arg(long, default_value = "")]
        talon: String,
        /// Write b1_runs.csv, b1_curves.csv and b1_summary.json here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Derive a trace variant (gpu_spec constraints, more gangs) for B1.
    Variant {
        #[arg(long, default_value = "../shared/data")]
        data_dir: PathBuf,
        /// Trace to derive from (openb_pod_list_<FROM>.csv).
        #[arg(long, default_value = "default")]
        from: String,
        /// Name of the new trace (openb_pod_list_<NAME>.csv under OUT/openb).
        #[arg(long)]
        name: String,
        /// Fraction of GPU tasks that get a gpu_spec.
        #[arg(long, default_value_t = 0.0)]
        gpu_spec: f64,
        /// Fraction of those whose gpu_spec names two types.
        #[arg(long, default_value_t = 0.3)]
        spec_pair: f64,
        /// Fraction of single-GPU tasks turned into 2/4/8-GPU gangs.
        #[arg(long, default_value_t = 0.0)]
        multi_gpu: f64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Data directory to write (gets openb/ with the node list and the trace).
        #[arg(long)]
        out: PathBuf,
    },
    /// The engine's MIG start-slice choice on an online stream of MIG
    /// requests and departures: first legal start against best fit.
    MigStarts {
        #[arg(long, default_value_t = 20)]
        seeds: u64,
        #[arg(long, default_value_t = 1)]
        seed_base: u64,
        #[arg(long, default_value_t = 8)]
        gpus: usize,
        #[arg(long, default_value_t = 2000)]
        events: usize,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// B6: forecast-driven autoscaling and routing on an LLM trace, in
    /// virtual time, against a simulated H100 + A100 fleet.
    B6 {
        /// The trace file.
        #[arg(long)]
        trace: PathBuf,
        /// azure (TIMESTAMP,ContextTokens,GeneratedTokens) or mooncake
        /// (JSON lines: timestamp ms, input_length, output_length, hash_ids).
        #[arg(long)]
        format: String,
        /// Days of the diurnal run built from the trace (0: none).
        #[arg(long, default_value_t = 3.0)]
        days: f64,
        /// Seed of the diurnal run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// SLO: time to first token, ms (default by format).
        #[arg(long)]
        ttft_ms: Option<f64>,
        /// SLO: extra time to first token per 1k prompt tokens, ms.
        #[arg(long)]
        ttft_per_1k_ms: Option<f64>,
        /// SLO: mean time per output token, ms.
        #[arg(long)]
        tpot_ms: Option<f64>,
        /// Write b6_summary.json and b6_timeline.csv here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// B7: MIG plans for the ParvaGPU scenarios.
    B7 {
        #[arg(long, default_value = "../shared/data")]
        data_dir: PathBuf,
        /// Write b7_plans.json and b7_summary.csv here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::B1 {
            data_dir,
            trace,
            seeds,
            seed_base,
            policies,
            scale,
            ratio,
            jobs,
            talon,
            out,
        } => TalonConfig::parse(&talon).and_then(|talon| {
            run_b1(
                data_dir, trace, seeds, seed_base, &policies, scale, ratio, jobs, talon, out,
            )
        }),
        Cmd::Variant {
            data_dir,
            from,
            name,
            gpu_spec,
            spec_pair,
            multi_gpu,
            seed,
            out,
        } => talon_scheduler::sim::variants::run_cli(
            &data_dir,
            &from,
            &name,
            &talon_scheduler::sim::variants::VariantSpec {
                gpu_spec,
                spec_pair,
                multi_gpu,
                seed,
            },
            &out,
        ),
        Cmd::MigStarts {
            seeds,
            seed_base,
            gpus,
            events,
            out,
        } => talon_scheduler::sim::mig_starts::run_cli(
            seeds,
            seed_base,
            gpus,
            events,
            out.as_deref(),
        ),
        Cmd::B6 {
            trace,
            format,
            days,
            seed,
            ttft_ms,
            ttft_per_1k_ms,
            tpot_ms,
            out,
        } => talon_scheduler::sim::b6::Format::parse(&format).and_then(|f| {
            let d = talon_scheduler::sim::b6::default_slo(f);
            let slo = talon_scheduler::capacity::Slo {
                ttft_ms: ttft_ms.unwrap_or(d.ttft_ms),
                ttft_ms_per_1k: ttft_per_1k_ms.unwrap_or(d.ttft_ms_per_1k),
                tpot_ms: tpot_ms.unwrap_or(d.tpot_ms),
                attainment: d.attainment,
            };
            talon_scheduler::sim::b6::run_cli(&trace, f, out.as_deref(), days, seed, slo)
        }),
        Cmd::B7 { data_dir, out } => talon_scheduler::sim::b7::run_cli(&data_dir, out.as_deref()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_b1(
    data_dir: PathBuf,
    trace: Vec<String>,
    seeds: u64,
    seed_base: u64,
    policies: &str,
    scale: usize,
    ratio: f64,
    jobs: usize,
    talon: TalonConfig,
    out: Option<PathBuf>,
) -> Result<(), String> {
    let policies: Vec<PolicyKind> = if policies == "all" {
        PolicyKind::ALL.to_vec()
    } else {
        policies
            .split(',')
            .map(|s| PolicyKind::parse(s.trim()))
            .collect::<Result<_, _>>()?
    };
    let traces: Vec<String> = if trace.iter().any(|t| t == "all") {
        b1::TRACES
            .iter()
            .filter(|t| {
                data_dir
                    .join(format!("openb/openb_pod_list_{t}.csv"))
                    .is_file()
            })
            .map(|t| t.to_string())
            .collect()
    } else {
        trace
    };
    if traces.is_empty() {
        return Err(format!(
            "no openb traces found under {}",
            data_dir.display()
        ));
    }
    let cfg = B1Config {
        data_dir,
        traces,
        seeds,
        seed_base,
        policies,
        scale: scale.max(1),
        ratio,
        jobs,
        talon,
    };
    eprintln!(
        "b1: {} trace(s) x {} policies x {} seeds, cluster x{}",
        cfg.traces.len(),
        cfg.policies.len(),
        cfg.seeds,
        cfg.scale
    );
    let progress = |r: &RunResult| {
        eprintln!(
            "  {:<12} {:<14} seed {:>3}: unalloc@100 {:>6} @130 {:>6}  run {:>8.1} ms  p50 {:>6.1} us  p99 {:>7.1} us",
            r.trace,
            r.policy.name(),
            r.seed,
            fmt_opt(r.unallocated.get(100).copied().flatten()),
            fmt_opt(r.unallocated.get(130).copied().flatten()),
            r.run_ns as f64 / 1e6,
            r.decision_p50_ns as f64 / 1e3,
            r.decision_p99_ns as f64 / 1e3,
        );
    };
    let results = b1::run_all(&cfg, &progress)?;
    let report = talon_scheduler::sim::b1_report::render(&cfg, &results);
    println!("{report}");
    if let Some(dir) = out {
        talon_scheduler::sim::b1_report::write(&dir, &cfg, &results)?;
        eprintln!("b1: wrote {}", dir.display());
    }
    Ok(())
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}
