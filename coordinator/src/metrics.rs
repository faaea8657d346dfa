//! Every Prometheus metric the coordinator exports, declared in one place.
//!
//! Names follow `talon_coordinator_<what>_<unit>`; counters end in `_total`.
//! Labels are bounded: the write outcome and the operation name are closed
//! sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Labels of a gateway policy outcome: `result` is `hit`, `miss` or
/// `bypass` for the cache, the refusal's type (`rate_limit_exceeded`,
/// `insufficient_quota`, `model_not_allowed`, `priority_not_allowed`,
/// `limits_unavailable`) for refusals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub result: &'static str,
}

/// Labels of a write: which admin operation and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `create_model`, `delete_model`, `update_model_labels`, `audit`.
    pub op: &'static str,
    /// `ok`, `rejected`, `forwarded`, `error`.
    pub result: &'static str,
}

/// The coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    pub term: Gauge,
    /// Id of the leader this node knows, -1 when none.
    pub leader_id: Gauge,
    pub is_leader: Gauge,
    pub last_log_index: Gauge,
    pub committed_index: Gauge,
    pub applied_index: Gauge,
    pub snapshot_index: Gauge,
    pub members: Gauge,
    pub snapshots_built: Counter,
    pub snapshots_installed: Counter,
    pub writes: Family<WriteLabels, Counter>,
    /// From a write's arrival at this node to its answer, committed and
    /// applied (or forwarded and answered).
    pub write_duration: Family<WriteLabels, Histogram>,
    /// Response cache lookups by result.
    pub cache_requests: Family<PolicyLabels, Counter>,
    /// Requests the gateway's key policies refused, by reason.
    pub policy_refusals: Family<PolicyLabels, Counter>,
    /// Requests the gateway holds (waiting ones included), and those
    /// waiting for a replica with room.
    pub gateway_held: Gauge,
    pub gateway_queued: Gauge,
    /// Requests each chain rule applied to.
    pub chain_rules: Family<RuleLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("talon_coordinator");
        let term = Gauge::default();
        let leader_id = Gauge::default();
        let is_leader = Gauge::default();
        let last_log_index = Gauge::default();
        let committed_index = Gauge::default();
        let applied_index = Gauge::default();
        let snapshot_index = Gauge::default();
        let members = Gauge::default();
        let snapshots_built = Counter::default();
        let snapshots_installed = Counter::default();
        let writes = Family::<WriteLabels, Counter>::default();
        let write_duration = Family::<WriteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        registry.register("raft_term", "Current Raft term", term.clone());
        registry.register(
            "raft_leader_id",
            "Id of the known leader, -1 when none",
            leader_id.clone(),
        );
        registry.register(
            "raft_is_leader",
            "1 when this node is the leader",
            is_leader.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Index of the last log entry",
            last_log_index.clone(),
        );
        registry.register(
            "raft_committed_index",
            "Index of the last committed entry",
            committed_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Index of the last applied entry",
            applied_index.clone(),
        );
        registry.register(
            "raft_snapshot_index",
            "Last index covered by the current snapshot",
            snapshot_index.clone(),
        );
        registry.register(
            "raft_members",
            "Voters and learners in the membership",
            members.clone(),
        );
        registry.register(
            "snapshots_built",
            "Snapshots built by this node",
            snapshots_built.clone(),
        );
        registry.register(
            "snapshots_installed",
            "Snapshots received and installed",
            snapshots_installed.clone(),
        );
        registry.register(
            "writes",
            "Admin writes by operation and outcome",
            writes.clone(),
        );
        registry.register_with_unit(
            "write_duration",
            "Time from a write's arrival to its answer",
            Unit::Seconds,
            write_duration.clone(),
        );
        let cache_requests = Family::<PolicyLabels, Counter>::default();
        let policy_refusals = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "gateway_cache_requests",
            "Response cache lookups by result (hit, miss, bypass)",
            cache_requests.clone(),
        );
        registry.register(
            "gateway_policy_refusals",
            "Requests refused by key policies, limits and budgets, by reason",
            policy_refusals.clone(),
        );
        let gateway_held = Gauge::default();
        let gateway_queued = Gauge::default();
        let chain_rules = Family::<RuleLabels, Counter>::default();
        registry.register(
            "gateway_held_requests",
            "Requests the gateway holds, waiting ones included (bounded by gateway.max_in_flight)",
            gateway_held.clone(),
        );
        registry.register(
            "gateway_queued_requests",
            "Requests waiting at the gateway for a replica with room (bounded by gateway.max_queued)",
            gateway_queued.clone(),
        );
        registry.register(
            "gateway_chain_rule_applied",
            "Requests each rule of the gateway's chain applied to",
            chain_rules.clone(),
        );
        Metrics {
            gateway_held,
            gateway_queued,
            chain_rules,
            cache_requests,
            policy_refusals,
            registry,
            term,
            leader_id,
            is_leader,
            last_log_index,
            committed_index,
            applied_index,
            snapshot_index,
            members,
            snapshots_built,
            snapshots_installed,
            writes,
            write_duration,
        }
    }

    /// The text exposition format, for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
