//! The agent's configuration: defaults, a TOML file, environment (`TALON_*`)
//! and flags, then [`AgentConfig::validate`]. `--check` stops after probing
//! the GPUs and prints the inventory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

/// Where the GPU inventory comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// The real GPUs, through NVML.
    #[default]
    Nvml,
    /// A simulated fleet from `fleet` or `sim_gpus`.
    Simulated,
}

/// The label (key, value) an agent that manages MIG layouts advertises
/// (the coordinator's `state::node::MANAGED_MIG_LABEL`).
pub const MANAGED_MIG_LABEL: (&str, &str) = ("talon-mig", "managed");

/// The label that lists the engines the agent runs (the coordinator's
/// `state::node::ENGINES_LABEL`): its profiles' names, `*` for any.
pub const ENGINES_LABEL: &str = "talon-engines";

/// Engines a model spec can name that an agent may have a profile for
/// (the coordinator's `state::model::ENGINES`, less `simulated`, which the
/// simulated executor serves).
pub const PROFILE_NAMES: &[&str] = &[
    "vllm", "sglang", "llamacpp", "tgi", "triton", "native", "test",
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Unique name of this host; defaults to its hostname.
    pub node_id: Option<String>,
    /// Coordinator gRPC addresses (any member; the agent finds the leader).
    pub coordinators: Vec<String>,
    pub join_token: String,
    pub join_token_file: Option<PathBuf>,
    /// Where the node's credential is kept (mode 0600) so that a restarted
    /// agent is the same node; default `$STATE_DIRECTORY/credential` under
    /// systemd, else `talon-agent-<node id>.credential` here.
    pub credential_file: Option<PathBuf>,
    /// The cluster CA (PEM): speak TLS to the coordinators.
    pub coordinator_ca_file: Option<PathBuf>,
    pub probe: ProbeKind,
    /// TOML fleet spec for the simulated probe.
    pub fleet: Option<PathBuf>,
    /// Compact fleet spec for the simulated probe: `h100-sxm:2,l4:4`.
    pub sim_gpus: Option<String>,
    /// HTTP: /metrics.
    pub http_listen: SocketAddr,
    /// The address others use for this agent; defaults to http_listen.
    pub advertise: Option<String>,
    /// Overrides the telemetry interval the coordinators ask for.
    pub telemetry_interval_ms: Option<u64>,
    pub labels: BTreeMap<String, String>,
    /// Let Talon lay out the MIG instances of the GPUs in MIG mode: the
    /// agent creates the instance a replica is assigned (destroying unused
    /// ones in its way) and advertises it with the label
    /// `talon-mig=managed`.
    pub manage_mig: bool,
    /// Give engine replicas a service-time model learned from their
    /// requests, reported for predictive routing (off: the gateway ranks
    /// them by held requests only, as before there was one).
    pub engine_signals: bool,
    /// Run replicas of models whose engine is `native` on Talon's own
    /// runtime in this process (advertised as the engine `native`).
    pub native: bool,
    pub cost_per_hour: f64,
    /// Run the CUDA calibration at start (real GPUs only).
    pub calibrate: bool,
    /// Command template of the inference engine that serves replicas, e.g.
    /// `vllm serve {artifact} --served-model-name {model} --port {port}`.
    /// Unset: replicas run on the simulated executor (simulated fleets) or
    /// not at all (real GPUs).
    pub engine_command: Option<String>,
    /// Engine profiles (`[engines.vllm]`, `[engines.llamacpp]` …): each
    /// replica runs with the profile of the engine its model names, and the
    /// agent advertises these names ([`ENGINES_LABEL`]) so that the
    /// coordinators place only models it can run here. A profile named
    /// after a built-in one needs no field; see
    /// [`crate::executor::profiles`].
    pub engines: BTreeMap<String, crate::executor::profiles::ProfileConfig>,
    /// Directory for the engines' logs.
    pub engine_log_dir: PathBuf,
    /// Size at which an engine's log is rotated, MiB.
    pub engine_log_max_mib: u64,
    /// Where `http(s)://` artifacts are downloaded to, and found again.
    pub artifact_cache_dir: PathBuf,
    /// The ports engines listen on, `first-last` (leased one per replica;
    /// keep them out of the kernel's ephemeral range).
    pub engine_ports: String,
    /// Rotated logs kept per engine beside the live one.
    pub engine_log_keep: u32,
    /// OpenTelemetry export (`[tracing]`).
    pub tracing: talon_trace::TraceConfig,
    /// Most requests one replica holds (queued or served) before it answers
    /// 429; low-priority requests are refused at half of it.
    pub max_queue: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_id: None,
            coordinators: vec!["127.0.0.1:7400".into()],
            join_token: String::new(),
            join_token_file: None,
            credential_file: None,
            coordinator_ca_file: None,
            probe: ProbeKind::Nvml,
            fleet: None,
            sim_gpus: None,
            http_listen: "127.0.0.1:7481".parse().expect("valid literal"),
            advertise: None,
            telemetry_interval_ms: None,
            labels: BTreeMap::new(),
            manage_mig: false,
            engine_signals: true,
            native: false,
            cost_per_hour: 0.0,
            calibrate: true,
            engine_command: None,
            engines: BTreeMap::new(),
            engine_log_dir: PathBuf::from("talon-engine-logs"),
            engine_log_max_mib: crate::executor::logs::DEFAULT_MAX_BYTES >> 20,
            artifact_cache_dir: PathBuf::from("talon-artifacts"),
            engine_ports: "20000-20999".into(),
            engine_log_keep: crate::executor::logs::DEFAULT_KEEP,
            tracing: Default::default(),
            max_queue: crate::replicas::DEFAULT_MAX_QUEUE,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "talon-agent",
    version,
    about = "Talon node agent: GPU discovery, registration and telemetry"
)]
pub struct Flags {
    #[arg(long, env = "TALON_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, probe the GPUs, print the inventory and exit.
    #[arg(long)]
    pub check: bool,
    #[arg(long, env = "TALON_NODE_ID")]
    pub node_id: Option<String>,
    /// Comma-separated coordinator addresses.
    #[arg(long, env = "TALON_COORDINATORS", value_delimiter = ',')]
    pub coordinators: Option<Vec<String>>,
    #[arg(long, env = "TALON_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    #[arg(long, env = "TALON_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Where the node's credential is kept across restarts.
    #[arg(long, env = "TALON_AGENT_CREDENTIAL_FILE")]
    pub credential_file: Option<PathBuf>,
    /// The cluster CA (PEM): speak TLS to the coordinators.
    #[arg(long, env = "TALON_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    #[arg(long, env = "TALON_PROBE")]
    pub probe: Option<ProbeKind>,
    #[arg(long, env = "TALON_FLEET")]
    pub fleet: Option<PathBuf>,
    /// e.g. h100-sxm:2:mig=3g.40gb+3g.40gb,l4:4 (implies --probe simulated).
    #[arg(long, env = "TALON_SIM_GPUS")]
    pub sim_gpus: Option<String>,
    #[arg(long, env = "TALON_AGENT_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    #[arg(long, env = "TALON_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    #[arg(long, env = "TALON_TELEMETRY_INTERVAL_MS")]
    pub telemetry_interval_ms: Option<u64>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Let Talon create and destroy the MIG instances of GPUs in MIG mode.
    #[arg(long, env = "TALON_MANAGE_MIG", num_args = 0..=1, default_missing_value = "true")]
    pub manage_mig: Option<bool>,
    /// Report engine replicas' learned service times (default true).
    #[arg(long, env = "TALON_ENGINE_SIGNALS", num_args = 0..=1, default_missing_value = "true")]
    pub engine_signals: Option<bool>,
    /// Serve models of the engine `native` with Talon's own runtime.
    #[arg(long, env = "TALON_NATIVE", num_args = 0..=1, default_missing_value = "true")]
    pub native: Option<bool>,
    #[arg(long, env = "TALON_COST_PER_HOUR")]
    pub cost_per_hour: Option<f64>,
    #[arg(long, env = "TALON_CALIBRATE", num_args = 0..=1, default_missing_value = "true")]
    pub calibrate: Option<bool>,
    /// Inference engine command template ({model}, {artifact}, {port}, {gpus}).
    #[arg(long, env = "TALON_ENGINE_COMMAND")]
    pub engine_command: Option<String>,
    /// An engine profile: `NAME` (a built-in one: vllm, sglang, llamacpp,
    /// tgi, test) or `NAME=COMMAND TEMPLATE` (repeatable; other fields in
    /// the configuration file's [engines.NAME]).
    #[arg(long = "engine", value_parser = parse_engine)]
    pub engines: Vec<(String, Option<String>)>,
    #[arg(long, env = "TALON_ENGINE_LOG_DIR")]
    pub engine_log_dir: Option<PathBuf>,
    /// OTLP/gRPC collector for traces (e.g. http://otel-collector:4317).
    #[arg(long, env = "TALON_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces kept, 0 to 1.
    #[arg(long, env = "TALON_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,
    /// Where http(s) artifacts are downloaded to.
    #[arg(long, env = "TALON_ARTIFACT_CACHE_DIR")]
    pub artifact_cache_dir: Option<PathBuf>,
    /// Ports for engines, FIRST-LAST.
    #[arg(long, env = "TALON_ENGINE_PORTS")]
    pub engine_ports: Option<String>,
    /// Most requests one replica holds before it answers 429.
    #[arg(long, env = "TALON_MAX_QUEUE")]
    pub max_queue: Option<u32>,
}

