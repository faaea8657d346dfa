//! The traffic split of a version change ([`crate::state::model::CANARY_LABEL`]):
//! while replicas of older versions serve beside the newest one's, a model
//! labelled `canary-percent=N` sends N % of its requests to the newest
//! version first and the rest to the older ones first. The split is exact
//! over every 100 requests of the model (not random), and only an order of
//! preference: when the replicas of the chosen side are all full or
//! unreachable, the others take the request.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::core::Target;

/// Per model, how many requests were split so far.
#[derive(Clone, Default)]
pub(super) struct Split {
    counts: Arc<Mutex<HashMap<String, u64>>>,
}

/// Whether request number `n` (from 0) of a model goes to the newest
/// version at `percent` %: exactly `percent` of every 100, spread evenly.
pub(super) fn to_newest(n: u64, percent: u32) -> bool {
    let p = u64::from(percent.min(100));
    (n + 1) * p / 100 > n * p / 100
}

impl Split {
    /// `ranked` (best first) with the side this request goes to first, each
    /// side in its own rank order; unchanged for a model without a canary
    /// share or with one version serving.
    pub(super) fn order(
        &self,
        state: &crate::state::State,
        model: &str,
        of_model: &[&crate::state::Replica],
        ranked: Vec<Target>,
    ) -> Vec<Target> {
        let Some(m) = state.models.get(model) else {
            return ranked;
        };
        let (Some(percent), Some(newest)) = (
            crate::state::model::canary_percent(&m.labels),
            m.versions.last(),
        ) else {
            return ranked;
        };
        let newest: HashSet<&str> = of_model
            .iter()
            .filter(|r| r.version == newest.version)
            .map(|r| r.id.as_str())
            .collect();
        let (new, old): (Vec<Target>, Vec<Target>) = ranked
            .into_iter()
            .partition(|t| newest.contains(t.replica.as_str()));
        if new.is_empty() || old.is_empty() {
            return new.into_iter().chain(old).collect();
        }
        let n = {
            let mut counts = self.counts.lock().expect("split lock poisoned");
            let c = counts.entry(model.to_string()).or_default();
            *c += 1;
            *c - 1
        };
        if to_newest(n, percent) {
            new.into_iter().chain(old).collect()
        } else {
            old.into_iter().chain(new).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_exact_over_every_hundred_requests_and_spread() {
        for percent in [0, 1, 10, 25, 33, 50, 90, 100] {
            let newest = (0..1000).filter(|&n| to_newest(n, percent)).count();
            assert_eq!(newest, 10 * percent as usize, "{percent} %");
            let first_hundred = (0..100).filter(|&n| to_newest(n, percent)).count();
            assert_eq!(first_hundred, percent as usize);
        }
        // 50 %: every other request, not the first half then the second
        let pattern: Vec<bool> = (0..4).map(|n| to_newest(n, 50)).collect();
        assert_eq!(pattern, [false, true, false, true]);
    }
}
