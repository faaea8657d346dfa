//! The agent's identity: the credential it got for its node id when it
//! joined, and the serve secret its own endpoint expects from coordinators.
//!
//! The join token is spent once, on `Join`; the credential it buys is kept
//! in a file (mode 0600) so that a restarted agent is the same node without
//! joining again. A stored credential the cluster no longer knows (revoked,
//! or from another cluster) is dropped and the agent joins afresh; a node id
//! that already holds a credential cannot join (an admin revokes it or
//! removes the node first).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

/// What `Join` handed out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node_id: String,
    pub credential_id: String,
    pub key: String,
    pub serve_secret: String,
}

/// Never prints the key or the secret.
impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("credential_id", &self.credential_id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityStore")
            .field("path", &self.path)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Who may call the agent's replica routes: coordinators presenting this
/// node's serve secret. Empty until the agent has joined.
#[derive(Clone, Default)]
pub struct ServeGuard(Arc<RwLock<Option<String>>>);

/// Why a call to a replica route was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The agent has not joined yet: no caller can be checked.
    NotJoined,
    /// No secret, or the wrong one.
    Unauthorized,
}

impl ServeGuard {
    pub fn set(&self, secret: &str) {
        *self.0.write().expect("serve guard poisoned") = Some(secret.to_string());
    }

    /// Checks an `authorization` header value.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Refusal> {
        let expected = self.0.read().expect("serve guard poisoned");
        let Some(expected) = expected.as_deref() else {
            return Err(Refusal::NotJoined);
        };
        bearer_matches(authorization, expected)
            .then_some(())
            .ok_or(Refusal::Unauthorized)
    }
}

/// Whether an `authorization` header value is `Bearer <expected>`, compared
/// in constant time; never for an empty `expected`.
pub fn bearer_matches(authorization: Option<&str>, expected: &str) -> bool {
    let Some(given) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    !expected.is_empty()
        && given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The identity in memory and, when a path is set, on disk.
pub struct IdentityStore {
    path: Option<PathBuf>,
    node_id: String,
    current: Mutex<Option<NodeIdentity>>,
    pub guard: ServeGuard,
}

impl IdentityStore {
    /// Loads the stored identity of `node_id` from `path`, if there is one.
    /// A file for another node id is an error: two agents share a path.
    pub fn open(
        path: Option<PathBuf>,
        node_id: &str,
        guard: ServeGuard,
    ) -> Result<IdentityStore, String> {
        let mut current = None;
        if let Some(p) = &path {
            match std::fs::read(p) {
                Ok(bytes) => {
                    let id: NodeIdentity = serde_json::from_slice(&bytes).map_err(|e| {
                        format!(
                            "credential file {} is unreadable ({e}); delete it and let the agent join again",
                            p.display()
                        )
                    })?;
                    if id.node_id != node_id {
                        return Err(format!(
                            "credential file {} belongs to node {:?}, not {node_id:?}; give each agent its own --credential-file",
                            p.display(),
                            id.node_id
                        ));
                    }
                    guard.set(&id.serve_secret);
                    current = Some(id);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read credential file {}: {e}", p.display())),
            }
        }
        Ok(IdentityStore {
            path,
            node_id: node_id.to_string(),
            current: Mutex::new(current),
            guard,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn get(&self) -> Option<NodeIdentity> {
        self.current.lock().expect("identity poisoned").clone()
    }

    /// Keeps a new identity (in the file first, so a crash cannot lose a
    /// credential the cluster has already recorded).
    pub fn store(&self, identity: NodeIdentity) -> Result<(), String> {
        if let Some(p) = &self.path {
            write_private(
                p,
                &serde_json::to_vec_pretty(&identity).expect("identity serializes"),
            )
            .map_err(|e| format!("cannot write credential file {}: {e}", p.display()))?;
        }
        self.guard.set(&identity.serve_secret);
        *self.current.lock().expect("identity poisoned") = Some(identity);
        Ok(())
    }

    /// Drops an identity the cluster refused.
    pub fn forget(&self) {
        *self.current.lock().expect("identity poisoned") = None;
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes `bytes` to `path` readable by its owner only, atomically.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_a_restart_and_belongs_to_one_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credential");
        let store = IdentityStore::open(Some(path.clone()), "n1", ServeGuard::default()).unwrap();
        assert!(store.get().is_none());
        assert_eq!(store.guard.check(Some("Bearer x")), Err(Refusal::NotJoined));
        let id = NodeIdentity {
            node_id: "n1".into(),
            credential_id: "c".into(),
            key: "k".into(),
            serve_secret: "s3cret".into(),
        };
        store.store(id.clone()).unwrap();
        let again = IdentityStore::open(Some(path.clone()), "n1", ServeGuard::default()).unwrap();
        assert_eq!(again.get(), Some(id));
        assert_eq!(again.guard.check(Some("Bearer s3cret")), Ok(()));
        assert_eq!(
            again.guard.check(Some("Bearer s3creT")),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(again.guard.check(None), Err(Refusal::Unauthorized));
        let err = IdentityStore::open(Some(path.clone()), "n2", ServeGuard::default())
            .err()
            .unwrap();
        assert!(err.contains("belongs to node"), "{err}");
        again.forget();
        assert!(!path.exists());
    }
}
