//! Starting a cluster with `--bootstrap`, safely.
//!
//! A node whose log is empty and that was told to bootstrap first asks the
//! peers it was given (`bootstrap_peers`) whether any of them already
//! belongs to a cluster: if one does, it does not form a second cluster
//! (the split brain of a coordinator that lost its disk and restarted with
//! the same flags); it waits, uninitialized, to be joined. Peers that cannot
//! be reached within `bootstrap_wait_ms` are taken as not yet started (a
//! first start, where the other coordinators come up after this one).
//!
//! The first admin credential of a bootstrapped cluster comes from (or goes
//! to) the admin key file; see [`first_admin`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::admin::AdminContext;
use crate::config::Config;
use crate::raft_types::Raft;
use crate::tls::TlsMaterial;
use crate::{auth, state};

/// Bootstraps a one-node cluster unless a peer already belongs to one.
pub async fn bootstrap_alone(
    raft: &Raft,
    config: &Config,
    tls: Option<&TlsMaterial>,
) -> anyhow::Result<()> {
    if let Some(peer) = initialized_peer(config, tls).await {
        tracing::error!(
            %peer,
            "not bootstrapping: peer {peer} already belongs to a cluster and this node's data directory is empty; join this node from the cluster (talon cluster join) instead"
        );
        return Ok(());
    }
    let addr = config.advertise.clone().unwrap_or_default();
    let members = std::collections::BTreeMap::from([(
        config.node_id,
        crate::raft_types::CoordinatorNode::new(&addr, config.raft_advertise_addr()),
    )]);
    raft.initialize(members)
        .await
        .context("bootstrapping a one-node cluster")?;
    tracing::info!(
        node_id = config.node_id,
        addr,
        "bootstrapped a one-node cluster"
    );
    Ok(())
}

/// The first of `bootstrap_peers` that answers as a member of a cluster.
async fn initialized_peer(config: &Config, tls: Option<&TlsMaterial>) -> Option<String> {
    let peers: Vec<&String> = config
        .bootstrap_peers
        .iter()
        .filter(|p| Some(p.as_str()) != config.advertise.as_deref())
        .collect();
    if peers.is_empty() {
        return None;
    }
    let deadline = Instant::now() + Duration::from_millis(config.bootstrap_wait_ms);
    let mut answered = std::collections::BTreeSet::new();
    loop {
        for peer in &peers {
            if answered.contains(peer.as_str()) {
                continue;
            }
            match peer_initialized(peer, tls).await {
                Some(true) => return Some(peer.to_string()),
                Some(false) => {
                    answered.insert(peer.to_string());
                }
                None => {}
            }
        }
        if answered.len() == peers.len() || Instant::now() >= deadline {
            if answered.len() < peers.len() {
                tracing::warn!(
                    unreachable = peers.len() - answered.len(),
                    "bootstrap peers did not answer within bootstrap_wait_ms; taking them as not started"
                );
            }
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the coordinator at `addr` belongs to a cluster; `None` when it
/// cannot be asked.
async fn peer_initialized(addr: &str, tls: Option<&TlsMaterial>) -> Option<bool> {
    use talon_proto::v1::admin_service_client::AdminServiceClient;
    let endpoint = crate::tls::peer_endpoint(addr, tls)
        .ok()?
        .connect_timeout(Duration::from_millis(500));
    let mut client = AdminServiceClient::new(endpoint.connect_lazy());
    let mut request = tonic::Request::new(talon_proto::v1::ClusterStatusRequest {});
    request.set_timeout(Duration::from_secs(1));
    let status = client.cluster_status(request).await.ok()?.into_inner();
    Some(status.initialized)
}

/// The first admin key of a cluster bootstrapped with `--bootstrap`: read
/// from `auth.admin_key_file` when that file exists (so operators can
/// provision it, e.g. from a Kubernetes secret), else made here and written
/// there with mode 0600. Recorded once this node leads and the cluster has
/// no admin yet; a cluster that has one is left alone.
pub async fn first_admin(ctx: Arc<AdminContext>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let path = ctx.config.admin_key_path();
    loop {
        if ctx.cluster_secret().is_some() {
            return;
        }
        if ctx.leads() {
            match admin_key_from(&path) {
                Ok((credential, made)) => {
                    let id = credential.id.clone();
                    let command = state::Command::InitAuth {
                        admin: credential,
                        cluster_secret: auth::random_bytes::<32>(),
                    };
                    match ctx.write("init_auth", "bootstrap".into(), command).await {
                        Ok(_) => {
                            tracing::info!(path = %path.display(), credential = %id, made, "first admin credential recorded; its key is in the admin key file");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not record the first admin credential; retrying")
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot read or write the admin key file; the cluster has no admin until this is fixed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The admin credential whose key is in `path`, making the key (and the
/// file) when there is none; `true` when it was made now.
fn admin_key_from(path: &std::path::Path) -> anyhow::Result<(state::Credential, bool)> {
    use std::io::Write;
    let (id, secret_sha256, made) = match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = text.lines().next().unwrap_or_default().trim();
            let (id, digest) = auth::parse(key).map_err(|e| anyhow::anyhow!("{e}"))?;
            (id, digest, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let new = auth::generate();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            writeln!(file, "{}", new.key)?;
            file.sync_all()?;
            (new.id, new.secret_sha256, true)
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let credential = state::Credential {
        id,
        principal: "admin".into(),
        role: state::Role::Admin,
        secret_sha256,
        node_id: None,
        created_at_ms: 0,
        created_by: "bootstrap".into(),
        revision: 0,
    };
    Ok((credential, made))
}
