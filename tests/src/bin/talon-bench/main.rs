//! `talon-bench`: Talon's benchmark driver for the coordinator.
//!
//! - `b2`: the Raft write path against etcd (BENCHMARKS.md B2). Three Talon
//!   coordinators and three etcd members on loopback, each with its own data
//!   directory; 256-byte writes through the cheapest write that goes through
//!   consensus (a model label update; an etcd Put) at 1, 16 and 64
//!   concurrent clients.
//! - `b5a`: leader failover (B5 a). Under a constant write load, SIGKILL the
//!   leader and time from the kill to the first acknowledged write sent after
//!   it; the killed member restarts between trials.
//!
//! Both print markdown tables and write JSON under `--out-dir`. Build in
//! release mode: `cargo build --release -p talon-coordinator -p talon-tests`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use talon_tests::clusters::{poll, BenchCluster, Kind, Writer, WriterPool};
use talon_tests::{http_post, model_spec};

mod b8;
mod engine_fleet;
mod engine_routing;
mod gateway;
mod ingest;
mod overload;
mod plan;
mod raft;
mod rollout;
mod serving_sim;
mod snapshot;
mod watch;

use gateway::{b3, b5b};
use ingest::b4;
use raft::{b2, b5a};
use serving_sim::{batching, routing};

/// The allocator `talon-agent` runs the native executor with (B8 measures
/// that executor in this process).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "talon-bench", about = "Talon coordinator benchmarks (B2, B5a)")]
struct Cli {
    /// Where the members' data directories go (must be on disk, not tmpfs,
    /// for durability to mean anything).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    base_dir: PathBuf,
    /// Where JSON results go.
    #[arg(long, default_value = "bench-out")]
    out_dir: PathBuf,
    /// Systems to measure, side by side.
    #[arg(long, value_delimiter = ',', default_value = "talon,etcd")]
    systems: Vec<System>,
    /// TLS everywhere (B2, B5a): a CA from `talon cert`; Talon with TLS on
    /// every port and mutual TLS between coordinators, etcd with client TLS
    /// and mutual peer TLS.
    #[arg(long)]
    tls: bool,
    #[command(subcommand)]
    command: Bench,
}

#[derive(Clone, Copy, ValueEnum)]
enum System {
    Talon,
    Etcd,
}

impl From<System> for Kind {
    fn from(s: System) -> Kind {
        match s {
            System::Talon => Kind::Talon,
            System::Etcd => Kind::Etcd,
        }
    }
}

