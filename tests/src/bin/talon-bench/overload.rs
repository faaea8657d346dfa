//! Overload without collapse: one coordinator and one agent serving a
//! simulated replica, driven open-loop at its sustained rate, then at ten
//! times that, then at the sustained rate again. Per phase: what was
//! answered (200, 429, 503, other, connection errors), whether refusals say
//! when to come back (`Retry-After`), the latency of the answered requests,
//! whether every answered request came back whole, and the resident memory
//! of the coordinator and the agent.

use super::*;

/// What one phase saw.
#[derive(Default)]
struct Phase {
    ok: u64,
    /// 200s whose body was not a whole completion (an acknowledged request
    /// lost).
    broken: u64,
    refused_429: u64,
    refused_503: u64,
    with_retry_after: u64,
    other: u64,
    errors: u64,
    latencies: Vec<f64>,
}

fn rss_mib(pid: u32) -> f64 {
    proc_status_bytes(&pid.to_string(), "VmRSS").map_or(0.0, |b| b as f64 / (1 << 20) as f64)
}

/// Open loop at `rate` for `seconds`, sampling both processes' memory once
/// a second: the phase, the highest memory seen (coordinator, agent) and
/// the seconds until the last answer came.
async fn drive(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    rate: u64,
    seconds: u64,
    pids: (u32, u32),
) -> (Phase, f64, f64, f64) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    let mut tasks = tokio::task::JoinSet::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut coord, mut agent) = (0f64, 0f64);
    while Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sample.tick() => {
                coord = coord.max(rss_mib(pids.0));
                agent = agent.max(rss_mib(pids.1));
                continue;
            }
        }
        let (http, url, key) = (http.clone(), url.to_string(), key.to_string());
        tasks.spawn(async move {
            let body = json!({"model": "demo", "max_tokens": 16,
                "messages": [{"role": "user", "content": "overload"}]});
            let t = Instant::now();
            let r = http.post(&url).bearer_auth(&key).json(&body).send().await?;
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            let whole = r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["choices"][0]["message"]["content"].as_str().map(|_| ()))
                .is_some();
            anyhow::Ok((
                status,
                retry_after,
                whole,
                t.elapsed().as_secs_f64() * 1000.0,
            ))
        });
    }
    let mut phase = Phase::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((200, _, whole, ms))) => {
                phase.ok += 1;
                phase.broken += u64::from(!whole);
                phase.latencies.push(ms);
            }
            Ok(Ok((status, retry_after, _, _))) => {
                match status {
                    429 => phase.refused_429 += 1,
                    503 => phase.refused_503 += 1,
                    _ => phase.other += 1,
                }
                phase.with_retry_after += u64::from(retry_after);
            }
            _ => phase.errors += 1,
        }
    }
    coord = coord.max(rss_mib(pids.0));
    agent = agent.max(rss_mib(pids.1));
    phase.latencies.sort_by(f64::total_cmp);
    (phase, coord, agent, started.elapsed().as_secs_f64())
}

pub(super) async fn overload(cli: &Cli, seconds: u64, factor: u64) -> anyhow::Result<()> {
    const TOKEN: &str = "bench-join-token-0123456789";
    let bin = talon_bin_dir()?;
    let cluster = BenchCluster::start_n(
        Kind::Talon,
        1,
        &cli.base_dir,
        &bin,
        &["--join-token", TOKEN],
    )
    .await?;
    let key = cluster.admin_key().await?;
    let admin = talon_client::Client::pinned(cluster.addr(0))?.with_key(&key);
    let credentials = tempfile::tempdir_in(&cli.base_dir)?;
    let listen = format!("127.0.0.1:{}", talon_tests::clusters::free_port());
    let credential = credentials
        .path()
        .join("n1.credential")
        .display()
        .to_string();
    let coordinator = cluster.addr(0);
    let agent = spawn_quiet(
        &bin.join("talon-agent"),
        &[
            "--node-id",
            "n1",
            "--coordinators",
            &coordinator,
            "--join-token",
            TOKEN,
            "--sim-gpus",
            "l4:1",
            "--credential-file",
            &credential,
            "--http-listen",
            &listen,
        ],
    )?;
    admin
        .create_model(model_spec("demo", "simulated", 8_000, 1))
        .await?;
    poll("a ready replica", Duration::from_secs(60), || async {
        let list = admin.list_replicas("demo").await.ok()?;
        list.replicas
            .iter()
            .any(|r| r.state == "ready")
            .then_some(())
    })
    .await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = format!("http://{}/v1/chat/completions", cluster.http_addr(0));
    let pids = (cluster.pid(0).context("coordinator pid")?, agent.0.id());

    // The sustained rate: what the replica answers per second when offered
    // far more than it can take, a little under it.
    let (probe, _, _, took) = drive(&http, &url, &key, 400, 5, pids).await;
    let capacity = probe.ok as f64 / took;
    let rate = ((capacity * 0.8) as u64).max(1);
    eprintln!("overload: the replica answers {capacity:.0} req/s; sustained rate {rate} req/s");

    let mut rows = Vec::new();
    for (name, r) in [
        ("before (1×)", rate),
        ("overload (10×)", rate * factor),
        ("after (1×)", rate),
    ] {
        let (p, coord, agent_mib, _) = drive(&http, &url, &key, r, seconds, pids).await;
        let refused = p.refused_429 + p.refused_503;
        let row = json!({
            "phase": name, "offered_per_s": r, "answered_per_s": p.ok as f64 / seconds as f64,
            "ok": p.ok, "broken": p.broken, "429": p.refused_429, "503": p.refused_503,
            "refusals_with_retry_after": p.with_retry_after, "refused": refused,
            "other": p.other, "errors": p.errors,
            "p50_ms": percentile(&p.latencies, 50.0), "p99_ms": percentile(&p.latencies, 99.0),
            "coordinator_rss_mib": coord, "agent_rss_mib": agent_mib,
        });
        eprintln!("overload: {row}");
        rows.push(row);
    }
    println!("| phase | offered req/s | answered req/s | 200 | lost (200 not whole) | 429 | 503 | refusals with Retry-After | other | conn. errors | p50 ms | p99 ms | coordinator RSS MiB | agent RSS MiB |");
    println!(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r["phase"].as_str().unwrap_or(""),
            r["offered_per_s"],
            r["answered_per_s"].as_f64().unwrap_or(0.0),
            r["ok"],
            r["broken"],
            r["429"],
            r["503"],
            r["refusals_with_retry_after"],
            r["other"],
            r["errors"],
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["coordinator_rss_mib"].as_f64().unwrap_or(0.0),
            r["agent_rss_mib"].as_f64().unwrap_or(0.0),
        );
    }
    write_out(
        cli,
        "overload.json",
        json!({"bench": "overload", "capacity_per_s": capacity, "rows": rows}),
    )
}
