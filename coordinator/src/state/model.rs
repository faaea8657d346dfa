//! The model registry's records and the validation of model specs.
//!
//! Validation is pure and runs twice: at the admin API, so that a bad spec is
//! refused before anything is proposed, and again inside `apply`, so that the
//! state machine never holds a record that breaks these rules whatever reached
//! the log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Inference engines a model version can be served by.
pub const ENGINES: &[&str] = &[
    "simulated",
    "vllm",
    "sglang",
    "llamacpp",
    "tgi",
    "triton",
    "native",
    // talon-fake-engine, the engine of Talon's own tests and benchmarks
    "test",
];

/// Priority classes, highest first.
pub const PRIORITIES: &[&str] = &["critical", "high", "normal", "low"];

/// Most labels one model may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label value, bytes.
pub const MAX_LABEL_VALUE: usize = 1024;
/// Largest memory footprint accepted for one replica: 16 TiB, in MiB.
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
/// Longest latency objective accepted: one hour, in ms.
pub const MAX_LATENCY_SLO_MS: u32 = 3_600_000;
/// Most replicas one model may ask for.
pub const MAX_REPLICAS: u32 = 10_000;

/// What a `model create` asks for: one version of a model plus the settings
/// shared by all its versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    pub version: String,
    pub engine: String,
    pub artifact_uri: String,
    /// GPU memory one replica needs (weights plus KV budget), MiB.
    pub memory_mib: u64,
    pub latency_slo_ms: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub priority: String,
    pub labels: BTreeMap<String, String>,
}

/// One registered version of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub version: String,
    pub engine: String,
    pub artifact_uri: String,
    pub memory_mib: u64,
    /// From the log entry that registered it.
    pub created_at_ms: u64,
}

/// A model in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub name: String,
    /// In registration order; never empty.
    pub versions: Vec<ModelVersion>,
    pub latency_slo_ms: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub priority: String,
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Log index of the last change to this record.
    pub revision: u64,
}

/// Checks a model name: 1 to 63 characters of `a-z`, `0-9`, `-`, `.` and
/// `_`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "model name must be 1 to 63 characters long, got {} characters",
            name.len()
        ));
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(format!(
            "model name {name:?} must start with a lowercase letter or a digit"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!(
            "model name {name:?} contains {bad:?}; use only lowercase letters, digits, '-', '.' and '_'"
        ));
    }
    Ok(())
}

/// Checks a version string: 1 to 64 characters of letters, digits, `.`, `-`,
/// `_` and `+`.
pub fn validate_version(version: &str) -> Result<(), String> {
    if version.is_empty() || version.len() > 64 {
        return Err(format!(
            "version must be 1 to 64 characters long, got {} characters",
            version.len()
        ));
    }
    if let Some(bad) = version
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+')))
    {
        return Err(format!(
            "version {version:?} contains {bad:?}; use letters, digits, '.', '-', '_' and '+'"
        ));
    }
    Ok(())
}

/// Checks one label key: 1 to 63 characters of letters, digits, `-`, `_`,
/// `.` and `/`.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 63 {
        return Err(format!("label key {key:?} must be 1 to 63 characters long"));
    }
    if let Some(bad) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return Err(format!(
            "label key {key:?} contains {bad:?}; use letters, digits, '-', '_', '.' and '/'"
        ));
    }
    Ok(())
}

/// Checks a set of labels: keys, value lengths and count.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "a model may carry at most {MAX_LABELS} labels, got {}",
            labels.len()
        ));
    }
    for (key, value) in labels {
        validate_label_key(key)?;
        if value.len() > MAX_LABEL_VALUE {
            return Err(format!(
                "label {key:?} has a value of {} bytes; the most is {MAX_LABEL_VALUE}",
                value.len()
            ));
        }
    }
    Ok(())
}

/// Model labels `engine.<option>` are options for the engine serving it
/// (`engine.context-length=8192`); each agent's engine profile turns them
/// into that engine's flags.
pub const ENGINE_OPTION_PREFIX: &str = "engine.";

/// The engine options a model may set, and what each takes.
pub const ENGINE_OPTIONS: &[(&str, &str)] = &[
    ("context-length", "a number of tokens from 1 to 16777216"),
    (
        "quantization",
        "a method name such as awq, gptq or fp8: 1 to 32 letters, digits, '_' or '-'",
    ),
    (
        "chat-template",
        "a template name or a path on the agents' hosts, without whitespace",
    ),
    ("embedding", "true or false"),
    (
        "dtype",
        "a type name such as auto, float16 or bfloat16: 1 to 32 letters, digits or '_'",
    ),
];

/// The model label that splits traffic during a version change: while
/// replicas of an older version serve beside the newest one's, this share
/// of requests (0 to 100 %) goes to the newest version and the rest to the
/// older, and the older replicas are kept until it is 100 or removed (a
/// canary). Without it, any ready replica takes requests and the older ones
/// go once every newest one is ready.
pub const CANARY_LABEL: &str = "canary-percent";

