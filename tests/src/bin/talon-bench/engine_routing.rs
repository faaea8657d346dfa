//! Routing real engine processes: two replicas of one model, each an
//! engine process (the fake engine) behind its own agent, one fast and one
//! slow, under open-loop load through Talon's gateway — with the agents'
//! engine signals (learned service times) and without them (the gateway
//! then ranks by held requests alone, as it did before engines reported
//! service times). Real processes, real time, loopback.

use super::engine_fleet::{EngineAgent, EngineFleet};
use super::*;

/// One run: the agents' `--engine-signals` setting, then each rate's
/// latencies.
async fn run_mode(
    cli: &Cli,
    signals: bool,
    fast_ms: u64,
    slow_ms: u64,
    rates: &[u64],
    seconds: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let signals_flag = if signals { "true" } else { "false" };
    let fleet = EngineFleet::start(
        cli,
        &[("fast", "h100-sxm:1", fast_ms), ("slow", "l4:1", slow_ms)].map(|(id, gpus, svc)| {
            EngineAgent {
                id,
                gpus,
                engine_flags: format!("--service-ms {svc} --max-running 4"),
                agent_flags: vec!["--engine-signals", signals_flag],
            }
        }),
    )
    .await?;
    let (cluster, admin) = (&fleet.cluster, &fleet.admin);
    admin
        .create_model(model_spec("bench", "vllm", 8_000, 2))
        .await?;
    poll("two ready replicas", Duration::from_secs(60), || async {
        let list = admin.list_replicas("bench").await.ok()?;
        (list.replicas.len() == 2 && list.replicas.iter().all(|r| r.state == "ready")).then_some(())
    })
    .await?;
    let app = admin
        .create_credential("routing-load", "inference", None)
        .await?;
    let url = format!("http://{}/v1/chat/completions", cluster.http_addr(0));
    let http = reqwest::Client::new();
    // warm up: the engines' timings reach the models, the models the leader
    let (_, _, _) = gateway::open_loop(&http, &url, &app.key, "bench", 4, 5).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rows = Vec::new();
    for &rate in rates {
        let (lat, failed, refused) =
            gateway::open_loop(&http, &url, &app.key, "bench", rate, seconds).await;
        let row = json!({"signals": signals, "rate": rate, "answered": lat.len(), "failed": failed,
            "refused_429": refused, "p50_ms": percentile(&lat, 50.0), "p90_ms": percentile(&lat, 90.0),
            "p99_ms": percentile(&lat, 99.0)});
        eprintln!("engine-routing: {row}");
        rows.push(row);
    }
    drop(fleet);
    Ok(rows)
}

pub(super) async fn engine_routing(
    cli: &Cli,
    fast_ms: u64,
    slow_ms: u64,
    rates: &[u64],
    seconds: u64,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for signals in [true, false] {
        rows.extend(run_mode(cli, signals, fast_ms, slow_ms, rates, seconds).await?);
    }
    println!("| rate req/s | routing | answered | failed | p50 ms | p90 ms | p99 ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &rate in rates {
        for signals in [true, false] {
            let Some(r) = rows
                .iter()
                .find(|r| r["rate"] == rate && r["signals"] == signals)
            else {
                continue;
            };
            println!(
                "| {rate} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
                if signals {
                    "predicted completion (learned service times)"
                } else {
                    "held requests only (no engine signals)"
                },
                r["answered"],
                r["failed"],
                r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["p90_ms"].as_f64().unwrap_or(f64::NAN),
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    write_out(
        cli,
        "engine_routing.json",
        json!({"fast_service_ms": fast_ms, "slow_service_ms": slow_ms, "seconds": seconds, "rows": rows}),
    )
}
