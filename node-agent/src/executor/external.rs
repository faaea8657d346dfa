//! The external-engine executor: one inference server process per replica.
//!
//! The command comes from a template with placeholders, e.g.
//! `vllm serve {artifact} --served-model-name {model} --port {port}` or
//! `llama-server -m {artifact} --port {port}` (`{tp}` and `{pp}`: the
//! replica's tensor-parallel degree and pipeline stages, for the engine's
//! flags), usually an engine profile's ([`super::profiles`]). The process
//! gets `CUDA_VISIBLE_DEVICES` set to its GPU or MIG uuids, its stdout and
//! stderr go through the agent to a log rotated by size
//! ([`super::logs`]), and a supervisor health-checks it (`GET` the health
//! path until it answers 200), restarts it with exponential backoff when it
//! exits, and gives up (state Failed) after too many failures in a row.
//! Once healthy it is checked every [`EngineSettings::check_every`] for its
//! whole life: an engine that stops answering its health check
//! [`EngineSettings::wedged_after`] times in a row is wedged, and is killed
//! and restarted. Each check also scrapes its metrics
//! ([`super::signals`]): running and waiting requests, KV cache in use.
//! Requests are proxied as OpenAI JSON to `127.0.0.1:{port}`, each timed
//! to correct the replica's service-time model.
//!
//! What an engine inherits is bounded: its environment is cleared down to
//! [`PASSED_ENV`] (no join token, no credentials of the agent), `{host}`
//! is the loopback address for templates to bind to, and an artifact that
//! could read as a command-line option is refused before anything runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::logs::RotatingLog;
use super::signals::{parse_engine_metrics, EngineLoad, ServiceModel};
use super::{ExecError, Executor, InferRequest, ReplicaState};

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

/// What one engine process is started with, beside its placeholders.
#[derive(Debug, Default)]
pub struct Launch {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Environment beside what it inherits ([`PASSED_ENV`]).
    pub env: BTreeMap<String, String>,
    /// (URL, path): the artifact to download first, while the replica is
    /// Loading (a failed download fails the replica, the reason in its log).
    pub fetch: Option<(String, PathBuf)>,
    /// Its port, held until the engine is gone.
    pub lease: Option<super::ports::PortLease>,
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

/// How the supervisor behaves.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub health_path: String,
    /// How long a (re)started engine may take to answer its health check.
    pub startup_timeout: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Consecutive failed starts before the replica is Failed.
    pub max_failures: u32,
    pub request_timeout: Duration,
    /// Where the engine exports Prometheus metrics.
    pub metrics_path: String,
    /// How often a running engine is health-checked and scraped.
    pub check_every: Duration,
    /// Failed health checks in a row after which a running engine is
    /// taken as wedged and restarted.
    pub wedged_after: u32,
    /// On stop, how long requests in flight may take to finish (new ones
    /// are refused at once).
    pub drain_grace: Duration,
    /// After SIGTERM, how long the engine may take to exit before SIGKILL.
    pub term_grace: Duration,
    /// Size at which the engine's log is rotated, bytes.
    pub log_max_bytes: u64,
    /// Rotated logs kept beside the live one.
    pub log_keep: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            health_path: "/health".into(),
            startup_timeout: Duration::from_secs(600),
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_failures: 5,
            request_timeout: Duration::from_secs(600),
            metrics_path: "/metrics".into(),
            check_every: Duration::from_secs(1),
            wedged_after: 3,
            drain_grace: Duration::from_secs(30),
            term_grace: Duration::from_secs(10),
            log_max_bytes: super::logs::DEFAULT_MAX_BYTES,
            log_keep: super::logs::DEFAULT_KEEP,
        }
    }
}

struct Shared {
    state: Mutex<ReplicaState>,
    pid: Mutex<Option<u32>>,
    restarts: Mutex<u32>,
    /// What its metrics said last (none before, or when it exports none).
    load: Mutex<Option<EngineLoad>>,
}

/// A supervised engine process serving one replica.
pub struct ExternalEngine {
    port: u16,
    http: reqwest::Client,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    log_path: PathBuf,
    /// Service-time model, when the agent knows the replica's GPUs.
    service: Option<ServiceModel>,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Told when the last request in flight ends (a drain waits on it).
    idle: tokio::sync::Notify,
    drain_grace: Duration,
}