/// The model's canary share, if its label holds a valid one.
pub fn canary_percent(labels: &BTreeMap<String, String>) -> Option<u32> {
    canary_share(labels.get(CANARY_LABEL)?)
}

/// A canary share label's value, if it is a valid one (0 to 100).
pub fn canary_share(value: &str) -> Option<u32> {
    value.parse::<u32>().ok().filter(|p| *p <= 100)
}

/// The engine options among a model's labels, keyed without the prefix.
pub fn engine_options(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(ENGINE_OPTION_PREFIX)?.to_string(), v.clone())))
        .collect()
}

/// The model label naming the model that serves a request this one could
/// not (overloaded, failing or without a ready replica).
pub const FALLBACK_LABEL: &str = "fallback";

/// The model labels of per-token prices, US dollars per million prompt
/// and completion tokens: what a model served by a remote provider costs
/// (or an internal list price). Set, they replace the GPU-time charge.
pub const PROMPT_PRICE_LABEL: &str = "price.prompt-per-mtok";
pub const COMPLETION_PRICE_LABEL: &str = "price.completion-per-mtok";

/// The model's per-token prices (dollars per million prompt and
/// completion tokens; an unset one is 0), if either label is set.
pub fn token_prices(labels: &BTreeMap<String, String>) -> Option<(f64, f64)> {
    let price = |label: &str| -> Option<f64> {
        labels
            .get(label)?
            .parse::<f64>()
            .ok()
            .filter(|p| p.is_finite() && (0.0..=10_000.0).contains(p))
    };
    let (p, c) = (price(PROMPT_PRICE_LABEL), price(COMPLETION_PRICE_LABEL));
    (p.is_some() || c.is_some()).then(|| (p.unwrap_or(0.0), c.unwrap_or(0.0)))
}

