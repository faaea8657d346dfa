//! The writers the Raft benchmarks drive (B2, B5a): the cheapest write
//! that goes through consensus on Talon and on etcd.

use std::collections::HashMap;
use std::time::Duration;

use talon_client::Client;
use tonic::transport::Channel;

use crate::clusters::{channel, talon_client, Kind};
use crate::etcdserverpb::kv_client::KvClient;
use crate::etcdserverpb::PutRequest;

/// A writer of 256-byte values through the cheapest write that goes
/// through consensus: a model label update on Talon, a Put on etcd.
pub enum Writer {
    Talon {
        client: Client,
        model: String,
    },
    Etcd {
        clients: Vec<KvClient<Channel>>,
        current: usize,
        key: Vec<u8>,
    },
}

impl Writer {
    /// A writer that talks to `addrs` (any member; the first is tried
    /// first). On Talon it registers its own model first.
    pub async fn new(
        kind: Kind,
        addrs: &[String],
        name: &str,
        key: &str,
    ) -> anyhow::Result<Writer> {
        match kind {
            Kind::Talon => {
                let client = talon_client(Client::new(addrs.to_vec())?)
                    .with_timeout(Duration::from_secs(5))
                    .with_key(key);
                let spec = talon_client::ModelSpec {
                    name: name.to_string(),
                    version: "v1".into(),
                    engine: "simulated".into(),
                    artifact_uri: format!("file:///bench/{name}"),
                    memory_mib: 1024,
                    latency_slo_ms: 100,
                    min_replicas: 0,
                    max_replicas: 1,
                    priority: "low".into(),
                    labels: HashMap::new(),
                };
                client.create_model(spec).await?;
                Ok(Writer::Talon {
                    client,
                    model: name.to_string(),
                })
            }
            Kind::Etcd => {
                let clients = addrs
                    .iter()
                    .map(|a| channel(a).map(KvClient::new))
                    .collect::<Result<_, _>>()?;
                Ok(Writer::Etcd {
                    clients,
                    current: 0,
                    key: format!("/bench/{name}").into_bytes(),
                })
            }
        }
    }

    /// One write of `value`; on etcd a failed write moves to the next member.
    pub async fn write(&mut self, value: &str) -> anyhow::Result<()> {
        match self {
            Writer::Talon { client, model } => {
                let set = HashMap::from([("payload".to_string(), value.to_string())]);
                client.update_model_labels(model, set, vec![]).await?;
                Ok(())
            }
            Writer::Etcd {
                clients,
                current,
                key,
            } => {
                let mut req = tonic::Request::new(PutRequest {
                    key: key.clone(),
                    value: value.as_bytes().to_vec(),
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(5));
                let n = clients.len();
                match clients[*current].put(req).await {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        *current = (*current + 1) % n;
                        Err(e.into())
                    }
                }
            }
        }
    }
}

/// Writers shared by many concurrent writes, for the failover benchmark: one
/// Talon SDK client that follows the leader, or etcd clients to every member
/// used in turn (a stock etcd client fails over the same way).
pub enum WriterPool {
    Talon { client: Client, model: String },
    Etcd { clients: Vec<KvClient<Channel>> },
}

impl WriterPool {
    pub async fn new(kind: Kind, addrs: &[String], key: &str) -> anyhow::Result<WriterPool> {
        match Writer::new(kind, addrs, "failover", key).await? {
            Writer::Talon { client, model } => Ok(WriterPool::Talon { client, model }),
            Writer::Etcd { clients, .. } => Ok(WriterPool::Etcd { clients }),
        }
    }

    /// Write number `n` (a 256-byte value).
    pub async fn write(&self, n: u64) -> anyhow::Result<()> {
        let value = format!("{n:0>256}");
        match self {
            WriterPool::Talon { client, model } => {
                let set = HashMap::from([("payload".to_string(), value)]);
                client.update_model_labels(model, set, vec![]).await?;
            }
            WriterPool::Etcd { clients } => {
                let mut c = clients[n as usize % clients.len()].clone();
                let mut req = tonic::Request::new(PutRequest {
                    key: format!("/bench/failover/{}", n % 64).into_bytes(),
                    value: value.into_bytes(),
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(10));
                c.put(req).await?;
            }
        }
        Ok(())
    }
}