async fn healthy(http: &reqwest::Client, url: &str) -> bool {
    matches!(http.get(url).timeout(Duration::from_secs(1)).send().await, Ok(r) if r.status().is_success())
}

impl ExternalEngine {
    /// Starts the engine and its supervisor. Returns at once: the state is
    /// Loading until the first health check passes.
    pub fn start(
        template: &CommandTemplate,
        placeholders: Placeholders,
        settings: EngineSettings,
        log_dir: &Path,
    ) -> Result<ExternalEngine, ExecError> {
        let launch = Launch {
            argv: template.render(&placeholders),
            ..Launch::default()
        };
        Self::launch(launch, placeholders, settings, log_dir)
    }

    /// Starts the engine of `launch` (a rendered template, e.g. an engine
    /// profile's).
    pub fn launch(
        launch: Launch,
        placeholders: Placeholders,
        settings: EngineSettings,
        log_dir: &Path,
    ) -> Result<ExternalEngine, ExecError> {
        let Launch {
            argv,
            env,
            fetch,
            lease,
        } = launch;
        check_artifact(&placeholders.artifact).map_err(ExecError::Config)?;
        if argv.is_empty() {
            return Err(ExecError::Config("the engine command is empty".into()));
        }
        std::fs::create_dir_all(log_dir)
            .map_err(|e| ExecError::Config(format!("log directory {}: {e}", log_dir.display())))?;
        let log_path = log_dir.join(format!("{}-{}.log", placeholders.model, placeholders.port));
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .build()
            .map_err(|e| ExecError::Config(format!("HTTP client: {e}")))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(ReplicaState::Loading),
            pid: Mutex::new(None),
            restarts: Mutex::new(0),
            load: Mutex::new(None),
        });
        let (stop, stop_rx) = watch::channel(false);
        let port = placeholders.port;
        let drain_grace = settings.drain_grace;
        tokio::spawn(supervise(
            lease,
            fetch,
            argv,
            env,
            placeholders.gpus,
            settings,
            log_path.clone(),
            http.clone(),
            shared.clone(),
            stop_rx,
            port,
        ));
        Ok(ExternalEngine {
            port,
            http,
            shared,
            stop,
            log_path,
            service: None,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            drain_grace,
        })
    }

    /// Gives the replica a service-time model, corrected by its requests.
    pub fn with_service_model(mut self, model: ServiceModel) -> ExternalEngine {
        self.service = Some(model);
        self
    }

    /// The engine process id, while one runs.
    pub fn pid(&self) -> Option<u32> {
        *self.shared.pid.lock().expect("pid lock poisoned")
    }

    /// Times the engine was restarted after exiting.
    pub fn restarts(&self) -> u32 {
        *self.shared.restarts.lock().expect("restart lock poisoned")
    }

    /// Where the engine's stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

