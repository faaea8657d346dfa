//! B4's watch load: replicas placed over the simulated fleet, one
//! assignment watch per agent (as every real agent holds one), and a
//! steady trickle of Raft writes that concern none of them — the leader
//! work that must not grow with agents × replicas.

use super::*;

use talon_proto::v1 as pb;
use talon_proto::v1::agent_service_client::AgentServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// What runs during the measured window.
pub(super) struct WatchLoad {
    /// Assignment messages the agents received.
    pub messages: Arc<AtomicU64>,
    /// Writes committed by the trickle.
    pub writes: Arc<AtomicU64>,
    pub placed: usize,
    pub placing_s: f64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WatchLoad {
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Places `replicas` replicas (models of at most 10,000 each) and waits
/// until the reconciler has put them all on nodes; opens a watch per agent
/// and waits until each has its first answer; starts `writes_per_s` label
/// writes a second on a model with no replicas, through `writer`.
pub(super) async fn start(
    admin: &talon_client::Client,
    writer: talon_client::Client,
    connections: &[AgentServiceClient<Channel>],
    keys: &HashMap<String, MetadataValue<Ascii>>,
    replicas: usize,
    writes_per_s: u32,
) -> anyhow::Result<WatchLoad> {
    let started = Instant::now();
    let models = replicas.div_ceil(10_000);
    for m in 0..models {
        let count = (replicas - m * 10_000).min(10_000) as u32;
        let mut spec = talon_tests::model_spec(&format!("b4-fleet-{m}"), "simulated", 4096, count);
        spec.max_replicas = count;
        admin.create_model(spec).await?;
    }
    eprintln!("b4: placing {replicas} replicas");
    let placed = poll("every replica placed", Duration::from_secs(600), || async {
        let mut placed = 0;
        for m in 0..models {
            let r = admin.list_replicas(&format!("b4-fleet-{m}")).await.ok()?;
            placed += r.replicas.iter().filter(|r| !r.node_id.is_empty()).count();
        }
        (placed >= replicas).then_some(placed)
    })
    .await?;
    let placing_s = started.elapsed().as_secs_f64();
    eprintln!("b4: {placed} replicas placed in {placing_s:.1} s; opening watches");

    let messages = Arc::new(AtomicU64::new(0));
    let first = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, (node, key)) in keys.iter().enumerate() {
        let mut client = connections[i % connections.len()].clone();
        let (node, key) = (node.clone(), key.clone());
        let (messages, first) = (messages.clone(), first.clone());
        tasks.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(pb::WatchAssignmentsRequest { node_id: node });
            request.metadata_mut().insert("authorization", key);
            let Ok(stream) = client.watch_assignments(request).await else {
                return;
            };
            let mut stream = stream.into_inner();
            let mut seen = false;
            while let Ok(Some(_)) = stream.message().await {
                if !seen {
                    seen = true;
                    first.fetch_add(1, Ordering::Relaxed);
                }
                messages.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let n = keys.len() as u64;
    poll("every watch answered", Duration::from_secs(300), || async {
        (first.load(Ordering::Relaxed) >= n).then_some(())
    })
    .await?;

    let mut spec = talon_tests::model_spec("b4-writes", "simulated", 1024, 0);
    spec.max_replicas = 1;
    admin.create_model(spec).await?;
    let writes = Arc::new(AtomicU64::new(0));
    if writes_per_s > 0 {
        let writes = writes.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(writes_per_s)));
            for n in 0u64.. {
                tick.tick().await;
                let set = HashMap::from([("n".to_string(), n.to_string())]);
                if writer
                    .update_model_labels("b4-writes", set, vec![])
                    .await
                    .is_ok()
                {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    Ok(WatchLoad {
        messages,
        writes,
        placed,
        placing_s,
        tasks,
    })
}
