//! B4: telemetry ingest from many simulated agents (leader CPU and memory).

use super::*;

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
    super::proc_status_bytes(&pid.to_string(), "VmRSS")
}

/// Linux reports process CPU time in ticks of 1/100 s (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

pub(super) async fn b4(
    cli: &Cli,
    counts: &[usize],
    seconds: u64,
    per_connection: usize,
    watches: Option<(usize, u32)>,
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
        let load = match watches {
            Some((replicas, writes_per_s)) => {
                let writer = talon_client::Client::pinned(addr.clone())?
                    .with_key(cluster.admin_key().await?);
                Some(
                    super::watch::start(
                        &admin,
                        writer,
                        &connections,
                        &keys,
                        replicas,
                        writes_per_s,
                    )
                    .await?,
                )
            }
            None => None,
        };
        let (m0, w0) = load.as_ref().map_or((0, 0), |l| {
            (
                l.messages.load(Ordering::Relaxed),
                l.writes.load(Ordering::Relaxed),
            )
        });
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
        let watch = load.map(|l| {
            let row = json!({
                "replicas": l.placed, "placing_s": l.placing_s,
                "writes_per_s": (l.writes.load(Ordering::Relaxed) - w0) as f64 / elapsed,
                "assignment_messages": l.messages.load(Ordering::Relaxed) - m0,
            });
            l.stop();
            row
        });
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
            "watch": watch,
        });
        eprintln!("b4: {row}");
        rows.push(row);
    }
    println!("| agents | replicas | writes/s | assignment messages | reports/s | coordinator CPU (cores) | coordinator RSS MiB | staleness p50 ms | p99 ms | max ms | load generator CPU |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let w = &r["watch"];
        println!(
            "| {} | {} | {:.1} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            r["agents"],
            w["replicas"],
            w["writes_per_s"].as_f64().unwrap_or(0.0),
            w["assignment_messages"],
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