fn set(shared: &Shared, state: ReplicaState) {
    *shared.state.lock().expect("state lock poisoned") = state;
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    // held until the engine is gone
    _lease: Option<super::ports::PortLease>,
    fetch: Option<(String, PathBuf)>,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    gpus: String,
    settings: EngineSettings,
    log_path: PathBuf,
    http: reqwest::Client,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    port: u16,
) {
    let health = format!("http://127.0.0.1:{port}{}", settings.health_path);
    let metrics = format!("http://127.0.0.1:{port}{}", settings.metrics_path);
    let mut failures = 0u32;
    let mut backoff = settings.first_backoff;
    // one log for every run of the engine, rotated by size
    let log = match RotatingLog::open(&log_path, settings.log_max_bytes, settings.log_keep) {
        Ok(l) => Some(Arc::new(Mutex::new(l))),
        Err(e) => {
            tracing::warn!(path = %log_path.display(), error = %e, "cannot open the engine log; its output is dropped");
            None
        }
    };
    if let Some((url, path)) = fetch {
        tracing::info!(%url, path = %path.display(), "downloading the artifact");
        // no timeout of the engine's requests: a model takes what it takes
        let downloader = reqwest::Client::new();
        let fetched = tokio::select! {
            r = crate::artifacts::fetch(&downloader, &url, &path) => r,
            _ = stop.changed() => return,
        };
        if let Err(e) = fetched {
            tracing::error!(error = %e, "cannot fetch the artifact; the replica fails");
            if let Some(log) = &log {
                let _ = log
                    .lock()
                    .expect("log lock poisoned")
                    .write(format!("talon-agent: {e}\n").as_bytes());
            }
            set(&shared, ReplicaState::Failed);
            return;
        }
    }
    loop {
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]).env_clear();
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let output = || {
            if log.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        command
            .envs(&env)
            .env("CUDA_VISIBLE_DEVICES", &gpus)
            .stdout(output())
            .stderr(output())
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // kill the engine when the agent dies, so no engine outlives it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned: std::io::Result<Child> = command.spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(program = %argv[0], error = %e, "cannot start the engine");
                set(&shared, ReplicaState::Failed);
                return;
            }
        };
        *shared.pid.lock().expect("pid lock poisoned") = child.id();
        if let Some(log) = &log {
            if let Some(out) = child.stdout.take() {
                tokio::spawn(super::logs::pump(out, log.clone()));
            }
            if let Some(err) = child.stderr.take() {
                tokio::spawn(super::logs::pump(err, log.clone()));
            }
        }
        // Wait for health, the process to exit, or a stop.
        let deadline = tokio::time::Instant::now() + settings.startup_timeout;
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        let mut up = false;
        let mut last_check = tokio::time::Instant::now();
        let mut missed = 0u32;
        let exited = loop {
            tokio::select! {
                status = child.wait() => break Some(status),
                _ = stop.changed() => {
                    terminate(&mut child, settings.term_grace).await;
                    return;
                }
                _ = poll.tick() => {
                    if !up && healthy(&http, &health).await {
                        // the answer must come from the engine itself, not
                        // from another process on its port
                        let tree = child.id().map(crate::probe::process_tree).unwrap_or_default();
                        if super::ports::listener_owned_by(port, &tree) == Some(false) {
                            tracing::error!(port, "a process that is not the engine listens on its port; restarting the engine");
                            let _ = child.kill().await;
                            break None;
                        }
                        up = true;
                        failures = 0;
                        backoff = settings.first_backoff;
                        set(&shared, ReplicaState::Ready);
                        tracing::info!(port, "engine is healthy");
                    }
                    if !up && tokio::time::Instant::now() > deadline {
                        tracing::warn!(port, "engine did not become healthy in time; restarting it");
                        let _ = child.kill().await;
                        break None;
                    }
                    if up && last_check.elapsed() >= settings.check_every {
                        last_check = tokio::time::Instant::now();
                        if healthy(&http, &health).await {
                            missed = 0;
                        } else {
                            missed += 1;
                            if missed >= settings.wedged_after {
                                tracing::warn!(port, missed, "engine stopped answering its health check; restarting it");
                                let _ = child.kill().await;
                                break None;
                            }
                        }
                        *shared.load.lock().expect("load lock poisoned") = scrape(&http, &metrics).await;
                    }
                }
            }
        };
        *shared.pid.lock().expect("pid lock poisoned") = None;
        *shared.load.lock().expect("load lock poisoned") = None;
        tracing::warn!(port, status = ?exited, "engine exited");
        failures += 1;
        if failures > settings.max_failures {
            set(&shared, ReplicaState::Failed);
            tracing::error!(port, failures, "engine keeps failing; giving up");
            return;
        }
        set(&shared, ReplicaState::Restarting);
        *shared.restarts.lock().expect("restart lock poisoned") += 1;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(settings.max_backoff);
    }
}

/// Asks the engine to exit (SIGTERM, so it can finish cleanly) and kills it
/// if it has not within `grace`.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child by the pid tokio reports while
        // it has not been reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(pid, "engine did not exit on SIGTERM in time; killing it");
    }
    let _ = child.kill().await;
}

