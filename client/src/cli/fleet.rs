//! `talon node` and `talon replica`: the fleet's hosts, their GPUs and
//! scheduling, and where replicas are placed.

use std::time::Duration;

use crate::{Client, ClientError};
use clap::Subcommand;
use serde_json::{json, Value};

use super::output::*;
use super::progress;

#[derive(Subcommand)]
pub enum ReplicaCmd {
    List {
        /// Only this model's replicas.
        #[arg(long, default_value = "")]
        model: String,
    },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Every node with its GPUs, MIG devices, memory, utilization and state.
    List,
    /// One node in detail.
    Show { node_id: String },
    /// Place no new work on the node.
    Cordon { node_id: String },
    /// Allow new work on the node again (ends a drain).
    Uncordon { node_id: String },
    /// Cordon the node and move its work elsewhere.
    Drain {
        node_id: String,
        /// Wait (showing progress) until every replica has moved off.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Forget a node that is down or drained: its record, replicas and
    /// agent credential (it must join again to come back).
    Remove { node_id: String },
}

pub async fn node(client: &Client, cmd: NodeCmd, json: bool) -> Result<(), ClientError> {
    let node = match cmd {
        NodeCmd::List => {
            let nodes = client.list_nodes().await?;
            if json {
                println!("{}", Value::Array(nodes.iter().map(node_json).collect()));
            } else {
                print_nodes(&nodes);
            }
            return Ok(());
        }
        NodeCmd::Show { node_id } => client.get_node(&node_id).await?,
        NodeCmd::Cordon { node_id } => client.set_node_scheduling(&node_id, "cordon").await?,
        NodeCmd::Uncordon { node_id } => client.set_node_scheduling(&node_id, "uncordon").await?,
        NodeCmd::Drain {
            node_id,
            wait,
            timeout_s,
        } => {
            let node = client.set_node_scheduling(&node_id, "drain").await?;
            if wait {
                progress::wait_drained(&client, &node_id, Duration::from_secs(timeout_s)).await?;
                return Ok(());
            }
            node
        }
        NodeCmd::Remove { node_id } => {
            let revision = client.remove_node(&node_id).await?;
            println!("removed node {node_id} (revision {revision})");
            return Ok(());
        }
    };
    if json {
        println!("{}", node_json(&node));
    } else {
        print_node(&node);
    }
    Ok(())
}

pub async fn replica(client: &Client, cmd: ReplicaCmd, json: bool) -> Result<(), ClientError> {
    let ReplicaCmd::List { model } = cmd;
    let list = client.list_replicas(&model).await?;
    if json {
        let replicas: Vec<Value> = list
                    .replicas
                    .iter()
                    .map(|r| json!({"id": r.id, "model": r.model, "version": r.version, "node_id": r.node_id,
                        "gpu": r.gpu, "gpus": r.gpus, "mig_device": r.mig_device, "mig_slice": r.mig_slice, "stages": r.stages,
                        "pipeline": r.pipeline.as_ref().map(|p| json!({"head": p.head, "index": p.index, "count": p.count, "first_layer": p.first_layer, "layers": p.layers})),
                        "milli": r.milli, "memory_mib": r.memory_mib,
                        "revision": r.revision, "state": r.state}))
                    .collect();
        println!(
            "{}",
            json!({"replicas": replicas, "unplaced": list.unplaced})
        );
    } else {
        let rows = list
            .replicas
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.node_id.clone(),
                    gpus_cell(r),
                    r.milli.to_string(),
                    r.memory_mib.to_string(),
                    if r.state.is_empty() {
                        "-".into()
                    } else {
                        r.state.clone()
                    },
                ]
            })
            .collect();
        table(
            &["REPLICA", "NODE", "GPUS", "MILLI", "MEMORY_MIB", "STATE"],
            rows,
        );
        for u in &list.unplaced {
            println!("unplaced: {u}");
        }
    }
    Ok(())
}

/// A replica's GPUs for the table: `0`, `0+1` (a tensor-parallel group),
/// `0>1` (a pipeline from GPU 0 to GPU 1),
/// `0:MIG-…` (a MIG device of GPU 0); a stage of a pipeline across nodes
/// leads with its place in it: `2/3 L40-79 0+1`.
fn gpus_cell(r: &talon_proto::v1::Replica) -> String {
    let gpus: Vec<String> = if r.gpus.is_empty() {
        vec![r.gpu.to_string()]
    } else {
        r.gpus.iter().map(u32::to_string).collect()
    };
    let mut cell = gpus.join(if r.stages > 1 { ">" } else { "+" });
    if let Some(p) = &r.pipeline {
        cell = format!(
            "{}/{} L{}-{} {cell}",
            p.index + 1,
            p.count,
            p.first_layer,
            (p.first_layer + p.layers).saturating_sub(1)
        );
    }
    for mig in [&r.mig_device, &r.mig_slice] {
        if !mig.is_empty() {
            cell.push(':');
            cell.push_str(mig);
        }
    }
    cell
}
