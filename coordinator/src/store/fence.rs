//! The restart fence: a leader that restarts serves no linearizable read and
//! runs no control loop until it has applied its whole log again.
//!
//! openraft restores a node whose saved vote is its own committed vote as
//! leader of the same term at once, and takes its read index from the first
//! entry of that term and the committed index saved on disk. Neither is
//! fresh after a crash: the committed index is saved without a flush and
//! the state machine is flushed in the background, so the restored leader
//! can confirm its leadership, find `applied >= read index`, and answer from
//! a state that lacks writes it acknowledged before the crash (seen after a
//! whole-cluster kill -9 ~100 ms after a write). openraft's own guidance for
//! a state machine that does not flush on apply is not to serve reads until
//! a new commit; this fence asks for the exact point instead: everything in
//! the log when the node started, which a leader in its own term commits
//! without truncating (every committed entry is in the leader's log).
//!
//! A leader elected after the restart needs no fence: its first entry comes
//! after its whole log, and openraft's read index already covers it. Its
//! loops, assignment watches and quota, which have no read index, wait for
//! that entry to be applied ([`RestartFence::leads`]).

use std::sync::atomic::{AtomicBool, Ordering};

use openraft::storage::RaftLogStorage;
use openraft::RaftMetrics;

use super::LogStore;
use crate::raft_types::{Node, NodeId, StorageError};

/// See the module documentation. Cheap to check: one atomic once open.
#[derive(Debug)]
pub struct RestartFence {
    /// The node, the term it restarted leading and the last log index it
    /// then held; `None`: it did not restart as leader.
    held: Option<(NodeId, u64, u64)>,
    open: AtomicBool,
}

impl RestartFence {
    /// A fence that never holds (a node that did not restart as leader).
    pub fn open() -> RestartFence {
        RestartFence {
            held: None,
            open: AtomicBool::new(true),
        }
    }

    /// Reads the saved vote and log of node `id`, before Raft starts on
    /// them: a committed vote for `id` means openraft restores it as leader.
    pub async fn load(log: &mut LogStore, id: NodeId) -> Result<RestartFence, StorageError> {
        let vote = log.read_vote().await?;
        let last = log.get_log_state().await?.last_log_id;
        Ok(match (vote, last) {
            (Some(v), Some(last)) if v.committed && v.leader_id.voted_for() == Some(id) => {
                RestartFence {
                    held: Some((id, v.leader_id.term, last.index)),
                    open: AtomicBool::new(false),
                }
            }
            _ => RestartFence::open(),
        })
    }

    /// Whether node `id` leads with a state it may act on: it leads, has
    /// applied an entry of its own term (a new leader's first entry: every
    /// earlier commit is then applied) and the fence does not hold it.
    /// What the leader's loops, assignment watches and quota ask; a
    /// linearizable read has openraft's read index for the first part.
    pub fn leads(&self, id: NodeId, metrics: &RaftMetrics<NodeId, Node>) -> bool {
        metrics.current_leader == Some(id)
            && metrics
                .last_applied
                .is_some_and(|l| l.leader_id.term == metrics.current_term)
            && self.pending(metrics).is_none()
    }

