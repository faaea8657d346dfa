//! What an answered request cost: the self-hosted price nobody else
//! computes, or a remote provider's per-token prices.
//!
//! A model labelled `price.prompt-per-mtok` / `price.completion-per-mtok`
//! (dollars per million tokens: a hosted API behind an engine profile, or
//! an internal list price) is charged its tokens at those prices; its
//! GPU-seconds are still counted where its replica holds GPUs. Any other
//! model is charged its GPU time:
//!
//! A replica holds a share of its node's GPUs (whole GPUs, a share of one,
//! or a MIG slice, as placed); its price per hour is that share of the
//! node's `cost_per_hour` (plus the shares of the later stages of a
//! pipeline across nodes). A request is charged the time it held the
//! replica divided by the requests the replica served at once (those this
//! gateway had in flight on it, at least one): a batch of eight pays for
//! the GPU time once, not eight times. GPU-seconds count the same way.

use std::time::Duration;

use super::core::Gateway;
use crate::state::State;

/// Price per hour and GPUs held by `replica` and its later stages.
pub fn replica_price(state: &State, replica: &str) -> (f64, f64) {
    let mut price = 0.0;
    let mut gpus = 0.0;
    // a pipeline's stages are its head's model's; a head already gone
    // (its node removed) leaves its stages to find among every replica
    let candidates: Box<dyn Iterator<Item = &crate::state::Replica>> =
        match state.replicas.get(replica) {
            Some(head) => Box::new(state.replicas.of_model(&head.model)),
            None => Box::new(state.replicas.values().map(|r| &**r)),
        };
    for r in candidates
        .filter(|r| r.id == replica || r.pipeline.as_ref().is_some_and(|p| p.head == replica))
    {
        let Some(node) = state.nodes.get(&r.node_id) else {
            continue;
        };
        let held = r.gpus.len().max(1) as f64 * f64::from(r.milli.min(1000)) / 1000.0;
        let of = node.inventory.gpus.len().max(1) as f64;
        price += node.inventory.cost_per_hour * (held / of).min(1.0);
        gpus += held;
    }
    (price, gpus)
}

impl Gateway {
    /// GPU-seconds and dollars of one request of `model` that held
    /// `replica` for `elapsed` with these tokens: at the model's
    /// per-token prices where it has them
    /// ([`crate::state::model::token_prices`], a remote provider's),
    /// else its share of the GPUs' price.
    pub(super) fn request_cost(
        &self,
        model: &str,
        replica: &str,
        elapsed: Duration,
        prompt: u64,
        completion: u64,
    ) -> (f64, f64) {
        let (gpu_seconds, gpu_usd) = self.gpu_cost(replica, elapsed);
        let prices = {
            let applied = self.ctx.state.read().expect("state lock poisoned");
            applied
                .state
                .models
                .get(model)
                .and_then(|m| crate::state::model::token_prices(&m.labels))
        };
        match prices {
            Some((p, c)) => (gpu_seconds, token_cost(p, c, prompt, completion)),
            None => (gpu_seconds, gpu_usd),
        }
    }

    /// GPU-seconds and dollars of one request that held `replica` for
    /// `elapsed`.
    pub(super) fn gpu_cost(&self, replica: &str, elapsed: Duration) -> (f64, f64) {
        let (price, gpus) = {
            let applied = self.ctx.state.read().expect("state lock poisoned");
            replica_price(&applied.state, replica)
        };
        let sharing = f64::from(self.in_flight_on(replica)).max(1.0);
        let seconds = elapsed.as_secs_f64() / sharing;
        (seconds * gpus, seconds * price / 3600.0)
    }
}

/// Dollars of `prompt` and `completion` tokens at prices per million.
pub fn token_cost(
    prompt_per_mtok: f64,
    completion_per_mtok: f64,
    prompt: u64,
    completion: u64,
) -> f64 {
    (prompt as f64 * prompt_per_mtok + completion as f64 * completion_per_mtok) / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_pays_its_share_of_the_node() {
        let mut state = State::default();
        let mut inventory = crate::reconcile::tests::inventory("n1", &[("h100", 80); 4]);
        inventory.cost_per_hour = 8.0;
        let register = crate::state::Request {
            at_ms: 1,
            actor: "t".into(),
            command: crate::state::Command::RegisterNode(inventory),
        };
        let (response, _) = state.apply(1, &register);
        assert!(
            matches!(response, crate::state::Response::Node(_)),
            "{response:?}"
        );
        let r = crate::state::Replica {
            id: "m@v1-0".into(),
            model: "m".into(),
            version: "v1".into(),
            node_id: "n1".into(),
            gpu: 0,
            milli: 1000,
            memory_mib: 1000,
            created_at_ms: 0,
            revision: 2,
            gpus: vec![0, 1],
            mig_device: String::new(),
            mig_slice: String::new(),
            stages: 0,
            pipeline: None,
        };
        state.replicas.insert(r.id.clone(), r);
        let (price, gpus) = replica_price(&state, "m@v1-0");
        assert!((price - 4.0).abs() < 1e-9, "{price}");
        assert!((gpus - 2.0).abs() < 1e-9);
        assert_eq!(replica_price(&state, "other"), (0.0, 0.0));
    }

    #[test]
    fn a_remote_provider_charges_its_tokens() {
        use crate::state::model::{token_prices, validate_engine_options};
        let mut labels = std::collections::BTreeMap::new();
        assert_eq!(token_prices(&labels), None);
        labels.insert("price.prompt-per-mtok".to_string(), "0.15".to_string());
        labels.insert("price.completion-per-mtok".to_string(), "0.60".to_string());
        assert_eq!(token_prices(&labels), Some((0.15, 0.60)));
        assert!(validate_engine_options(&labels).is_ok());
        // 1000 prompt and 500 completion tokens: 0.00015 + 0.0003
        let usd = token_cost(0.15, 0.60, 1000, 500);
        assert!((usd - 0.00045).abs() < 1e-12, "{usd}");
        labels.insert("price.prompt-per-mtok".to_string(), "-1".to_string());
        let e = validate_engine_options(&labels).unwrap_err();
        assert!(e.contains("dollars per million tokens"), "{e}");
        labels.insert("price.prompt-per-mtok".to_string(), "NaN".to_string());
        assert!(validate_engine_options(&labels).is_err());
    }
}
