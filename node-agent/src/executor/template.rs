//! Engine command templates: the placeholders a command may hold, what
//! fills them, and what an engine inherits and may be given (its
//! environment is bounded to [`PASSED_ENV`]; an artifact that could read as
//! an option is refused).

/// Placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "model",
    "artifact",
    "port",
    "gpus",
    "tp",
    "pp",
    "host",
    "memory_fraction",
];

/// The address engines are to listen on (`{host}`): loopback, so that only
/// the agent reaches them.
pub const ENGINE_HOST: &str = "127.0.0.1";

/// The agent's environment variables an engine keeps; everything else
/// (TALON_* among them) is cleared.
pub const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_CACHE",
    "XDG_CACHE_HOME",
    "VIRTUAL_ENV",
    "PYTHONPATH",
];

/// Refuses an artifact that an engine could take for an option or that
/// holds characters no path or URI needs.
pub fn check_artifact(artifact: &str) -> Result<(), String> {
    if artifact.starts_with('-') {
        return Err(format!(
            "artifact {artifact:?} starts with '-' and would read as a command-line option"
        ));
    }
    if artifact
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "artifact {artifact:?} contains whitespace or a control character"
        ));
    }
    Ok(())
}

/// A parsed, validated command template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandTemplate {
    /// Arguments; each may hold placeholders.
    args: Vec<String>,
}

/// What fills a template's placeholders.
#[derive(Clone, Debug)]
pub struct Placeholders {
    pub model: String,
    pub artifact: String,
    pub port: u16,
    /// GPU or MIG uuids, comma-separated.
    pub gpus: String,
    /// Tensor-parallel degree: how many GPUs the replica holds (e.g.
    /// `vllm serve … --tensor-parallel-size {tp}`).
    pub tp: u32,
    /// Pipeline stages (`--pipeline-parallel-size {pp}`); 1 for none.
    pub pp: u32,
    /// The share of each GPU's (or the MIG device's) memory the plan gives
    /// the replica, 0.01 to 1, two decimals (`vllm serve …
    /// --gpu-memory-utilization {memory_fraction}`, SGLang's
    /// `--mem-fraction-static`): an engine that preallocates then takes
    /// what was planned, not 90 % of the GPU.
    pub memory_fraction: f64,
}

impl CommandTemplate {
    /// Parses and checks a template: not empty, whitespace-separated
    /// arguments without quotes, only known placeholders, balanced braces,
    /// and `{port}` present (the engine must listen where Talon proxies).
    pub fn parse(template: &str) -> Result<CommandTemplate, String> {
        let template = template.trim();
        if template.is_empty() {
            return Err("the command template is empty; give the engine command, e.g. `vllm serve {artifact} --port {port}`".into());
        }
        if template.contains(['"', '\'']) {
            return Err("the command template contains quotes; they are not supported: write arguments without spaces".into());
        }
        let args: Vec<String> = template.split_whitespace().map(String::from).collect();
        let mut has_port = false;
        for arg in &args {
            let mut rest = arg.as_str();
            loop {
                match (rest.find('{'), rest.find('}')) {
                    (None, None) => break,
                    (Some(open), Some(close)) if open < close => {
                        let name = &rest[open + 1..close];
                        if !PLACEHOLDERS.contains(&name) {
                            return Err(format!(
                                "unknown placeholder {{{name}}} in {arg:?}; use {}",
                                PLACEHOLDERS
                                    .iter()
                                    .map(|p| format!("{{{p}}}"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ));
                        }
                        has_port |= name == "port";
                        rest = &rest[close + 1..];
                    }
                    _ => {
                        return Err(format!(
                            "unbalanced braces in {arg:?}; placeholders look like {{port}}"
                        ))
                    }
                }
            }
        }
        if args[0].starts_with('{') {
            return Err(
                "the command template must start with the program, not a placeholder".into(),
            );
        }
        if !template.contains("{host}") {
            tracing::warn!(
                template,
                "the engine command has no {{host}}: unless the engine binds to loopback by itself, replicas are reachable from the network, bypassing the gateway; add e.g. --host {{host}}"
            );
        }
        if !has_port {
            return Err("the command template has no {port}: the engine must listen on the port Talon gives it".into());
        }
        Ok(CommandTemplate { args })
    }

    /// The program and its arguments with the placeholders filled.
    pub fn render(&self, p: &Placeholders) -> Vec<String> {
        self.args
            .iter()
            .map(|a| {
                a.replace("{model}", &p.model)
                    .replace("{artifact}", &p.artifact)
                    .replace("{port}", &p.port.to_string())
                    .replace("{gpus}", &p.gpus)
                    .replace("{tp}", &p.tp.to_string())
                    .replace("{pp}", &p.pp.to_string())
                    .replace("{memory_fraction}", &format!("{:.2}", p.memory_fraction))
                    .replace("{host}", ENGINE_HOST)
            })
            .collect()
    }
}
