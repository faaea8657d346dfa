//! `talon chain`: the gateway's plugin chain — list it, put a rule,
//! delete one.

use crate::chain::Rule;
use crate::{Client, ClientError};
use clap::{Args, Subcommand};
use serde_json::json;

/// When a rule applies; every condition given must hold.
#[derive(Args, Clone, Default)]
pub struct WhenArgs {
    /// Requests for these models (comma-separated).
    #[arg(long = "model", value_delimiter = ',')]
    models: Vec<String>,
    /// Requests by keys of these tenants (comma-separated).
    #[arg(long = "tenant", value_delimiter = ',')]
    tenants: Vec<String>,
    /// Requests at these priorities (critical, high, normal, low).
    #[arg(long = "priority-class", value_delimiter = ',')]
    priorities: Vec<String>,
    /// Requests with this header value, NAME=VALUE (name in lowercase).
    #[arg(long)]
    header: Option<String>,
    /// Requests inside this time of day, HH:MM-HH:MM (wraps past midnight).
    #[arg(long)]
    hours: Option<String>,
    /// Minutes east of UTC the hours are in (480 for UTC+8).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    utc_offset: i32,
}

/// What the rule does: exactly one.
#[derive(Args, Clone, Default)]
#[group(required = true, multiple = false)]
pub struct ActionArgs {
    /// Send the request to this model instead.
    #[arg(long)]
    route_to: Option<String>,
    /// MODEL:PERCENT — send that share of the requests to the model.
    #[arg(long)]
    split: Option<String>,
    /// When the model cannot serve it, try these models in order.
    #[arg(long, value_delimiter = ',')]
    fallback: Option<Vec<String>>,
    /// FAILURES/SECONDS — open the model's breaker after that many
    /// failures in a row, for that long.
    #[arg(long)]
    breaker: Option<String>,
    /// Refuse the request with this message.
    #[arg(long)]
    deny: Option<String>,
    /// Run the request at this priority at most.
    #[arg(long)]
    cap_priority: Option<String>,
    /// Mask PII in the prompt and answer.
    #[arg(long)]
    mask_pii: bool,
}

#[derive(Subcommand)]
pub enum ChainCmd {
    /// The chain in the order it runs, built-in plugins included.
    List,
    /// Create or replace a rule.
    Put {
        name: String,
        /// 0 to 999, lower first (keys 100, guardrails 200, limits 300).
        #[arg(long)]
        priority: u32,
        #[command(flatten)]
        when: WhenArgs,
        #[command(flatten)]
        action: ActionArgs,
    },
    /// Delete a rule.
    Delete { name: String },
}

fn bad(message: String) -> ClientError {
    ClientError::Status(tonic::Status::invalid_argument(message))
}

/// The wire rule the arguments describe.
fn rule(name: String, priority: u32, w: WhenArgs, a: ActionArgs) -> Result<Rule, ClientError> {
    let (header_name, header_value) = match &w.header {
        None => (String::new(), String::new()),
        Some(h) => {
            let (n, v) = h.split_once('=').ok_or_else(|| {
                bad(format!(
                    "--header {h:?} is not NAME=VALUE (for example x-team=batch)"
                ))
            })?;
            (n.to_string(), v.to_string())
        }
    };
    let mut rule = Rule {
        name,
        priority,
        models: w.models,
        tenants: w.tenants,
        priorities: w.priorities,
        header_name,
        header_value,
        hours: w.hours.unwrap_or_default(),
        utc_offset_minutes: w.utc_offset,
        ..Default::default()
    };
    if let Some(m) = a.route_to {
        rule.action = "route".into();
        rule.to_models = vec![m];
    } else if let Some(s) = a.split {
        let parsed = s
            .rsplit_once(':')
            .and_then(|(m, p)| Some((m.to_string(), p.parse::<u32>().ok()?)));
        let (m, p) = parsed.ok_or_else(|| {
            bad(format!(
                "--split {s:?} is not MODEL:PERCENT (for example small:10)"
            ))
        })?;
        rule.action = "split".into();
        rule.to_models = vec![m];
        rule.percent = p;
    } else if let Some(models) = a.fallback {
        rule.action = "fallback".into();
        rule.to_models = models;
    } else if let Some(b) = a.breaker {
        let parsed = b
            .split_once('/')
            .and_then(|(f, s)| Some((f.parse().ok()?, s.trim_end_matches('s').parse().ok()?)));
        let (f, s) = parsed.ok_or_else(|| {
            bad(format!(
                "--breaker {b:?} is not FAILURES/SECONDS (for example 5/30)"
            ))
        })?;
        rule.action = "breaker".into();
        rule.failures = f;
        rule.open_s = s;
    } else if let Some(m) = a.deny {
        rule.action = "deny".into();
        rule.message = m;
    } else if let Some(p) = a.cap_priority {
        rule.action = "cap-priority".into();
        rule.message = p;
    } else if a.mask_pii {
        rule.action = "mask-pii".into();
    }
    Ok(rule)
}

pub async fn chain(client: &Client, cmd: ChainCmd, json: bool) -> Result<(), ClientError> {
    match cmd {
        ChainCmd::List => {
            let entries = client.list_chain().await?;
            if json {
                let all: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        json!({"priority": e.priority, "name": e.name, "kind": e.kind,
                               "what": e.what, "when": e.when})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(all));
                return Ok(());
            }
            println!(
                "{:<9} {:<24} {:<8} {:<44} WHEN",
                "PRIORITY", "NAME", "KIND", "WHAT"
            );
            for e in &entries {
                println!(
                    "{:<9} {:<24} {:<8} {:<44} {}",
                    e.priority, e.name, e.kind, e.what, e.when
                );
            }
        }
        ChainCmd::Put {
            name,
            priority,
            when,
            action,
        } => {
            let r = client.put_rule(rule(name, priority, when, action)?).await?;
            println!(
                "rule {} (revision {}) at priority {}: {}",
                r.name, r.revision, r.priority, r.action
            );
        }
        ChainCmd::Delete { name } => {
            let revision = client.delete_rule(&name).await?;
            println!("rule {name} deleted (revision {revision})");
        }
    }
    Ok(())
}