#[derive(Subcommand)]
enum Bench {
    /// B8 on the CPU: the native executor against transformers on PyTorch
    /// CPU, prefill and decode tokens/s per batch size, side by side.
    B8 {
        /// A Hugging Face model directory; default: a random-weight
        /// Llama written by tests/python/make_tiny_hf.py --size bench.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batches: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        #[arg(long, default_value_t = 32)]
        decode: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// The reconciler's planning time on simulated fleets of each size (no
    /// processes): from empty until stable, then the steady plan the leader
    /// makes every 500 ms.
    Plan {
        #[arg(long, value_delimiter = ',', default_value = "100,400,1600")]
        nodes: Vec<usize>,
        #[arg(long, default_value_t = 21)]
        rounds: usize,
    },
    /// Write throughput and latency at several client counts.
    B2 {
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        concurrency: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 256)]
        value_bytes: usize,
    },
    /// Leader failover time under load.
    B5a {
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Writes per second of the open-loop load.
        #[arg(long, default_value_t = 100)]
        rate: u64,
    },
    /// Gateway overhead: direct, nginx, LiteLLM and Talon in front of the
    /// same OpenAI-compatible fake engine, open-loop at fixed rates.
    /// Run tests/bench/b3-setup.sh first.
    B3 {
        /// Engine service time, ms (repeatable).
        #[arg(long, value_delimiter = ',', default_value = "0,20")]
        service_ms: Vec<u64>,
        #[arg(long, value_delimiter = ',', default_value = "200,500,1000,2000,5000")]
        rates: Vec<u64>,
        /// Seconds of load per rate.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "direct,nginx,litellm,talon,talon-policies"
        )]
        doors: Vec<String>,
        /// The engine behind every door: `fake` (talon-fake-engine, at each
        /// service time) or `llama` (llama.cpp's server from
        /// llama-cpp-python on a tiny Llama GGUF; built on first use).
        #[arg(long, default_value = "fake")]
        engine: String,
    },
    /// Node loss: kill the agent that serves a model's replicas; time until
    /// they serve from another node, and count failed requests.
    B5b {
        #[arg(long, default_value_t = 5)]
        trials: usize,
        /// Requests per second of the open-loop load.
        #[arg(long, default_value_t = 20)]
        rate: u64,
        /// Extra coordinator flags, e.g. "--suspect-after-ms 1000 --down-after-ms 3000".
        #[arg(long, default_value = "")]
        coordinator_flags: String,
    },
    /// Routing engine processes: a fast and a slow replica (fake engines
    /// behind two agents), open-loop through the gateway, with the agents'
    /// learned service times and without (real time).
    EngineRouting {
        #[arg(long, default_value_t = 40)]
        fast_ms: u64,
        #[arg(long, default_value_t = 320)]
        slow_ms: u64,
        #[arg(long, value_delimiter = ',', default_value = "5,10,20,40")]
        rates: Vec<u64>,
        /// Seconds of load per rate.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Hot swap: a version change under steady load (engine processes with
    /// a model-load delay behind two agents): failures and latency before,
    /// during and after it (real time).
    Rollout {
        #[arg(long, default_value_t = 20)]
        rate: u64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// How long an engine takes to load before it listens.
        #[arg(long, default_value_t = 3000)]
        startup_ms: u64,
        #[arg(long, default_value_t = 50)]
        service_ms: u64,
        /// `fake` (talon-fake-engine with the times above) or `llama`
        /// (llama.cpp's server on tiny GGUFs; the times are its own).
        #[arg(long, default_value = "fake")]
        engine: String,
    },
    /// Routing by predicted completion time against least-loaded and
    /// round-robin on a mixed simulated fleet (virtual time).
    Routing {
        #[arg(
            long,
            default_value = "../shared/data/azure-llm/AzureLLMInferenceTrace_conv.csv"
        )]
        trace: PathBuf,
        /// One replica per GPU, of these types.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "h100-sxm,a100-80gb,l4,l4"
        )]
        gpus: Vec<String>,
        #[arg(long, default_value_t = 16_000)]
        memory_mib: u64,
        #[arg(long, default_value_t = 2_000)]
        ttft_ms: u64,
        #[arg(long, default_value_t = 100)]
        tpot_ms: u64,
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
        #[arg(long, default_value_t = 0.95)]
        attainment: f64,
    },
    /// The gain of dynamic batching at the same latency target, on a
    /// simulated GPU (virtual time: runs in seconds).
    Batching {
        /// Azure LLM conversation trace (prompt and output tokens per request).
        #[arg(
            long,
            default_value = "../shared/data/azure-llm/AzureLLMInferenceTrace_conv.csv"
        )]
        trace: PathBuf,
        /// GPU types to run on.
        #[arg(long, value_delimiter = ',', default_value = "h100-sxm,a100-80gb,l4")]
        gpus: Vec<String>,
        /// Model footprint, MiB (weights ~80 %).
        #[arg(long, default_value_t = 16_000)]
        memory_mib: u64,
        /// Latency target of a request: time to first token plus this...
        #[arg(long, default_value_t = 2_000)]
        ttft_ms: u64,
        /// ...plus this per output token (the request's deadline).
        #[arg(long, default_value_t = 100)]
        tpot_ms: u64,
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Virtual seconds of arrivals per rate.
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
        /// Share of requests that must meet their target.
        #[arg(long, default_value_t = 0.95)]
        attainment: f64,
    },
    /// Overload: a simulated replica at its sustained rate, then at
    /// `factor` times it, then at its sustained rate again.
    Overload {
        /// Length of each phase.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 10)]
        factor: u64,
    },
    /// Snapshot size, build and install time of a large fleet's state,
    /// through the coordinator's own state machine store.
    Snapshot {
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        #[arg(long, default_value_t = 20_000)]
        replicas: usize,
    },
    /// Telemetry ingest: N simulated agents (8 GPUs each) at 1 Hz to one
    /// coordinator.
    B4 {
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        agents: Vec<usize>,
        /// Measurement window after all agents stream.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Agents per gRPC connection (HTTP/2 streams share it).
        #[arg(long, default_value_t = 100)]
        agents_per_connection: usize,
        /// Replicas to place over the fleet before measuring, with one
        /// assignment watch per agent (0: no watches).
        #[arg(long, default_value_t = 0)]
        replicas: usize,
        /// Raft writes a second during the window (label updates of a
        /// model without replicas), with watches.
        #[arg(long, default_value_t = 10)]
        writes_per_s: u32,
    },
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn talon_bin_dir() -> anyhow::Result<PathBuf> {
    // Another build's binaries (an older commit's, for a before/after run).
    if let Some(dir) = std::env::var_os("TALON_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .context("executable has a directory")?
        .to_path_buf())
}

