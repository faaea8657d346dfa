//! Entry points for the fuzzers (`fuzz/`), one per input surface of the
//! node agent: its config file, fleet specs, the headers of a pipeline
//! step, engines' Prometheus text, engine command templates and the
//! OpenAI bodies its HTTP API takes from gateways. A panic or
//! hang is a finding. Built with the `fuzzing` feature and in tests, which
//! replay `fuzz/corpus/<target>` and `fuzz/regressions/<target>`.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

/// The surfaces, by the name of their fuzz target.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("agent_config", agent_config),
    ("fleet_spec", fleet_spec),
    ("agent_inputs", agent_inputs),
    ("agent_http_body", agent_http_body),
];

/// A small word-level tokenizer and a ChatML template that checks roles
/// (`raise_exception`) as Qwen's and Llama's do: what the native executor
/// renders and tokenizes a request's messages with.
const TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"<|im_start|>":1,"<|im_end|>":2,"user":3,"assistant":4,"system":5,"hello":6},"unk_token":"<unk>"}}"#;
const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('roles are system, user and assistant') }}{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn fuzz_text() -> &'static talon_runtime::text::Text {
    static TEXT: OnceLock<talon_runtime::text::Text> = OnceLock::new();
    TEXT.get_or_init(|| {
        let config = serde_json::json!({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"});
        talon_runtime::text::Text::from_json(TOKENIZER, &config, &[2], "fuzz")
            .expect("the fuzz tokenizer loads")
    })
}

/// An OpenAI body as the agent's HTTP API takes it from a gateway
/// (`/v1/replicas/<id>/chat/completions`, `…/completions`): the token
/// estimate every executor makes, the native executor's sampling
/// parameters, and its rendering and tokenizing of the messages or prompt.
pub fn agent_http_body(data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let prompt = crate::executor::prompt_tokens(&body);
    let _ = crate::executor::native::params(&body, prompt.min(1 << 20) as usize, 4096);
    let text = fuzz_text();
    if let Ok(rendered) = text.render_chat(&body["messages"]) {
        let _ = text.encode_rendered(&rendered);
    }
    if let Some(p) = body["prompt"].as_str() {
        let _ = text.encode(p);
    }
}

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
    fn the_body_harness_renders_checks_roles_and_tokenizes() {
        let text = fuzz_text();
        let messages = serde_json::json!([{"role": "user", "content": " hello "}]);
        let rendered = text.render_chat(&messages).expect("renders");
        assert_eq!(
            rendered,
            "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!text.encode_rendered(&rendered).expect("tokens").is_empty());
        let tool = serde_json::json!([{"role": "tool", "content": "x"}]);
        let e = text.render_chat(&tool).expect_err("unknown role");
        assert!(e.to_string().contains("roles are"), "{e}");
    }

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
