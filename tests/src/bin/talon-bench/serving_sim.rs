//! Simulated serving: dynamic batching and routing by predicted completion time
//! on the Azure trace, in virtual time.

use super::*;

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
            talon_node_agent::replicas::Placement::gpu(0),
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
    use talon_coordinator::gateway::routing::{rank, ReplicaLoad};
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
                prefix_saved_ms: 0.0,
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
pub(super) fn routing(
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
pub(super) fn batching(
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
