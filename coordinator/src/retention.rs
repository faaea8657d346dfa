//! Audit retention: the leader keeps the audit log at `audit_keep` entries.
//!
//! Lease transitions, placements and registrations each add an entry, so an
//! unbounded audit log would grow with churn forever. Every ten seconds the
//! leader checks the count; past `audit_keep` plus a tenth (hysteresis, so
//! that trimming is rare and batched) it proposes `TrimAudit` with the index
//! below which entries go. The cut travels in the command, so every replica
//! drops exactly the same entries.

use std::sync::Arc;
use std::time::Duration;

use crate::admin::AdminContext;
use crate::state::Command;

/// The index below which entries are dropped to keep `keep` of them, when
/// the log holds more than `keep` plus a tenth.
pub fn cutoff(
    indices: impl DoubleEndedIterator<Item = u64> + ExactSizeIterator,
    keep: u64,
) -> Option<u64> {
    let len = indices.len() as u64;
    if len <= keep + keep / 10 {
        return None;
    }
    indices.rev().nth(keep as usize - 1)
}

pub async fn run(ctx: Arc<AdminContext>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let keep = ctx.config.audit_keep;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !ctx.leads() {
            continue;
        }
        let cut = {
            let applied = ctx.state.read().expect("state lock poisoned");
            cutoff(applied.state.audit.values().map(|a| a.index), keep)
        };
        if let Some(before_index) = cut {
            match ctx
                .write(
                    "trim_audit",
                    "retention".into(),
                    Command::TrimAudit { before_index },
                )
                .await
            {
                Ok(_) => tracing::info!(before_index, keep, "audit log trimmed"),
                Err(e) => tracing::warn!(error = %e, "could not trim the audit log"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cutoff;

    #[test]
    fn trims_past_the_hysteresis_to_exactly_keep() {
        let log = |n: u64| (1..=n).collect::<Vec<u64>>();
        assert_eq!(cutoff(log(110).into_iter(), 100), None);
        // 111 entries, keep 100: drop below the 100th newest (index 12).
        assert_eq!(cutoff(log(111).into_iter(), 100), Some(12));
        let kept = (1..=111u64).filter(|i| *i >= 12).count();
        assert_eq!(kept, 100);
    }
}
