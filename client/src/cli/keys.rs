//! `talon`'s credentials: where the CLI finds its key, and the `credential`
//! and `whoami` commands.
//!
//! The key comes from `--key`, else `TALON_KEY`, else the file named by
//! `--key-file` / `TALON_KEY_FILE`, else `~/.config/talon/key` when it
//! exists. A key printed by `cluster init` or `credential create` is shown
//! once; `--save-key PATH` writes it to a file readable only by its owner
//! instead.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Client, ClientError, Credential};
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand)]
pub enum CredentialCmd {
    /// Make a key for a person, an application or an agent; shown once.
    Create {
        /// Who acts with it, e.g. alice or search-frontend.
        #[arg(long)]
        principal: String,
        /// admin, operator, viewer, inference or agent.
        #[arg(long)]
        role: String,
        /// Agents only: the node id the key may act as.
        #[arg(long)]
        node: Option<String>,
        /// Write the key to this file (mode 0600) instead of printing it.
        #[arg(long)]
        save_key: Option<PathBuf>,
    },
    /// Every credential (ids, principals and roles; never secrets).
    List,
    /// Revoke a key on every coordinator.
    Revoke { id: String },
}

/// The default key file, `~/.config/talon/key`.
pub fn default_key_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("talon").join("key"))
}

/// The key the CLI sends: `key` (flag or TALON_KEY), else the key file.
pub fn resolve(key: Option<String>, key_file: Option<PathBuf>) -> Result<String, String> {
    if let Some(key) = key.filter(|k| !k.trim().is_empty()) {
        return Ok(key.trim().to_string());
    }
    let (path, explicit) = match key_file {
        Some(p) => (p, true),
        None => match default_key_file() {
            Some(p) => (p, false),
            None => return Ok(String::new()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().next().unwrap_or_default().trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(String::new()),
        Err(e) => Err(format!("cannot read key file {}: {e}", path.display())),
    }
}

/// Shows a new key once: into `save` (0600) or on stdout.
pub fn hand_out(key: &str, what: &str, save: Option<&Path>) -> Result<(), String> {
    match save {
        Some(path) => {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            writeln!(file, "{key}").map_err(|e| format!("writing {}: {e}", path.display()))?;
            eprintln!("{what} key written to {}", path.display());
        }
        None => {
            eprintln!("{what} key (shown once; keep it safe):");
            println!("{key}");
        }
    }
    Ok(())
}

fn credential_json(c: &Credential) -> serde_json::Value {
    json!({"id": c.id, "principal": c.principal, "role": c.role, "node_id": c.node_id,
        "created_at_ms": c.created_at_ms, "created_by": c.created_by, "revision": c.revision})
}

/// Runs a `credential` command.
pub async fn run(client: &Client, cmd: CredentialCmd, json: bool) -> Result<(), ClientError> {
    match cmd {
        CredentialCmd::Create {
            principal,
            role,
            node,
            save_key,
        } => {
            let made = client
                .create_credential(&principal, &role, node.as_deref())
                .await?;
            let c = made.credential.unwrap_or_default();
            eprintln!("credential {} for {} ({})", c.id, c.principal, c.role);
            if let Err(e) = hand_out(&made.key, "the new", save_key.as_deref()) {
                eprintln!(
                    "talon: {e}; the key was not saved: revoke credential {} and make another",
                    c.id
                );
                return Err(ClientError::Status(tonic::Status::aborted(e)));
            }
        }
        CredentialCmd::List => {
            let list = client.list_credentials().await?;
            if json {
                let all: Vec<_> = list.iter().map(credential_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                println!(
                    "{:<18} {:<24} {:<10} {:<16} CREATED_BY",
                    "ID", "PRINCIPAL", "ROLE", "NODE"
                );
                for c in &list {
                    let node = if c.node_id.is_empty() {
                        "-"
                    } else {
                        &c.node_id
                    };
                    println!(
                        "{:<18} {:<24} {:<10} {:<16} {}",
                        c.id, c.principal, c.role, node, c.created_by
                    );
                }
            }
        }
        CredentialCmd::Revoke { id } => {
            let revision = client.revoke_credential(&id).await?;
            println!("revoked {id} (revision {revision})");
        }
    }
    Ok(())
}
