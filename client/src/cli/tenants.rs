//! `talon tenant`, `talon key` and `talon usage`: tenants with limits and
//! budgets, their inference keys, and what they spent.

use std::path::PathBuf;

use crate::{
    Client, ClientError, CreateKeyRequest, GetUsageRequest, Key, Limits, Tenant, UpdateKeyRequest,
};
use clap::{Args, Subcommand};
use serde_json::json;

/// Limits and budgets; unset: no limit.
#[derive(Args, Clone, Default)]
pub struct LimitArgs {
    /// Requests per minute (cluster-wide).
    #[arg(long)]
    rpm: Option<u32>,
    /// Prompt + completion tokens per minute (cluster-wide).
    #[arg(long)]
    tpm: Option<u64>,
    /// US dollars per UTC day.
    #[arg(long)]
    daily_budget: Option<f64>,
    /// US dollars per UTC month.
    #[arg(long)]
    monthly_budget: Option<f64>,
}

impl LimitArgs {
    fn wire(&self) -> Limits {
        Limits {
            requests_per_minute: self.rpm,
            tokens_per_minute: self.tpm,
            daily_budget_usd: self.daily_budget,
            monthly_budget_usd: self.monthly_budget,
        }
    }
}

#[derive(Subcommand)]
pub enum TenantCmd {
    /// Create a tenant, or replace its models and limits.
    Put {
        name: String,
        /// Models its keys may use (comma-separated; default: every model).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[command(flatten)]
        limits: LimitArgs,
        /// Mask PII in its prompts and answers.
        #[arg(long)]
        mask_pii: bool,
        /// Cache its deterministic answers this many seconds (0: off).
        #[arg(long, default_value_t = 0)]
        cache_ttl: u32,
        /// Refuse prompts and withhold answers that match this regular
        /// expression (repeatable; `(?i)` for any case).
        #[arg(long)]
        block: Vec<String>,
        /// Replace what this regular expression matches by [FILTERED]
        /// (repeatable).
        #[arg(long)]
        mask: Vec<String>,
    },
    /// Every tenant with its limits and spending.
    List,
    /// Delete a tenant that holds no keys.
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Make an inference key of a tenant; the secret is shown once.
    Create {
        /// tenant/name, e.g. acme/search.
        key: String,
        /// Models it may use within its tenant's (comma-separated).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// The highest priority its requests may ask for.
        #[arg(long, default_value = "normal")]
        max_priority: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Write the key to this file (mode 0600) instead of printing it.
        #[arg(long)]
        save_key: Option<PathBuf>,
    },
    /// Keys (of one tenant with --tenant), never secrets.
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Replace a key's models, priority ceiling and limits.
    Update {
        id: String,
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long, default_value = "normal")]
        max_priority: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// A new secret for a key; the old one stops working at once.
    Rotate {
        id: String,
        #[arg(long)]
        save_key: Option<PathBuf>,
    },
    /// Revoke a key on every coordinator.
    Revoke { id: String },
}

#[derive(Args)]
pub struct UsageArgs {
    #[arg(long, default_value = "")]
    tenant: String,
    /// A key's name (within --tenant).
    #[arg(long, default_value = "")]
    key: String,
    #[arg(long, default_value = "")]
    model: String,
    /// Days back, today included.
    #[arg(long, default_value_t = 31)]
    days: u32,
}

/// A list of models, or `none` when it is empty.
fn models_cell(models: &[String], none: &str) -> String {
    if models.is_empty() {
        none.to_string()
    } else {
        models.join(",")
    }
}

fn money(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("${v:.2}"))
}

fn limits_cell(l: &Option<Limits>) -> String {
    let l = l.clone().unwrap_or_default();
    format!(
        "rpm={} tpm={} day={} month={}",
        l.requests_per_minute.map_or("-".into(), |v| v.to_string()),
        l.tokens_per_minute.map_or("-".into(), |v| v.to_string()),
        money(l.daily_budget_usd),
        money(l.monthly_budget_usd)
    )
}

fn limits_json(l: &Option<Limits>) -> serde_json::Value {
    let l = l.clone().unwrap_or_default();
    json!({"requests_per_minute": l.requests_per_minute, "tokens_per_minute": l.tokens_per_minute,
        "daily_budget_usd": l.daily_budget_usd, "monthly_budget_usd": l.monthly_budget_usd})
}

fn key_json(k: &Key) -> serde_json::Value {
    json!({"id": k.id, "tenant": k.tenant, "name": k.name, "models": k.models,
        "max_priority": k.max_priority, "limits": limits_json(&k.limits),
        "spent_today_usd": k.spent_today_usd, "spent_month_usd": k.spent_month_usd,
        "revision": k.revision})
}

fn print_keys(keys: &[Key], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::Value::Array(keys.iter().map(key_json).collect())
        );
        return;
    }
    println!(
        "{:<18} {:<28} {:<9} {:<20} {:<44} TODAY/MONTH",
        "ID", "KEY", "MAX_PRIO", "MODELS", "LIMITS"
    );
    for k in keys {
        let models = models_cell(&k.models, "(tenant's)");
        println!(
            "{:<18} {:<28} {:<9} {:<20} {:<44} ${:.4}/${:.4}",
            k.id,
            format!("{}/{}", k.tenant, k.name),
            k.max_priority,
            models,
            limits_cell(&k.limits),
            k.spent_today_usd,
            k.spent_month_usd
        );
    }
}

