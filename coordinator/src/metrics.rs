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
    /// Group commit: entries proposed through the proposer, and the writes
    /// they carried (their ratio is the mean batch).
    pub group_commit_entries: Counter,
    pub group_commit_writes: Counter,
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
    /// The serving metrics under vLLM's names, which dashboards and
    /// autoscalers already read (no `talon_coordinator_` prefix).
    pub engine: EngineMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model_name: String,
}

type Histograms = Family<ModelLabel, Histogram, fn() -> Histogram>;

/// `vllm:*` as the gateway measures them, per model; the per-replica
/// gauges (`vllm:num_requests_running`, `…_waiting`,
/// `vllm:kv_cache_usage_perc`) are written from the leader's telemetry
/// at each scrape ([`engine_gauges`]).
pub struct EngineMetrics {
    registry: Registry,
    /// From the request's start to a stream's first chunk.
    pub time_to_first_token: Histograms,
    /// Between chunks of a stream.
    pub inter_token_latency: Histograms,
    /// From the request's start to its last byte.
    pub e2e_request_latency: Histograms,
    pub prompt_tokens: Family<ModelLabel, Counter>,
    pub generation_tokens: Family<ModelLabel, Counter>,
}

impl EngineMetrics {
    fn new() -> EngineMetrics {
        fn ttft() -> Histogram {
            Histogram::new([
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0,
            ])
        }
        fn itl() -> Histogram {
            Histogram::new([
                0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
            ])
        }
        fn e2e() -> Histogram {
            Histogram::new([
                0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
            ])
        }
        let mut registry = Registry::default();
        let m = EngineMetrics {
            time_to_first_token: Family::new_with_constructor(ttft),
            inter_token_latency: Family::new_with_constructor(itl),
            e2e_request_latency: Family::new_with_constructor(e2e),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Time to first token, from the request's arrival at the gateway",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "vllm:inter_token_latency_seconds",
            "Time between chunks of a streamed answer",
            m.inter_token_latency.clone(),
        );
        registry.register(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency at the gateway",
            m.e2e_request_latency.clone(),
        );
        registry.register(
            "vllm:prompt_tokens",
            "Prompt tokens of answered requests",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "vllm:generation_tokens",
            "Generated tokens of answered requests",
            m.generation_tokens.clone(),
        );
        EngineMetrics { registry, ..m }
    }

    /// Counts an answer's `usage`.
    pub fn count_usage(&self, model: &str, usage: &serde_json::Value) {
        let label = ModelLabel {
            model_name: model.to_string(),
        };
        if let Some(p) = usage["prompt_tokens"].as_u64() {
            self.prompt_tokens.get_or_create(&label).inc_by(p);
        }
        if let Some(c) = usage["completion_tokens"].as_u64() {
            self.generation_tokens.get_or_create(&label).inc_by(c);
        }
    }

    pub fn observe(&self, histograms: &Histograms, model: &str, seconds: f64) {
        histograms
            .get_or_create(&ModelLabel {
                model_name: model.to_string(),
            })
            .observe(seconds);
    }
}

/// The per-replica gauges under vLLM's names, in the text format: from
/// `(model, replica, running, waiting, kv_cache_usage)` rows (a negative
/// KV use is not reported and left out).
pub fn engine_gauges(rows: &[(String, String, u32, u32, f32)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let families: [(
        &str,
        &str,
        fn(&(String, String, u32, u32, f32)) -> Option<f64>,
    ); 3] = [
        (
            "vllm:num_requests_running",
            "Requests the replica is running",
            |r| Some(f64::from(r.2)),
        ),
        (
            "vllm:num_requests_waiting",
            "Requests the replica holds waiting",
            |r| Some(f64::from(r.3)),
        ),
        (
            "vllm:kv_cache_usage_perc",
            "Fraction of the replica's KV cache in use (1 is full)",
            |r| (r.4 >= 0.0).then_some(f64::from(r.4)),
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} gauge");
        for r in rows {
            if let Some(v) = value(r) {
                let _ = writeln!(
                    out,
                    "{name}{{model_name=\"{}\",replica=\"{}\"}} {v}",
                    r.0, r.1
                );
            }
        }
    }
    out
}

/// The reasons `talon_coordinator_gateway_policy_refusals_total` counts.
pub const REFUSALS: [&str; 7] = [
    "rate_limit_exceeded",
    "insufficient_quota",
    "model_not_allowed",
    "priority_not_allowed",
    "content_filtered",
    "limits_unavailable",
    "policy_denied",
];

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
        let group_commit_entries = Counter::default();
        let group_commit_writes = Counter::default();
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
            "group_commit_entries",
            "Log entries the leader proposed through group commit",
            group_commit_entries.clone(),
        );
        registry.register(
            "group_commit_writes",
            "Writes those entries carried (one entry can carry many)",
            group_commit_writes.clone(),
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
        // every result from the start at 0, so that a dashboard shows 0
        // rather than no data
        for result in ["hit", "miss", "bypass"] {
            let _ = cache_requests.get_or_create(&PolicyLabels { result });
        }
        for result in REFUSALS {
            let _ = policy_refusals.get_or_create(&PolicyLabels { result });
        }
        let gateway_held = Gauge::default();
        let gateway_queued = Gauge::default();
        let chain_rules = Family::<RuleLabels, Counter>::default();
        let engine = EngineMetrics::new();
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
            engine,
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
            group_commit_entries,
            group_commit_writes,
            writes,
            write_duration,
        }
    }

    /// The text exposition format, for `/metrics`: Talon's metrics, then
    /// the engine-named ones, then `extra` (already in the text format).
    pub fn encode(&self) -> String {
        self.encode_with("")
    }

    pub fn encode_with(&self, extra: &str) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        encode_registry(&mut out, &self.registry).expect("writing to a String cannot fail");
        encode_registry(&mut out, &self.engine.registry).expect("writing to a String cannot fail");
        out.push_str(extra);
        encode_eof(&mut out).expect("writing to a String cannot fail");
        out
    }
}
