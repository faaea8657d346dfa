//! The coordinator's configuration: defaults, a TOML file, environment
//! variables (`TALON_*`) and flags, in rising order of precedence, then
//! [`Config::validate`], which refuses contradictions with a message that
//! says what to change. `--check` stops after validation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

/// Raft timings and snapshot policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSettings {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// A follower that hears nothing from a known leader for `max` (the
    /// leader's lease, fixed by openraft to `election_timeout_max_ms`) plus a
    /// random time in [min, max) starts an election: with the defaults a lost
    /// leader is noticed 0.75 to 1 s after its last heartbeat.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log up to it) every this many entries.
    pub snapshot_logs: u64,
    /// Entries kept in the log behind the last snapshot, so that a follower a
    /// little behind catches up from the log rather than a snapshot.
    pub keep_logs_after_snapshot: u64,
    /// Group commit: the leader keeps at most this many proposals in
    /// flight; writes that arrive while all are taken go together in the
    /// next one (label and node-state writes; `crate::proposer`).
    pub proposals_in_flight: usize,
    /// The most writes one group-committed entry carries.
    pub max_batch: usize,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 50,
            election_timeout_min_ms: 250,
            election_timeout_max_ms: 500,
            snapshot_logs: 10_000,
            keep_logs_after_snapshot: 1_000,
            proposals_in_flight: 2,
            max_batch: 256,
        }
    }
}

/// How node agents join and how their leases run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// Shared secret agents present to register; empty refuses every agent.
    pub join_token: String,
    /// Read the join token from this file instead (first line).
    pub join_token_file: Option<PathBuf>,
    /// How often agents send telemetry.
    pub telemetry_interval_ms: u64,
    /// A node silent this long becomes Suspect (no new work).
    pub suspect_after_ms: u64,
    /// A node silent this long becomes Down (its work moves).
    pub down_after_ms: u64,
    /// Samples kept per GPU on the leader: the memory-pressure check reads
    /// the last [`crate::reconcile::SUSTAINED_SAMPLES`]; each sample costs
    /// about 48 bytes per GPU per node (at 50,000 8-GPU nodes, 120 samples
    /// were 2.2 GiB of the leader's memory).
    pub history_len: usize,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            join_token: String::new(),
            join_token_file: None,
            telemetry_interval_ms: 1_000,
            suspect_after_ms: 5_000,
            down_after_ms: 15_000,
            history_len: 10,
        }
    }
}

/// Who may call the admin and inference APIs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Authenticate every admin and inference call with an API key (the
    /// default). Off: every caller is an anonymous admin, for experiments on
    /// a machine nobody else can reach. Agents authenticate either way.
    pub enabled: bool,
    /// Where `--bootstrap` reads the first admin key from, or writes the one
    /// it makes (mode 0600); default `<data_dir>/admin.key`.
    pub admin_key_file: Option<PathBuf>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            enabled: true,
            admin_key_file: None,
        }
    }
}

/// TLS for every port (see `tls.rs`): all three files, or none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// The cluster CA certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// This coordinator's certificate (PEM, common name talon-coordinator-…).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Shortest join token accepted.
pub const MIN_JOIN_TOKEN: usize = 16;

