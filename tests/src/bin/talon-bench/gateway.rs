//! B3 (gateway overhead against nginx and LiteLLM) and B5b (node loss under load).

use super::*;

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
pub(super) async fn open_loop(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    model: &str,
    rate: u64,
    seconds: u64,
) -> (Vec<f64>, u64, u64) {
    // Deterministic (temperature 0) and each one different, across every
    // run of this process: a gateway with a response cache looks every
    // one up and keeps every answer (its miss path), none is a hit.
    static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let model = Arc::new(model.to_string());
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tick.tick().await;
        let n = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (http, url, key, model) = (
            http.clone(),
            url.to_string(),
            key.to_string(),
            model.clone(),
        );
        tasks.spawn(async move {
            let body = json!({"model": &*model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": format!("hello from the load generator, request {n}")}]});
            let t = Instant::now();
            match http.post(&url).bearer_auth(&key).json(&body).send().await {
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

/// The chain of the policies-on door: a header deny and an off-hours
/// route that never apply (their conditions are checked), and a priority
/// cap, a fallback list and a model breaker that apply to every request.
async fn bench_chain(admin: &talon_client::Client, model: &str) -> anyhow::Result<()> {
    use talon_client::chain::Rule;
    let rule = |name: &str, priority: u32, action: &str| Rule {
        name: name.into(),
        priority,
        action: action.into(),
        ..Default::default()
    };
    let rules = [
        Rule {
            header_name: "x-team".into(),
            header_value: "ads".into(),
            message: "not here".into(),
            ..rule("no-ads", 10, "deny")
        },
        Rule {
            models: vec![model.into()],
            priorities: vec!["low".into()],
            hours: "03:00-03:01".into(),
            to_models: vec!["elsewhere".into()],
            ..rule("night-route", 20, "route")
        },
        Rule {
            message: "normal".into(),
            ..rule("cap", 30, "cap-priority")
        },
        Rule {
            models: vec![model.into()],
            to_models: vec!["backup".into()],
            ..rule("fallback", 40, "fallback")
        },
        Rule {
            models: vec![model.into()],
            failures: 5,
            open_s: 30,
            ..rule("breaker", 50, "breaker")
        },
    ];
    for r in rules {
        admin.put_rule(r).await?;
    }
    Ok(())
}

pub(super) async fn b3(
    cli: &Cli,
    service_ms: &[u64],
    rates: &[u64],
    seconds: u64,
    doors: &[String],
    engine: &str,
) -> anyhow::Result<()> {
    const TOKEN: &str = "bench-join-token-0123456789";
    let bin = talon_bin_dir()?;
    let dir = tempfile::Builder::new()
        .prefix("b3")
        .tempdir_in(&cli.base_dir)?;
    // The real engine: llama.cpp's server (llama-cpp-python) on a tiny
    // Llama; its service time is its own, so one pass.
    let llama = match engine {
        "fake" => None,
        "llama" => {
            let python = talon_tests::llama::python()?;
            let gguf = talon_tests::llama::tiny_gguf(&python, dir.path(), 7)?;
            Some((python, gguf))
        }
        other => anyhow::bail!("unknown engine {other:?}; use fake or llama"),
    };
    let service_ms: &[u64] = if llama.is_some() { &[0] } else { service_ms };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut rows = Vec::new();
    for &svc in service_ms {
        let engine_port = talon_tests::clusters::free_port();
        let svc_arg = svc.to_string();
        let _engine = match &llama {
            Some((python, gguf)) => {
                let args = talon_tests::llama::server_args(gguf, "bench", engine_port);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                spawn_quiet(python, &args)?
            }
            None => spawn_quiet(
                &bin.join("talon-fake-engine"),
                &[
                    "--port",
                    &engine_port.to_string(),
                    "--model",
                    "bench",
                    "--service-ms",
                    &svc_arg,
                ],
            )?,
        };
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
                "talon" | "talon-policies" | "talon-policies-3" => {
                    // talon-policies-3: three coordinators, the load on a
                    // follower, whose limits are lent by the leader
                    let size = if door == "talon-policies-3" { 3 } else { 1 };
                    let cluster = BenchCluster::start_n(
                        Kind::Talon,
                        size,
                        &cli.base_dir,
                        &bin,
                        &["--join-token", TOKEN],
                    )
                    .await?;
                    let grpc = cluster.addr(0);
                    let coordinators = cluster.addrs().join(",");
                    let listen = format!("127.0.0.1:{}", talon_tests::clusters::free_port());
                    let engine = format!(
                        "{} --port {{port}} --model {{model}} --service-ms {svc}",
                        bin.join("talon-fake-engine").display()
                    );
                    let logs = dir.path().join(format!("engine-logs-{svc}"));
                    // the same engine, run by the agent through its profile
                    let profile = dir.path().join("llama-agent.toml");
                    let engine_flags: Vec<String> = match &llama {
                        Some((python, _)) => {
                            std::fs::write(
                                &profile,
                                talon_tests::llama::agent_profile(python, ""),
                            )?;
                            vec!["--config".into(), profile.display().to_string()]
                        }
                        None => vec!["--engine-command".into(), engine],
                    };
                    let credential = dir.path().join(format!("b3-{svc}.credential"));
                    let mut agent_args = vec![
                        "--node-id",
                        "b3",
                        "--credential-file",
                        credential.to_str().context("utf-8 path")?,
                        "--coordinators",
                        &coordinators,
                        "--join-token",
                        TOKEN,
                        "--sim-gpus",
                        "l4:1",
                        "--http-listen",
                        &listen,
                        "--engine-log-dir",
                        logs.to_str().context("utf-8 path")?,
                    ];
                    agent_args.extend(engine_flags.iter().map(String::as_str));
                    keep.push(spawn_quiet(&bin.join("talon-agent"), &agent_args)?);
                    let admin =
                        talon_client::Client::pinned(grpc)?.with_key(cluster.admin_key().await?);
                    poll("the agent", Duration::from_secs(30), || async {
                        admin.get_node("b3").await.ok()
                    })
                    .await?;
                    let mut spec = model_spec("bench", "vllm", 4_000, 1);
                    if let Some((_, gguf)) = &llama {
                        spec.engine = "llamacpp".into();
                        spec.artifact_uri = format!("file://{}", gguf.display());
                    }
                    admin.create_model(spec).await?;
                    // The load comes with an inference key, as applications' does;
                    // with policies, a tenant's key under cluster-wide limits
                    // (never reached), PII masking, the response cache on
                    // (every request a miss) and five chain rules, three of
                    // which apply to every request.
                    let key = if door.starts_with("talon-policies") {
                        bench_chain(&admin, "bench").await?;
                        let limits = talon_client::Limits {
                            requests_per_minute: Some(100_000_000),
                            tokens_per_minute: Some(1_000_000_000_000),
                            daily_budget_usd: Some(1e9),
                            monthly_budget_usd: None,
                        };
                        admin
                            .put_tenant(talon_client::Tenant {
                                name: "bench".into(),
                                limits: Some(limits.clone()),
                                mask_pii: true,
                                cache_ttl_s: 60,
                                ..Default::default()
                            })
                            .await?;
                        admin
                            .create_key(talon_client::CreateKeyRequest {
                                tenant: "bench".into(),
                                name: "load".into(),
                                models: vec![],
                                max_priority: "normal".into(),
                                limits: Some(limits),
                            })
                            .await?
                            .secret
                    } else {
                        admin
                            .create_credential("b3-load", "inference", None)
                            .await?
                            .key
                    };
                    let serve_on = if size > 1 {
                        let leader = cluster.leader(None).await?;
                        (leader + 1) % size
                    } else {
                        0
                    };
                    urls.push((
                        door.clone(),
                        format!(
                            "http://{}/v1/chat/completions",
                            cluster.http_addr(serve_on)
                        ),
                        key,
                    ));
                    clusters.push(cluster);
                }
                other => anyhow::bail!(
                    "unknown front door {other:?}; use direct, nginx, litellm, talon, talon-policies or talon-policies-3"
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
                let row = json!({"engine": engine, "service_ms": svc, "door": door, "rate": rate, "answered": lat.len(), "failed": failed,
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
        json!({"bench": "B3", "engine": engine, "seconds": seconds, "rows": rows}),
    )
}

pub(super) async fn b5b(cli: &Cli, trials: usize, rate: u64, flags: &str) -> anyhow::Result<()> {
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
