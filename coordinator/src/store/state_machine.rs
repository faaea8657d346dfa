//! The state machine in sled (openraft's `RaftStateMachine`).
//!
//! The registry lives in memory as a [`State`] (what reads see) and on disk as
//! one record per key in the `sm` tree. `apply` runs the pure
//! [`State::apply`], then writes exactly the records it changed together with
//! the applied log id, in one atomic sled batch. Snapshots are the whole state
//! as one binary envelope ([`codec`]), kept in the `snapshot` tree so that a restarted node
//! can serve it to a lagging follower.
//!
//! Installing a snapshot rewrites the `sm` tree in batches of
//! [`INSTALL_BATCH`] records, not in one batch of the whole state (which
//! held every record's bytes in memory at once: 2.5× the peak memory at
//! 10,000 nodes). The received snapshot is saved and flushed first with a
//! marker (`current/installing`) that is removed once every record is
//! written and flushed; a coordinator that stops in between finds the
//! marker when it opens its store and installs the saved snapshot again
//! before it reads the `sm` tree.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::{any, codec, DataDir};
use crate::metrics::Metrics;
use crate::raft_types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::state::{Change, Response, State, Usage, UsageKey};

const APPLIED: &[u8] = b"meta/applied";
const MEMBERSHIP: &[u8] = b"meta/membership";
const MODEL: &[u8] = b"model/";
const NODE: &[u8] = b"node/";
pub(super) const AUDIT: &[u8] = b"audit/";
const REPLICA: &[u8] = b"replica/";
const CREDENTIAL: &[u8] = b"credential/";
const AUTH: &[u8] = b"meta/auth";
const TENANT: &[u8] = b"tenant/";
const KEY: &[u8] = b"key/";
const USAGE: &[u8] = b"usage/";
const RULE: &[u8] = b"rule/";

/// `usage/<day BE><tenant>\0<key>\0<model>`: sorted by day, so old days
/// are a prefix range.
fn usage_key(k: &UsageKey) -> Vec<u8> {
    let mut key = prefixed(USAGE, &k.day.to_be_bytes());
    for (i, part) in [&k.tenant, &k.key, &k.model].into_iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part.as_bytes());
    }
    key
}

/// Every record of `state`, as changes (a snapshot install writes them all).
fn every_record(state: &State) -> Vec<Change> {
    let mut all = Vec::new();
    all.extend(state.models.keys().cloned().map(Change::Model));
    all.extend(state.nodes.keys().cloned().map(Change::Node));
    all.extend(state.replicas.keys().cloned().map(Change::Replica));
    all.extend(state.credentials.keys().cloned().map(Change::Credential));
    all.push(Change::Auth);
    all.extend(state.audit.keys().copied().map(Change::Audit));
    all.extend(state.tenancy.tenants.keys().cloned().map(Change::Tenant));
    all.extend(state.tenancy.keys.keys().cloned().map(Change::Key));
    all.extend(state.tenancy.usage.keys().cloned().map(Change::Usage));
    all.extend(state.chain.keys().cloned().map(Change::Rule));
    all
}
const SNAPSHOT_META: &str = "current/meta";
const SNAPSHOT_DATA: &str = "current/data";
/// Present while the `sm` tree is being rewritten from the current
/// snapshot (its value: the snapshot's id).
const SNAPSHOT_INSTALLING: &str = "current/installing";
/// Records written per batch when a snapshot is installed.
pub const INSTALL_BATCH: usize = 4096;

/// The applied state that reads see.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: State,
}

/// Shared, read-mostly view of the applied state.
pub type SharedState = Arc<RwLock<Applied>>;

/// The state machine store. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct StateMachineStore {
    dir: DataDir,
    applied: SharedState,
    metrics: Arc<Metrics>,
    snapshots_built: Arc<AtomicU64>,
    feed: Arc<super::ChangeFeed>,
    /// Tests: installs give up after this many batches, as a crash would.
    stop_install_after: Option<usize>,
    /// Held while the snapshot tree is written or read as a pair: openraft
    /// builds snapshots in a task of their own, which may finish while a
    /// received snapshot is being installed.
    snapshot_io: Arc<tokio::sync::Mutex<()>>,
}

