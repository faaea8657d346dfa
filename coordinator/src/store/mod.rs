//! Durable storage of a coordinator: one sled database per data directory.
//!
//! The data directory holds a marker file, `talon-coordinator.json`, that
//! names its format version and the node id it belongs to, and a sled
//! database with typed key spaces (one tree, or one key prefix, per record
//! kind):
//!
//! | tree       | keys                                   | values                       |
//! |------------|----------------------------------------|------------------------------|
//! | `meta`     | `format` (JSON number), `vote`, `committed`, `purged` | envelope      |
//! | `log`      | log index, u64 big-endian              | envelope: `Entry`            |
//! | `sm`       | `model/<name>`, `node/<id>`, `replica/<id>`, `credential/<id>`, `audit/<u64 BE>`, `tenant/<name>`, `key/<credential id>`, `usage/<day BE><tenant>\0<key>\0<model>`, `meta/applied`, `meta/membership`, `meta/auth` | envelope |
//! | `snapshot` | `current/meta`, `current/data`         | envelope: meta, `Applied`    |
//!
//! Values are in the strict binary envelope of [`codec`] (format 5: since
//! format 4, the state holds tenants, key policies and usage; since format
//! 3, a replica can be a stage of a pipeline across nodes; since format 2,
//! replicas carry their GPU list and MIG device). A format-1 directory
//! (every value JSON), a format-2, -3 or -4 one (envelope versions 1 to 3)
//! is migrated in place at start, by
//! [`migrate`]; golden copies of each are tested to decode.
//!
//! A directory that is not empty and has no marker, a marker of another
//! format or node, or a database that sled cannot open is refused at start
//! with a message that says what to do, never silently reused.

pub mod codec;
mod feed;
mod fence;
#[cfg(test)]
mod format_tests;
mod log_store;
mod migrate;
#[cfg(test)]
mod record_tests;
mod state_machine;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use feed::ChangeFeed;
pub use fence::RestartFence;
pub use log_store::LogStore;
#[cfg(any(test, feature = "fuzzing"))]
pub use migrate::fuzz_one_value as fuzz_migrate_value;
pub use state_machine::{Applied, SharedState, StateMachineStore};

/// Version of the on-disk format this build writes (7: binary envelope,
/// replicas over several GPUs, on a MIG device, or a pipeline stage;
/// tenants, key policies and usage; the gateway's chain; batched log
/// entries and audit entries keyed by log index and position).
pub const FORMAT_VERSION: u32 = 7;
/// The oldest format this build migrates from (1: JSON values; 2: the
/// envelope with one-GPU replicas; 3: no pipeline stages; 4: no tenancy;
/// 5: no chain; 6: audit keys are log indices).
pub const MIGRATES_FROM: u32 = 1;
const MARKER_FILE: &str = "talon-coordinator.json";
const MARKER_KIND: &str = "talon-coordinator-data";

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data directory {path} is not a Talon coordinator directory (it holds {entry:?} but no {MARKER_FILE}); point data_dir at an empty or new directory")]
    Foreign { path: PathBuf, entry: String },
    #[error("data directory {path} has a corrupted marker {MARKER_FILE}: {reason}; restore the directory from a backup or start this node from an empty directory and re-join it")]
    CorruptMarker { path: PathBuf, reason: String },
    #[error("data directory {path} holds format version {found}, this build reads versions {MIGRATES_FROM} to {FORMAT_VERSION}; run the matching release")]
    Version { path: PathBuf, found: u32 },
    #[error("data directory {path} belongs to node {found}, but this coordinator is configured as node {configured}; fix node_id or data_dir")]
    WrongNode {
        path: PathBuf,
        found: u64,
        configured: u64,
    },
    #[error("data directory {path} cannot be opened: {reason}; the database may be corrupted: restore it from a backup or start this node from an empty directory and re-join it")]
    Corrupt { path: PathBuf, reason: String },
    #[error("data directory {path} is in use: another process holds its lock ({reason}); stop the other coordinator using it, or give this one another data_dir")]
    Locked { path: PathBuf, reason: String },
    #[error("data directory {path} could not be migrated from format {from} to {FORMAT_VERSION}: {reason}; nothing was lost (the migration resumes at the next start), but fix the cause or restore a backup")]
    Migration {
        path: PathBuf,
        from: u32,
        reason: String,
    },
    #[error("data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct Marker {
    kind: String,
    format_version: u32,
    node_id: u64,
}

