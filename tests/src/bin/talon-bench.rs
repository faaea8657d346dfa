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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use talon_tests::clusters::{poll, BenchCluster, Kind, Writer, WriterPool};

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
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn talon_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .context("executable has a directory")?
        .to_path_buf())
}

struct LoadResult {
    writes: u64,
    errors: u64,
    seconds: f64,
    latencies_ms: Vec<f64>,
}

async fn run_load(
    kind: Kind,
    addrs: &[String],
    tag: &str,
    clients: usize,
    seconds: u64,
    value: &str,
) -> anyhow::Result<LoadResult> {
    let mut writers = Vec::new();
    for i in 0..clients {
        writers.push(Writer::new(kind, addrs, &format!("bench-{tag}-{i}")).await?);
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut w in writers {
        let value = value.to_string();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                match w.write(&value).await {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => _ = errors.fetch_add(1, Ordering::Relaxed),
                }
            }
            lat
        }));
    }
    let mut latencies_ms = Vec::new();
    for t in tasks {
        latencies_ms.extend(t.await?);
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(LoadResult {
        writes: latencies_ms.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        latencies_ms,
    })
}

async fn b2(
    cli: &Cli,
    concurrency: &[usize],
    seconds: u64,
    value_bytes: usize,
) -> anyhow::Result<()> {
    let value = "x".repeat(value_bytes);
    let mut rows = Vec::new();
    for system in &cli.systems {
        let kind = Kind::from(*system);
        let cluster = BenchCluster::start(kind, &cli.base_dir, &talon_bin_dir()?).await?;
        let leader = cluster.leader(None).await?;
        let leader_addr = cluster.addr(leader);
        let mut addrs = vec![leader_addr.clone()];
        addrs.extend(cluster.addrs().into_iter().filter(|a| *a != leader_addr));
        for &c in concurrency {
            eprintln!("b2: {} with {c} clients for {seconds} s", kind.name());
            let r = run_load(kind, &addrs, &format!("c{c}"), c, seconds, &value).await?;
            rows.push(json!({
                "system": kind.name(), "clients": c, "writes": r.writes, "errors": r.errors,
                "seconds": r.seconds, "writes_per_s": r.writes as f64 / r.seconds,
                "p50_ms": percentile(&r.latencies_ms, 50.0), "p99_ms": percentile(&r.latencies_ms, 99.0),
            }));
        }
    }
    println!("| clients | system | writes/s | p50 ms | p99 ms | errors |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for &c in concurrency {
        for r in rows.iter().filter(|r| r["clients"] == c) {
            println!(
                "| {c} | {} | {:.0} | {:.2} | {:.2} | {} |",
                r["system"].as_str().unwrap_or(""),
                r["writes_per_s"].as_f64().unwrap_or(0.0),
                r["p50_ms"].as_f64().unwrap_or(0.0),
                r["p99_ms"].as_f64().unwrap_or(0.0),
                r["errors"]
            );
        }
        let get = |s: &str| {
            rows.iter()
                .find(|r| r["clients"] == c && r["system"] == s)
                .and_then(|r| r["writes_per_s"].as_f64())
        };
        if let (Some(t), Some(e)) = (get("talon"), get("etcd")) {
            println!("| {c} | talon/etcd | {:.2}× | | | |", t / e);
        }
    }
    write_out(
        cli,
        "b2.json",
        json!({"bench": "B2", "value_bytes": value_bytes, "seconds": seconds, "rows": rows}),
    )
}

async fn b5a(cli: &Cli, trials: usize, rate: u64) -> anyhow::Result<()> {
    let mut summary = Vec::new();
    for system in &cli.systems {
        let kind = Kind::from(*system);
        let mut cluster = BenchCluster::start(kind, &cli.base_dir, &talon_bin_dir()?).await?;
        // Open-loop load: a new write every 1/rate s, each in its own task,
        // so a write stuck on the dead leader does not hold back the next.
        let writers = Arc::new(WriterPool::new(kind, &cluster.addrs()).await?);
        let acks: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = {
            let (writers, acks, stop) = (writers.clone(), acks.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    n += 1;
                    let (writers, acks) = (writers.clone(), acks.clone());
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        match writers.write(n).await {
                            Ok(()) => acks.lock().expect("acks").push((sent, Instant::now())),
                            Err(e) if std::env::var_os("TALON_BENCH_DEBUG").is_some() => {
                                eprintln!("write {n} failed after {:?}: {e:#}", sent.elapsed())
                            }
                            Err(_) => {}
                        }
                    });
                }
            })
        };
        let mut times_ms = Vec::new();
        for trial in 0..trials {
            let leader = cluster.leader(None).await?;
            let flowing = Instant::now();
            poll("writes flowing", Duration::from_secs(30), || async {
                acks.lock()
                    .expect("acks")
                    .iter()
                    .rev()
                    .any(|(s, _)| *s > flowing)
                    .then_some(())
            })
            .await?;
            let killed_at = Instant::now();
            cluster.kill(leader);
            let (sent, first) = poll(
                "the first write acknowledged after the kill",
                Duration::from_secs(60),
                || async {
                    acks.lock()
                        .expect("acks")
                        .iter()
                        .filter(|(s, _)| *s >= killed_at)
                        .min_by_key(|(_, a)| *a)
                        .copied()
                },
            )
            .await?;
            let ms = (first - killed_at).as_secs_f64() * 1000.0;
            eprintln!(
                "b5a: {} trial {trial}: {ms:.0} ms (that write was sent {:.0} ms after the kill)",
                kind.name(),
                (sent - killed_at).as_secs_f64() * 1000.0
            );
            times_ms.push(ms);
            cluster.restart(leader)?;
            // Wait until all three agree on a leader again and the restarted
            // member has caught up before the next kill.
            cluster.leader(None).await?;
            cluster.caught_up(leader).await?;
            acks.lock().expect("acks").clear();
        }
        stop.store(true, Ordering::Relaxed);
        let _ = load.await;
        let mut sorted = times_ms.clone();
        sorted.sort_by(f64::total_cmp);
        summary.push(json!({
            "system": kind.name(), "trials": trials, "rate_per_s": rate, "times_ms": times_ms,
            "median_ms": percentile(&sorted, 50.0), "p95_ms": percentile(&sorted, 95.0),
            "min_ms": sorted.first(), "max_ms": sorted.last(),
        }));
    }
    println!("| system | trials | median ms | p95 ms | min ms | max ms |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for s in &summary {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            s["system"].as_str().unwrap_or(""),
            s["trials"],
            s["median_ms"].as_f64().unwrap_or(0.0),
            s["p95_ms"].as_f64().unwrap_or(0.0),
            s["min_ms"].as_f64().unwrap_or(0.0),
            s["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    write_out(cli, "b5a.json", json!({"bench": "B5a", "results": summary}))
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
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match &cli.command {
        Bench::B2 {
            concurrency,
            seconds,
            value_bytes,
        } => b2(&cli, concurrency, *seconds, *value_bytes).await,
        Bench::B5a { trials, rate } => b5a(&cli, *trials, *rate).await,
    }
}
