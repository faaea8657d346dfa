//! Entry points for the fuzzers (`fuzz/`), one per input surface of the
//! node agent: its config file, fleet specs, the headers of a pipeline
//! step, engines' Prometheus text and engine command templates. A panic or
//! hang is a finding. Built with the `fuzzing` feature and in tests, which
//! replay `fuzz/corpus/<target>` and `fuzz/regressions/<target>`.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// The surfaces, by the name of their fuzz target.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("agent_config", agent_config),
    ("fleet_spec", fleet_spec),
    ("agent_inputs", agent_inputs),
];

/// The agent's TOML config file, then its validation.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = toml::from_str::<crate::config::AgentConfig>(text) {
        let _ = config.validate();
    }
}

/// A fleet spec, as `--fleet TYPE:COUNT:mig=…` (first byte even) or as a
/// TOML file (odd), then the simulated fleet built from it.
pub fn fleet_spec(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let spec = if first % 2 == 0 {
        crate::fleet::FleetSpec::from_flag(text).ok()
    } else {
        toml::from_str::<crate::fleet::FleetSpec>(text).ok()
    };
    if let Some(spec) = spec {
        let _ = crate::probe::sim::SimFleet::new("fuzz", spec);
    }
}

/// What reaches an agent from outside its own code, by the first byte: the
/// headers of a pipeline step (`name: value` lines), an engine's
/// Prometheus text, an engine command template, a port range.
pub fn agent_inputs(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match first % 4 {
        0 => {
            let mut headers = HeaderMap::new();
            for line in rest.split(|&b| b == b'\n') {
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    continue;
                };
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(&line[..colon]),
                    HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
                ) {
                    headers.append(name, value);
                }
            }
            if let Ok(step) = crate::executor::pipeline::Step::from_headers(&headers) {
                let _ = (step.tokens(), step.activation_bytes());
            }
        }
        1 => {
            let _ = crate::executor::signals::parse_engine_metrics(&text);
        }
        2 => {
            let _ = crate::executor::template::CommandTemplate::parse(&text);
        }
        _ => {
            let _ = crate::executor::ports::parse_range(&text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_regressions_and_garbage_run_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        for dir in ["corpus", "regressions"] {
            for (target, run) in TARGETS {
                let Ok(files) = std::fs::read_dir(root.join(dir).join(target)) else {
                    continue;
                };
                for file in files.flatten() {
                    run(&std::fs::read(file.path()).expect("readable input"));
                }
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            for (_, run) in TARGETS {
                run(&bytes);
            }
        }
    }
}
