//! Engine profiles: how one inference engine is started and watched.
//!
//! A model's spec names its engine (`vllm`, `sglang`, `llamacpp`, `tgi`,
//! `test`); the agent runs each replica with the profile of that name. A
//! profile is a command template ([`CommandTemplate`]), the flags each
//! engine option of the model becomes (its `engine.context-length`,
//! `engine.quantization`, `engine.chat-template`, `engine.embedding` and
//! `engine.dtype` labels), extra environment, the health and metrics paths,
//! and the startup and health-check timings. Built-in presets give every
//! field for the engines Talon knows; an agent's configuration may override
//! any of them (`[engines.<name>]`), or define a profile of its own on a
//! preset (`preset = "vllm"`).
//!
//! Option values go into one argument each, never through a shell, and a
//! value that could read as a flag is refused before anything runs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::external::{CommandTemplate, EngineSettings, Placeholders};

/// A built-in profile.
struct Preset {
    name: &'static str,
    command: &'static str,
    /// Engine option → the arguments it becomes; `{value}` is replaced by
    /// the option's value, and arguments without it are a switch, added
    /// when the value is `true`.
    options: &'static [(&'static str, &'static str)],
    health_path: &'static str,
    metrics_path: &'static str,
}

const PRESETS: &[Preset] = &[
    Preset {
        name: "vllm",
        command: "vllm serve {artifact} --served-model-name {model} --host {host} --port {port} \
                  --tensor-parallel-size {tp} --pipeline-parallel-size {pp} \
                  --gpu-memory-utilization {memory_fraction}",
        options: &[
            ("context-length", "--max-model-len {value}"),
            ("quantization", "--quantization {value}"),
            ("chat-template", "--chat-template {value}"),
            ("embedding", "--task embed"),
            ("dtype", "--dtype {value}"),
        ],
        health_path: "/health",
        metrics_path: "/metrics",
    },
    Preset {
        name: "sglang",
        command: "python3 -m sglang.launch_server --model-path {artifact} --served-model-name {model} \
                  --host {host} --port {port} --tp-size {tp} --mem-fraction-static {memory_fraction} \
                  --enable-metrics",
        options: &[
            ("context-length", "--context-length {value}"),
            ("quantization", "--quantization {value}"),
            ("chat-template", "--chat-template {value}"),
            ("embedding", "--is-embedding"),
            ("dtype", "--dtype {value}"),
        ],
        health_path: "/health",
        metrics_path: "/metrics",
    },
    Preset {
        name: "llamacpp",
        command: "llama-server --model {artifact} --alias {model} --host {host} --port {port} \
                  --n-gpu-layers 999 --metrics",
        options: &[
            ("context-length", "--ctx-size {value}"),
            ("chat-template", "--chat-template {value}"),
            ("embedding", "--embedding"),
        ],
        health_path: "/health",
        metrics_path: "/metrics",
    },
    Preset {
        name: "tgi",
        command: "text-generation-launcher --model-id {artifact} --hostname {host} --port {port} \
                  --num-shard {tp} --cuda-memory-fraction {memory_fraction}",
        options: &[
            ("context-length", "--max-total-tokens {value}"),
            ("quantization", "--quantize {value}"),
            ("dtype", "--dtype {value}"),
        ],
        health_path: "/health",
        metrics_path: "/metrics",
    },
    Preset {
        name: "test",
        command: "talon-fake-engine --model {model} --host {host} --port {port} \
                  --gpu-memory-utilization {memory_fraction}",
        options: &[("context-length", "--max-model-len {value}")],
        health_path: "/health",
        metrics_path: "/metrics",
    },
];

/// The names of the built-in profiles.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

/// One `[engines.<name>]` table of the agent's configuration. Every field
/// is optional where the name (or `preset`) is a built-in profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// The built-in profile this one starts from; default: the one of the
    /// same name, if any.
    pub preset: Option<String>,
    /// Command template (see [`CommandTemplate`]).
    pub command: Option<String>,
    /// Engine option → its arguments (`"--ctx-size {value}"`), added to
    /// or replacing the preset's; an empty string takes the option away.
    pub options: BTreeMap<String, String>,
    /// Environment for the engine, beyond what it inherits.
    pub env: BTreeMap<String, String>,
    pub health_path: Option<String>,
    pub metrics_path: Option<String>,
    /// How long a (re)started engine may take to become healthy, seconds.
    pub startup_timeout_s: Option<u64>,
    /// How often a running engine is health-checked, milliseconds.
    pub check_every_ms: Option<u64>,
    /// Failed health checks in a row after which it is restarted.
    pub wedged_after: Option<u32>,
    /// On stop, how long requests in flight may take to finish, seconds.
    pub drain_grace_s: Option<u64>,
}

