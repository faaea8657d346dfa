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
use super::relay::{relay, scrape};
use super::signals::{EngineLoad, ServiceModel};
pub use super::template::{
    check_artifact, CommandTemplate, Placeholders, ENGINE_HOST, PASSED_ENV, PLACEHOLDERS,
};
use super::{ExecError, Executor, InferRequest, ReplicaState};

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
            let mut request = self.http.post(&url).json(&body);
            if let Some(traceparent) = &r.traceparent {
                // vLLM, SGLang and TGI continue the trace from it
                request = request.header(talon_trace::TRACEPARENT, traceparent);
            }
            let response = request
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