/// Checks a join token's form: at least 16 characters of letters, digits,
/// `-`, `_` and `.`.
pub fn validate_join_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_JOIN_TOKEN {
        return Err(format!(
            "join token is {} characters long; use at least {MIN_JOIN_TOKEN}",
            token.len()
        ));
    }
    if let Some(bad) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "join token contains {bad:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Output format of the logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything a coordinator needs to start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's Raft id, unique in the cluster and fixed for the life of
    /// its data directory.
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// gRPC: Raft, admin API.
    pub listen: SocketAddr,
    /// The gRPC address other coordinators and clients use; defaults to
    /// `listen` (with port 0 resolved to the bound port).
    pub advertise: Option<String>,
    /// HTTP: /metrics, /healthz.
    pub http_listen: SocketAddr,
    /// How long an admin write may wait to commit before the caller is told
    /// the outcome is unknown.
    pub write_timeout_ms: u64,
    /// Accept the test-only SetFaults admin call.
    pub fault_injection: bool,
    /// On a node whose log is empty, bootstrap a one-node cluster at start
    /// (others join it later). Ignored once the node belongs to a cluster.
    pub bootstrap: bool,
    /// Other coordinators (host:port) a bootstrapping node asks first: if
    /// one already belongs to a cluster, this node does not form another.
    pub bootstrap_peers: Vec<String>,
    /// How long to wait for bootstrap peers to answer.
    pub bootstrap_wait_ms: u64,
    /// Audit entries kept; older ones are trimmed by the leader (the same
    /// cut on every replica).
    pub audit_keep: u64,
    /// Largest inference request body the gateway reads; a larger one is
    /// refused with 413.
    pub max_body_bytes: usize,
    pub log_format: LogFormat,
    pub raft: RaftSettings,
    pub agents: AgentSettings,
    pub auth: AuthSettings,
    pub tls: TlsSettings,
    /// What the inference gateway holds and queues.
    pub gateway: crate::gateway::queue::GatewaySettings,
    /// OpenTelemetry export (`[tracing]`).
    pub tracing: talon_trace::TraceConfig,
    /// Raft on its own listener (required with TLS: mutual TLS there).
    /// Unset: Raft shares the API port.
    pub raft_listen: Option<SocketAddr>,
    /// The Raft address peers use; defaults to `raft_listen`.
    pub raft_advertise: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("talon-data"),
            listen: "127.0.0.1:7400".parse().expect("valid literal"),
            advertise: None,
            http_listen: "127.0.0.1:7480".parse().expect("valid literal"),
            write_timeout_ms: 5_000,
            fault_injection: false,
            bootstrap: false,
            bootstrap_peers: Vec::new(),
            bootstrap_wait_ms: 10_000,
            audit_keep: 100_000,
            max_body_bytes: 4 << 20,
            log_format: LogFormat::Text,
            raft: RaftSettings::default(),
            agents: AgentSettings::default(),
            auth: AuthSettings::default(),
            tls: TlsSettings::default(),
            gateway: Default::default(),
            tracing: Default::default(),
            raft_listen: None,
            raft_advertise: None,
        }
    }
}

/// Flags of `talon-coordinator`; each may also come from the environment.
#[derive(Debug, Parser)]
#[command(
    name = "talon-coordinator",
    version,
    about = "Talon coordinator: the Raft-replicated control plane"
)]
pub struct Flags {
    /// TOML configuration file; flags and environment override it.
    #[arg(long, env = "TALON_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    pub check: bool,
    #[arg(long, env = "TALON_NODE_ID")]
    pub node_id: Option<u64>,
    #[arg(long, env = "TALON_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "TALON_LISTEN")]
    pub listen: Option<SocketAddr>,
    #[arg(long, env = "TALON_ADVERTISE")]
    pub advertise: Option<String>,
    #[arg(long, env = "TALON_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    #[arg(long, env = "TALON_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    #[arg(long, env = "TALON_FAULT_INJECTION", num_args = 0..=1, default_missing_value = "true")]
    pub fault_injection: Option<bool>,
    /// Bootstrap a one-node cluster when this node's log is empty.
    #[arg(long, env = "TALON_BOOTSTRAP", num_args = 0..=1, default_missing_value = "true")]
    pub bootstrap: Option<bool>,
    /// Comma-separated coordinators a bootstrapping node asks first.
    #[arg(long, env = "TALON_BOOTSTRAP_PEERS", value_delimiter = ',')]
    pub bootstrap_peers: Option<Vec<String>>,
    #[arg(long, env = "TALON_BOOTSTRAP_WAIT_MS")]
    pub bootstrap_wait_ms: Option<u64>,
    #[arg(long, env = "TALON_AUDIT_KEEP")]
    pub audit_keep: Option<u64>,
    /// Largest inference request body, bytes (default 4 MiB).
    #[arg(long, env = "TALON_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Requests the gateway holds at once, waiting ones included.
    #[arg(long, env = "TALON_GATEWAY_MAX_IN_FLIGHT")]
    pub gateway_max_in_flight: Option<usize>,
    /// Requests that may wait at the gateway for a replica with room.
    #[arg(long, env = "TALON_GATEWAY_MAX_QUEUED")]
    pub gateway_max_queued: Option<usize>,
    /// How long a request without a deadline may wait for a replica with
    /// room (default 0: 429 at once).
    #[arg(long, env = "TALON_GATEWAY_QUEUE_WAIT_MS")]
    pub gateway_queue_wait_ms: Option<u64>,
    #[arg(long, env = "TALON_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC collector for traces (e.g. http://otel-collector:4317).
    #[arg(long, env = "TALON_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces kept, 0 to 1.
    #[arg(long, env = "TALON_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,
    #[arg(long, env = "TALON_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    #[arg(long, env = "TALON_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    #[arg(long, env = "TALON_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    #[arg(long, env = "TALON_SNAPSHOT_LOGS")]
    pub snapshot_logs: Option<u64>,
    #[arg(long, env = "TALON_KEEP_LOGS_AFTER_SNAPSHOT")]
    pub keep_logs_after_snapshot: Option<u64>,
    /// Group commit: proposals the leader keeps in flight.
    #[arg(long, env = "TALON_PROPOSALS_IN_FLIGHT")]
    pub proposals_in_flight: Option<usize>,
    /// Group commit: the most writes in one entry.
    #[arg(long, env = "TALON_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// The token node agents present to register.
    #[arg(long, env = "TALON_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    #[arg(long, env = "TALON_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    #[arg(long, env = "TALON_TELEMETRY_INTERVAL_MS")]
    pub telemetry_interval_ms: Option<u64>,
    #[arg(long, env = "TALON_SUSPECT_AFTER_MS")]
    pub suspect_after_ms: Option<u64>,
    #[arg(long, env = "TALON_DOWN_AFTER_MS")]
    pub down_after_ms: Option<u64>,
    /// Authenticate admin and inference calls (default true); `false` makes
    /// every caller an anonymous admin.
    #[arg(long, env = "TALON_AUTH")]
    pub auth: Option<bool>,
    /// Where --bootstrap reads or writes the first admin key.
    #[arg(long, env = "TALON_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<PathBuf>,
    #[arg(long, env = "TALON_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    #[arg(long, env = "TALON_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long, env = "TALON_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Raft's own listener (mutual TLS when TLS is on).
    #[arg(long, env = "TALON_RAFT_LISTEN")]
    pub raft_listen: Option<SocketAddr>,
    #[arg(long, env = "TALON_RAFT_ADVERTISE")]
    pub raft_advertise: Option<String>,
}

