//! B2 (Raft writes against etcd) and B5a (leader failover).

use super::*;

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

pub(super) async fn b2(
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

pub(super) async fn b5a(cli: &Cli, trials: usize, rate: u64) -> anyhow::Result<()> {
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
