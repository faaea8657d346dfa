//! Every metric the agent exports, in one place. Per-GPU gauges carry one
//! label, the GPU index on this host (bounded by the host's GPU count).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabel {
    pub gpu: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    pub replica: String,
}

pub struct AgentMetrics {
    registry: Registry,
    pub memory_used: Family<GpuLabel, Gauge>,
    pub memory_total: Family<GpuLabel, Gauge>,
    pub utilization: Family<GpuLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub temperature: Family<GpuLabel, Gauge>,
    pub power: Family<GpuLabel, Gauge>,
    pub reports: Counter,
    pub reconnects: Counter,
    pub registered: Gauge,
    /// Pipeline steps a later stage here served, per stage replica.
    pub pipeline_steps: Family<ReplicaLabel, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("talon_agent");
        let m = AgentMetrics {
            memory_used: Family::default(),
            memory_total: Family::default(),
            utilization: Family::default(),
            temperature: Family::default(),
            power: Family::default(),
            reports: Counter::default(),
            reconnects: Counter::default(),
            registered: Gauge::default(),
            pipeline_steps: Family::default(),
            registry: Registry::default(),
        };
        registry.register_with_unit(
            "gpu_memory_used",
            "GPU memory in use",
            Unit::Bytes,
            m.memory_used.clone(),
        );
        registry.register_with_unit(
            "gpu_memory_total",
            "GPU memory in all",
            Unit::Bytes,
            m.memory_total.clone(),
        );
        registry.register_with_unit(
            "gpu_utilization",
            "GPU busy fraction, 0 to 1",
            Unit::Other("ratio".into()),
            m.utilization.clone(),
        );
        registry.register_with_unit(
            "gpu_temperature",
            "GPU temperature",
            Unit::Celsius,
            m.temperature.clone(),
        );
        registry.register_with_unit(
            "gpu_power",
            "GPU power draw",
            Unit::Other("watts".into()),
            m.power.clone(),
        );
        registry.register(
            "telemetry_reports",
            "Telemetry reports sent to the leader",
            m.reports.clone(),
        );
        registry.register(
            "reconnects",
            "Times the agent looked for the leader again",
            m.reconnects.clone(),
        );
        registry.register(
            "registered",
            "1 once the coordinator committed this node's inventory",
            m.registered.clone(),
        );
        registry.register(
            "pipeline_steps",
            "Pipeline steps (a prefill or a decode step of a batch) a later stage on this node ran and handed on",
            m.pipeline_steps.clone(),
        );
        AgentMetrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
