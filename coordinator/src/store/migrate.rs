//! Older formats → 7: every record of a format-1 (JSON), format-2
//! (envelope version 1, replicas without GPU list or MIG device),
//! format-3 (envelope version 2, replicas without pipeline stage),
//! format-4 (envelope version 3, a state without tenancy), format-5
//! (envelope version 4, a state without the gateway's chain) or format-6
//! (envelope version 5, audit entries keyed by their log index alone) data
//! directory rewritten in the current envelope of [`codec`](super::codec),
//! and every audit entry moved to its key by index and position
//! ([`audit_key`](crate::state::audit_key)).
//!
//! The migration is idempotent: a value already in the current envelope is
//! left alone, so a migration cut short by a crash simply runs again at the
//! next start. Only after every tree is converted and flushed is the format
//! key moved to 5 (and then the marker file).

use std::collections::BTreeMap;

use super::codec;
use super::state_machine::{audit_record_key, Applied, AUDIT};
use crate::raft_types::{Entry, LogId, SnapshotMeta, StoredMembership, Vote};
use crate::state::{
    first_audit_key, AuditEntry, Credential, KeyPolicy, Model, NodeRecord, Replica, Tenant, Usage,
    UsageKey,
};

/// How an old value is written.
#[derive(Clone, Copy)]
enum Old {
    /// Format 1: JSON.
    Json,
    /// Format 2: envelope version 1.
    Format2,
    /// Format 3: envelope version 2.
    Format3,
    /// Format 4: envelope version 3.
    Format4,
    /// Format 5: envelope version 4.
    Format5,
    /// Format 6: envelope version 5.
    Format6,
}

fn read<T: serde::de::DeserializeOwned>(what: &str, old: Old, bytes: &[u8]) -> Result<T, String> {
    let value: T = match old {
        Old::Json => serde_json::from_slice(bytes).map_err(|e| format!("{what}: {e}"))?,
        Old::Format2 => codec::decode_format_2(bytes).map_err(|e| format!("{what}: {e}"))?,
        Old::Format3 => codec::decode_format_3(bytes).map_err(|e| format!("{what}: {e}"))?,
        Old::Format4 => codec::decode_format_4(bytes).map_err(|e| format!("{what}: {e}"))?,
        Old::Format5 => codec::decode_format_5(bytes).map_err(|e| format!("{what}: {e}"))?,
        Old::Format6 => codec::decode_format_6(bytes).map_err(|e| format!("{what}: {e}"))?,
    };
    Ok(value)
}

fn convert<T: serde::de::DeserializeOwned + serde::Serialize>(
    what: &str,
    old: Old,
    bytes: &[u8],
) -> Result<Vec<u8>, String> {
    let value: T = read(what, old, bytes)?;
    codec::encode(&value).map_err(|e| format!("{what}: {e}"))
}

/// Before format 7 an audit entry's key was its log index; now it is the
/// first key of that index (one entry per index then).
fn rekey_audit(audit: BTreeMap<u64, AuditEntry>) -> BTreeMap<u64, AuditEntry> {
    audit
        .into_values()
        .map(|e| (first_audit_key(e.index), e))
        .collect()
}

/// The current key and bytes of one old value, chosen by its tree and key.
/// `None`: the value stays as it is (the format key itself).
fn convert_value(
    tree: &str,
    key: &[u8],
    old: Old,
    bytes: &[u8],
) -> Result<Option<(Vec<u8>, Vec<u8>)>, String> {
    let name = String::from_utf8_lossy(key).into_owned();
    let bytes = match (tree, key) {
        ("meta", b"format") => return Ok(None),
        ("meta", b"vote") => convert::<Vote>("vote", old, bytes)?,
        ("meta", b"committed") => convert::<Option<LogId>>("committed", old, bytes)?,
        ("meta", b"purged") => convert::<LogId>("purged", old, bytes)?,
        ("log", _) => convert::<Entry>("log entry", old, bytes)?,
        ("sm", b"meta/applied") => convert::<Option<LogId>>("applied log id", old, bytes)?,
        ("sm", b"meta/membership") => convert::<StoredMembership>("membership", old, bytes)?,
        ("sm", k) if k.starts_with(b"model/") => convert::<Model>(&name, old, bytes)?,
        ("sm", k) if k.starts_with(b"node/") => convert::<NodeRecord>(&name, old, bytes)?,
        ("sm", k) if k.starts_with(b"replica/") => convert::<Replica>(&name, old, bytes)?,
        ("sm", k) if k.starts_with(b"credential/") => convert::<Credential>(&name, old, bytes)?,
        ("sm", b"meta/auth") => convert::<[u8; 32]>("cluster secret", old, bytes)?,
        ("sm", k) if k.starts_with(AUDIT) => {
            let entry: AuditEntry = read("audit entry", old, bytes)?;
            let key = audit_record_key(first_audit_key(entry.index));
            let bytes = codec::encode(&entry).map_err(|e| format!("audit entry: {e}"))?;
            return Ok(Some((key, bytes)));
        }
        ("sm", k) if k.starts_with(b"tenant/") => convert::<Tenant>(&name, old, bytes)?,
        ("sm", k) if k.starts_with(b"key/") => convert::<KeyPolicy>(&name, old, bytes)?,
        ("sm", k) if k.starts_with(b"usage/") => convert::<(UsageKey, Usage)>(&name, old, bytes)?,
        ("snapshot", b"current/meta") => convert::<SnapshotMeta>("snapshot meta", old, bytes)?,
        ("snapshot", b"current/data") => {
            let mut applied: Applied = read("snapshot data", old, bytes)?;
            applied.state.audit = rekey_audit(std::mem::take(&mut applied.state.audit));
            codec::encode(&applied).map_err(|e| format!("snapshot data: {e}"))?
        }
        _ => return Err(format!("unknown key {name:?} in tree {tree:?}")),
    };
    Ok(Some((key.to_vec(), bytes)))
}

