//! Format 1 → 2: every record of a format-1 data directory (JSON) rewritten
//! in the binary envelope of [`codec`](super::codec).
//!
//! The migration is idempotent: a value that already carries the envelope
//! is left alone, so a migration cut short by a crash simply runs again at
//! the next start. Only after every tree is converted and flushed is the
//! format key moved to 2 (and then the marker file).

use super::codec;
use super::state_machine::Applied;
use crate::raft_types::{Entry, LogId, SnapshotMeta, StoredMembership, Vote};
use crate::state::{AuditEntry, Model, NodeRecord, Replica};

fn convert<T: serde::de::DeserializeOwned + serde::Serialize>(
    what: &str,
    json: &[u8],
) -> Result<Vec<u8>, String> {
    let value: T = serde_json::from_slice(json).map_err(|e| format!("{what}: {e}"))?;
    codec::encode(&value).map_err(|e| format!("{what}: {e}"))
}

/// The format-2 bytes of one format-1 value, chosen by its tree and key.
/// `None`: the value stays as it is (the format key itself).
fn convert_value(tree: &str, key: &[u8], json: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let name = String::from_utf8_lossy(key).into_owned();
    let bytes = match (tree, key) {
        ("meta", b"format") => return Ok(None),
        ("meta", b"vote") => convert::<Vote>("vote", json)?,
        ("meta", b"committed") => convert::<Option<LogId>>("committed", json)?,
        ("meta", b"purged") => convert::<LogId>("purged", json)?,
        ("log", _) => convert::<Entry>("log entry", json)?,
        ("sm", b"meta/applied") => convert::<Option<LogId>>("applied log id", json)?,
        ("sm", b"meta/membership") => convert::<StoredMembership>("membership", json)?,
        ("sm", k) if k.starts_with(b"model/") => convert::<Model>(&name, json)?,
        ("sm", k) if k.starts_with(b"node/") => convert::<NodeRecord>(&name, json)?,
        ("sm", k) if k.starts_with(b"replica/") => convert::<Replica>(&name, json)?,
        ("sm", k) if k.starts_with(b"audit/") => convert::<AuditEntry>("audit entry", json)?,
        ("snapshot", b"current/meta") => convert::<SnapshotMeta>("snapshot meta", json)?,
        ("snapshot", b"current/data") => convert::<Applied>("snapshot data", json)?,
        _ => return Err(format!("unknown key {name:?} in tree {tree:?}")),
    };
    Ok(Some(bytes))
}

/// Rewrites every format-1 value of `db` in place and flushes.
pub(super) fn v1_to_v2(db: &sled::Db) -> Result<u64, String> {
    let mut converted = 0;
    for tree_name in ["meta", "log", "sm", "snapshot"] {
        let tree = db.open_tree(tree_name).map_err(|e| e.to_string())?;
        let mut batch = sled::Batch::default();
        for item in tree.iter() {
            let (key, value) = item.map_err(|e| e.to_string())?;
            if codec::is_encoded(&value) {
                continue;
            }
            if let Some(bytes) = convert_value(tree_name, &key, &value)
                .map_err(|e| format!("tree {tree_name}: {e}"))?
            {
                batch.insert(key, bytes);
                converted += 1;
            }
        }
        tree.apply_batch(batch).map_err(|e| e.to_string())?;
    }
    db.flush().map_err(|e| e.to_string())?;
    Ok(converted)
}
