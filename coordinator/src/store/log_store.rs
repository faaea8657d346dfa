//! The Raft log and vote in sled (openraft's `RaftLogStorage`).
//!
//! Appends are written in one batch and flushed to disk before openraft is
//! told they are persisted, so an acknowledged entry survives a crash. The
//! purge point is persisted before any entry is removed, so a crash in the
//! middle of a purge never leaves a log that claims entries it lost.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageIOError};

use super::{any, codec, DataDir};
use crate::raft_types::{Entry, LogId, StorageError, TypeConfig, Vote};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// The log store. Cheap to clone: clones share the same trees.
#[derive(Clone)]
pub struct LogStore {
    dir: DataDir,
    /// Last committed index seen, for metrics; `u64::MAX` when none.
    committed: Arc<AtomicU64>,
}

impl LogStore {
    pub fn new(dir: DataDir) -> LogStore {
        LogStore {
            dir,
            committed: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// The committed index last saved by openraft, if any.
    pub fn committed_index(&self) -> Option<u64> {
        match self.committed.load(Ordering::Relaxed) {
            u64::MAX => None,
            i => Some(i),
        }
    }

    /// A handle that reads the committed index later, for metrics.
    pub fn committed_handle(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self
            .dir
            .meta
            .get(key)
            .map_err(|e| StorageIOError::read(any(e)))?
        else {
            return Ok(None);
        };
        let value = codec::decode(&bytes).map_err(|e| StorageIOError::read(any(e)))?;
        Ok(Some(value))
    }

    fn write_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = codec::encode(value).map_err(|e| StorageIOError::write(any(e)))?;
        self.dir
            .meta
            .insert(key, bytes)
            .map_err(|e| StorageIOError::write(any(e)))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), sled::Error> {
        self.dir.db.flush_async().await.map(|_| ())
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode(bytes: &[u8]) -> Result<Entry, StorageError> {
    codec::decode(bytes).map_err(|e| StorageIOError::read_logs(any(e)).into())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for item in self.dir.log.range((Bound::Included(key(start)), end)) {
            let (_, bytes) = item.map_err(|e| StorageIOError::read_logs(any(e)))?;
            entries.push(decode(&bytes)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(PURGED)?;
        let last = self
            .dir
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(any(e)))?;
        let last_log_id = match last {
            Some((_, bytes)) => Some(decode(&bytes)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote)?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(any(e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(COMMITTED, &committed)?;
        self.committed
            .store(committed.map_or(u64::MAX, |c| c.index), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<LogId> = self.read_meta::<Option<LogId>>(COMMITTED)?.flatten();
        self.committed
            .store(committed.map_or(u64::MAX, |c| c.index), Ordering::Relaxed);
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(|e| StorageIOError::write_logs(any(e)))?;
            batch.insert(&key(entry.log_id.index), bytes);
        }
        self.dir
            .log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        let flushed = self
            .flush()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.dir.log.range(key(log_id.index)..) {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(any(e)))?;
            batch.remove(k);
        }
        self.dir
            .log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The purge point goes to disk first: a crash after this line leaves
        // entries behind that are ignored, never a gap that is claimed.
        self.write_meta(PURGED, &log_id)?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        let mut batch = sled::Batch::default();
        for item in self.dir.log.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(any(e)))?;
            batch.remove(k);
        }
        self.dir
            .log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(any(e)))?;
        Ok(())
    }
}
