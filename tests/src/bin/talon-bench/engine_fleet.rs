//! A one-coordinator Talon cluster whose agents run engine processes (the
//! fake engine), for the benchmarks that drive engines through the
//! gateway.

use super::*;

const TOKEN: &str = "bench-join-token-0123456789";

/// One agent: its node id, simulated GPUs, the fake engine's own flags,
/// and more agent flags.
pub(super) struct EngineAgent<'a> {
    pub id: &'a str,
    pub gpus: &'a str,
    pub engine_flags: String,
    pub agent_flags: Vec<&'a str>,
}

/// The cluster, an admin client, and the agents (stopped when dropped).
pub(super) struct EngineFleet {
    pub cluster: BenchCluster,
    pub admin: talon_client::Client,
    _agents: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl EngineFleet {
    /// Starts the coordinator and the agents, and waits until every agent's
    /// node is Ready.
    pub async fn start(cli: &Cli, agents: &[EngineAgent<'_>]) -> anyhow::Result<EngineFleet> {
        let bin = talon_bin_dir()?;
        let cluster = BenchCluster::start_n(
            Kind::Talon,
            1,
            &cli.base_dir,
            &bin,
            &["--join-token", TOKEN, "--telemetry-interval-ms", "500"],
        )
        .await?;
        let grpc = cluster.addr(0);
        let admin =
            talon_client::Client::pinned(grpc.clone())?.with_key(cluster.admin_key().await?);
        let dir = tempfile::tempdir_in(&cli.base_dir)?;
        let mut children = Vec::new();
        for a in agents {
            let listen = format!("127.0.0.1:{}", talon_tests::clusters::free_port());
            let engine = format!(
                "{} --port {{port}} --model {{model}} {}",
                bin.join("talon-fake-engine").display(),
                a.engine_flags
            );
            let credential = dir.path().join(format!("{}.credential", a.id));
            let logs = dir.path().join(format!("logs-{}", a.id));
            let mut args = vec![
                "--node-id",
                a.id,
                "--credential-file",
                credential.to_str().context("utf-8 path")?,
                "--coordinators",
                &grpc,
                "--join-token",
                TOKEN,
                "--sim-gpus",
                a.gpus,
                "--http-listen",
                &listen,
                "--engine-command",
                &engine,
                "--engine-log-dir",
                logs.to_str().context("utf-8 path")?,
                "--telemetry-interval-ms",
                "500",
            ];
            args.extend(a.agent_flags.iter().copied());
            children.push(spawn_quiet(&bin.join("talon-agent"), &args)?);
        }
        poll("every agent", Duration::from_secs(60), || async {
            let nodes = admin.list_nodes().await.ok()?;
            (nodes.iter().filter(|n| n.state == "ready").count() == agents.len()).then_some(())
        })
        .await?;
        Ok(EngineFleet {
            cluster,
            admin,
            _agents: children,
            _dir: dir,
        })
    }
}