/// A configuration that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Defaults, then the file, then environment and flags; validated.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let mut config = match &flags.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = flags.$flag.clone() { config.$($field).+ = v; })*
            };
        }
        set!(
            node_id => node_id, data_dir => data_dir, listen => listen, http_listen => http_listen,
            write_timeout_ms => write_timeout_ms, fault_injection => fault_injection, bootstrap => bootstrap, log_format => log_format,
            heartbeat_ms => raft.heartbeat_ms, election_timeout_min_ms => raft.election_timeout_min_ms,
            election_timeout_max_ms => raft.election_timeout_max_ms, snapshot_logs => raft.snapshot_logs,
            keep_logs_after_snapshot => raft.keep_logs_after_snapshot,
            proposals_in_flight => raft.proposals_in_flight, max_batch => raft.max_batch,
            join_token => agents.join_token, telemetry_interval_ms => agents.telemetry_interval_ms,
            suspect_after_ms => agents.suspect_after_ms, down_after_ms => agents.down_after_ms,
            auth => auth.enabled, bootstrap_peers => bootstrap_peers,
            bootstrap_wait_ms => bootstrap_wait_ms, audit_keep => audit_keep,
            max_body_bytes => max_body_bytes, gateway_max_in_flight => gateway.max_in_flight,
            gateway_max_queued => gateway.max_queued, gateway_queue_wait_ms => gateway.queue_wait_ms,
            trace_sample_ratio => tracing.sample_ratio,
        );
        if flags.admin_key_file.is_some() {
            config.auth.admin_key_file = flags.admin_key_file.clone();
        }
        macro_rules! set_opt {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = flags.$flag.clone() { config.$($field).+ = Some(v); })*
            };
        }
        set_opt!(
            tls_ca_file => tls.ca_file, tls_cert_file => tls.cert_file, tls_key_file => tls.key_file,
            raft_listen => raft_listen, raft_advertise => raft_advertise,
            otlp_endpoint => tracing.otlp_endpoint,
        );
        if flags.join_token_file.is_some() {
            config.agents.join_token_file = flags.join_token_file.clone();
        }
        if let Some(path) = &config.agents.join_token_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            config.agents.join_token = text.lines().next().unwrap_or_default().trim().to_string();
        }
        if flags.advertise.is_some() {
            config.advertise = flags.advertise.clone();
        }
        config.validate()?;
        config.tls_material()?;
        Ok(config)
    }

    /// The TLS files, read and checked; `None` when TLS is off.
    pub fn tls_material(&self) -> Result<Option<crate::tls::TlsMaterial>, ConfigError> {
        match (&self.tls.ca_file, &self.tls.cert_file, &self.tls.key_file) {
            (Some(ca), Some(cert), Some(key)) => crate::tls::TlsMaterial::load(ca, cert, key)
                .map(Some)
                .map_err(ConfigError::Invalid),
            _ => Ok(None),
        }
    }

    /// The Raft address this node advertises ("" when Raft shares the API
    /// port).
    pub fn raft_advertise_addr(&self) -> String {
        match (&self.raft_advertise, &self.raft_listen) {
            (Some(a), _) => a.clone(),
            (None, Some(l)) => l.to_string(),
            (None, None) => String::new(),
        }
    }

    /// Refuses values that cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let r = &self.raft;
        if self.node_id == 0 {
            return bad("node_id must be 1 or more".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad(
                "data_dir is empty; give the directory that holds this node's log and state".into(),
            );
        }
        if self.listen.ip().is_unspecified() && self.advertise.is_none() {
            return bad(format!(
                "listen is {} (all interfaces) but advertise is not set; set advertise to the host:port peers and clients use",
                self.listen
            ));
        }
        if let Some(addr) = &self.advertise {
            if !talon_proto::is_host_port(addr) {
                return bad(format!(
                    "advertise {addr:?} is not host:port with a non-zero port"
                ));
            }
        }
        if self.listen.port() != 0 && self.listen == self.http_listen {
            return bad(format!(
                "listen and http_listen are both {}; give them different ports",
                self.listen
            ));
        }
        if let Some(peer) = self
            .bootstrap_peers
            .iter()
            .find(|p| !talon_proto::is_host_port(p))
        {
            return bad(format!(
                "bootstrap_peers entry {peer:?} is not host:port with a non-zero port"
            ));
        }
        let t = &self.tls;
        let given = [&t.ca_file, &t.cert_file, &t.key_file]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if given != 0 && given != 3 {
            return bad(
                "tls needs all three of ca_file, cert_file and key_file (or none of them)".into(),
            );
        }
        if given == 3 && self.raft_listen.is_none() {
            return bad("tls is on but raft_listen is not set: with TLS, Raft runs on its own listener with mutual TLS; set raft_listen (e.g. 127.0.0.1:7410)".into());
        }
        if let Some(raft) = self.raft_listen {
            if raft.port() != 0 && (raft == self.listen || raft == self.http_listen) {
                return bad(format!(
                    "raft_listen {raft} is also listen or http_listen; give Raft a port of its own"
                ));
            }
            if raft.ip().is_unspecified() && self.raft_advertise.is_none() {
                return bad(format!(
                    "raft_listen is {raft} (all interfaces) but raft_advertise is not set; set it to the host:port peers use"
                ));
            }
        }
        if let Some(addr) = &self.raft_advertise {
            if !talon_proto::is_host_port(addr) {
                return bad(format!(
                    "raft_advertise {addr:?} is not host:port with a non-zero port"
                ));
            }
        }
        if !(1024..=256 << 20).contains(&self.max_body_bytes) {
            return bad(format!(
                "max_body_bytes is {}; give 1024 (1 KiB) to 268435456 (256 MiB)",
                self.max_body_bytes
            ));
        }
        self.gateway.validate().map_err(ConfigError::Invalid)?;
        self.tracing.validate().map_err(ConfigError::Invalid)?;
        if self.audit_keep < 100 {
            return bad(format!(
                "audit_keep is {}; keep at least 100 audit entries",
                self.audit_keep
            ));
        }
        if r.heartbeat_ms < 10 {
            return bad(format!(
                "raft.heartbeat_ms is {}; use 10 or more",
                r.heartbeat_ms
            ));
        }
        if r.election_timeout_min_ms <= 2 * r.heartbeat_ms {
            return bad(format!(
                "raft.election_timeout_min_ms ({}) must be more than twice raft.heartbeat_ms ({}), or followers elect a new leader between heartbeats; raise it or lower heartbeat_ms",
                r.election_timeout_min_ms, r.heartbeat_ms
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad(format!(
                "raft.election_timeout_max_ms ({}) must be greater than raft.election_timeout_min_ms ({})",
                r.election_timeout_max_ms, r.election_timeout_min_ms
            ));
        }
        if r.snapshot_logs < 10 {
            return bad(format!(
                "raft.snapshot_logs is {}; use 10 or more",
                r.snapshot_logs
            ));
        }
        if !(1..=64).contains(&r.proposals_in_flight) {
            return bad(format!(
                "raft.proposals_in_flight is {}; use 1 to 64",
                r.proposals_in_flight
            ));
        }
        if !(1..=crate::state::MAX_BATCH).contains(&r.max_batch) {
            return bad(format!(
                "raft.max_batch is {}; use 1 to {}",
                r.max_batch,
                crate::state::MAX_BATCH
            ));
        }
        if self.write_timeout_ms < r.election_timeout_max_ms {
            return bad(format!(
                "write_timeout_ms ({}) is shorter than raft.election_timeout_max_ms ({}); a write could time out during an ordinary election: raise it",
                self.write_timeout_ms, r.election_timeout_max_ms
            ));
        }
        let a = &self.agents;
        if !a.join_token.is_empty() {
            validate_join_token(&a.join_token)
                .map_err(|m| ConfigError::Invalid(format!("agents.join_token: {m}")))?;
        }
        if a.telemetry_interval_ms < 10 {
            return bad(format!(
                "agents.telemetry_interval_ms is {}; use 10 or more",
                a.telemetry_interval_ms
            ));
        }
        if a.suspect_after_ms < 2 * a.telemetry_interval_ms {
            return bad(format!(
                "agents.suspect_after_ms ({}) must be at least twice agents.telemetry_interval_ms ({}), or one late report marks a node Suspect",
                a.suspect_after_ms, a.telemetry_interval_ms
            ));
        }
        if a.down_after_ms <= a.suspect_after_ms {
            return bad(format!(
                "agents.down_after_ms ({}) must be greater than agents.suspect_after_ms ({})",
                a.down_after_ms, a.suspect_after_ms
            ));
        }
        let least = crate::reconcile::SUSTAINED_SAMPLES;
        if a.history_len < least || a.history_len > 100_000 {
            return bad(format!(
                "agents.history_len must be between {least} (the samples the memory-pressure check reads) and 100000, got {}",
                a.history_len
            ));
        }
        Ok(())
    }

    /// Where `--bootstrap` keeps the first admin key.
    pub fn admin_key_path(&self) -> PathBuf {
        self.auth
            .admin_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.key"))
    }

    /// openraft's configuration for these settings.
    pub fn openraft(&self) -> Result<openraft::Config, ConfigError> {
        let r = &self.raft;
        let config = openraft::Config {
            cluster_name: "talon".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_logs),
            max_in_snapshot_log_to_keep: r.keep_logs_after_snapshot,
            snapshot_max_chunk_size: 1024 * 1024,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("raft settings: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        Config::default().openraft().unwrap();
    }

    #[test]
    fn contradictions_are_named() {
        let mut c = Config::default();
        c.raft.election_timeout_min_ms = 90;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("more than twice raft.heartbeat_ms"));
        let mut c = Config::default();
        c.listen = "0.0.0.0:7400".parse().unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("advertise is not set"));
        let mut c = Config::default();
        c.write_timeout_ms = 100;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("write_timeout_ms"));
        let mut c = Config::default();
        c.agents.history_len = 4;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains(
                "history_len must be between 5 (the samples the memory-pressure check reads)"
            ),
            "{err}"
        );
    }

    #[test]
    fn file_with_unknown_or_mistyped_field_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "node_id = 2\nlisen = \"127.0.0.1:1\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `lisen`"), "{err}");
        std::fs::write(&path, "node_id = \"two\"\n").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("node_id"), "{err}");
        std::fs::write(&path, "node_id = 2\n[raft]\nheartbeat_ms = 40\n").unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(
            (
                c.node_id,
                c.raft.heartbeat_ms,
                c.raft.election_timeout_min_ms
            ),
            (2, 40, 250)
        );
    }
}
