//! The coordinator's errors and the one table that maps them to gRPC codes.
//!
//! "Not leader" is an answer, not a failure: it becomes `UNAVAILABLE` with
//! the leader's address in the `talon-leader` metadata, which the SDK
//! follows.

use talon_proto::LEADER_METADATA_KEY;

use crate::state::{Rejection, RejectionKind};

/// What can go wrong serving an admin call.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request is malformed; nothing was proposed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The state machine refused the request; nothing changed.
    #[error("{}", .0.message)]
    Rejected(Rejection),
    /// This node is not the leader and could not forward the call.
    #[error("this node is not the leader{}; retry on the leader", leader_hint(.leader_addr))]
    NotLeader { leader_addr: Option<String> },
    /// The write was proposed but not confirmed in time; it may still commit.
    #[error("write not confirmed within {timeout_ms} ms (the cluster may have lost its quorum); its outcome is unknown: it may still commit, so check with a linearizable read before retrying")]
    Timeout { timeout_ms: u64 },
    /// A leader just elected, or restarted in its own term, has not yet
    /// applied its log.
    #[error("this coordinator has just become leader and has not yet applied its log up to index {index} ({reason}); retry shortly")]
    CatchingUp { index: u64, reason: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn leader_hint(addr: &Option<String>) -> String {
    match addr {
        Some(a) => format!(" (the leader is at {a})"),
        None => " and no leader is known yet".into(),
    }
}

impl From<AdminError> for tonic::Status {
    fn from(e: AdminError) -> tonic::Status {
        let message = e.to_string();
        match e {
            AdminError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            AdminError::Rejected(r) => match r.kind {
                RejectionKind::Invalid => tonic::Status::invalid_argument(message),
                RejectionKind::NotFound => tonic::Status::not_found(message),
                RejectionKind::AlreadyExists => tonic::Status::already_exists(message),
                RejectionKind::Conflict => tonic::Status::aborted(message),
            },
            AdminError::NotLeader { leader_addr } => {
                let mut status = tonic::Status::unavailable(message);
                if let Some(addr) = leader_addr.and_then(|a| a.parse().ok()) {
                    status.metadata_mut().insert(LEADER_METADATA_KEY, addr);
                }
                status
            }
            AdminError::Timeout { .. } => tonic::Status::deadline_exceeded(message),
            AdminError::CatchingUp { .. } => tonic::Status::unavailable(message),
            AdminError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            AdminError::NotFound(_) => tonic::Status::not_found(message),
            AdminError::Internal(_) => tonic::Status::internal(message),
        }
    }
}
