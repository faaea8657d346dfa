//! Group-committed entries ([`Command::Batch`](super::Command::Batch)): several writes at one log
//! index, applied in order as if proposed one after another.

use super::{audit_key, rejected, Change, RejectionKind, Request, Response, State, MAX_BATCH};

impl State {
    /// Applies the writes of a batch at log `index`, each at its position:
    /// its own answer and audit entry. A batch that holds more than
    /// [`MAX_BATCH`] writes, or one that is never batched, is refused whole
    /// and changes nothing.
    pub(super) fn apply_batch(
        &mut self,
        index: u64,
        requests: &[Request],
    ) -> (Response, Vec<Change>) {
        if requests.len() > MAX_BATCH {
            return rejected(
                RejectionKind::Invalid,
                format!(
                    "a batch holds {} requests; the most is {MAX_BATCH}",
                    requests.len()
                ),
            );
        }
        if let Some(r) = requests.iter().find(|r| !r.command.batchable()) {
            return rejected(
                RejectionKind::Invalid,
                format!(
                    "a batch holds a {} request, which is proposed alone",
                    r.command.name()
                ),
            );
        }
        // the last position's key is the largest
        if audit_key(index, requests.len().saturating_sub(1)).is_none() {
            return rejected(
                RejectionKind::Invalid,
                format!("log index {index} has no audit keys left for a batch"),
            );
        }
        let mut answers = Vec::with_capacity(requests.len());
        let mut changes = Vec::new();
        for (position, r) in requests.iter().enumerate() {
            let (answer, changed) = self.apply_at(index, position, r);
            answers.push(answer);
            changes.extend(changed);
        }
        (Response::Batch(answers), changes)
    }
}