/// A child process, in its own process group, killed with the whole group
/// when dropped (nginx and LiteLLM fork workers).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = std::process::Command::new("kill")
            .args(["-9", "--", &group])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_quiet(program: &std::path::Path, args: &[&str]) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new(program)
        .process_group(0)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Child(child))
}

/// A memory field of /proc/`pid`/status (`pid` may be `self`), in bytes.
fn proc_status_bytes(pid: &str, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

fn write_out(cli: &Cli, name: &str, value: serde_json::Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cli.out_dir)?;
    let path = cli.out_dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(&value)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let _tls_dir = if cli.tls {
        let dir = tempfile::Builder::new()
            .prefix("tls")
            .tempdir_in(&cli.base_dir)?;
        talon_tests::clusters::enable_tls(&talon_bin_dir()?, dir.path())?;
        eprintln!(
            "talon-bench: TLS on (certificates in {})",
            dir.path().display()
        );
        Some(dir)
    } else {
        None
    };
    match &cli.command {
        Bench::EngineRouting {
            fast_ms,
            slow_ms,
            rates,
            seconds,
        } => engine_routing::engine_routing(&cli, *fast_ms, *slow_ms, rates, *seconds).await,
        Bench::Rollout {
            rate,
            seconds,
            startup_ms,
            service_ms,
            engine,
        } => rollout::rollout(&cli, *rate, *seconds, *startup_ms, *service_ms, engine).await,
        Bench::B8 {
            model,
            batches,
            prompt,
            decode,
            repeats,
            threads,
        } => b8::b8(
            &cli,
            &b8::B8 {
                model: model.clone(),
                batches: batches.clone(),
                prompt: *prompt,
                decode: *decode,
                repeats: (*repeats).max(1),
                threads: (*threads).max(1),
            },
        ),
        Bench::Plan { nodes, rounds } => plan::plan_bench(&cli, nodes, (*rounds).max(1)),
        Bench::B2 {
            concurrency,
            seconds,
            value_bytes,
        } => b2(&cli, concurrency, *seconds, *value_bytes).await,
        Bench::B5a { trials, rate } => b5a(&cli, *trials, *rate).await,
        Bench::B3 {
            service_ms,
            rates,
            seconds,
            doors,
            engine,
        } => b3(&cli, service_ms, rates, *seconds, doors, engine).await,
        Bench::B5b {
            trials,
            rate,
            coordinator_flags,
        } => b5b(&cli, *trials, *rate, coordinator_flags).await,
        Bench::Overload { seconds, factor } => overload::overload(&cli, *seconds, *factor).await,
        Bench::Snapshot { nodes, replicas } => snapshot::snapshot(&cli, *nodes, *replicas).await,
        Bench::B4 {
            agents,
            seconds,
            agents_per_connection,
            replicas,
            writes_per_s,
        } => {
            let watches = (*replicas > 0).then_some((*replicas, *writes_per_s));
            b4(&cli, agents, *seconds, *agents_per_connection, watches).await
        }
        Bench::Routing {
            trace,
            gpus,
            memory_mib,
            ttft_ms,
            tpot_ms,
            max_batch,
            seconds,
            attainment,
        } => std::thread::scope(|s| {
            s.spawn(|| {
                routing(
                    &cli,
                    trace,
                    gpus,
                    *memory_mib,
                    (*ttft_ms, *tpot_ms),
                    *max_batch,
                    *seconds,
                    *attainment,
                )
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the routing run panicked")))
        }),
        Bench::Batching {
            trace,
            gpus,
            memory_mib,
            ttft_ms,
            tpot_ms,
            max_batch,
            seconds,
            attainment,
        } => {
            // Virtual time needs its own runtime, on a thread outside this one.
            std::thread::scope(|s| {
                s.spawn(|| {
                    batching(
                        &cli,
                        trace,
                        gpus,
                        *memory_mib,
                        (*ttft_ms, *tpot_ms),
                        *max_batch,
                        *seconds,
                        *attainment,
                    )
                })
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the batching run panicked")))
            })
        }
    }
}
