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
            default_value = "direct,nginx,litellm,talon"
        )]
        doors: Vec<String>,
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
    key: &str,
) -> anyhow::Result<LoadResult> {
    let mut writers = Vec::new();
    for i in 0..clients {
        writers.push(Writer::new(kind, addrs, &format!("bench-{tag}-{i}"), key).await?);
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
        let key = cluster.admin_key().await?;
        for &c in concurrency {
            eprintln!("b2: {} with {c} clients for {seconds} s", kind.name());
            let r = run_load(kind, &addrs, &format!("c{c}"), c, seconds, &value, &key).await?;
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
        if cli.tls { "b2-tls.json" } else { "b2.json" },
        json!({"bench": "B2", "tls": cli.tls, "value_bytes": value_bytes, "seconds": seconds, "rows": rows}),
    )
}

async fn b5a(cli: &Cli, trials: usize, rate: u64) -> anyhow::Result<()> {
    let mut summary = Vec::new();
    for system in &cli.systems {
        let kind = Kind::from(*system);
        let mut cluster = BenchCluster::start(kind, &cli.base_dir, &talon_bin_dir()?).await?;
        // Open-loop load: a new write every 1/rate s, each in its own task,
        // so a write stuck on the dead leader does not hold back the next.
        let key = cluster.admin_key().await?;
        let writers = Arc::new(WriterPool::new(kind, &cluster.addrs(), &key).await?);
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
    write_out(
        cli,
        if cli.tls { "b5a-tls.json" } else { "b5a.json" },
        json!({"bench": "B5a", "tls": cli.tls, "results": summary}),
    )
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

/// LiteLLM refuses to start without a master key; every door gets it as a
/// bearer token (the others ignore it).
const LITELLM_KEY: &str = "sk-talon-bench-0123456789abcdef";

/// Waits until `url` answers 200 to a chat completion for `model`.
async fn wait_serving(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    model: &str,
) -> anyhow::Result<()> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2});
    poll(
        &format!("{url} to serve"),
        Duration::from_secs(180),
        || async {
            let r = http
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await
}

/// Open-loop load on `url` at `rate` req/s for `seconds`: latencies (ms) of
/// the answered requests, how many failed, and how many of those failures
/// were overload refusals (429).
async fn open_loop(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    model: &str,
    rate: u64,
    seconds: u64,
) -> (Vec<f64>, u64, u64) {
    let body = Arc::new(
        json!({"model": model, "messages": [{"role": "user", "content": "hello from the load generator"}], "max_tokens": 8}),
    );
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tick.tick().await;
        let (http, url, body, key) = (http.clone(), url.to_string(), body.clone(), key.to_string());
        tasks.spawn(async move {
            let t = Instant::now();
            match http.post(&url).bearer_auth(&key).json(&*body).send().await {
                Ok(r) if r.status().is_success() => r
                    .bytes()
                    .await
                    .map(|_| t.elapsed().as_secs_f64() * 1000.0)
                    .map_err(|_| false),
                Ok(r) => Err(r.status().as_u16() == 429),
                Err(_) => Err(false),
            }
        });
    }
    let (mut latencies, mut failed, mut refused) = (Vec::new(), 0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(l)) => latencies.push(l),
            Ok(Err(overload)) => {
                failed += 1;
                refused += u64::from(overload);
            }
            Err(_) => failed += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    (latencies, failed, refused)
}

async fn b3(
    cli: &Cli,
    service_ms: &[u64],
    rates: &[u64],
    seconds: u64,
    doors: &[String],
) -> anyhow::Result<()> {
    const TOKEN: &str = "bench-join-token-0123456789";
    let bin = talon_bin_dir()?;
    let dir = tempfile::Builder::new()
        .prefix("b3")
        .tempdir_in(&cli.base_dir)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut rows = Vec::new();
    for &svc in service_ms {
        let engine_port = talon_tests::clusters::free_port();
        let svc_arg = svc.to_string();
        let _engine = spawn_quiet(
            &bin.join("talon-fake-engine"),
            &[
                "--port",
                &engine_port.to_string(),
                "--model",
                "bench",
                "--service-ms",
                &svc_arg,
            ],
        )?;
        // (door, URL, the key the door wants)
        let mut urls: Vec<(String, String, String)> = Vec::new();
        let mut keep: Vec<Child> = Vec::new();
        let mut clusters = Vec::new();
        for door in doors {
            match door.as_str() {
                "direct" => urls.push((
                    door.clone(),
                    format!("http://127.0.0.1:{engine_port}/v1/chat/completions"),
                    LITELLM_KEY.to_string(),
                )),
                "nginx" => {
                    let port = talon_tests::clusters::free_port();
                    let prefix = dir.path().join(format!("nginx-{svc}"));
                    std::fs::create_dir_all(prefix.join("logs"))?;
                    let conf = prefix.join("nginx.conf");
                    std::fs::write(&conf, format!(
                        "worker_processes 1; daemon off; pid {p}/nginx.pid; error_log {p}/logs/error.log;\n\
                         events {{ worker_connections 8192; }}\n\
                         http {{ access_log off; client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;\n\
                         upstream be {{ server 127.0.0.1:{engine_port}; keepalive 256; }}\n\
                         server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
                        p = prefix.display()))?;
                    keep.push(spawn_quiet(
                        std::path::Path::new("nginx"),
                        &[
                            "-c",
                            conf.to_str().context("utf-8 path")?,
                            "-p",
                            prefix.to_str().context("utf-8 path")?,
                        ],
                    )?);
                    urls.push((
                        door.clone(),
                        format!("http://127.0.0.1:{port}/v1/chat/completions"),
                        LITELLM_KEY.to_string(),
                    ));
                }
                "litellm" => {
                    let port = talon_tests::clusters::free_port();
                    let conf = dir.path().join(format!("litellm-{svc}.yaml"));
                    std::fs::write(&conf, format!(
                        "general_settings:\n  master_key: {LITELLM_KEY}\nmodel_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      api_base: http://127.0.0.1:{engine_port}/v1\n      api_key: none\n"))?;
                    let litellm = std::env::current_dir()?.join("target/litellm-venv/bin/litellm");
                    keep.push(spawn_quiet(
                        &litellm,
                        &[
                            "--config",
                            conf.to_str().context("utf-8 path")?,
                            "--port",
                            &port.to_string(),
                            "--num_workers",
                            "1",
                        ],
                    )?);
                    urls.push((
                        door.clone(),
                        format!("http://127.0.0.1:{port}/v1/chat/completions"),
                        LITELLM_KEY.to_string(),
                    ));
                }
                "talon" => {
                    let cluster = BenchCluster::start_n(
                        Kind::Talon,
                        1,
                        &cli.base_dir,
                        &bin,
                        &["--join-token", TOKEN],
                    )
                    .await?;
                    let grpc = cluster.addr(0);
                    let listen = format!("127.0.0.1:{}", talon_tests::clusters::free_port());
                    let engine = format!(
                        "{} --port {{port}} --model {{model}} --service-ms {svc}",
                        bin.join("talon-fake-engine").display()
                    );
                    let logs = dir.path().join(format!("engine-logs-{svc}"));
                    keep.push(spawn_quiet(
                        &bin.join("talon-agent"),
                        &[
                            "--node-id",
                            "b3",
                            "--credential-file",
                            dir.path()
                                .join(format!("b3-{svc}.credential"))
                                .to_str()
                                .context("utf-8 path")?,
                            "--coordinators",
                            &grpc,
                            "--join-token",
                            TOKEN,
                            "--sim-gpus",
                            "l4:1",
                            "--http-listen",
                            &listen,
                            "--engine-command",
                            &engine,
                            "--engine-log-dir",
                            logs.to_str().context("utf-8 path")?,
                        ],
                    )?);
                    let admin =
                        talon_client::Client::pinned(grpc)?.with_key(cluster.admin_key().await?);
                    poll("the agent", Duration::from_secs(30), || async {
                        admin.get_node("b3").await.ok()
                    })
                    .await?;
                    let spec = model_spec("bench", "vllm", 4_000, 1);
                    admin.create_model(spec).await?;
                    // The load comes with an inference key, as applications' does.
                    let app = admin
                        .create_credential("b3-load", "inference", None)
                        .await?;
                    urls.push((
                        door.clone(),
                        format!("http://{}/v1/chat/completions", cluster.http_addr(0)),
                        app.key,
                    ));
                    clusters.push(cluster);
                }
                other => anyhow::bail!(
                    "unknown front door {other:?}; use direct, nginx, litellm or talon"
                ),
            }
        }
        for (door, url, key) in &urls {
            wait_serving(&http, url, key, "bench")
                .await
                .with_context(|| format!("{door} does not serve"))?;
        }
        // Side by side: every door at one rate before the next rate. A door
        // that stops sustaining the load (failures, or p99 over twice its
        // low-load p99) is not driven harder.
        let mut low_p99: HashMap<String, f64> = HashMap::new();
        let mut saturated: Vec<String> = Vec::new();
        for &rate in rates {
            for (door, url, key) in &urls {
                if saturated.contains(door) {
                    continue;
                }
                let (lat, failed, refused) =
                    open_loop(&http, url, key, "bench", rate, seconds).await;
                let p99 = percentile(&lat, 99.0);
                let base = *low_p99.entry(door.clone()).or_insert(p99);
                let sustained = failed == 0 && p99 <= 2.0 * base;
                if !sustained {
                    saturated.push(door.clone());
                }
                let row = json!({"service_ms": svc, "door": door, "rate": rate, "answered": lat.len(), "failed": failed,
                    "refused_429": refused, "p50_ms": percentile(&lat, 50.0), "p99_ms": p99, "sustained": sustained});
                eprintln!("b3: {row}");
                rows.push(row);
            }
        }
        drop(keep);
        drop(clusters);
    }
    println!("| service ms | rate req/s | front door | p50 ms | p99 ms | added p50 ms | added p99 ms | failed | of which 429 | sustained |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let direct = rows.iter().find(|d| {
            d["door"] == "direct" && d["rate"] == r["rate"] && d["service_ms"] == r["service_ms"]
        });
        let added = |k: &str| {
            direct
                .and_then(|d| Some(r[k].as_f64()? - d[k].as_f64()?))
                .map_or("-".to_string(), |v| format!("{v:.2}"))
        };
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            r["service_ms"],
            r["rate"],
            r["door"].as_str().unwrap_or(""),
            r["p50_ms"].as_f64().unwrap_or(f64::NAN),
            r["p99_ms"].as_f64().unwrap_or(f64::NAN),
            added("p50_ms"),
            added("p99_ms"),
            r["failed"],
            r["refused_429"],
            r["sustained"]
        );
    }
    write_out(
        cli,
        "b3.json",
        json!({"bench": "B3", "seconds": seconds, "rows": rows}),
    )
}