/// Checks the engine options among `labels`: known names, values of the
/// right kind, and nothing an engine could read as a flag of its own; and
/// the gateway's labels (fallback, canary share, prices). Checked where a
/// model is created or labelled (not when the log is replayed, so that
/// entries from before keep their meaning).
pub fn validate_engine_options(labels: &BTreeMap<String, String>) -> Result<(), String> {
    crate::autoscale::settings::validate(labels)?;
    if let Some(v) = labels.get(FALLBACK_LABEL) {
        validate_name(v).map_err(|m| format!("label {FALLBACK_LABEL}: {m}"))?;
    }
    for label in [PROMPT_PRICE_LABEL, COMPLETION_PRICE_LABEL] {
        if let Some(v) = labels.get(label) {
            let ok = v
                .parse::<f64>()
                .is_ok_and(|p| p.is_finite() && (0.0..=10_000.0).contains(&p));
            if !ok {
                return Err(format!(
                    "label {label} is {v:?}; give US dollars per million tokens, 0 to 10000 (for example 0.15)"
                ));
            }
        }
    }
    if let Some(v) = labels.get(CANARY_LABEL) {
        if canary_percent(labels).is_none() {
            return Err(format!(
                "label {CANARY_LABEL} is {v:?}; give the newest version's share of requests, 0 to 100"
            ));
        }
    }
    for (name, value) in engine_options(labels) {
        let Some((_, takes)) = ENGINE_OPTIONS.iter().find(|(n, _)| *n == name) else {
            return Err(format!(
                "label {ENGINE_OPTION_PREFIX}{name} is not an engine option; use one of: {}",
                ENGINE_OPTIONS
                    .iter()
                    .map(|(n, _)| format!("{ENGINE_OPTION_PREFIX}{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let word = |extra: &[char]| {
            (1..=32).contains(&value.len())
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
        };
        let ok = match name.as_str() {
            "context-length" => value
                .parse::<u32>()
                .is_ok_and(|n| (1..=16_777_216).contains(&n)),
            "quantization" => word(&['_', '-']),
            "dtype" => word(&['_']),
            "embedding" => value == "true" || value == "false",
            _ => {
                !value.is_empty()
                    && !value.starts_with('-')
                    && !value.chars().any(|c| c.is_whitespace() || c.is_control())
            }
        };
        if !ok {
            return Err(format!(
                "label {ENGINE_OPTION_PREFIX}{name} is {value:?}; it takes {takes}"
            ));
        }
    }
    Ok(())
}

impl ModelSpec {
    /// Checks every field and their consistency; the error names the field
    /// and says what to change.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        validate_version(&self.version)?;
        if !ENGINES.contains(&self.engine.as_str()) {
            return Err(format!(
                "engine {:?} is unknown; use one of: {}",
                self.engine,
                ENGINES.join(", ")
            ));
        }
        if self.artifact_uri.len() > 1024
            || self
                .artifact_uri
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(format!(
                "artifact_uri must be at most 1024 characters without whitespace or control characters, got {} characters",
                self.artifact_uri.len()
            ));
        }
        match self.artifact_uri.split_once("://") {
            Some((scheme, rest))
                if scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                    && !rest.is_empty() => {}
            _ => {
                return Err(format!(
                    "artifact_uri {:?} is not a URI; give one like hf://org/model, s3://bucket/key or file:///path",
                    self.artifact_uri
                ))
            }
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            return Err(format!(
                "memory_mib must be between 1 and {MAX_MEMORY_MIB} (16 TiB), got {}",
                self.memory_mib
            ));
        }
        if self.latency_slo_ms == 0 || self.latency_slo_ms > MAX_LATENCY_SLO_MS {
            return Err(format!(
                "latency_slo_ms must be between 1 and {MAX_LATENCY_SLO_MS}, got {}",
                self.latency_slo_ms
            ));
        }
        if self.max_replicas == 0 || self.max_replicas > MAX_REPLICAS {
            return Err(format!(
                "max_replicas must be between 1 and {MAX_REPLICAS}, got {}",
                self.max_replicas
            ));
        }
        if self.min_replicas > self.max_replicas {
            return Err(format!(
                "min_replicas ({}) is greater than max_replicas ({}); lower min_replicas or raise max_replicas",
                self.min_replicas, self.max_replicas
            ));
        }
        if !PRIORITIES.contains(&self.priority.as_str()) {
            return Err(format!(
                "priority {:?} is unknown; use one of: {}",
                self.priority,
                PRIORITIES.join(", ")
            ));
        }
        validate_labels(&self.labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> ModelSpec {
        ModelSpec {
            name: "llama-8b".into(),
            version: "v1".into(),
            engine: "vllm".into(),
            artifact_uri: "hf://meta-llama/Llama-3.1-8B".into(),
            memory_mib: 20_000,
            latency_slo_ms: 500,
            min_replicas: 1,
            max_replicas: 4,
            priority: "normal".into(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn good_spec_passes() {
        spec().validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(Box<dyn Fn(&mut ModelSpec)>, &str)> = vec![
            (Box::new(|s| s.name = "Bad Name".into()), "model name"),
            (Box::new(|s| s.name = String::new()), "model name"),
            (Box::new(|s| s.version = "v 1".into()), "version"),
            (Box::new(|s| s.engine = "pytorch".into()), "engine"),
            (
                Box::new(|s| s.artifact_uri = "llama.bin".into()),
                "artifact_uri",
            ),
            (Box::new(|s| s.memory_mib = 0), "memory_mib"),
            (Box::new(|s| s.latency_slo_ms = 0), "latency_slo_ms"),
            (Box::new(|s| s.max_replicas = 0), "max_replicas"),
            (
                Box::new(|s| s.min_replicas = 9),
                "min_replicas (9) is greater than max_replicas (4)",
            ),
            (Box::new(|s| s.priority = "urgent".into()), "priority"),
            (
                Box::new(|s| _ = s.labels.insert("bad key".into(), "x".into())),
                "label key",
            ),
            (
                Box::new(|s| _ = s.labels.insert("k".into(), "x".repeat(2000))),
                "value of 2000 bytes",
            ),
        ];
        for (mutate, needle) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.validate().unwrap_err();
            assert!(
                err.contains(needle),
                "error {err:?} should mention {needle:?}"
            );
        }
    }

    #[test]
    fn engine_options_are_checked_where_models_are_made() {
        let labels = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        for (k, v) in [
            ("engine.context-length", "8192"),
            ("engine.quantization", "awq"),
            ("engine.chat-template", "/etc/templates/chatml.jinja"),
            ("engine.embedding", "true"),
            ("engine.dtype", "bfloat16"),
            ("zone", "--not-an-engine-option"),
        ] {
            validate_engine_options(&labels(k, v)).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        for (k, v, says) in [
            ("engine.temperature", "1", "not an engine option"),
            ("engine.context-length", "0", "1 to 16777216"),
            ("engine.context-length", "lots", "1 to 16777216"),
            (
                "engine.quantization",
                "--load-format=dummy",
                "engine.quantization",
            ),
            ("engine.chat-template", "-x", "engine.chat-template"),
            ("engine.embedding", "yes", "true or false"),
            ("engine.dtype", "float16;rm", "engine.dtype"),
        ] {
            let err = validate_engine_options(&labels(k, v)).expect_err(k);
            assert!(err.contains(says), "{k}={v}: {err}");
        }
        let options = engine_options(&BTreeMap::from([
            ("engine.context-length".to_string(), "512".to_string()),
            ("zone".to_string(), "a".to_string()),
        ]));
        assert_eq!(
            options,
            BTreeMap::from([("context-length".to_string(), "512".to_string())])
        );
    }
}
