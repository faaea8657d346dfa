//! A model's autoscale settings, from its labels (`autoscale.*`), checked
//! where the labels are written.

use std::collections::BTreeMap;

use talon_scheduler::capacity::Slo;

/// `off` keeps the model at `min_replicas`; anything else scales between
/// `min_replicas` and `max_replicas` (when they differ).
pub const ENABLED_LABEL: &str = "autoscale";
pub const TPOT_LABEL: &str = "autoscale.tpot-ms";
pub const TTFT_PER_1K_LABEL: &str = "autoscale.ttft-per-1k-ms";
pub const INTERVAL_LABEL: &str = "autoscale.interval-s";
pub const BUCKET_LABEL: &str = "autoscale.bucket-s";
pub const HORIZON_LABEL: &str = "autoscale.horizon-s";
pub const LOAD_LABEL: &str = "autoscale.load-s";
pub const DOWN_WINDOW_LABEL: &str = "autoscale.down-window-s";
pub const PROMPT_TOKENS_LABEL: &str = "autoscale.prompt-tokens";

/// (label, lowest, highest, what it is).
const NUMBERS: &[(&str, f64, f64, &str)] = &[
    (TPOT_LABEL, 1.0, 10_000.0, "milliseconds per output token"),
    (
        TTFT_PER_1K_LABEL,
        0.0,
        100_000.0,
        "milliseconds of first-token time per 1000 prompt tokens",
    ),
    (INTERVAL_LABEL, 1.0, 3600.0, "seconds between plans"),
    (BUCKET_LABEL, 1.0, 3600.0, "seconds per forecast bucket"),
    (
        HORIZON_LABEL,
        1.0,
        7.0 * 86_400.0,
        "seconds the forecast looks ahead",
    ),
    (LOAD_LABEL, 0.0, 3600.0, "seconds a replica takes to load"),
    (
        DOWN_WINDOW_LABEL,
        0.0,
        86_400.0,
        "seconds a scale-down waits for",
    ),
    (
        PROMPT_TOKENS_LABEL,
        1.0,
        10_000_000.0,
        "prompt tokens of a typical request",
    ),
];

/// What the autoscaler reads for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub enabled: bool,
    pub slo: Slo,
    pub interval_s: f64,
    pub bucket_s: f64,
    pub horizon_s: f64,
    pub load_s: f64,
    pub down_window_s: f64,
    pub prompt_tokens: u32,
}

fn number(labels: &BTreeMap<String, String>, label: &str) -> Option<f64> {
    labels
        .get(label)?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

impl Settings {
    /// The settings of a model with `latency_slo_ms` (its time-to-first-
    /// token target) and these labels; unset or unreadable ones take their
    /// defaults (a label is checked when written, see [`validate`]).
    pub fn of(
        latency_slo_ms: u32,
        min: u32,
        max: u32,
        labels: &BTreeMap<String, String>,
    ) -> Settings {
        let get = |label: &str, default: f64| number(labels, label).unwrap_or(default);
        let interval_s = get(INTERVAL_LABEL, 60.0);
        Settings {
            enabled: max > min && labels.get(ENABLED_LABEL).is_none_or(|v| v != "off"),
            slo: slo(latency_slo_ms, labels),
            interval_s,
            bucket_s: get(BUCKET_LABEL, 60.0),
            horizon_s: get(HORIZON_LABEL, 1800.0),
            load_s: get(LOAD_LABEL, 60.0),
            down_window_s: get(DOWN_WINDOW_LABEL, 600.0),
            prompt_tokens: get(PROMPT_TOKENS_LABEL, 1000.0) as u32,
        }
    }
}

/// The SLO of a model with `latency_slo_ms` and these labels: what the
/// gateway judges each answer by, without reading the other settings.
pub fn slo(latency_slo_ms: u32, labels: &BTreeMap<String, String>) -> Slo {
    let get = |label: &str, default: f64| number(labels, label).unwrap_or(default);
    Slo {
        ttft_ms: f64::from(latency_slo_ms.max(1)),
        ttft_ms_per_1k: get(TTFT_PER_1K_LABEL, 250.0),
        tpot_ms: get(TPOT_LABEL, 100.0),
        attainment: 0.99,
    }
}

/// Checks the `autoscale.*` labels: known names, numbers in range.
pub fn validate(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if let Some(v) = labels.get(ENABLED_LABEL) {
        if v != "on" && v != "off" {
            return Err(format!("label {ENABLED_LABEL} is {v:?}; give on or off"));
        }
    }
    for (label, value) in labels.iter().filter(|(k, _)| k.starts_with("autoscale.")) {
        let Some(&(_, lo, hi, what)) = NUMBERS.iter().find(|(l, ..)| l == label) else {
            let known: Vec<&str> = NUMBERS.iter().map(|(l, ..)| *l).collect();
            return Err(format!(
                "label {label} is not an autoscale setting; use one of {}",
                known.join(", ")
            ));
        };
        let ok = value
            .trim()
            .parse::<f64>()
            .is_ok_and(|v| v.is_finite() && v >= lo && v <= hi);
        if !ok {
            return Err(format!(
                "label {label} is {value:?}; give {what}, {lo} to {hi}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_overrides() {
        let s = Settings::of(500, 1, 4, &BTreeMap::new());
        assert!(s.enabled);
        assert_eq!(s.slo.ttft_ms, 500.0);
        assert_eq!(s.interval_s, 60.0);
        assert_eq!(s.horizon_s, 1800.0);
        let s = Settings::of(
            500,
            1,
            4,
            &labels(&[(TPOT_LABEL, "50"), (INTERVAL_LABEL, "5")]),
        );
        assert_eq!((s.slo.tpot_ms, s.interval_s), (50.0, 5.0));
        assert!(!Settings::of(500, 2, 2, &BTreeMap::new()).enabled);
        assert!(!Settings::of(500, 1, 4, &labels(&[(ENABLED_LABEL, "off")])).enabled);
    }

    #[test]
    fn bad_labels_say_what_to_change() {
        assert!(validate(&labels(&[(TPOT_LABEL, "50"), (ENABLED_LABEL, "on")])).is_ok());
        let e = validate(&labels(&[(TPOT_LABEL, "fast")]))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("autoscale.tpot-ms") && e.contains("milliseconds"),
            "{e}"
        );
        let e = validate(&labels(&[("autoscale.speed", "1")]))
            .err()
            .unwrap_or_default();
        assert!(e.contains("not an autoscale setting"), "{e}");
        let e = validate(&labels(&[(ENABLED_LABEL, "yes")]))
            .err()
            .unwrap_or_default();
        assert!(e.contains("on or off"), "{e}");
        let e = validate(&labels(&[(INTERVAL_LABEL, "0")]))
            .err()
            .unwrap_or_default();
        assert!(e.contains("1 to 3600"), "{e}");
    }
}