/// The engine's load gauges, if it exports any we know.
async fn scrape(http: &reqwest::Client, url: &str) -> Option<EngineLoad> {
    let response = http
        .get(url)
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    // a metrics page is small; a huge one is not read whole
    let text = response.text().await.ok()?;
    parse_engine_metrics(&text[..text.len().min(4 << 20)])
}

/// Whether an answer chunk carries generated text (a token, in the
/// engines Talon runs, which stream one token per chunk).
fn carries_text(chunk: &Value) -> bool {
    chunk["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            c["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
                || c["text"].as_str().is_some_and(|t| !t.is_empty())
        })
    })
}

/// The usage chunk for a stream whose engine sent none although the
/// caller asked (`stream_options.include_usage`; llama-cpp-python's server
/// ignores it): completion tokens counted from the chunks, prompt tokens
/// the agent's estimate, marked `"talon_estimated": true`.
fn usage_chunk(last: &Value, completion_tokens: u64, prompt_tokens: u64) -> Value {
    serde_json::json!({
        "id": last["id"],
        "object": last["object"],
        "created": last["created"],
        "model": last["model"],
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "talon_estimated": true,
        },
    })
}

/// Relays the engine's server-sent events to `sink` until `[DONE]`. The
/// result says how many chunks went through. `usage`: the caller asked for
/// a usage chunk, and the prompt's estimated tokens.
async fn relay(
    response: reqwest::Response,
    sink: &super::ChunkSink,
    usage: Option<u64>,
) -> Result<Value, ExecError> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let mut events = response.bytes_stream().eventsource();
    let mut chunks = 0u64;
    let mut tokens = 0u64;
    let mut usage_seen = false;
    let mut last = Value::Null;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| {
            ExecError::Engine(format!("engine stream broke after {chunks} chunks: {e}"))
        })?;
        if event.data.trim() == "[DONE]" {
            if let (Some(prompt), false, false) = (usage, usage_seen, last.is_null()) {
                // a caller that left already is no error here
                let _ = sink.send(usage_chunk(&last, tokens, prompt));
            }
            return Ok(
                serde_json::json!({"chunks": chunks, "usage": {"completion_tokens": tokens}}),
            );
        }
        let chunk: Value = serde_json::from_str(&event.data).map_err(|e| {
            ExecError::Engine(format!(
                "engine sent an unreadable chunk ({e}): {}",
                event.data
            ))
        })?;
        chunks += 1;
        tokens += u64::from(carries_text(&chunk));
        usage_seen |= chunk["usage"].is_object();
        last = serde_json::json!({
            "id": chunk["id"],
            "object": chunk["object"],
            "created": chunk["created"],
            "model": chunk["model"],
        });
        if sink.send(chunk).is_err() {
            // The caller left: dropping the response closes the connection,
            // which tells the engine to stop generating.
            return Err(ExecError::Engine(format!(
                "the caller left after {chunks} chunks"
            )));
        }
    }
    Err(ExecError::Engine(format!(
        "engine stream ended after {chunks} chunks without [DONE]"
    )))
}

#[async_trait::async_trait]
impl Executor for ExternalEngine {
    fn state(&self) -> ReplicaState {
        *self.shared.state.lock().expect("state lock poisoned")
    }

    fn process_id(&self) -> Option<u32> {
        self.pid()
    }

    fn batches_itself(&self) -> bool {
        true
    }

    fn service_time(&self, n: usize) -> Duration {
        self.service
            .as_ref()
            .map_or(Duration::ZERO, |m| m.predict(n))
    }

    fn engine_load(&self) -> Option<EngineLoad> {
        *self.shared.load.lock().expect("load lock poisoned")
    }

