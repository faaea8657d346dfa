//! Hot swap: a model's version changes under steady load. Two replicas,
//! each an engine process (the fake engine, with a model-load delay)
//! behind its own agent; open-loop load through the gateway; half-way the
//! new version is created. Failed requests and latency before, during (from
//! the new version's creation until only its replicas are placed and ready)
//! and after the change. Real processes, real time, loopback. With
//! `--engine llama` the engines are llama.cpp's server (llama-cpp-python)
//! on two tiny Llama GGUFs (v1 and v2 weights), run through the agents'
//! `llamacpp` profile; their load and service times are their own.

use super::engine_fleet::{EngineAgent, EngineFleet};
use super::*;

pub(super) async fn rollout(
    cli: &Cli,
    rate: u64,
    seconds: u64,
    startup_ms: u64,
    service_ms: u64,
    engine: &str,
) -> anyhow::Result<()> {
    let files = tempfile::tempdir_in(&cli.base_dir)?;
    let profile = files.path().join("llama-agent.toml");
    // (engine, v1 artifact, v2 artifact)
    let (engine_name, artifacts) = match engine {
        "fake" => ("vllm", None),
        "llama" => {
            let python = talon_tests::llama::python()?;
            std::fs::write(&profile, talon_tests::llama::agent_profile(&python, ""))?;
            let v1 = talon_tests::llama::tiny_gguf(&python, files.path(), 1)?;
            let v2 = talon_tests::llama::tiny_gguf(&python, files.path(), 2)?;
            ("llamacpp", Some((v1, v2)))
        }
        other => anyhow::bail!("unknown engine {other:?}; use fake or llama"),
    };
    let profile_flags: Vec<&str> = match artifacts {
        Some(_) => vec!["--config", profile.to_str().context("utf-8 path")?],
        None => Vec::new(),
    };
    let fleet = EngineFleet::start(
        cli,
        &["r1", "r2"].map(|id| EngineAgent {
            id,
            gpus: "l4:1",
            engine_flags: format!("--service-ms {service_ms} --startup-ms {startup_ms}"),
            agent_flags: profile_flags.clone(),
        }),
    )
    .await?;
    let spec = |version: &str| {
        let mut s = model_spec("roll", engine_name, 4_000, 2);
        s.version = version.into();
        if let Some((v1, v2)) = &artifacts {
            let file = if version == "v1" { v1 } else { v2 };
            s.artifact_uri = format!("file://{}", file.display());
        }
        s
    };
    let (cluster, admin) = (&fleet.cluster, &fleet.admin);
    let all_ready = |version: &'static str| async move {
        let list = admin.list_replicas("roll").await.ok()?;
        (list.replicas.len() == 2
            && list
                .replicas
                .iter()
                .all(|r| r.version == version && r.state == "ready"))
        .then_some(())
    };
    admin.create_model(spec("v1")).await?;
    poll("v1 ready", Duration::from_secs(60), || all_ready("v1")).await?;
    let app = admin
        .create_credential("rollout-load", "inference", None)
        .await?;
    let url = format!("http://{}/v1/chat/completions", cluster.http_addr(0));
    let http = reqwest::Client::new();
    let body = Arc::new(
        json!({"model": "roll", "messages": [{"role": "user", "content": "steady load"}], "max_tokens": 8}),
    );
    // the load: one task per request, each recording when it was sent,
    // how long it took, and whether it was answered
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let load = {
        let (http, url, key, body) = (http.clone(), url.clone(), app.key.clone(), body.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            let end = t0 + Duration::from_secs(seconds);
            while Instant::now() < end {
                tick.tick().await;
                let (http, url, key, body) = (http.clone(), url.clone(), key.clone(), body.clone());
                tasks.spawn(async move {
                    let sent = t0.elapsed().as_secs_f64();
                    let t = Instant::now();
                    let ok = match http.post(&url).bearer_auth(&key).json(&*body).send().await {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    (sent, t.elapsed().as_secs_f64() * 1000.0, ok)
                });
            }
            let mut out = Vec::new();
            while let Some(r) = tasks.join_next().await {
                if let Ok(r) = r {
                    out.push(r);
                }
            }
            out
        }
    };
    let change = async {
        tokio::time::sleep(Duration::from_secs(seconds / 3)).await;
        let started = t0.elapsed().as_secs_f64();
        admin.create_model(spec("v2")).await?;
        poll("v2 alone, ready", Duration::from_secs(120), || {
            all_ready("v2")
        })
        .await?;
        anyhow::Ok((started, t0.elapsed().as_secs_f64()))
    };
    let (samples, window) = tokio::join!(load, change);
    let (from, to) = window?;
    drop(fleet);
    let part = |name: &str, keep: &dyn Fn(f64) -> bool| {
        let mut lat: Vec<f64> = samples
            .iter()
            .filter(|(s, _, ok)| keep(*s) && *ok)
            .map(|(_, l, _)| *l)
            .collect();
        lat.sort_by(f64::total_cmp);
        let failed = samples.iter().filter(|(s, _, ok)| keep(*s) && !*ok).count();
        json!({"window": name, "answered": lat.len(), "failed": failed,
            "p50_ms": percentile(&lat, 50.0), "p99_ms": percentile(&lat, 99.0)})
    };
    let rows = vec![
        part("before the change", &|s| s < from),
        part("during the change", &|s| s >= from && s < to),
        part("after the change", &|s| s >= to),
    ];
    let load_time = match engine {
        "fake" => format!("fake engines load in {startup_ms} ms"),
        _ => "llama.cpp engines (llama-cpp-python), their own load time".into(),
    };
    println!(
        "version change at {from:.1} s, only v2 serving at {to:.1} s ({:.1} s); {load_time}",
        to - from
    );
    println!("| window | answered | failed | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} |",
            r["window"].as_str().unwrap_or(""),
            r["answered"],
            r["failed"],
            r["p50_ms"].as_f64().unwrap_or(f64::NAN),
            r["p99_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    write_out(
        cli,
        "rollout.json",
        json!({"engine": engine, "rate": rate, "seconds": seconds, "startup_ms": startup_ms, "service_ms": service_ms,
            "change_at_s": from, "done_at_s": to, "rows": rows}),
    )
}