fn parse_engine(s: &str) -> Result<(String, Option<String>), String> {
    match s.split_once('=') {
        Some((name, command)) => Ok((name.trim().to_string(), Some(command.to_string()))),
        None => Ok((s.trim().to_string(), None)),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.into(), v.into()))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Shortest join token accepted (the coordinators' rule too).
pub const MIN_JOIN_TOKEN: usize = 16;

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

impl AgentConfig {
    /// The labels the agent registers with: the configured ones, plus
    /// [`MANAGED_MIG_LABEL`] with `manage_mig`.
    pub fn advertised_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        if self.manage_mig {
            labels.insert(MANAGED_MIG_LABEL.0.into(), MANAGED_MIG_LABEL.1.into());
        }
        labels.insert(ENGINES_LABEL.into(), self.engine_names().join(","));
        labels
    }

    /// The engines this agent runs replicas of: its profiles, `*` for an
    /// engine command that runs every model, or `*` for the simulated
    /// executor (which stands in for any engine). Empty on real GPUs
    /// without an engine: nothing is placed there.
    pub fn engine_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.engines.keys().cloned().collect();
        let simulated = self.probe == ProbeKind::Simulated && self.engines.is_empty();
        if self.engine_command.is_some() || simulated {
            names.push(crate::replicas::ANY_ENGINE.into());
        }
        if self.native
            && !names
                .iter()
                .any(|n| n == crate::executor::native::NATIVE_ENGINE)
        {
            names.push(crate::executor::native::NATIVE_ENGINE.into());
        }
        names
    }

    /// Where the node's credential lives.
    pub fn credential_path(&self) -> PathBuf {
        if let Some(p) = &self.credential_file {
            return p.clone();
        }
        match std::env::var_os("STATE_DIRECTORY") {
            Some(dir) => PathBuf::from(dir).join("credential"),
            None => PathBuf::from(format!("talon-agent-{}.credential", self.node_id())),
        }
    }

    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn load(flags: &Flags) -> Result<AgentConfig, ConfigError> {
        let mut c = match &flags.config {
            Some(path) => AgentConfig::from_file(path)?,
            None => AgentConfig::default(),
        };
        if let Some(v) = &flags.node_id {
            c.node_id = Some(v.clone());
        }
        if let Some(v) = &flags.coordinators {
            c.coordinators = v.clone();
        }
        if let Some(v) = &flags.join_token {
            c.join_token = v.clone();
        }
        if let Some(v) = &flags.join_token_file {
            c.join_token_file = Some(v.clone());
        }
        if let Some(v) = &flags.credential_file {
            c.credential_file = Some(v.clone());
        }
        if let Some(v) = &flags.ca_file {
            c.coordinator_ca_file = Some(v.clone());
        }
        if let Some(v) = flags.probe {
            c.probe = v;
        }
        if let Some(v) = &flags.fleet {
            c.fleet = Some(v.clone());
            c.probe = flags.probe.unwrap_or(ProbeKind::Simulated);
        }
        if let Some(v) = &flags.sim_gpus {
            c.sim_gpus = Some(v.clone());
            c.probe = flags.probe.unwrap_or(ProbeKind::Simulated);
        }
        if let Some(v) = flags.http_listen {
            c.http_listen = v;
        }
        if let Some(v) = &flags.advertise {
            c.advertise = Some(v.clone());
        }
        if let Some(v) = flags.telemetry_interval_ms {
            c.telemetry_interval_ms = Some(v);
        }
        c.labels.extend(flags.labels.iter().cloned());
        if let Some(v) = flags.manage_mig {
            c.manage_mig = v;
        }
        if let Some(v) = flags.engine_signals {
            c.engine_signals = v;
        }
        if let Some(v) = flags.native {
            c.native = v;
        }
        if let Some(v) = flags.cost_per_hour {
            c.cost_per_hour = v;
        }
        if let Some(v) = flags.calibrate {
            c.calibrate = v;
        }
        if let Some(v) = &flags.engine_command {
            c.engine_command = Some(v.clone());
        }
        for (name, command) in &flags.engines {
            let profile = c.engines.entry(name.clone()).or_default();
            if command.is_some() {
                profile.command = command.clone();
            }
        }
        if let Some(v) = &flags.engine_log_dir {
            c.engine_log_dir = v.clone();
        }
        if let Some(v) = &flags.otlp_endpoint {
            c.tracing.otlp_endpoint = Some(v.clone());
        }
        if let Some(v) = flags.trace_sample_ratio {
            c.tracing.sample_ratio = v;
        }
        if let Some(v) = &flags.artifact_cache_dir {
            c.artifact_cache_dir = v.clone();
        }
        if let Some(v) = &flags.engine_ports {
            c.engine_ports = v.clone();
        }
        if let Some(v) = flags.max_queue {
            c.max_queue = v;
        }
        if let Some(path) = &c.join_token_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            c.join_token = text.lines().next().unwrap_or_default().trim().to_string();
        }
        if c.node_id.is_none() {
            c.node_id = Some(hostname());
        }
        c.validate()?;
        Ok(c)
    }

    pub fn node_id(&self) -> &str {
        self.node_id.as_deref().unwrap_or("localhost")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let id = self.node_id();
        if id.is_empty()
            || id.len() > 63
            || !id.as_bytes()[0].is_ascii_alphanumeric()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return bad(format!(
                "node_id {id:?} must be 1 to 63 letters, digits, '-', '.' or '_', starting with a letter or digit"
            ));
        }
        if self.coordinators.is_empty() {
            return bad("coordinators is empty; give at least one coordinator host:port".into());
        }
        for addr in &self.coordinators {
            if !talon_proto::is_host_port(addr) {
                return bad(format!("coordinator address {addr:?} is not host:port"));
            }
        }
        if self.join_token.is_empty() {
            return bad("join_token is empty; pass the cluster's join token (--join-token, TALON_JOIN_TOKEN or join_token_file)".into());
        }
        if self.join_token.len() < MIN_JOIN_TOKEN {
            return bad(format!(
                "join token is {} characters long; the cluster's token has at least {MIN_JOIN_TOKEN}: check that it was copied whole",
                self.join_token.len()
            ));
        }
        if let Some(bad_char) = self
            .join_token
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return bad(format!("join token contains {bad_char:?}; a token has only letters, digits, '-', '_' and '.'"));
        }
        match self.probe {
            ProbeKind::Simulated if self.fleet.is_none() && self.sim_gpus.is_none() => {
                return bad("probe is simulated but no fleet is given; pass --sim-gpus (e.g. h100-sxm:2,l4:4) or --fleet FILE".into())
            }
            ProbeKind::Simulated if self.fleet.is_some() && self.sim_gpus.is_some() => {
                return bad("both fleet and sim_gpus are given; use one".into())
            }
            ProbeKind::Nvml if self.fleet.is_some() || self.sim_gpus.is_some() => {
                return bad("probe is nvml but a simulated fleet is given; drop --fleet/--sim-gpus or use --probe simulated".into())
            }
            _ => {}
        }
        if self.manage_mig
            && self.probe == ProbeKind::Nvml
            && self.engine_command.is_none()
            && self.engines.is_empty()
        {
            return bad("manage_mig is set with the NVML probe but no engine: real GPUs run replicas through an engine; give --engine NAME (or [engines.NAME])".into());
        }
        if self.labels.contains_key(MANAGED_MIG_LABEL.0) {
            return bad(format!(
                "label {} is Talon's own; set --manage-mig instead",
                MANAGED_MIG_LABEL.0
            ));
        }
        if self.labels.contains_key(ENGINES_LABEL) {
            return bad(format!(
                "label {ENGINES_LABEL} is Talon's own; it lists the agent's engine profiles ([engines.NAME], --engine)"
            ));
        }
        for name in self.engines.keys() {
            if !PROFILE_NAMES.contains(&name.as_str()) {
                return bad(format!(
                    "engine profile {name:?} is not an engine a model can name; use one of: {}",
                    PROFILE_NAMES.join(", ")
                ));
            }
        }
        crate::executor::profiles::build_all(&self.engines).map_err(ConfigError::Invalid)?;
        crate::executor::ports::parse_range(&self.engine_ports).map_err(ConfigError::Invalid)?;
        if let Err(m) = self.tracing.validate() {
            return bad(m);
        }
        if self.engine_log_max_mib == 0 {
            return bad("engine_log_max_mib is 0; give the size in MiB at which engine logs rotate (1 or more)".into());
        }
        if let Some(ms) = self.telemetry_interval_ms {
            if ms < 10 {
                return bad(format!("telemetry_interval_ms is {ms}; use 10 or more"));
            }
        }
        if let Some(template) = &self.engine_command {
            crate::executor::external::CommandTemplate::parse(template)
                .map_err(|m| ConfigError::Invalid(format!("engine_command: {m}")))?;
        }
        if self.max_queue < 2 {
            return bad(format!(
                "max_queue is {}; use 2 or more (low priority gets half)",
                self.max_queue
            ));
        }
        if !(self.cost_per_hour.is_finite() && self.cost_per_hour >= 0.0) {
            return bad(format!(
                "cost_per_hour must be 0 or more, got {}",
                self.cost_per_hour
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simulated() -> AgentConfig {
        AgentConfig {
            probe: ProbeKind::Simulated,
            sim_gpus: Some("l4:1".into()),
            join_token: "a-join-token-of-32-characters-xx".into(),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn engine_profiles_come_from_the_file_and_are_advertised() {
        let config: AgentConfig = toml::from_str(
            r#"
probe = "simulated"
sim_gpus = "l4:1"
join_token = "a-join-token-of-32-characters-xx"
[engines.vllm]
[engines.llamacpp]
command = "llama-server -m {artifact} --host {host} --port {port}"
health_path = "/health"
[engines.llamacpp.options]
context-length = "-c {value}"
"#,
        )
        .expect("parses");
        config.validate().expect("valid");
        assert_eq!(config.engine_names(), ["llamacpp", "vllm"]);
        assert_eq!(
            config
                .advertised_labels()
                .get(ENGINES_LABEL)
                .map(String::as_str),
            Some("llamacpp,vllm")
        );
        // the simulated executor stands in for any engine; real GPUs with no
        // engine run nothing
        assert_eq!(simulated().engine_names(), ["*"]);
        assert!(AgentConfig::default().engine_names().is_empty());
        let one_command = AgentConfig {
            engine_command: Some("e --port {port} --host {host}".into()),
            ..AgentConfig::default()
        };
        assert_eq!(one_command.engine_names(), ["*"]);
    }

    #[test]
    fn bad_engine_settings_are_refused_with_the_fix() {
        let with = |name: &str, profile: crate::executor::profiles::ProfileConfig| AgentConfig {
            engines: BTreeMap::from([(name.to_string(), profile)]),
            ..simulated()
        };
        let cases = [
            (
                with("vllm2", Default::default()),
                "is not an engine a model can name",
            ),
            (
                with(
                    "vllm",
                    crate::executor::profiles::ProfileConfig {
                        command: Some("vllm serve {artifact}".into()),
                        ..Default::default()
                    },
                ),
                "{port}",
            ),
            (
                AgentConfig {
                    labels: BTreeMap::from([(ENGINES_LABEL.to_string(), "vllm".to_string())]),
                    ..simulated()
                },
                "Talon's own",
            ),
            (
                AgentConfig {
                    engine_log_max_mib: 0,
                    ..simulated()
                },
                "engine_log_max_mib",
            ),
        ];
        for (config, says) in cases {
            let err = config.validate().expect_err(says).to_string();
            assert!(err.contains(says), "{says}: {err}");
        }
        assert!(toml::from_str::<AgentConfig>("[engines.vllm]\nhealth = \"/h\"\n").is_err());
    }
}