    async fn infer(&self, batch: Vec<InferRequest>) -> Vec<Result<Value, ExecError>> {
        use std::sync::atomic::Ordering;
        // The engine batches on its own; requests go in concurrently, each
        // timed.
        let calls = batch.into_iter().map(|r| async move {
            let concurrent = self.in_flight.fetch_add(1, Ordering::SeqCst);
            let started = tokio::time::Instant::now();
            let prompt = super::prompt_tokens(&r.body);
            let asked = r.body["max_tokens"].as_u64().unwrap_or(16);
            let answer = self.call(r).await;
            if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.idle.notify_waiters();
            }
            if let (Ok(body), Some(model)) = (&answer, &self.service) {
                let output = body["usage"]["completion_tokens"]
                    .as_u64()
                    .or_else(|| body["chunks"].as_u64())
                    .unwrap_or(asked);
                model.observe(prompt, output, concurrent, started.elapsed());
            }
            answer
        });
        futures_util::future::join_all(calls).await
    }

    /// Drains: new requests are refused (the gateway sends them
    /// elsewhere), those in flight get up to the drain grace to finish, then
    /// the engine gets SIGTERM, and SIGKILL after the term grace.
    async fn stop(&self) {
        use std::sync::atomic::Ordering;
        set(&self.shared, ReplicaState::Draining);
        let until = tokio::time::Instant::now() + self.drain_grace;
        loop {
            // registered before the count is read: no end is missed
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::select! {
                _ = idle => {}
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        let _ = self.stop.send(true);
    }
}

impl ExternalEngine {
    /// Proxies one request to the engine.
    async fn call(&self, r: InferRequest) -> Result<Value, ExecError> {
        {
            let state = self.state();
            if state != ReplicaState::Ready {
                return Err(ExecError::NotReady(state.as_str()));
            }
            let url = format!("http://127.0.0.1:{}{}", self.port, r.endpoint.path());
            let mut body = r.body.clone();
            if let (Some(_), Some(o)) = (&r.stream, body.as_object_mut()) {
                o.insert("stream".into(), Value::Bool(true));
            }
            let response = self
                .http
                .post(&url)
                .json(&body)
                .send()
                .await
                .map_err(|e| ExecError::Engine(e.to_string()))?;
            let status = response.status();
            if let (Some(sink), true) = (&r.stream, status.is_success()) {
                let usage = (r.body["stream_options"]["include_usage"] == Value::Bool(true))
                    .then(|| super::prompt_tokens(&r.body));
                return relay(response, sink, usage).await;
            }
            let body: Value = response
                .json()
                .await
                .map_err(|e| ExecError::Engine(format!("unreadable answer: {e}")))?;
            if status.as_u16() == 429 {
                // the engine's own queue is full: another replica may take it
                return Err(ExecError::Overloaded {
                    queued: self.in_flight.load(std::sync::atomic::Ordering::SeqCst) as u32,
                    retry_after_ms: 1000,
                });
            }
            if status.is_client_error() {
                let message = body["error"]["message"]
                    .as_str()
                    .unwrap_or("rejected by the engine")
                    .to_string();
                return Err(ExecError::BadRequest(message));
            }
            if !status.is_success() {
                return Err(ExecError::Engine(format!("engine answered {status}")));
            }
            Ok(body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_checked_and_rendered() {
        let t = CommandTemplate::parse(
            "vllm serve {artifact} --served-model-name {model} --port {port} -tp {tp} --gpu-memory-utilization {memory_fraction}",
        )
        .unwrap();
        let argv = t.render(&Placeholders {
            model: "m".into(),
            artifact: "hf://a/b".into(),
            port: 9000,
            gpus: "GPU-1,GPU-2".into(),
            tp: 2,
            memory_fraction: 0.5,
            pp: 1,
        });
        assert_eq!(
            argv,
            [
                "vllm",
                "serve",
                "hf://a/b",
                "--served-model-name",
                "m",
                "--port",
                "9000",
                "-tp",
                "2",
                "--gpu-memory-utilization",
                "0.50"
            ]
        );
        let cases = [
            ("", "empty"),
            ("vllm serve {artifact}", "has no {port}"),
            (
                "vllm --port {port} --model {name}",
                "unknown placeholder {name}",
            ),
            ("vllm --port {port", "unbalanced braces"),
            ("vllm --port }port{", "unbalanced braces"),
            ("vllm --port {port} --chat-template \"a b\"", "quotes"),
            ("{model} --port {port}", "must start with the program"),
        ];
        for (template, needle) in cases {
            let err = CommandTemplate::parse(template).unwrap_err();
            assert!(err.contains(needle), "{template:?}: {err}");
        }
    }
}