/// Rewrites every format-1 to -6 value of `db` in place and flushes.
pub(super) fn to_current(db: &sled::Db) -> Result<u64, String> {
    let mut converted = 0;
    for tree_name in ["meta", "log", "sm", "snapshot"] {
        let tree = db.open_tree(tree_name).map_err(|e| e.to_string())?;
        // Removals first, then inserts: sled keeps the last write of a key
        // in a batch, and a moved audit entry can land on the old key of
        // another one (index 1 moves to 1024, where index 1024 was).
        let mut removed = Vec::new();
        let mut written = Vec::new();
        for item in tree.iter() {
            let (key, value) = item.map_err(|e| e.to_string())?;
            let old = match codec::version_of(&value) {
                None => Old::Json,
                Some(codec::FORMAT_2_ENCODING) => Old::Format2,
                Some(codec::FORMAT_3_ENCODING) => Old::Format3,
                Some(codec::FORMAT_4_ENCODING) => Old::Format4,
                Some(codec::FORMAT_5_ENCODING) => Old::Format5,
                Some(codec::FORMAT_6_ENCODING) => Old::Format6,
                // current (or a version the decoder will name when read)
                Some(_) => continue,
            };
            if let Some((new_key, bytes)) = convert_value(tree_name, &key, old, &value)
                .map_err(|e| format!("tree {tree_name}: {e}"))?
            {
                if new_key != key.as_ref() {
                    removed.push(key);
                }
                written.push((new_key, bytes));
                converted += 1;
            }
        }
        let mut batch = sled::Batch::default();
        for key in removed {
            batch.remove(key);
        }
        for (key, bytes) in written {
            batch.insert(key, bytes);
        }
        tree.apply_batch(batch).map_err(|e| e.to_string())?;
    }
    db.flush().map_err(|e| e.to_string())?;
    Ok(converted)
}

/// Format 7 keeps the state machine's records and the snapshot in their
/// own database (`state/`): copies the `sm` and `snapshot` trees of `db`
/// there, flushes it, then drops them from `db` and flushes that. Run
/// again after a crash it copies the same records again (or finds the
/// trees already gone), so it is idempotent too.
pub(super) fn move_state(db: &sled::Db, state: &sled::Db) -> Result<u64, String> {
    let mut moved = 0;
    let names = db.tree_names();
    for name in ["sm", "snapshot"] {
        if !names.iter().any(|n| n.as_ref() == name.as_bytes()) {
            continue;
        }
        let from = db.open_tree(name).map_err(|e| e.to_string())?;
        let to = state.open_tree(name).map_err(|e| e.to_string())?;
        let mut batch = sled::Batch::default();
        for item in from.iter() {
            let (key, value) = item.map_err(|e| e.to_string())?;
            batch.insert(key, value);
            moved += 1;
        }
        to.apply_batch(batch).map_err(|e| e.to_string())?;
    }
    state.flush().map_err(|e| e.to_string())?;
    for name in ["sm", "snapshot"] {
        db.drop_tree(name).map_err(|e| e.to_string())?;
    }
    db.flush().map_err(|e| e.to_string())?;
    Ok(moved)
}

/// The migration of one value, as the fuzzers feed it
/// ([`crate::fuzzing::store_migration`]): `tree` picks one of the keys the
/// migration knows, `old` one of the older formats. Whatever converts must
/// come out in the current envelope, under a key of the same kind.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_one_value(tree: u8, old: u8, bytes: &[u8]) {
    const KEYS: &[(&str, &[u8])] = &[
        ("meta", b"vote"),
        ("meta", b"committed"),
        ("meta", b"purged"),
        ("log", &[0, 0, 0, 0, 0, 0, 0, 7]),
        ("sm", b"meta/applied"),
        ("sm", b"meta/membership"),
        ("sm", b"model/m"),
        ("sm", b"node/n"),
        ("sm", b"replica/r"),
        ("sm", b"credential/c"),
        ("sm", b"meta/auth"),
        ("sm", b"audit/\0\0\0\0\0\0\0\x07"),
        ("sm", b"tenant/t"),
        ("sm", b"key/k"),
        ("sm", b"usage/u"),
        ("snapshot", b"current/meta"),
        ("snapshot", b"current/data"),
    ];
    const OLD: [Old; 6] = [
        Old::Json,
        Old::Format2,
        Old::Format3,
        Old::Format4,
        Old::Format5,
        Old::Format6,
    ];
    let (tree, key) = KEYS[tree as usize % KEYS.len()];
    let old = OLD[old as usize % OLD.len()];
    if let Ok(Some((new_key, value))) = convert_value(tree, key, old, bytes) {
        assert_eq!(
            codec::version_of(&value),
            Some(codec::ENCODING_VERSION),
            "{tree}/{key:?} converted out of the current envelope"
        );
        assert_eq!(
            new_key.starts_with(AUDIT),
            key.starts_with(AUDIT),
            "{tree}/{key:?} moved to {new_key:?}"
        );
    }
}
