//! Authentication: API keys in, principals out.
//!
//! A key reads `talon_<id>_<secret>`: the credential id (16 hex characters)
//! and a 256-bit secret (64 hex characters). Callers send it as
//! `authorization: Bearer <key>` (gRPC metadata or an HTTP header). The key
//! is looked up by id in the applied state and its secret compared, in
//! constant time, by SHA-256. Randomness comes from the operating system
//! and is drawn by the coordinator that proposes a credential, never in
//! `apply`.
//!
//! Agents' own HTTP endpoints (where replicas are served) accept only the
//! coordinators: each node's serve secret is an HMAC of the cluster's
//! secret (replicated, never sent to clients) and the node id, handed to
//! the agent once when it joins.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::state::credential::{Credential, Permission, Role, ID_LEN};
use crate::state::State;

/// Prefix of every key.
pub const KEY_PREFIX: &str = "talon_";
/// The HTTP header and gRPC metadata key that carries a key.
pub const AUTHORIZATION: &str = "authorization";

/// Who is calling, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The credential id (`-` when authentication is off).
    pub credential: String,
    pub name: String,
    pub role: Role,
    pub node_id: Option<String>,
}

impl Principal {
    /// The principal of every call when authentication is off.
    pub fn anonymous() -> Principal {
        Principal {
            credential: "-".into(),
            name: "anonymous".into(),
            role: Role::Admin,
            node_id: None,
        }
    }

    /// What the audit log records as the actor.
    pub fn actor(&self) -> String {
        format!("{} ({})", self.name, self.credential)
    }

    /// Refuses a call of class `p` that this principal's role does not allow.
    pub fn require(&self, p: Permission, what: &str) -> Result<(), AuthError> {
        if self.role.allows(p) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "{what} needs a role that allows {p:?} access; credential {} ({}) has role {}",
                self.credential,
                self.name,
                self.role.as_str()
            )))
        }
    }
}

/// Why a call was not authenticated or not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> tonic::Status {
        match e {
            AuthError::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            AuthError::Forbidden(m) => tonic::Status::permission_denied(m),
        }
    }
}

/// A freshly made key: the text to hand out once, and what is replicated.
pub struct NewKey {
    pub key: String,
    pub id: String,
    pub secret_sha256: [u8; 32],
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 == 1 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).expect("the operating system's random source");
    out
}

/// Makes a new key.
pub fn generate() -> NewKey {
    let id = hex(&random_bytes::<{ ID_LEN / 2 }>());
    let secret = random_bytes::<32>();
    NewKey {
        key: format!("{KEY_PREFIX}{id}_{}", hex(&secret)),
        id,
        secret_sha256: Sha256::digest(secret).into(),
    }
}

/// Splits a key into its id and the SHA-256 of its secret.
pub fn parse(key: &str) -> Result<(String, [u8; 32]), AuthError> {
    let bad = || {
        AuthError::Unauthenticated(format!(
            "malformed key: a Talon key reads {KEY_PREFIX}<16 hex>_<64 hex>"
        ))
    };
    let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(bad)?;
    let (id, secret) = rest.split_once('_').ok_or_else(bad)?;
    if id.len() != ID_LEN || unhex(id).is_none() || id.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    let secret = unhex(secret).filter(|s| s.len() == 32).ok_or_else(bad)?;
    Ok((id.to_string(), Sha256::digest(secret).into()))
}

/// Compares without leaking where the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The principal a key belongs to in `state`.
pub fn authenticate(state: &State, key: &str) -> Result<Principal, AuthError> {
    let (id, digest) = parse(key)?;
    let credential: &Credential = state.credentials.get(&id).ok_or_else(|| {
        AuthError::Unauthenticated(format!(
            "key {id} is unknown or revoked; ask an admin for a valid key"
        ))
    })?;
    if !constant_time_eq(&credential.secret_sha256, &digest) {
        return Err(AuthError::Unauthenticated(format!(
            "key {id} does not match its credential; check that it was copied whole"
        )));
    }
    Ok(Principal {
        credential: credential.id.clone(),
        name: credential.principal.clone(),
        role: credential.role,
        node_id: credential.node_id.clone(),
    })
}

/// The key in an `authorization: Bearer <key>` value.
pub fn bearer(value: Option<&str>) -> Result<&str, AuthError> {
    let value = value.ok_or_else(|| {
        AuthError::Unauthenticated(
            "no credential: send `authorization: Bearer <key>` (talon: --key, TALON_KEY or --key-file)"
                .into(),
        )
    })?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            AuthError::Unauthenticated("authorization must read `Bearer <key>`".into())
        })?;
    Ok(key.trim())
}

/// The key a gRPC request carries.
pub fn grpc_key<T>(request: &tonic::Request<T>) -> Result<&str, AuthError> {
    let value = match request.metadata().get(AUTHORIZATION) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            AuthError::Unauthenticated("authorization metadata must be ASCII".into())
        })?),
    };
    bearer(value)
}

/// The secret an agent's endpoint expects from coordinators.
pub fn serve_secret(cluster_secret: &[u8; 32], node_id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(cluster_secret).expect("HMAC takes any key");
    mac.update(b"talon agent serve secret\0");
    mac.update(node_id.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// The token a pipeline stage's agent expects from the stage before it:
/// bound to that one stage replica, so an agent holds tokens only for the
/// stages next to its own.
pub fn stage_token(cluster_secret: &[u8; 32], replica_id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(cluster_secret).expect("HMAC takes any key");
    mac.update(b"talon pipeline stage token\0");
    mac.update(replica_id.as_bytes());
    hex(&mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_authenticate() {
        let new = generate();
        let (id, digest) = parse(&new.key).unwrap();
        assert_eq!((id.as_str(), digest), (new.id.as_str(), new.secret_sha256));
        let mut state = State::default();
        assert!(matches!(
            authenticate(&state, &new.key),
            Err(AuthError::Unauthenticated(_))
        ));
        state.credentials.insert(
            new.id.clone(),
            Credential {
                id: new.id.clone(),
                principal: "alice".into(),
                role: Role::Viewer,
                secret_sha256: new.secret_sha256,
                node_id: None,
                created_at_ms: 1,
                created_by: "root".into(),
                revision: 1,
            },
        );
        let p = authenticate(&state, &new.key).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("alice", Role::Viewer));
        assert!(p.require(Permission::Read, "list models").is_ok());
        assert!(matches!(
            p.require(Permission::Write, "create model"),
            Err(AuthError::Forbidden(_))
        ));
        // Same id, other secret.
        let other = generate();
        let forged = format!(
            "{KEY_PREFIX}{}_{}",
            new.id,
            &other.key[KEY_PREFIX.len() + 17..]
        );
        assert!(authenticate(&state, &forged).is_err());
        for bad in [
            "",
            "talon_",
            "talon_zz_00",
            &new.key[..new.key.len() - 1],
            "Bearer x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(Some("Bearer abc")).unwrap(), "abc");
        assert!(bearer(None).is_err());
        assert!(bearer(Some("Basic abc")).is_err());
    }

    #[test]
    fn serve_secrets_differ_per_node() {
        let s = [7u8; 32];
        assert_ne!(serve_secret(&s, "a"), serve_secret(&s, "b"));
        assert_eq!(serve_secret(&s, "a"), serve_secret(&s, "a"));
        assert_ne!(serve_secret(&s, "a"), serve_secret(&[8u8; 32], "a"));
    }
}