    /// The log index this node must apply before it reads linearizably or
    /// leads: `Some` while it leads the term it restarted in and has not
    /// applied that far. Opens for good once passed or once the term moves.
    pub fn pending(&self, metrics: &RaftMetrics<NodeId, Node>) -> Option<u64> {
        if self.open.load(Ordering::Acquire) {
            return None;
        }
        let (id, term, index) = self.held?;
        // A later term means a leader elected since, whose first entry comes
        // after this log. (An earlier one is only the metrics before Raft
        // has started: they must not open the fence.)
        let applied = metrics.last_applied.map(|l| l.index);
        if metrics.current_term > term || (metrics.current_term == term && applied >= Some(index)) {
            self.open.store(true, Ordering::Release);
            return None;
        }
        (metrics.current_leader == Some(id) && metrics.current_term == term).then_some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft_types::{LogId, Vote};
    use openraft::CommittedLeaderId;

    fn metrics(
        term: u64,
        leader: Option<NodeId>,
        applied: Option<u64>,
    ) -> RaftMetrics<NodeId, Node> {
        let mut m = RaftMetrics::new_initial(1);
        m.current_term = term;
        m.current_leader = leader;
        m.last_applied = applied.map(|i| LogId::new(CommittedLeaderId::new(term, 1), i));
        m
    }

    async fn fence_of(vote: Option<Vote>, entries: u64) -> RestartFence {
        let dir = tempfile::tempdir().unwrap();
        let data = super::super::DataDir::open(dir.path(), 1).unwrap();
        for i in 1..=entries {
            let entry = crate::raft_types::Entry {
                log_id: LogId::new(CommittedLeaderId::new(3, 1), i),
                payload: openraft::EntryPayload::Blank,
            };
            let bytes = super::super::codec::encode(&entry).unwrap();
            data.log.insert(i.to_be_bytes(), bytes).unwrap();
        }
        let mut log = LogStore::new(data);
        if let Some(v) = vote {
            log.save_vote(&v).await.unwrap();
        }
        RestartFence::load(&mut log, 1).await.unwrap()
    }

    #[tokio::test]
    async fn a_leader_restarted_in_its_term_waits_for_its_whole_log() {
        let mut vote = Vote::new(3, 1);
        vote.commit();
        let fence = fence_of(Some(vote), 7).await;
        // leading term 3 again, applied only what the stale disk held
        assert_eq!(fence.pending(&metrics(3, Some(1), Some(4))), Some(7));
        assert_eq!(fence.pending(&metrics(3, Some(1), None)), Some(7));
        // not (yet) known as leader: nothing to serve, the fence stays
        assert_eq!(fence.pending(&metrics(3, None, Some(4))), None);
        assert_eq!(fence.pending(&metrics(3, Some(1), Some(6))), Some(7));
        // applied the whole log: open for good
        assert_eq!(fence.pending(&metrics(3, Some(1), Some(7))), None);
        assert_eq!(fence.pending(&metrics(3, Some(1), Some(4))), None);
    }

    #[tokio::test]
    async fn a_new_term_opens_the_fence() {
        let mut vote = Vote::new(3, 1);
        vote.commit();
        let fence = fence_of(Some(vote), 7).await;
        assert_eq!(fence.pending(&metrics(4, Some(1), Some(4))), None);
        assert_eq!(fence.pending(&metrics(3, Some(1), Some(4))), None);
    }

    #[test]
    fn a_new_leader_leads_once_it_has_applied_an_entry_of_its_term() {
        let fence = RestartFence::open();
        let mut m = metrics(4, Some(1), Some(9));
        // elected in term 4, the last applied entry still of term 3
        m.last_applied = Some(LogId::new(CommittedLeaderId::new(3, 2), 9));
        assert!(!fence.leads(1, &m));
        m.last_applied = Some(LogId::new(CommittedLeaderId::new(4, 1), 10));
        assert!(fence.leads(1, &m));
        assert!(!fence.leads(2, &m), "another node's leadership");
        m.current_leader = None;
        assert!(!fence.leads(1, &m));
    }

    #[tokio::test]
    async fn the_metrics_before_raft_starts_leave_the_fence_closed() {
        let mut vote = Vote::new(3, 1);
        vote.commit();
        let fence = fence_of(Some(vote), 7).await;
        assert_eq!(fence.pending(&RaftMetrics::new_initial(1)), None);
        assert_eq!(fence.pending(&metrics(3, Some(1), Some(4))), Some(7));
    }

    #[tokio::test]
    async fn only_a_committed_vote_for_this_node_fences() {
        // voted for itself but never won: it restarts as a follower
        assert!(fence_of(Some(Vote::new(3, 1)), 7).await.held.is_none());
        // another node's leadership
        let mut other = Vote::new(3, 2);
        other.commit();
        assert!(fence_of(Some(other), 7).await.held.is_none());
        // a fresh node
        assert!(fence_of(None, 0).await.held.is_none());
    }
}
