//! `talon`: the command-line interface to a Talon cluster.
//!
//! Tables for people, `--json` for scripts. Exit status: 0 on success, 1 when
//! the cluster refused or failed the call, 2 on a usage error.

mod cert;
mod fleet;
mod keys;
mod output;
mod progress;
mod rules;
mod tenants;

use output::*;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use crate::{Client, ClientError, Member, ModelSpec};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "talon", version, about = "Operate a Talon cluster")]
struct Cli {
    /// Coordinator gRPC addresses, comma-separated; any member will do.
    #[arg(
        long,
        env = "TALON_ENDPOINTS",
        default_value = "127.0.0.1:7400",
        value_delimiter = ',',
        global = true
    )]
    endpoints: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of the call, retries included.
    #[arg(long, default_value_t = 10_000, global = true)]
    timeout_ms: u64,
    /// API key (talon_<id>_<secret>).
    #[arg(long, env = "TALON_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// Read the API key from this file (default: ~/.config/talon/key if it exists).
    #[arg(long, env = "TALON_KEY_FILE", global = true)]
    key_file: Option<std::path::PathBuf>,
    /// The cluster CA (PEM): speak TLS to the coordinators.
    #[arg(long, env = "TALON_CA_FILE", global = true)]
    ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The model registry.
    #[command(subcommand)]
    Model(ModelCmd),
    /// The audit log of admin changes.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// GPU nodes: inventory, state, telemetry, scheduling.
    #[command(subcommand)]
    Node(fleet::NodeCmd),
    /// Where the reconciler placed model replicas.
    #[command(subcommand)]
    Replica(fleet::ReplicaCmd),
    /// API keys and their roles (admin).
    #[command(subcommand)]
    Credential(keys::CredentialCmd),
    /// Tenants: allowed models, cluster-wide limits, budgets (admin).
    #[command(subcommand)]
    Tenant(tenants::TenantCmd),
    /// Inference keys of tenants: create, list, update, rotate, revoke (admin).
    #[command(subcommand)]
    Key(tenants::KeyCmd),
    /// What tenants, keys and models spent: requests, tokens, GPU-seconds, dollars.
    Usage(tenants::UsageArgs),
    /// The gateway's plugin chain: rules that route, split, fall back,
    /// break, deny, cap priority or mask PII, under conditions (admin).
    #[command(subcommand)]
    Chain(rules::ChainCmd),
    /// The principal and role of the key in use.
    Whoami,
    /// A cluster CA and certificates for coordinators, nodes and clients.
    #[command(subcommand)]
    Cert(cert::CertCmd),
    /// Send one request to a model through the gateway (gRPC).
    Infer {
        model: String,
        /// The user message (or the prompt with --completion).
        text: String,
        /// Print the answer as it is produced.
        #[arg(long)]
        stream: bool,
        /// A text completion of TEXT instead of a chat.
        #[arg(long)]
        completion: bool,
        #[arg(long, default_value_t = 0)]
        max_tokens: u32,
        /// critical, high, normal or low.
        #[arg(long, default_value = "")]
        priority: String,
    },
    /// Live per-model traffic of a coordinator (from its /metrics):
    /// requests and tokens per second, p50/p99 latency, replicas' load.
    Top {
        /// The coordinator's HTTP address (http_listen).
        #[arg(long, default_value = "127.0.0.1:7480")]
        http: String,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval_s: u64,
        /// Tables to show, then exit (0: until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        rounds: u32,
    },
    /// Run Talon here, in this process: a coordinator, simulated GPU hosts
    /// and a demo model, serving the OpenAI-compatible API.
    #[cfg(feature = "up")]
    Up(crate::up::UpArgs),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Bootstrap a new cluster on the first endpoint.
    Init {
        /// Other initial voters, as ID=HOST:PORT (repeatable).
        #[arg(long = "member", value_parser = parse_member)]
        members: Vec<Member>,
        /// Write the first admin key to this file (mode 0600) instead of
        /// printing it.
        #[arg(long)]
        save_key: Option<std::path::PathBuf>,
    },
    /// Add a node: it catches up as a learner, then becomes a voter.
    Join {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        addr: String,
        /// Stay a learner (no vote).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the cluster.
    Remove {
        #[arg(long)]
        node_id: u64,
    },
    /// Raft status as the first endpoint sees it.
    Status,
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Wait (showing progress) until the model's newest version has its
    /// minimum replicas ready.
    Wait {
        name: String,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Register a model, or a new version of an existing model.
    Create {
        name: String,
        #[arg(long)]
        version: String,
        /// simulated, vllm, sglang, llamacpp, tgi, triton or native.
        #[arg(long)]
        engine: String,
        /// Where the weights are, e.g. hf://org/model.
        #[arg(long)]
        artifact: String,
        /// GPU memory per replica (weights plus KV budget), MiB.
        #[arg(long)]
        memory_mib: u64,
        #[arg(long)]
        latency_slo_ms: u32,
        #[arg(long, default_value_t = 1)]
        min_replicas: u32,
        #[arg(long, default_value_t = 1)]
        max_replicas: u32,
        /// critical, high, normal or low.
        #[arg(long, default_value = "normal")]
        priority: String,
        /// KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// A model's spec, labels and — from the leader — its autoscaling:
    /// forecast, plan and why.
    #[command(alias = "show")]
    Get {
        name: String,
        /// Read through the leader, seeing every acknowledged write.
        #[arg(long)]
        linearizable: bool,
    },
    List {
        #[arg(long)]
        linearizable: bool,
    },
    /// Delete a model, or one version of it.
    Delete {
        name: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Set or remove labels.
    Label {
        name: String,
        #[arg(long = "set", value_parser = parse_label)]
        set: Vec<(String, String)>,
        #[arg(long = "remove")]
        remove: Vec<String>,
        /// Compare-and-set: change nothing unless this label has this value
        /// now (repeatable; the command fails with ABORTED otherwise).
        #[arg(long = "if", value_parser = parse_label)]
        expect: Vec<(String, String)>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    List {
        /// Only entries after this log index.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

fn parse_member(s: &str) -> Result<Member, String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=HOST:PORT"))?;
    let node_id = id
        .parse()
        .map_err(|_| format!("node id {id:?} in {s:?} is not a number"))?;
    Ok(Member {
        node_id,
        addr: addr.into(),
        voter: true,
        matched_index: None,
        raft_addr: String::new(),
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.into(), v.into()))
}

async fn execute(cli: Cli) -> Result<(), ClientError> {
    let json = cli.json;
    let timeout = Duration::from_millis(cli.timeout_ms);
    let key = keys::resolve(cli.key.clone(), cli.key_file.clone())
        .map_err(|e| ClientError::Status(tonic::Status::invalid_argument(e)))?;
    let ca = match &cli.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            ClientError::Status(tonic::Status::invalid_argument(format!(
                "cannot read --ca-file {}: {e}",
                path.display()
            )))
        })?),
        None => None,
    };
    let connect = |client: Client| match &ca {
        Some(ca) => client.with_tls(ca.clone()),
        None => client,
    };
    let client = connect(Client::new(cli.endpoints.clone())?)
        .with_timeout(timeout)
        .with_key(&key);
    match cli.command {
        Command::Cert(cmd) => {
            cert::run(cmd).map_err(|e| ClientError::Status(tonic::Status::invalid_argument(e)))?
        }
        Command::Credential(cmd) => keys::run(&client, cmd, json).await?,
        Command::Tenant(cmd) => tenants::tenant(&client, cmd, json).await?,
        Command::Key(cmd) => tenants::key(&client, cmd, json).await?,
        Command::Usage(args) => tenants::usage(&client, args, json).await?,
        Command::Chain(cmd) => rules::chain(&client, cmd, json).await?,
        Command::Whoami => {
            let me = client.who_am_i().await?;
            if json {
                println!(
                    "{}",
                    json!({"credential_id": me.credential_id, "principal": me.principal, "role": me.role, "authenticated": me.authenticated})
                );
            } else if me.authenticated {
                println!("{} ({}), role {}", me.principal, me.credential_id, me.role);
            } else {
                println!(
                    "authentication is off on this cluster: every caller is an anonymous admin"
                );
            }
        }
        Command::Cluster(cmd) => {
            let status = match cmd {
                ClusterCmd::Init { members, save_key } => {
                    let reply = connect(Client::pinned(cli.endpoints[0].clone())?)
                        .with_timeout(timeout)
                        .cluster_init(members)
                        .await?;
                    if let Err(e) =
                        keys::hand_out(&reply.admin_key, "the first admin", save_key.as_deref())
                    {
                        eprintln!("talon: {e}; printing the key instead:");
                        println!("{}", reply.admin_key);
                    }
                    reply.status.unwrap_or_default()
                }
                ClusterCmd::Join {
                    node_id,
                    addr,
                    learner,
                } => client.cluster_join(node_id, &addr, learner).await?,
                ClusterCmd::Remove { node_id } => client.cluster_remove(node_id).await?,
                ClusterCmd::Status => {
                    connect(Client::pinned(cli.endpoints[0].clone())?)
                        .with_timeout(timeout)
                        .cluster_status()
                        .await?
                }
            };
            if json {
                println!("{}", status_json(&status));
            } else {
                print_status(&status);
            }
        }
        Command::Model(cmd) => match cmd {
            ModelCmd::Create {
                name,
                version,
                engine,
                artifact,
                memory_mib,
                latency_slo_ms,
                min_replicas,
                max_replicas,
                priority,
                labels,
            } => {
                let spec = ModelSpec {
                    name,
                    version,
                    engine,
                    artifact_uri: artifact,
                    memory_mib,
                    latency_slo_ms,
                    min_replicas,
                    max_replicas,
                    priority,
                    labels: labels.into_iter().collect(),
                };
                let model = client.create_model(spec).await?;
                if json {
                    println!("{}", model_json(&model));
                } else {
                    print_models(&[model]);
                }
            }
            ModelCmd::Wait { name, timeout_s } => {
                progress::wait_ready(&client, &name, Duration::from_secs(timeout_s)).await?;
            }
            ModelCmd::Get { name, linearizable } => {
                let model = client.get_model(&name, linearizable).await?;
                if json {
                    println!("{}", model_json(&model));
                } else {
                    print_models(std::slice::from_ref(&model));
                    for (k, v) in &model.labels {
                        println!("label {k}={v}");
                    }
                    output::print_autoscale(&model);
                }
            }
            ModelCmd::List { linearizable } => {
                let models = client.list_models(linearizable).await?;
                if json {
                    println!("{}", Value::Array(models.iter().map(model_json).collect()));
                } else {
                    print_models(&models);
                }
            }
            ModelCmd::Delete { name, version } => {
                let revision = client.delete_model(&name, version.as_deref()).await?;
                if json {
                    println!(
                        "{}",
                        json!({"deleted": name, "version": version, "revision": revision})
                    );
                } else {
                    match version {
                        Some(v) => {
                            println!("deleted version {v} of model {name} at revision {revision}")
                        }
                        None => println!("deleted model {name} at revision {revision}"),
                    }
                }
            }
            ModelCmd::Label {
                name,
                set,
                remove,
                expect,
            } => {
                let set: HashMap<String, String> = set.into_iter().collect();
                let model = if expect.is_empty() {
                    client.update_model_labels(&name, set, remove).await?
                } else {
                    let expect = expect.into_iter().collect();
                    client
                        .update_model_labels_if(&name, expect, set, remove)
                        .await?
                };
                if json {
                    println!("{}", model_json(&model));
                } else {
                    for (k, v) in &model.labels {
                        println!("{k}={v}");
                    }
                }
            }
        },
        Command::Node(cmd) => fleet::node(&client, cmd, json).await?,
        #[cfg(feature = "up")]
        Command::Up(_) => unreachable!("handled above"),
        Command::Replica(cmd) => fleet::replica(&client, cmd, json).await?,
        Command::Top {
            http,
            interval_s,
            rounds,
        } => progress::top(&http, Duration::from_secs(interval_s.max(1)), rounds).await?,
        Command::Infer {
            model,
            text,
            stream,
            completion,
            max_tokens,
            priority,
        } => {
            let mut request = if completion {
                crate::InferRequest {
                    model,
                    prompt: text,
                    ..Default::default()
                }
            } else {
                crate::chat(&model, &text)
            };
            request.max_tokens = max_tokens;
            request.priority = priority;
            if stream {
                use std::io::Write;
                let mut chunks = client.infer_stream(request).await?;
                let mut out = std::io::stdout();
                while let Some(chunk) = chunks.message().await.map_err(ClientError::Status)? {
                    let _ = write!(out, "{}", chunk.text);
                    let _ = out.flush();
                }
                println!();
            } else {
                let reply = client.infer(request).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"id": reply.id, "model": reply.model, "text": reply.text,
                            "finish_reason": reply.finish_reason, "replica": reply.replica,
                            "usage": reply.usage.map(|u| serde_json::json!({"prompt_tokens": u.prompt_tokens,
                                "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}))})
                    );
                } else {
                    println!("{}", reply.text);
                }
            }
        }
        Command::Audit(AuditCmd::List { after, limit }) => {
            let entries = client.list_audit(after, limit).await?;
            if json {
                println!("{}", Value::Array(entries.iter().map(audit_json).collect()));
            } else {
                let rows = entries
                    .iter()
                    .map(|a| {
                        vec![
                            a.index.to_string(),
                            a.at_ms.to_string(),
                            a.actor.clone(),
                            a.action.clone(),
                            a.target.clone(),
                            a.detail.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["INDEX", "AT_MS", "ACTOR", "ACTION", "TARGET", "DETAIL"],
                    rows,
                );
            }
        }
    }
    Ok(())
}

/// Parses `talon`'s arguments as [`main`] does and runs nothing (what the
/// CLI's fuzz target drives).
pub fn parse_args<I, T>(args: I) -> Result<(), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args).map(|_| ())
}

/// The `talon` binary: parse the arguments, run the command, and map the
/// outcome to the exit status (0 done, 1 refused or failed, 2 usage).
#[tokio::main]
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "up")]
    let cli = match cli.command {
        Command::Up(args) => {
            return match crate::up::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("talon up: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        command => Cli { command, ..cli },
    };
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (ClientError::NoEndpoints | ClientError::BadEndpoint { .. })) => {
            eprintln!("talon: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("talon: {e}");
            ExitCode::from(1)
        }
    }
}