/// Reads the marker file's bytes of the data directory at `path`: ours,
/// of a format this build reads, of node `node_id` — or why not.
pub fn check_marker(bytes: &[u8], path: &Path, node_id: u64) -> Result<(), OpenError> {
    let marker: Marker = serde_json::from_slice(bytes).map_err(|e| OpenError::CorruptMarker {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if marker.kind != MARKER_KIND {
        return Err(OpenError::CorruptMarker {
            path: path.to_path_buf(),
            reason: format!("kind is {:?}, expected {MARKER_KIND:?}", marker.kind),
        });
    }
    if !(MIGRATES_FROM..=FORMAT_VERSION).contains(&marker.format_version) {
        return Err(OpenError::Version {
            path: path.to_path_buf(),
            found: marker.format_version,
        });
    }
    if marker.node_id != node_id {
        return Err(OpenError::WrongNode {
            path: path.to_path_buf(),
            found: marker.node_id,
            configured: node_id,
        });
    }
    Ok(())
}

/// An opened data directory: two sled databases and their trees.
///
/// `db/` holds the Raft log and its metadata (vote, committed, purge
/// point, format): every append is flushed before it is acknowledged, and
/// a flush writes only what changed here. `state/` holds the state
/// machine's records and the snapshot, flushed in the background and
/// whenever a snapshot is built or installed: what a crash leaves unflushed
/// there, openraft applies again from the log at the next start (every
/// entry after the state's applied index up to the committed one is still
/// in the log, because the log is only purged up to a snapshot, and
/// building one flushes the state first). Until format 7 both lived in
/// `db/`, so the state machine's records rode along on every log flush.
#[derive(Clone)]
pub struct DataDir {
    pub db: sled::Db,
    pub state: sled::Db,
    pub meta: sled::Tree,
    pub log: sled::Tree,
    pub sm: sled::Tree,
    pub snapshot: sled::Tree,
}

impl DataDir {
    /// Opens (or creates) the data directory of node `node_id`, refusing
    /// anything that is not ours.
    pub fn open(path: &Path, node_id: u64) -> Result<DataDir, OpenError> {
        let io = |source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(io)?;
        let marker_path = path.join(MARKER_FILE);
        match std::fs::read(&marker_path) {
            Ok(bytes) => check_marker(&bytes, path, node_id)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let first = std::fs::read_dir(path)
                    .map_err(io)?
                    .next()
                    .transpose()
                    .map_err(io)?;
                if let Some(entry) = first {
                    return Err(OpenError::Foreign {
                        path: path.to_path_buf(),
                        entry: entry.file_name().to_string_lossy().into_owned(),
                    });
                }
                write_marker(path, node_id).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        let corrupt = |e: sled::Error| {
            let reason = e.to_string();
            if is_lock_held(&e) {
                OpenError::Locked {
                    path: path.to_path_buf(),
                    reason,
                }
            } else {
                OpenError::Corrupt {
                    path: path.to_path_buf(),
                    reason,
                }
            }
        };
        // The log's database needs no background flusher: every append,
        // vote, truncation and purge point is flushed before it is
        // reported done. The committed index is saved unflushed and the
        // state is flushed in the background, so either may be older than
        // the log after a crash: openraft applies the log again, and a
        // leader restored in its own term serves no linearizable read and
        // leads no loop until it has (`fence::RestartFence`).
        let db = open_db(&path.join("db"), None).map_err(corrupt)?;
        let state = open_db(&path.join("state"), Some(500)).map_err(corrupt)?;
        let meta = db.open_tree("meta").map_err(corrupt)?;
        match meta.get("format").map_err(corrupt)? {
            Some(v) => {
                let found: u32 = serde_json::from_slice(&v).map_err(|e| OpenError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("format key is unreadable: {e}"),
                })?;
                if (MIGRATES_FROM..FORMAT_VERSION).contains(&found) {
                    let failed = |reason| OpenError::Migration {
                        path: path.to_path_buf(),
                        from: found,
                        reason,
                    };
                    let converted = migrate::to_current(&db).map_err(failed)?;
                    migrate::move_state(&db, &state).map_err(failed)?;
                    meta.insert(
                        "format",
                        serde_json::to_vec(&FORMAT_VERSION).expect("u32 serializes"),
                    )
                    .map_err(corrupt)?;
                    db.flush().map_err(corrupt)?;
                    tracing::info!(path = %path.display(), converted, from = found, to = FORMAT_VERSION, "data directory migrated");
                } else if found != FORMAT_VERSION {
                    return Err(OpenError::Version {
                        path: path.to_path_buf(),
                        found,
                    });
                }
                write_marker(path, node_id).map_err(io)?;
            }
            None => {
                meta.insert(
                    "format",
                    serde_json::to_vec(&FORMAT_VERSION).expect("u32 serializes"),
                )
                .map_err(corrupt)?;
                db.flush().map_err(corrupt)?;
            }
        }
        Ok(DataDir {
            log: db.open_tree("log").map_err(corrupt)?,
            sm: state.open_tree("sm").map_err(corrupt)?,
            snapshot: state.open_tree("snapshot").map_err(corrupt)?,
            meta,
            db,
            state,
        })
    }
}

/// Opens one sled database, flushed in the background every
/// `flush_every_ms` (`None`: only when asked). A dropped database's file
/// lock can stay taken for a while (sled's own threads let go of it
/// late), so a directory closed and opened again in one process (a restart
/// in tests) can find it still held: the open is retried for ten seconds
/// before the lock counts as another process's.
pub(super) fn open_db(path: &Path, flush_every_ms: Option<u64>) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let config = sled::Config::new()
            .path(path)
            .flush_every_ms(flush_every_ms);
        match config.open() {
            Err(e) if is_lock_held(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Whether sled could not open a database because its file lock is held
/// (sled 0.34 reports it as an `Other` error whose message carries the
/// OS's `WouldBlock`).
fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io)
        if io.kind() == std::io::ErrorKind::WouldBlock
            || io.to_string().starts_with("could not acquire lock"))
}

/// Writes the marker file of the current format (atomically: a temporary
/// file renamed over it).
fn write_marker(path: &Path, node_id: u64) -> std::io::Result<()> {
    let marker = Marker {
        kind: MARKER_KIND.into(),
        format_version: FORMAT_VERSION,
        node_id,
    };
    let bytes = serde_json::to_vec_pretty(&marker).expect("marker serializes");
    let tmp = path.join(format!("{MARKER_FILE}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path.join(MARKER_FILE))
}

/// Wraps a sled or serde error for openraft's storage errors.
pub(crate) fn any<E: std::error::Error + 'static>(e: E) -> openraft::AnyError {
    openraft::AnyError::new(&e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory another open database holds is refused, after the
    /// wait for a lock a closing database still holds, as in use (not as
    /// corrupt, which would tell the operator to wipe it).
    #[test]
    fn a_directory_in_use_is_refused_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDir::open(dir.path(), 1).unwrap();
        let err = DataDir::open(dir.path(), 1).err().unwrap();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains("stop the other coordinator"),
            "{err}"
        );
        drop(held);
    }

    #[test]
    fn refuses_foreign_corrupt_and_other_nodes_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("something.txt"), "x").unwrap();
        let err = DataDir::open(dir.path(), 1).err().unwrap();
        assert!(matches!(err, OpenError::Foreign { .. }), "{err}");

        let dir = tempfile::tempdir().unwrap();
        drop(DataDir::open(dir.path(), 1).unwrap());
        let err = DataDir::open(dir.path(), 2).err().unwrap();
        assert!(err.to_string().contains("belongs to node 1"), "{err}");
        assert!(DataDir::open(dir.path(), 1).is_ok());

        std::fs::write(dir.path().join(MARKER_FILE), "{not json").unwrap();
        let err = DataDir::open(dir.path(), 1).err().unwrap();
        assert!(matches!(err, OpenError::CorruptMarker { .. }), "{err}");
    }
}

/// openraft's own storage conformance suite, run against the sled store.
#[cfg(test)]
mod openraft_suite {
    use std::sync::Arc;

    use openraft::testing::{StoreBuilder, Suite};

    use super::{DataDir, LogStore, StateMachineStore};
    use crate::metrics::Metrics;
    use crate::raft_types::{StorageError, TypeConfig};

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let data = DataDir::open(dir.path(), 1).expect("open data dir");
            let sm = StateMachineStore::open(data.clone(), Arc::new(Metrics::new()))?;
            Ok((dir, LogStore::new(data), sm))
        }
    }

    #[test]
    fn sled_store_passes_openraft_suite() {
        Suite::test_all(SledBuilder).expect("openraft storage suite");
    }
}