/// A profile ready to start engines.
#[derive(Clone, Debug)]
pub struct EngineProfile {
    pub name: String,
    pub template: CommandTemplate,
    /// Engine option → argument templates.
    pub options: BTreeMap<String, Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub settings: EngineSettings,
}

/// Variables a profile may not set: Talon sets them, or they would let an
/// engine reach what the agent keeps from it.
const RESERVED_ENV: &[&str] = &["CUDA_VISIBLE_DEVICES"];

fn check_path(field: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{field} {path:?} must be an absolute URL path such as /health"
        ));
    }
    Ok(())
}

impl EngineProfile {
    /// Builds the profile `name` from its configuration (and preset);
    /// errors say which field to change.
    pub fn build(name: &str, config: &ProfileConfig) -> Result<EngineProfile, String> {
        let preset_name = config.preset.as_deref().unwrap_or(name);
        let preset = PRESETS.iter().find(|p| p.name == preset_name);
        if config.preset.is_some() && preset.is_none() {
            return Err(format!(
                "engine profile {name}: preset {preset_name:?} is unknown; use one of: {}",
                preset_names().join(", ")
            ));
        }
        let command = match (&config.command, preset) {
            (Some(c), _) => c.clone(),
            (None, Some(p)) => p.command.to_string(),
            (None, None) => {
                return Err(format!(
                    "engine profile {name} is not a built-in one ({}): give it a command, or a preset to start from",
                    preset_names().join(", ")
                ))
            }
        };
        let template = CommandTemplate::parse(&command)
            .map_err(|e| format!("engine profile {name}: command: {e}"))?;
        let mut options: BTreeMap<String, Vec<String>> = preset
            .map(|p| {
                p.options
                    .iter()
                    .map(|(o, a)| {
                        (
                            o.to_string(),
                            a.split_whitespace().map(String::from).collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (option, args) in &config.options {
            if !OPTION_NAMES.contains(&option.as_str()) {
                return Err(format!(
                    "engine profile {name}: options.{option} is not an engine option; use one of: {}",
                    OPTION_NAMES.join(", ")
                ));
            }
            if args.contains(['"', '\'']) {
                return Err(format!(
                    "engine profile {name}: options.{option} contains quotes; write arguments without spaces"
                ));
            }
            let args: Vec<String> = args.split_whitespace().map(String::from).collect();
            if args
                .iter()
                .any(|a| a.replace("{value}", "").contains(['{', '}']))
            {
                return Err(format!(
                    "engine profile {name}: options.{option} may hold only the placeholder {{value}}"
                ));
            }
            if args.is_empty() {
                options.remove(option);
            } else {
                options.insert(option.clone(), args);
            }
        }
        for key in config.env.keys() {
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "engine profile {name}: env.{key} is not a variable name (letters, digits and '_', not starting with a digit)"
                ));
            }
            if RESERVED_ENV.contains(&key.as_str()) || key.starts_with("TALON") {
                return Err(format!(
                    "engine profile {name}: env.{key} is set by the agent itself and cannot be given"
                ));
            }
        }
        let defaults = EngineSettings::default();
        let health_path = config.health_path.clone().unwrap_or_else(|| {
            preset.map_or(defaults.health_path.clone(), |p| p.health_path.into())
        });
        check_path(&format!("engine profile {name}: health_path"), &health_path)?;
        let metrics_path = config.metrics_path.clone().unwrap_or_else(|| {
            preset.map_or(defaults.metrics_path.clone(), |p| p.metrics_path.into())
        });
        check_path(
            &format!("engine profile {name}: metrics_path"),
            &metrics_path,
        )?;
        let positive = |field: &str, v: Option<u64>| match v {
            Some(0) => Err(format!("engine profile {name}: {field} must be at least 1")),
            _ => Ok(v),
        };
        let settings = EngineSettings {
            health_path,
            metrics_path,
            startup_timeout: positive("startup_timeout_s", config.startup_timeout_s)?
                .map_or(defaults.startup_timeout, Duration::from_secs),
            check_every: positive("check_every_ms", config.check_every_ms)?
                .map_or(defaults.check_every, Duration::from_millis),
            wedged_after: positive("wedged_after", config.wedged_after.map(u64::from))?
                .map_or(defaults.wedged_after, |n| n.min(1000) as u32),
            drain_grace: config
                .drain_grace_s
                .map_or(defaults.drain_grace, Duration::from_secs),
            ..defaults
        };
        Ok(EngineProfile {
            name: name.to_string(),
            template,
            options,
            env: config.env.clone(),
            settings,
        })
    }

    /// The engine's argv for a replica: the template filled in, then the
    /// flags of the model's engine options. An option this profile has no
    /// flags for is refused (an engine that silently ignored
    /// `quantization` would load something else than asked).
    pub fn argv(
        &self,
        p: &Placeholders,
        options: &BTreeMap<String, String>,
    ) -> Result<Vec<String>, String> {
        let mut argv = self.template.render(p);
        for (option, value) in options {
            let Some(args) = self.options.get(option) else {
                return Err(format!(
                    "the model sets engine option {option}, which engine profile {} has no flag for (it takes: {}); remove the model's engine.{option} label, or give the agent's profile options.{option}",
                    self.name,
                    if self.options.is_empty() {
                        "none".to_string()
                    } else {
                        self.options.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ));
            };
            if value.is_empty()
                || value.starts_with('-')
                || value.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!(
                    "engine option {option} is {value:?}: a value must not be empty, start with '-' or hold whitespace"
                ));
            }
            let switch = !args.iter().any(|a| a.contains("{value}"));
            if switch {
                match value.as_str() {
                    "true" => argv.extend(args.iter().cloned()),
                    "false" => {}
                    other => {
                        return Err(format!(
                            "engine option {option} is a switch for profile {}; give true or false, not {other:?}",
                            self.name
                        ))
                    }
                }
            } else {
                argv.extend(args.iter().map(|a| a.replace("{value}", value)));
            }
        }
        Ok(argv)
    }
}

/// The engine options a model may set (the coordinator's
/// `state::model::ENGINE_OPTIONS`).
pub const OPTION_NAMES: &[&str] = &[
    "context-length",
    "quantization",
    "chat-template",
    "embedding",
    "dtype",
];

/// Builds every configured profile; the first error is returned.
pub fn build_all(
    configs: &BTreeMap<String, ProfileConfig>,
) -> Result<BTreeMap<String, EngineProfile>, String> {
    configs
        .iter()
        .map(|(name, c)| Ok((name.clone(), EngineProfile::build(name, c)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholders() -> Placeholders {
        Placeholders {
            model: "m".into(),
            artifact: "/models/m.gguf".into(),
            port: 9000,
            gpus: "GPU-a,GPU-b".into(),
            tp: 2,
            pp: 1,
            memory_fraction: 0.5,
        }
    }

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn presets_render_the_engines_own_flags() {
        let vllm = EngineProfile::build("vllm", &ProfileConfig::default()).expect("preset");
        let argv = vllm
            .argv(
                &placeholders(),
                &opts(&[
                    ("context-length", "8192"),
                    ("embedding", "true"),
                    ("dtype", "bfloat16"),
                ]),
            )
            .expect("renders");
        let line = argv.join(" ");
        assert!(line.starts_with("vllm serve /models/m.gguf --served-model-name m --host 127.0.0.1 --port 9000 --tensor-parallel-size 2"), "{line}");
        assert!(line.contains("--gpu-memory-utilization 0.50"), "{line}");
        assert!(line.contains("--max-model-len 8192"), "{line}");
        assert!(line.contains("--task embed"), "{line}");
        assert!(line.contains("--dtype bfloat16"), "{line}");
        let off = vllm
            .argv(&placeholders(), &opts(&[("embedding", "false")]))
            .expect("renders");
        assert!(!off.join(" ").contains("--task"));

        let llama = EngineProfile::build("llamacpp", &ProfileConfig::default()).expect("preset");
        let argv = llama
            .argv(&placeholders(), &opts(&[("context-length", "2048")]))
            .expect("renders");
        assert_eq!(argv[0], "llama-server");
        assert!(argv.windows(2).any(|w| w == ["--ctx-size", "2048"]));
        for name in preset_names() {
            EngineProfile::build(name, &ProfileConfig::default()).expect("every preset builds");
        }
    }

    #[test]
    fn options_a_profile_cannot_take_are_refused_with_the_fix() {
        let llama = EngineProfile::build("llamacpp", &ProfileConfig::default()).expect("preset");
        let err = llama
            .argv(&placeholders(), &opts(&[("quantization", "awq")]))
            .expect_err("llama.cpp takes quantization from the file");
        assert!(
            err.contains("no flag for") && err.contains("engine.quantization"),
            "{err}"
        );
        let vllm = EngineProfile::build("vllm", &ProfileConfig::default()).expect("preset");
        for (option, value) in [
            ("chat-template", "--trust-remote-code"),
            ("chat-template", "a b"),
            ("embedding", "yes"),
        ] {
            let err = vllm
                .argv(&placeholders(), &opts(&[(option, value)]))
                .expect_err("refused");
            assert!(err.contains(option), "{err}");
        }
    }

    #[test]
    fn configuration_overrides_the_preset() {
        let config = ProfileConfig {
            command: Some(
                "python -m llama_cpp.server --model {artifact} --host {host} --port {port}".into(),
            ),
            options: opts(&[("context-length", "--n_ctx {value}"), ("embedding", "")]),
            env: opts(&[("OMP_NUM_THREADS", "2")]),
            health_path: Some("/v1/models".into()),
            startup_timeout_s: Some(30),
            ..ProfileConfig::default()
        };
        let p = EngineProfile::build("llamacpp", &config).expect("valid");
        assert_eq!(p.settings.health_path, "/v1/models");
        assert_eq!(p.settings.startup_timeout, Duration::from_secs(30));
        assert_eq!(p.settings.metrics_path, "/metrics");
        assert!(!p.options.contains_key("embedding"));
        let argv = p
            .argv(&placeholders(), &opts(&[("context-length", "512")]))
            .expect("renders");
        assert_eq!(argv[..3], ["python", "-m", "llama_cpp.server"]);
        assert!(argv.windows(2).any(|w| w == ["--n_ctx", "512"]));
        // a profile of its own on a preset
        let own = ProfileConfig {
            preset: Some("vllm".into()),
            ..ProfileConfig::default()
        };
        assert!(EngineProfile::build("vllm-big", &own).is_ok());
    }

    #[test]
    fn bad_profiles_are_refused_with_the_field_to_change() {
        let cases: Vec<(&str, ProfileConfig, &str)> = vec![
            ("mine", ProfileConfig::default(), "give it a command"),
            (
                "x",
                ProfileConfig {
                    preset: Some("vlm".into()),
                    ..ProfileConfig::default()
                },
                "preset",
            ),
            (
                "vllm",
                ProfileConfig {
                    command: Some("vllm serve {artifact}".into()),
                    ..ProfileConfig::default()
                },
                "{port}",
            ),
            (
                "vllm",
                ProfileConfig {
                    options: opts(&[("temperature", "--temp {value}")]),
                    ..ProfileConfig::default()
                },
                "options.temperature",
            ),
            (
                "vllm",
                ProfileConfig {
                    options: opts(&[("dtype", "--dtype {port}")]),
                    ..ProfileConfig::default()
                },
                "{value}",
            ),
            (
                "vllm",
                ProfileConfig {
                    env: opts(&[("CUDA_VISIBLE_DEVICES", "0")]),
                    ..ProfileConfig::default()
                },
                "env.CUDA_VISIBLE_DEVICES",
            ),
            (
                "vllm",
                ProfileConfig {
                    env: opts(&[("1X", "0")]),
                    ..ProfileConfig::default()
                },
                "env.1X",
            ),
            (
                "vllm",
                ProfileConfig {
                    health_path: Some("health".into()),
                    ..ProfileConfig::default()
                },
                "health_path",
            ),
            (
                "vllm",
                ProfileConfig {
                    startup_timeout_s: Some(0),
                    ..ProfileConfig::default()
                },
                "startup_timeout_s",
            ),
        ];
        for (name, config, names) in cases {
            let err = EngineProfile::build(name, &config).expect_err("refused");
            assert!(err.contains(names), "{names}: {err}");
        }
    }
}
