//! Group commit: the writes that arrive while earlier proposals are still in
//! flight go through Raft together, as one log entry.
//!
//! openraft 0.9 appends and flushes every `client_write` on its own before
//! it looks at the next one, so without this the leader's write rate is one
//! disk flush per write. Here a write is proposed at once when a slot is
//! free (a lone client waits for nothing extra); while every slot is taken,
//! the writes that come in queue, and the next free slot proposes all of
//! them as one [`Command::Batch`]: one append, one flush on each member,
//! one replication round, however many writes it carries. Each write keeps
//! its own actor, time, answer and audit entry; `apply` takes a batch's
//! writes in order, so what a reader sees is the same as if they had been
//! proposed one after another (it never sees a batch half applied: reads
//! take the state lock, which `apply` holds for the whole entry).
//!
//! Only the commands [`Command::batchable`] names go this way: the frequent
//! ones whose log index is only a revision. The others are proposed alone,
//! as before.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::metrics::Metrics;
use crate::raft_types::Raft;
use crate::state::{Command, Request, Response, MAX_BATCH};

/// Why a proposal did not give an answer.
#[derive(Debug, Clone)]
pub enum ProposeError {
    /// This node is not the leader; the leader's address when known.
    NotLeader(Option<String>),
    /// Raft failed otherwise (shutting down, storage error).
    Raft(String),
}

type Reply = oneshot::Sender<Result<Response, ProposeError>>;

struct Pending {
    request: Request,
    reply: Reply,
}

/// The handle writers propose through. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

/// Writes waiting for a slot; a writer past this waits to queue (its call
/// deadline still applies).
const QUEUE: usize = 4096;

impl Proposer {
    /// Starts the proposing task: at most `slots` entries in flight at once,
    /// at most `max_batch` writes in one entry.
    pub fn start(raft: Raft, metrics: Arc<Metrics>, slots: usize, max_batch: usize) -> Proposer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let max_batch = max_batch.clamp(1, MAX_BATCH);
        tokio::spawn(run(raft, metrics, rx, slots.max(1), max_batch));
        Proposer { tx }
    }

    /// Proposes `request` and waits for its answer once it is applied.
    pub async fn propose(&self, request: Request) -> Result<Response, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { request, reply })
            .await
            .map_err(|_| ProposeError::Raft("the proposer has stopped".into()))?;
        answer
            .await
            .map_err(|_| ProposeError::Raft("the proposal was dropped (shutting down)".into()))?
    }
}

async fn run(
    raft: Raft,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Pending>,
    slots: usize,
    max_batch: usize,
) {
    let slots = Arc::new(Semaphore::new(slots));
    while let Some(first) = rx.recv().await {
        // Waiting for a slot is where writes pile up into the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // A write whose caller has given up (its deadline passed while it
        // queued) is not proposed: its caller was told the outcome is
        // unknown, and proposing it minutes later, after a partition
        // healed, could overwrite what others wrote since.
        let mut batch: Vec<Pending> = Some(first).into_iter().filter(waiting).collect();
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(p) if waiting(&p) => batch.push(p),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        metrics.group_commit_entries.inc();
        metrics.group_commit_writes.inc_by(batch.len() as u64);
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, batch).await;
            drop(slot);
        });
    }
}

/// Whether the write's caller still waits for its answer.
fn waiting(p: &Pending) -> bool {
    !p.reply.is_closed()
}

/// A Raft write error as a [`ProposeError`].
pub fn failure(
    e: RaftError<u64, ClientWriteError<u64, crate::raft_types::CoordinatorNode>>,
) -> ProposeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ProposeError::NotLeader(f.leader_node.map(|n| n.addr))
        }
        e => ProposeError::Raft(e.to_string()),
    }
}

async fn propose(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Some(one) = batch.pop() else { return };
        let answer = raft
            .client_write(one.request)
            .await
            .map(|r| r.data)
            .map_err(failure);
        let _ = one.reply.send(answer);
        return;
    }
    let (requests, replies): (Vec<Request>, Vec<Reply>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let request = Request {
        at_ms: requests.iter().map(|r| r.at_ms).max().unwrap_or(0),
        actor: "batch".into(),
        command: Command::Batch(requests),
    };
    match raft.client_write(request).await {
        Ok(reply) => match reply.data {
            Response::Batch(answers) if answers.len() == replies.len() => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            other => {
                let why = format!("a batch was answered {other:?}");
                tracing::error!(%why, "group commit");
                for reply in replies {
                    let _ = reply.send(Err(ProposeError::Raft(why.clone())));
                }
            }
        },
        Err(e) => {
            let e = failure(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