async fn b5b(cli: &Cli, trials: usize, rate: u64, flags: &str) -> anyhow::Result<()> {
    const TOKEN: &str = "bench-join-token-0123456789";
    let mut extra: Vec<&str> = vec!["--join-token", TOKEN];
    extra.extend(flags.split_whitespace());
    let bin = talon_bin_dir()?;
    let mut times_ms = Vec::new();
    let (mut sent_total, mut failed_total) = (0u64, 0u64);
    for trial in 0..trials {
        let cluster = BenchCluster::start_n(Kind::Talon, 1, &cli.base_dir, &bin, &extra).await?;
        let grpc = cluster.addr(0);
        let key = cluster.admin_key().await?;
        let admin = talon_client::Client::pinned(grpc.clone())?.with_key(&key);
        let http = admin
            .cluster_status()
            .await
            .ok()
            .map(|_| ())
            .context("coordinator")?;
        let _ = http;
        let mut agents = Vec::new();
        let credentials = tempfile::tempdir_in(&cli.base_dir)?;
        for id in ["n1", "n2"] {
            let listen = format!("127.0.0.1:{}", talon_tests::clusters::free_port());
            let credential = credentials.path().join(format!("{id}.credential"));
            let child = std::process::Command::new(bin.join("talon-agent"))
                .args([
                    "--node-id",
                    id,
                    "--coordinators",
                    &grpc,
                    "--join-token",
                    TOKEN,
                    "--sim-gpus",
                    "h100-sxm:1",
                ])
                .arg("--credential-file")
                .arg(&credential)
                .args(["--http-listen", &listen])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting talon-agent (build it in release too)")?;
            agents.push((id, child));
        }
        poll("two ready nodes", Duration::from_secs(30), || async {
            let nodes = admin.list_nodes().await.ok()?;
            (nodes.iter().filter(|n| n.state == "ready").count() == 2).then_some(())
        })
        .await?;
        let spec = model_spec("demo", "simulated", 8_000, 2);
        admin.create_model(spec).await?;
        let placed = poll("2 ready replicas", Duration::from_secs(30), || async {
            let list = admin.list_replicas("demo").await.ok()?;
            (list.replicas.len() == 2 && list.replicas.iter().all(|r| r.state == "ready"))
                .then_some(list)
        })
        .await?;
        let http_addr = cluster.http_addr(0);
        // Open-loop load, one thread per request.
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let load = {
            let (stop, sent, failed, http_addr, key) = (
                stop.clone(),
                sent.clone(),
                failed.clone(),
                http_addr.clone(),
                key.clone(),
            );
            std::thread::spawn(move || {
                let mut workers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (sent, failed, http_addr, key) =
                        (sent.clone(), failed.clone(), http_addr.clone(), key.clone());
                    workers.push(std::thread::spawn(move || {
                        sent.fetch_add(1, Ordering::Relaxed);
                        let body = r#"{"model":"demo","messages":[{"role":"user","content":"node loss"}],"max_tokens":2}"#;
                        if http_post(&http_addr, "/v1/chat/completions", body, &key).map(|(status, _)| status) != Some(200) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }));
                    std::thread::sleep(Duration::from_micros(1_000_000 / rate.max(1)));
                }
                for w in workers {
                    let _ = w.join();
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let victim = placed.replicas[0].node_id.clone();
        let survivor = if victim == "n1" { "n2" } else { "n1" };
        let killed_at = Instant::now();
        for (id, child) in agents.iter_mut() {
            if *id == victim {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        poll(
            "replicas serving from the survivor",
            Duration::from_secs(300),
            || async {
                let list = admin.list_replicas("demo").await.ok()?;
                (list.replicas.len() == 2
                    && list
                        .replicas
                        .iter()
                        .all(|r| r.node_id == survivor && r.state == "ready"))
                .then_some(())
            },
        )
        .await?;
        let ms = killed_at.elapsed().as_secs_f64() * 1000.0;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || load.join()).await;
        let (s, f) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        eprintln!("b5b: trial {trial}: replicas serving elsewhere after {ms:.0} ms; {f} of {s} requests failed");
        times_ms.push(ms);
        sent_total += s;
        failed_total += f;
        for (_, mut child) in agents {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    println!("| coordinator flags | trials | median ms | max ms | requests | failed |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {trials} | {:.0} | {:.0} | {sent_total} | {failed_total} |",
        if flags.is_empty() { "defaults" } else { flags },
        percentile(&sorted, 50.0),
        sorted.last().copied().unwrap_or(0.0)
    );
    write_out(
        cli,
        "b5b.json",
        json!({"bench": "B5b", "flags": flags, "rate": rate, "times_ms": times_ms,
        "requests": sent_total, "failed": failed_total}),
    )
}

/// Reads (prompt tokens, output tokens) from the Azure trace.
fn read_azure(path: &std::path::Path) -> anyhow::Result<Vec<(u64, u64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let mut f = line.split(',');
        let (_, p, o) = (f.next(), f.next(), f.next());
        let parse = |v: Option<&str>| v.and_then(|v| v.trim().parse::<u64>().ok());
        match (parse(p), parse(o)) {
            (Some(p), Some(o)) => out.push((p, o)),
            _ => anyhow::bail!(
                "{}:{}: expected TIMESTAMP,ContextTokens,GeneratedTokens",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

/// A small deterministic generator (xorshift64*), so runs repeat exactly.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct BatchRun {
    rate: f64,
    within_slo: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_batch: f64,
}

/// A queued request in the virtual-time benches: the request, when it
/// arrived, and its latency target.
type SimItem = (
    talon_node_agent::executor::InferRequest,
    tokio::time::Instant,
    Duration,
);
/// A served request: (latency, its target, the size of its batch).
type SimDone = (Duration, Duration, usize);

/// A simulated replica of a `memory_mib` model on one GPU of type `gpu`.
fn sim_replica(
    gpu: &str,
    memory_mib: u64,
) -> anyhow::Result<Arc<talon_node_agent::executor::simulated::SimulatedExecutor>> {
    use talon_node_agent::fleet::FleetSpec;
    use talon_node_agent::perf::Correction;
    use talon_node_agent::probe::sim::SimFleet;
    let gpu_type = talon_node_agent::catalog::by_key(gpu)
        .with_context(|| format!("unknown GPU type {gpu}"))?;
    let fleet = Arc::new(SimFleet::new(
        "bench",
        FleetSpec::from_flag(&format!("{gpu}:1"))?,
    )?);
    Ok(Arc::new(
        talon_node_agent::executor::simulated::SimulatedExecutor::load(
            "bench",
            memory_mib,
            fleet,
            0,
            gpu_type,
            Arc::new(Correction::default()),
        )?,
    ))
}

/// The dynamic batcher in front of `exec`: each served request goes to
/// `done`, and, when given, leaves the replica's `held` count.
fn sim_batcher(
    exec: Arc<talon_node_agent::executor::simulated::SimulatedExecutor>,
    limits: talon_node_agent::batcher::Limits,
    service: impl Fn(usize) -> Duration + Send + 'static,
    done: tokio::sync::mpsc::UnboundedSender<SimDone>,
    held: Option<Arc<std::sync::atomic::AtomicU32>>,
) -> talon_node_agent::batcher::Batcher<SimItem> {
    use talon_node_agent::executor::Executor;
    talon_node_agent::batcher::Batcher::start(limits, service, move |batch: Vec<SimItem>| {
        let (exec, done, held) = (exec.clone(), done.clone(), held.clone());
        async move {
            let n = batch.len();
            let requests = batch.iter().map(|(r, _, _)| r.clone()).collect();
            exec.infer(requests).await;
            for (_, arrived, target) in batch {
                if let Some(h) = &held {
                    h.fetch_sub(1, Ordering::Relaxed);
                }
                let _ = done.send((arrived.elapsed(), target, n));
            }
        }
    })
}

/// Poisson arrivals at `rate` per second for `seconds` of virtual time,
/// prompt and output lengths drawn from `trace`; each request goes to
/// `submit`. Returns how many were sent.
async fn sim_arrivals(
    trace: &[(u64, u64)],
    rate: f64,
    seconds: u64,
    (ttft, tpot): (Duration, Duration),
    mut submit: impl FnMut(SimItem),
) -> usize {
    use talon_node_agent::executor::{Endpoint, InferRequest};
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ rate.to_bits());
    let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0usize;
    while tokio::time::Instant::now() < end {
        let gap = -rng.next_f64().max(1e-12).ln() / rate;
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        let (prompt, output) = trace[(rng.next_f64() * trace.len() as f64) as usize % trace.len()];
        let body = json!({"messages": [{"role": "user", "content": "w ".repeat(prompt as usize)}], "max_tokens": output});
        let target = ttft + tpot * output as u32;
        let request = InferRequest::new(Endpoint::ChatCompletions, body);
        submit((request, tokio::time::Instant::now(), target));
        sent += 1;
    }
    sent
}

/// Collects the answers to `sent` requests, waiting at most `seconds` more
/// (an overloaded run never drains); requests not served count as late.
async fn sim_results(
    done: &mut tokio::sync::mpsc::UnboundedReceiver<SimDone>,
    sent: usize,
    seconds: u64,
    rate: f64,
) -> BatchRun {
    let mut latencies = Vec::with_capacity(sent);
    let (mut within, mut batch_sizes) = (0usize, 0usize);
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while latencies.len() < sent {
        tokio::select! {
            Some((latency, target, n)) = done.recv() => {
                latencies.push(latency.as_secs_f64() * 1000.0);
                within += usize::from(latency <= target);
                if latency > target && std::env::var_os("TALON_BENCH_DEBUG").is_some() {
                    eprintln!("late: {latency:?} > {target:?} (batch {n})");
                }
                batch_sizes += n;
            }
            _ = tokio::time::sleep_until(drain_until) => break,
        }
    }
    let served = latencies.len();
    latencies.extend(std::iter::repeat_n(f64::INFINITY, sent - served));
    latencies.sort_by(f64::total_cmp);
    BatchRun {
        rate,
        within_slo: within as f64 / sent.max(1) as f64,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        mean_batch: batch_sizes as f64 / served.max(1) as f64,
    }
}

/// A current-thread runtime on a paused clock: virtual time.
fn virtual_time() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?)
}

/// One open-loop run in virtual time: Poisson arrivals at `rate` per second
/// for `seconds`, requests drawn from `trace`, served by one simulated
/// replica through the dynamic batcher.
fn batching_run(
    gpu: &str,
    trace: &[(u64, u64)],
    memory_mib: u64,
    slo: (Duration, Duration),
    limits: talon_node_agent::batcher::Limits,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<BatchRun> {
    use talon_node_agent::batcher::Priority;
    use talon_node_agent::executor::{Endpoint, InferRequest};
    virtual_time()?.block_on(async move {
        let exec = sim_replica(gpu, memory_mib)?;
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let predictor = exec.clone();
        let service = move |n: usize| {
            let probe = InferRequest::new(
                Endpoint::ChatCompletions,
                json!({"messages": [{"role": "user", "content": "x ".repeat(512)}], "max_tokens": 256}),
            );
            predictor.predict(&vec![probe; n])
        };
        let batcher = sim_batcher(exec, limits, service, done_tx, None);
        let sent = sim_arrivals(trace, rate, seconds, slo, |item| {
            let deadline = item.1 + item.2;
            batcher.submit(item, Priority::Normal, deadline);
        })
        .await;
        anyhow::Ok(sim_results(&mut done_rx, sent, seconds, rate).await)
    })
}

/// How the routing bench picks a replica.
#[derive(Clone, Copy, Debug)]
enum Policy {
    /// Talon's: lowest predicted completion time (`talon_coordinator::routing`).
    Predicted,
    /// Fewest requests held.
    LeastLoaded,
    RoundRobin,
}

/// One open-loop run in virtual time over a fleet of simulated replicas
/// (one per GPU in `gpus`), each behind its own dynamic batcher, with
/// requests routed by `policy`. The router sees each replica's held count
/// as it is (one gateway, no telemetry lag).
#[allow(clippy::too_many_arguments)]
fn routing_run(
    gpus: &[String],
    policy: Policy,
    trace: &[(u64, u64)],
    memory_mib: u64,
    slo: (Duration, Duration),
    limits: talon_node_agent::batcher::Limits,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<BatchRun> {
    use std::sync::atomic::AtomicU32;
    use talon_coordinator::routing::{rank, ReplicaLoad};
    use talon_node_agent::batcher::Priority;
    use talon_node_agent::executor::Executor;
    virtual_time()?.block_on(async move {
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut replicas = Vec::new();
        for gpu in gpus {
            let exec = sim_replica(gpu, memory_mib)?;
            let held = Arc::new(AtomicU32::new(0));
            let load = ReplicaLoad {
                held: 0,
                service_ms_one: exec.service_time(1).as_secs_f64() * 1e3,
                service_ms_full: exec.service_time(limits.max_batch).as_secs_f64() * 1e3,
                max_batch: limits.max_batch as u32,
            };
            let predictor = exec.clone();
            let service = move |n| predictor.service_time(n);
            let batcher = sim_batcher(exec, limits, service, done_tx.clone(), Some(held.clone()));
            replicas.push((batcher, held, load));
        }
        let mut turn = 0usize;
        let sent = sim_arrivals(trace, rate, seconds, slo, |item| {
            let pick = match policy {
                Policy::Predicted => {
                    let loads = replicas
                        .iter()
                        .enumerate()
                        .map(|(i, (_, held, load))| {
                            (
                                format!("{i:03}"),
                                ReplicaLoad {
                                    held: held.load(Ordering::Relaxed),
                                    ..*load
                                },
                                i,
                            )
                        })
                        .collect();
                    rank(loads)[0].2
                }
                Policy::LeastLoaded => (0..replicas.len())
                    .min_by_key(|&i| (replicas[i].1.load(Ordering::Relaxed), i))
                    .unwrap_or(0),
                Policy::RoundRobin => {
                    turn += 1;
                    turn % replicas.len()
                }
            };
            let (batcher, held, _) = &replicas[pick];
            held.fetch_add(1, Ordering::Relaxed);
            let deadline = item.1 + item.2;
            batcher.submit(item, Priority::Normal, deadline);
        })
        .await;
        anyhow::Ok(sim_results(&mut done_rx, sent, seconds, rate).await)
    })
}

#[allow(clippy::too_many_arguments)]
fn routing(
    cli: &Cli,
    trace_path: &std::path::Path,
    gpus: &[String],
    memory_mib: u64,
    (ttft_ms, tpot_ms): (u64, u64),
    max_batch: usize,
    seconds: u64,
    attainment: f64,
) -> anyhow::Result<()> {
    let trace = read_azure(trace_path)?;
    let slo = (
        Duration::from_millis(ttft_ms),
        Duration::from_millis(tpot_ms),
    );
    let limits = talon_node_agent::batcher::Limits {
        max_batch,
        max_wait_ms: 50,
    };
    let rates: Vec<f64> = (0..40)
        .map(|k| (0.05 * 1.15f64.powi(k) * 100.0).round() / 100.0)
        .collect();
    let policies = [
        ("predicted completion (Talon)", Policy::Predicted),
        ("least loaded", Policy::LeastLoaded),
        ("round robin", Policy::RoundRobin),
    ];
    let mut rows = Vec::new();
    println!(
        "| fleet | routing | highest rate with ≥{:.0} % within target (req/s) | p50 ms there | p99 ms there |",
        attainment * 100.0
    );
    println!("| --- | --- | --- | --- | --- |");
    let fleet = gpus.join("+");
    let mut best = Vec::new();
    for (name, policy) in policies {
        let mut last_ok: Option<BatchRun> = None;
        for &rate in &rates {
            let run = routing_run(gpus, policy, &trace, memory_mib, slo, limits, rate, seconds)?;
            eprintln!(
                "routing: {name} {rate} req/s: {:.1} % within SLO, p50 {:.0} ms, p99 {:.0} ms",
                run.within_slo * 100.0,
                run.p50_ms,
                run.p99_ms
            );
            rows.push(
                json!({"fleet": fleet, "policy": name, "rate": rate, "within_slo": run.within_slo,
                "p50_ms": run.p50_ms, "p99_ms": run.p99_ms}),
            );
            if run.within_slo < attainment {
                break;
            }
            last_ok = Some(run);
        }
        match &last_ok {
            Some(r) => println!(
                "| {fleet} | {name} | {} | {:.0} | {:.0} |",
                r.rate, r.p50_ms, r.p99_ms
            ),
            None => println!("| {fleet} | {name} | below {} | | |", rates[0]),
        }
        best.push(last_ok.map_or(0.0, |r| r.rate));
    }
    for (i, (name, _)) in policies.iter().enumerate().skip(1) {
        if best[i] > 0.0 {
            println!(
                "| {fleet} | Talon vs {name} | {:.2}× | | |",
                best[0] / best[i]
            );
        }
    }
    write_out(
        cli,
        "routing.json",
        json!({"bench": "routing", "attainment": attainment, "ttft_ms": ttft_ms, "tpot_ms": tpot_ms,
               "max_batch": max_batch, "memory_mib": memory_mib, "seconds": seconds, "rows": rows}),
    )
}

#[allow(clippy::too_many_arguments)]
fn batching(
    cli: &Cli,
    trace_path: &std::path::Path,
    gpus: &[String],
    memory_mib: u64,
    (ttft_ms, tpot_ms): (u64, u64),
    max_batch: usize,
    seconds: u64,
    attainment: f64,
) -> anyhow::Result<()> {
    use talon_node_agent::batcher::Limits;
    let trace = read_azure(trace_path)?;
    let slo = (
        Duration::from_millis(ttft_ms),
        Duration::from_millis(tpot_ms),
    );
    // 0.05 req/s upwards in steps of 25 %.
    let rates: Vec<f64> = (0..40)
        .map(|k| (0.05 * 1.25f64.powi(k) * 100.0).round() / 100.0)
        .collect();
    let modes = [
        (
            "no batching",
            Limits {
                max_batch: 1,
                max_wait_ms: 0,
            },
        ),
        (
            "dynamic batching",
            Limits {
                max_batch,
                max_wait_ms: 50,
            },
        ),
    ];
    let mut rows = Vec::new();
    println!(
        "| GPU | mode | highest rate with ≥{:.0} % within target (req/s) | p50 ms there | p99 ms there | mean batch |",
        attainment * 100.0
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for gpu in gpus {
        let mut best = Vec::new();
        for (mode, limits) in modes {
            let mut last_ok: Option<BatchRun> = None;
            for &rate in &rates {
                if rate == 0.0 {
                    continue;
                }
                let run = batching_run(gpu, &trace, memory_mib, slo, limits, rate, seconds)?;
                eprintln!(
                    "batching: {gpu} {mode} {rate} req/s: {:.1} % within SLO, p50 {:.0} ms, p99 {:.0} ms, batch {:.1}",
                    run.within_slo * 100.0, run.p50_ms, run.p99_ms, run.mean_batch
                );
                rows.push(
                    json!({"gpu": gpu, "mode": mode, "rate": rate, "within_slo": run.within_slo,
                    "p50_ms": run.p50_ms, "p99_ms": run.p99_ms, "mean_batch": run.mean_batch}),
                );
                if run.within_slo < attainment {
                    break;
                }
                last_ok = Some(run);
            }
            match &last_ok {
                Some(r) => println!(
                    "| {gpu} | {mode} | {} | {:.0} | {:.0} | {:.1} |",
                    r.rate, r.p50_ms, r.p99_ms, r.mean_batch
                ),
                None => println!("| {gpu} | {mode} | below {} | | | |", rates[0]),
            }
            best.push(last_ok.map_or(0.0, |r| r.rate));
        }
        if best[0] > 0.0 {
            println!("| {gpu} | gain | {:.1}× | | | |", best[1] / best[0]);
        }
    }
    write_out(
        cli,
        "batching.json",
        json!({"bench": "batching", "attainment": attainment, "ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "max_batch": max_batch, "memory_mib": memory_mib, "seconds": seconds, "rows": rows}),
    )
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14, 15).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?)
}

/// Resident memory of a process, bytes (/proc/PID/status VmRSS).
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

/// Linux reports process CPU time in ticks of 1/100 s (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

async fn b4(
    cli: &Cli,
    counts: &[usize],
    seconds: u64,
    per_connection: usize,
) -> anyhow::Result<()> {
    use talon_node_agent::agent::{inventory_to_wire, sample_to_wire, AgentSettings};
    use talon_node_agent::fleet::FleetSpec;
    use talon_node_agent::probe::sim::SimFleet;
    use talon_node_agent::probe::GpuProbe;
    use talon_proto::v1 as pb;
    use talon_proto::v1::agent_service_client::AgentServiceClient;

    const TOKEN: &str = "bench-join-token-0123456789";
    let mut rows = Vec::new();
    for &n in counts {
        let extra = [
            "--join-token",
            TOKEN,
            "--telemetry-interval-ms",
            "1000",
            "--suspect-after-ms",
            "10000",
            "--down-after-ms",
            "30000",
        ];
        let cluster =
            BenchCluster::start_n(Kind::Talon, 1, &cli.base_dir, &talon_bin_dir()?, &extra).await?;
        let pid = cluster.pid(0).context("coordinator pid")?;
        let addr = cluster.addr(0);
        let connections: Vec<AgentServiceClient<tonic::transport::Channel>> = (0..n
            .div_ceil(per_connection))
            .map(|_| {
                let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .tcp_nodelay(true);
                Ok(AgentServiceClient::new(endpoint.connect_lazy()))
            })
            .collect::<anyhow::Result<_>>()?;
        let spec = FleetSpec::from_flag("h100-sxm:8")?;
        let token: tonic::metadata::MetadataValue<_> = TOKEN.parse()?;
        eprintln!("b4: registering {n} agents");
        let started = Instant::now();
        let mut agents = Vec::new();
        for i in 0..n {
            let node_id = format!("sim-{i:05}");
            let fleet = SimFleet::new(&node_id, spec.clone())?;
            let settings = AgentSettings {
                node_id: node_id.clone(),
                addr: format!("{node_id}:7481"),
                coordinators: vec![addr.clone()],
                join_token: TOKEN.into(),
                identity: Arc::new(
                    talon_node_agent::identity::IdentityStore::open(
                        None,
                        &node_id,
                        Default::default(),
                    )
                    .map_err(anyhow::Error::msg)?,
                ),
                coordinator_ca: None,
                labels: Default::default(),
                cost_per_hour: 0.0,
                cpu_cores: 64,
                host_memory_bytes: 512 << 30,
                telemetry_interval: None,
                calibrations: Vec::new(),
                replicas: None,
            };
            let inventory = inventory_to_wire(&settings, "simulated", &fleet.inventory()?);
            agents.push((node_id, fleet, inventory));
        }
        // Join (the token buys each node its credential) and register, with
        // bounded concurrency: each is a Raft write.
        let mut set = tokio::task::JoinSet::new();
        let mut keys: HashMap<String, tonic::metadata::MetadataValue<_>> = HashMap::new();
        let mut joined = |r: anyhow::Result<(String, String)>| -> anyhow::Result<()> {
            let (node, key) = r?;
            keys.insert(node, format!("Bearer {key}").parse()?);
            Ok(())
        };
        for (i, (node_id, _, inventory)) in agents.iter().enumerate() {
            if set.len() >= 64 {
                joined(set.join_next().await.context("join")??)?;
            }
            let mut client = connections[i % connections.len()].clone();
            let (node_id, inventory, token) = (node_id.clone(), inventory.clone(), token.clone());
            set.spawn(async move {
                let mut join = tonic::Request::new(pb::JoinRequest {
                    node_id: node_id.clone(),
                });
                join.metadata_mut().insert("talon-join-token", token);
                let key = client.join(join).await?.into_inner().key;
                let mut request = tonic::Request::new(pb::RegisterRequest {
                    inventory: Some(inventory),
                });
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {key}").parse()?);
                client.register(request).await?;
                anyhow::Ok((node_id, key))
            });
        }
        while let Some(r) = set.join_next().await {
            joined(r?)?;
        }
        eprintln!(
            "b4: {n} agents registered in {:.1} s; streaming",
            started.elapsed().as_secs_f64()
        );

        // One stream per agent, at 1 Hz, phases spread over the second.
        let stop = Arc::new(AtomicBool::new(false));
        let mut streams = Vec::new();
        for (i, (node_id, fleet, _)) in agents.into_iter().enumerate() {
            let mut client = connections[i % connections.len()].clone();
            let stop = stop.clone();
            let key = keys.get(&node_id).context("agent key")?.clone();
            let phase = Duration::from_micros((i as u64 * 1_000_000) / n as u64);
            streams.push(tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<pb::TelemetryReport>(2);
                let mut request =
                    tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                request.metadata_mut().insert("authorization", key);
                let call = tokio::spawn(async move { client.report_telemetry(request).await });
                tokio::time::sleep(phase).await;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    seq += 1;
                    let gpus = fleet
                        .sample()
                        .map(|s| s.iter().map(sample_to_wire).collect())
                        .unwrap_or_default();
                    let report = pb::TelemetryReport {
                        node_id: node_id.clone(),
                        seq,
                        sampled_at_ms: 0,
                        gpus,
                        replicas: Vec::new(),
                    };
                    if tx.send(report).await.is_err() {
                        break;
                    }
                }
                drop(tx);
                let _ = call.await;
            }));
        }
        let admin =
            talon_client::Client::pinned(addr.clone())?.with_key(cluster.admin_key().await?);
        // Warm up until every node has reported, then measure.
        poll(
            "every agent reporting",
            Duration::from_secs(120),
            || async {
                let s = admin.fleet_stats().await.ok()?;
                (s.nodes_without_telemetry == 0 && s.nodes as usize == n).then_some(())
            },
        )
        .await?;
        let bench_pid = std::process::id();
        let (t0, c0, b0) = (Instant::now(), cpu_ticks(pid)?, cpu_ticks(bench_pid)?);
        let (r0, mut ages, mut max_rss) = (
            admin.fleet_stats().await?.reports_received,
            Vec::new(),
            0u64,
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while t0.elapsed() < Duration::from_secs(seconds) {
            tick.tick().await;
            let s = admin.fleet_stats().await?;
            ages.extend(s.telemetry_age_ms.iter().map(|a| f64::from(*a)));
            max_rss = max_rss.max(rss_bytes(pid)?);
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cores = (cpu_ticks(pid)? - c0) as f64 / TICKS_PER_SECOND / elapsed;
        let bench_cores = (cpu_ticks(bench_pid)? - b0) as f64 / TICKS_PER_SECOND / elapsed;
        let reports = admin.fleet_stats().await?.reports_received - r0;
        stop.store(true, Ordering::Relaxed);
        for s in streams {
            s.abort();
        }
        ages.sort_by(f64::total_cmp);
        let row = json!({
            "agents": n, "gpus_per_agent": 8, "seconds": elapsed,
            "reports_per_s": reports as f64 / elapsed,
            "coordinator_cores": cores, "coordinator_rss_mib": max_rss as f64 / (1 << 20) as f64,
            "load_generator_cores": bench_cores,
            "staleness_p50_ms": percentile(&ages, 50.0), "staleness_p99_ms": percentile(&ages, 99.0),
            "staleness_max_ms": ages.last(), "staleness_samples": ages.len(),
        });
        eprintln!("b4: {row}");
        rows.push(row);
    }
    println!("| agents | reports/s | coordinator CPU (cores) | coordinator RSS MiB | staleness p50 ms | p99 ms | max ms | load generator CPU |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            r["agents"],
            r["reports_per_s"].as_f64().unwrap_or(0.0),
            r["coordinator_cores"].as_f64().unwrap_or(0.0),
            r["coordinator_rss_mib"].as_f64().unwrap_or(0.0),
            r["staleness_p50_ms"].as_f64().unwrap_or(0.0),
            r["staleness_p99_ms"].as_f64().unwrap_or(0.0),
            r["staleness_max_ms"].as_f64().unwrap_or(0.0),
            r["load_generator_cores"].as_f64().unwrap_or(0.0)
        );
    }
    write_out(cli, "b4.json", json!({"bench": "B4", "rows": rows}))
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
        } => b3(&cli, service_ms, rates, *seconds, doors).await,
        Bench::B5b {
            trials,
            rate,
            coordinator_flags,
        } => b5b(&cli, *trials, *rate, coordinator_flags).await,
        Bench::B4 {
            agents,
            seconds,
            agents_per_connection,
        } => b4(&cli, agents, *seconds, *agents_per_connection).await,
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