/// The sled key of the audit record stored under `audit_key`.
pub(super) fn audit_record_key(audit_key: u64) -> Vec<u8> {
    prefixed(AUDIT, &audit_key.to_be_bytes())
}

fn prefixed(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest);
    key
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(any(e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(any(e)).into()
}

impl StateMachineStore {
    /// Loads the applied state from disk (first finishing a snapshot
    /// install that was cut short).
    pub fn open(dir: DataDir, metrics: Arc<Metrics>) -> Result<StateMachineStore, StorageError> {
        if dir
            .snapshot
            .get(SNAPSHOT_INSTALLING)
            .map_err(read_err)?
            .is_some()
        {
            let (Some(meta), Some(data)) = (
                dir.snapshot.get(SNAPSHOT_META).map_err(read_err)?,
                dir.snapshot.get(SNAPSHOT_DATA).map_err(read_err)?,
            ) else {
                return Err(StorageIOError::read_state_machine(openraft::AnyError::error(
                    "a snapshot install was cut short and the snapshot it installed is not in the data directory: restore the directory from a backup or let the node rejoin empty",
                ))
                .into());
            };
            let meta: SnapshotMeta = codec::decode(&meta).map_err(read_err)?;
            let mut incoming: Applied = codec::decode(&data).map_err(read_err)?;
            drop(data);
            incoming.last_applied = meta.last_log_id;
            incoming.membership = meta.last_membership.clone();
            tracing::warn!(snapshot_id = %meta.snapshot_id, "finishing a snapshot install that was cut short");
            rewrite_records(&dir, &incoming, None)?;
            dir.state.flush().map_err(write_err)?;
            dir.snapshot
                .remove(SNAPSHOT_INSTALLING)
                .map_err(write_err)?;
            dir.state.flush().map_err(write_err)?;
        }
        let mut applied = Applied::default();
        for item in dir.sm.iter() {
            let (k, v) = item.map_err(read_err)?;
            if k.as_ref() == APPLIED {
                applied.last_applied = codec::decode(&v).map_err(read_err)?;
            } else if k.as_ref() == MEMBERSHIP {
                applied.membership = codec::decode(&v).map_err(read_err)?;
            } else if let Some(name) = k.strip_prefix(MODEL) {
                let name = String::from_utf8_lossy(name).into_owned();
                applied
                    .state
                    .models
                    .insert(name, codec::decode(&v).map_err(read_err)?);
            } else if let Some(id) = k.strip_prefix(NODE) {
                let id = String::from_utf8_lossy(id).into_owned();
                applied
                    .state
                    .nodes
                    .insert(id, codec::decode(&v).map_err(read_err)?);
            } else if let Some(id) = k.strip_prefix(REPLICA) {
                let id = String::from_utf8_lossy(id).into_owned();
                applied
                    .state
                    .replicas
                    .insert(id, codec::decode(&v).map_err(read_err)?);
            } else if let Some(id) = k.strip_prefix(CREDENTIAL) {
                let id = String::from_utf8_lossy(id).into_owned();
                applied
                    .state
                    .credentials
                    .insert(id, codec::decode(&v).map_err(read_err)?);
            } else if let Some(name) = k.strip_prefix(TENANT) {
                let name = String::from_utf8_lossy(name).into_owned();
                applied
                    .state
                    .tenancy
                    .tenants
                    .insert(name, codec::decode(&v).map_err(read_err)?);
            } else if let Some(name) = k.strip_prefix(RULE) {
                let name = String::from_utf8_lossy(name).into_owned();
                applied
                    .state
                    .chain
                    .insert(name, codec::decode(&v).map_err(read_err)?);
            } else if let Some(id) = k.strip_prefix(KEY) {
                let id = String::from_utf8_lossy(id).into_owned();
                applied
                    .state
                    .tenancy
                    .keys
                    .insert(id, codec::decode(&v).map_err(read_err)?);
            } else if k.starts_with(USAGE) {
                let (key, usage): (UsageKey, Usage) = codec::decode(&v).map_err(read_err)?;
                applied.state.tenancy.usage.insert(key, usage);
            } else if k.as_ref() == AUTH {
                applied.state.cluster_secret = Some(codec::decode(&v).map_err(read_err)?);
            } else if let Some(key) = k.strip_prefix(AUDIT) {
                let key = <[u8; 8]>::try_from(key).map_err(|_| {
                    StorageIOError::read_state_machine(openraft::AnyError::error(format!(
                        "audit record key {k:?} is not 8 bytes after its prefix"
                    )))
                })?;
                let entry: crate::state::AuditEntry = codec::decode(&v).map_err(read_err)?;
                applied.state.audit.insert(u64::from_be_bytes(key), entry);
            } else {
                let key = String::from_utf8_lossy(&k).into_owned();
                return Err(StorageIOError::read_state_machine(openraft::AnyError::error(format!(
                    "unknown key {key:?} in the state machine tree: the data directory was written by another release"
                )))
                .into());
            }
        }
        Ok(StateMachineStore {
            dir,
            feed: Arc::new(super::ChangeFeed::new(&applied.state)),
            applied: Arc::new(RwLock::new(applied)),
            metrics,
            snapshots_built: Arc::new(AtomicU64::new(0)),
            stop_install_after: None,
            snapshot_io: Arc::default(),
        })
    }

    /// Tests: snapshot installs give up after `batches` batches of
    /// records, leaving the store as a crash in the middle would.
    #[cfg(test)]
    pub(crate) fn stop_installs_after(&mut self, batches: usize) {
        self.stop_install_after = Some(batches);
    }

    /// Which nodes each applied entry concerns (the assignment watches).
    pub fn feed(&self) -> Arc<super::ChangeFeed> {
        self.feed.clone()
    }

    /// The applied state, for reads.
    pub fn shared(&self) -> SharedState {
        self.applied.clone()
    }
}

fn persist(state: &State, changes: &[Change], batch: &mut sled::Batch) -> Result<(), StorageError> {
    for change in changes {
        match change {
            Change::Model(name) => {
                let key = prefixed(MODEL, name.as_bytes());
                match state.models.get(name) {
                    Some(m) => batch.insert(key, codec::encode(m).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
            Change::Node(id) => {
                let key = prefixed(NODE, id.as_bytes());
                match state.nodes.get(id) {
                    Some(n) => batch.insert(key, codec::encode(n).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
            Change::Replica(id) => {
                let key = prefixed(REPLICA, id.as_bytes());
                match state.replicas.get(id) {
                    Some(r) => batch.insert(key, codec::encode(r).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
            Change::Credential(id) => {
                let key = prefixed(CREDENTIAL, id.as_bytes());
                match state.credentials.get(id) {
                    Some(c) => batch.insert(key, codec::encode(c).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
            Change::Auth => match &state.cluster_secret {
                Some(secret) => batch.insert(AUTH, codec::encode(secret).map_err(write_err)?),
                None => batch.remove(AUTH),
            },
            Change::Tenant(name) => {
                let key = prefixed(TENANT, name.as_bytes());
                match state.tenancy.tenants.get(name) {
                    Some(t) => batch.insert(key, codec::encode(t).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
            Change::Rule(name) => {
                let key = prefixed(RULE, name.as_bytes());
                match state.chain.get(name) {
                    Some(r) => batch.insert(key, codec::encode(r).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
            Change::Key(id) => {
                let key = prefixed(KEY, id.as_bytes());
                match state.tenancy.keys.get(id) {
                    Some(p) => batch.insert(key, codec::encode(p).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
            Change::Usage(k) => {
                let key = usage_key(k);
                match state.tenancy.usage.get(k) {
                    Some(u) => batch.insert(key, codec::encode(&(k, u)).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
            Change::Audit(audit_key) => {
                let key = audit_record_key(*audit_key);
                match state.audit.get(audit_key) {
                    Some(a) => batch.insert(key, codec::encode(a).map_err(write_err)?),
                    None => batch.remove(key),
                }
            }
        }
    }
    Ok(())
}

/// Writes `applied` as the `sm` tree: every old record removed, every
/// record of the state written, [`INSTALL_BATCH`] to a batch, the applied
/// log id and membership last. Not atomic: the install marker covers it.
/// `stop_after` (tests): give up after that many batches of records, as a
/// crash would.
fn rewrite_records(
    dir: &DataDir,
    applied: &Applied,
    stop_after: Option<usize>,
) -> Result<(), StorageError> {
    dir.sm.clear().map_err(write_err)?;
    let store_err = |e: String| {
        StorageError::from(StorageIOError::write_state_machine(
            openraft::AnyError::error(e),
        ))
    };
    for (n, chunk) in every_record(&applied.state)
        .chunks(INSTALL_BATCH)
        .enumerate()
    {
        if stop_after.is_some_and(|k| n >= k) {
            return Err(store_err(format!("stopped after {n} batches")));
        }
        let mut batch = sled::Batch::default();
        persist(&applied.state, chunk, &mut batch)?;
        dir.sm.apply_batch(batch).map_err(write_err)?;
    }
    let mut batch = sled::Batch::default();
    batch.insert(
        APPLIED,
        codec::encode(&applied.last_applied).map_err(write_err)?,
    );
    batch.insert(
        MEMBERSHIP,
        codec::encode(&applied.membership).map_err(write_err)?,
    );
    dir.sm.apply_batch(batch).map_err(write_err)?;
    Ok(())
}

impl StateMachineStore {
    /// Writes a snapshot's meta and data in one batch (with the install
    /// marker when `installing`); the caller flushes.
    fn save_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: &[u8],
        installing: bool,
    ) -> Result<(), StorageError> {
        let err = |e: &dyn std::fmt::Display| {
            StorageIOError::write_snapshot(
                Some(meta.signature()),
                openraft::AnyError::error(e.to_string()),
            )
        };
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_META, codec::encode(meta).map_err(|e| err(&e))?);
        batch.insert(SNAPSHOT_DATA, data);
        if installing {
            let id = codec::encode(&meta.snapshot_id).map_err(|e| err(&e))?;
            batch.insert(SNAPSHOT_INSTALLING, id);
        } else {
            batch.remove(SNAPSHOT_INSTALLING);
        }
        self.dir.snapshot.apply_batch(batch).map_err(|e| err(&e))?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (data, meta) = {
            // a copy under the lock (node and replica records are shared,
            // not copied), encoded after it: writes wait for the copy only
            let applied = self.applied.read().expect("state lock poisoned").clone();
            let data = codec::encode(&applied)
                .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?;
            let n = self.snapshots_built.fetch_add(1, Ordering::Relaxed);
            let snapshot_id = match applied.last_applied {
                Some(id) => format!(
                    "{}-{}-{}-{n}",
                    id.leader_id.term, id.leader_id.node_id, id.index
                ),
                None => format!("empty-{n}"),
            };
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
                snapshot_id,
            };
            (data, meta)
        };
        let _io = self.snapshot_io.lock().await;
        // a snapshot installed while this one was encoded is newer: it
        // stays the current one (and its install marker with it)
        let stored = self
            .dir
            .snapshot
            .get(SNAPSHOT_META)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?
            .and_then(|b| codec::decode::<SnapshotMeta>(&b).ok());
        if stored.is_some_and(|s| s.last_log_id > meta.last_log_id) {
            tracing::info!(snapshot_id = %meta.snapshot_id, "snapshot built but not kept: a newer one was installed meanwhile");
            return Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            });
        }
        self.save_snapshot(&meta, &data, false)?;
        self.dir
            .state
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any(e)))?;
        self.metrics.snapshots_built.inc();
        tracing::info!(snapshot_id = %meta.snapshot_id, bytes = data.len(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.applied.read().expect("state lock poisoned");
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let mut batch = sled::Batch::default();
        {
            let mut applied = self.applied.write().expect("state lock poisoned");
            let mut membership_changed = false;
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => Response::Empty,
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                        membership_changed = true;
                        Response::Empty
                    }
                    EntryPayload::Normal(request) => {
                        let (response, changes) = applied.state.apply(entry.log_id.index, &request);
                        persist(&applied.state, &changes, &mut batch)?;
                        self.feed.applied(&applied.state, &changes);
                        response
                    }
                };
                responses.push(response);
            }
            batch.insert(
                APPLIED,
                codec::encode(&applied.last_applied).map_err(write_err)?,
            );
            if membership_changed {
                batch.insert(
                    MEMBERSHIP,
                    codec::encode(&applied.membership).map_err(write_err)?,
                );
            }
        }
        self.dir.sm.apply_batch(batch).map_err(write_err)?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let _io = self.snapshot_io.lock().await;
        let data = snapshot.into_inner();
        let signature = Some(meta.signature());
        let mut incoming: Applied = codec::decode(&data)
            .map_err(|e| StorageIOError::read_snapshot(signature.clone(), any(e)))?;
        incoming.last_applied = meta.last_log_id;
        incoming.membership = meta.last_membership.clone();
        // the received bytes are kept (and flushed) as the current
        // snapshot with the install marker, then let go of before the
        // records are written again, a batch at a time
        self.save_snapshot(meta, &data, true)?;
        drop(data);
        let flush_err = |e| StorageIOError::write_snapshot(signature.clone(), any(e));
        self.dir.state.flush_async().await.map_err(flush_err)?;
        rewrite_records(&self.dir, &incoming, self.stop_install_after)?;
        self.dir.state.flush_async().await.map_err(flush_err)?;
        // a later flush makes this durable; a restart before it installs
        // the same snapshot again
        self.dir
            .snapshot
            .remove(SNAPSHOT_INSTALLING)
            .map_err(write_err)?;
        {
            let mut applied = self.applied.write().expect("state lock poisoned");
            *applied = incoming;
            self.feed.replaced(&applied.state);
        }
        self.metrics.snapshots_installed.inc();
        tracing::info!(snapshot_id = %meta.snapshot_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let read = |e: sled::Error| StorageIOError::read_snapshot(None, any(e));
        let _io = self.snapshot_io.lock().await;
        let (Some(meta), Some(data)) = (
            self.dir.snapshot.get(SNAPSHOT_META).map_err(read)?,
            self.dir.snapshot.get(SNAPSHOT_DATA).map_err(read)?,
        ) else {
            return Ok(None);
        };
        let meta: SnapshotMeta =
            codec::decode(&meta).map_err(|e| StorageIOError::read_snapshot(None, any(e)))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, RaftSnapshotBuilder};

    /// openraft builds snapshots in a task of their own: one that
    /// finishes after a newer snapshot was installed (here: saved while
    /// the build waits for the snapshot tree) keeps the newer one current.
    #[tokio::test]
    async fn a_snapshot_built_while_a_newer_one_was_installed_does_not_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachineStore::open(
            DataDir::open(dir.path(), 1).unwrap(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        sm.apply(vec![Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 3),
            payload: EntryPayload::Blank,
        }])
        .await
        .unwrap();
        let held = sm.snapshot_io.clone().lock_owned().await;
        let mut builder = sm.clone();
        let build = tokio::spawn(async move { builder.build_snapshot().await });
        let newer = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 100)),
            last_membership: StoredMembership::default(),
            snapshot_id: "newer".into(),
        };
        sm.save_snapshot(&newer, b"installed", true).unwrap();
        drop(held);
        let built = build.await.unwrap().unwrap();
        assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(3));
        let stored = sm.dir.snapshot.get(SNAPSHOT_META).unwrap().unwrap();
        let stored: SnapshotMeta = codec::decode(&stored).unwrap();
        assert_eq!(stored.snapshot_id, "newer");
        assert!(
            sm.dir.snapshot.get(SNAPSHOT_INSTALLING).unwrap().is_some(),
            "the newer one's install marker stays"
        );
        // with nothing newer stored, a build is kept
        sm.dir.snapshot.remove(SNAPSHOT_META).unwrap();
        let kept = sm.build_snapshot().await.unwrap();
        let stored = sm.dir.snapshot.get(SNAPSHOT_META).unwrap().unwrap();
        let stored: SnapshotMeta = codec::decode(&stored).unwrap();
        assert_eq!(stored.snapshot_id, kept.meta.snapshot_id);
    }
}