pub async fn tenant(client: &Client, cmd: TenantCmd, json: bool) -> Result<(), ClientError> {
    match cmd {
        TenantCmd::Put {
            name,
            models,
            limits,
            mask_pii,
            cache_ttl,
            block,
            mask,
        } => {
            let filter = |action: &'static str, pattern: String| crate::ContentFilter {
                pattern,
                action: action.into(),
            };
            let mut filters: Vec<_> = block.into_iter().map(|p| filter("block", p)).collect();
            filters.extend(mask.into_iter().map(|p| filter("mask", p)));
            let t = client
                .put_tenant(Tenant {
                    name,
                    models,
                    mask_pii,
                    cache_ttl_s: cache_ttl,
                    filters,
                    limits: Some(limits.wire()),
                    ..Default::default()
                })
                .await?;
            println!(
                "tenant {} (revision {}): {}",
                t.name,
                t.revision,
                limits_cell(&t.limits)
            );
        }
        TenantCmd::List => {
            let list = client.list_tenants().await?;
            if json {
                let all: Vec<_> = list
                    .iter()
                    .map(|t| {
                        json!({"name": t.name, "models": t.models, "limits": limits_json(&t.limits),
                        "spent_today_usd": t.spent_today_usd, "spent_month_usd": t.spent_month_usd})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(all));
                return Ok(());
            }
            println!(
                "{:<20} {:<24} {:<44} TODAY/MONTH",
                "TENANT", "MODELS", "LIMITS"
            );
            for t in &list {
                let models = models_cell(&t.models, "*");
                println!(
                    "{:<20} {:<24} {:<44} ${:.4}/${:.4}",
                    t.name,
                    models,
                    limits_cell(&t.limits),
                    t.spent_today_usd,
                    t.spent_month_usd
                );
            }
        }
        TenantCmd::Delete { name } => {
            let revision = client.delete_tenant(&name).await?;
            println!("deleted tenant {name} (revision {revision})");
        }
    }
    Ok(())
}

fn hand_out(
    made: crate::CreateKeyResponse,
    save: Option<&std::path::Path>,
) -> Result<(), ClientError> {
    let k = made.key.unwrap_or_default();
    eprintln!("key {} is {}/{}", k.id, k.tenant, k.name);
    super::keys::hand_out(&made.secret, "the new", save).map_err(|e| {
        eprintln!(
            "talon: {e}; the key was not saved: revoke key {} and make another",
            k.id
        );
        ClientError::Status(tonic::Status::aborted(e))
    })
}

pub async fn key(client: &Client, cmd: KeyCmd, json: bool) -> Result<(), ClientError> {
    match cmd {
        KeyCmd::Create {
            key,
            models,
            max_priority,
            limits,
            save_key,
        } => {
            let Some((tenant, name)) = key.split_once('/') else {
                return Err(ClientError::Status(tonic::Status::invalid_argument(
                    format!("key {key:?} must read tenant/name, e.g. acme/search"),
                )));
            };
            let made = client
                .create_key(CreateKeyRequest {
                    tenant: tenant.into(),
                    name: name.into(),
                    models,
                    max_priority,
                    limits: Some(limits.wire()),
                })
                .await?;
            hand_out(made, save_key.as_deref())?;
        }
        KeyCmd::List { tenant } => print_keys(&client.list_keys(&tenant).await?, json),
        KeyCmd::Update {
            id,
            models,
            max_priority,
            limits,
        } => {
            let k = client
                .update_key(UpdateKeyRequest {
                    id,
                    models,
                    max_priority,
                    limits: Some(limits.wire()),
                })
                .await?;
            print_keys(&[k], json);
        }
        KeyCmd::Rotate { id, save_key } => {
            let made = client.rotate_key(&id).await?;
            hand_out(made, save_key.as_deref())?;
            eprintln!("the old key {id} no longer works");
        }
        KeyCmd::Revoke { id } => {
            let revision = client.revoke_credential(&id).await?;
            println!("revoked key {id} (revision {revision})");
        }
    }
    Ok(())
}

pub async fn usage(client: &Client, args: UsageArgs, json: bool) -> Result<(), ClientError> {
    let rows = client
        .usage(GetUsageRequest {
            tenant: args.tenant,
            key: args.key,
            model: args.model,
            days: args.days,
        })
        .await?;
    if json {
        let all: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({"day": r.day, "tenant": r.tenant, "key": r.key, "model": r.model,
                "requests": r.requests, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens, "gpu_seconds": r.gpu_seconds,
                "cost_usd": r.cost_usd})
            })
            .collect();
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    println!(
        "{:<11} {:<16} {:<16} {:<16} {:>9} {:>11} {:>11} {:>10} {:>10}",
        "DAY", "TENANT", "KEY", "MODEL", "REQUESTS", "PROMPT_TOK", "COMPL_TOK", "GPU_S", "COST"
    );
    let mut total = 0.0;
    for r in &rows {
        total += r.cost_usd;
        println!(
            "{:<11} {:<16} {:<16} {:<16} {:>9} {:>11} {:>11} {:>10.2} {:>10}",
            r.day,
            r.tenant,
            r.key,
            r.model,
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.gpu_seconds,
            format!("${:.4}", r.cost_usd)
        );
    }
    println!("total ${total:.4}");
    Ok(())
}
