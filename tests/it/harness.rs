//! Starts real `talon-coordinator` processes on loopback and waits on
//! conditions with deadlines.
//!
//! Binaries come from this workspace's target directory; the first test that
//! needs them runs `cargo build` for them once, so they are never stale.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use talon_client::{Client, ClusterStatus, ModelSpec};

/// The directory that holds the workspace's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>/deps/<exe>")
                .to_path_buf();
            let cargo = option_env!("CARGO").unwrap_or("cargo");
            // The same packages and targets `cargo test --workspace` builds
            // (every member, dev-dependencies on), so features resolve the
            // same and the binaries link the dependencies that build already
            // made: building only the three binary packages resolves other
            // features and compiles some fifty crates a second time (minutes
            // and gigabytes on a fresh machine).
            let status = Command::new(cargo)
                .args(["build", "--workspace", "--bins", "--tests"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build for the binaries");
            assert!(status.success(), "cargo build of the binaries failed");
            dir
        })
        .clone()
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A port that was free a moment ago and that this test process has not
/// handed out before (so that two nodes picked before either binds never get
/// the same one).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<std::collections::HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind port 0")
            .local_addr()
            .expect("local addr")
            .port();
        let mut given = GIVEN.lock().expect("port set");
        if given.get_or_insert_with(Default::default).insert(port) {
            return port;
        }
    }
}

/// Polls `check` until it yields a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
    }
}

/// One coordinator process.
pub struct Node {
    pub id: u64,
    pub grpc: String,
    pub http: String,
    pub data_dir: PathBuf,
    pub extra_args: Vec<String>,
    /// The cluster's admin key, once `cluster init` printed it.
    pub key: Arc<Mutex<String>>,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Node {
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} already runs", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        let child = Command::new(bin("talon-coordinator"))
            .args(["--node-id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--listen",
                &self.grpc,
                "--http-listen",
                &self.http,
                "--fault-injection",
                "true",
            ])
            .args(&self.extra_args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn talon-coordinator");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, no flush beyond what was already acknowledged.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A client pinned to this node, with the cluster's admin key.
    pub fn client(&self) -> Client {
        self.client_as("")
            .with_key(self.key.lock().expect("key lock").as_str())
    }

    /// A client pinned to this node with `key` (none when empty).
    pub fn client_as(&self, key: &str) -> Client {
        Client::pinned(self.grpc.clone())
            .expect("valid address")
            .with_timeout(Duration::from_secs(5))
            .with_key(key)
    }

    /// This node's `/metrics` value of `name`, if exported.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let http = self.http.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&http).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
            let mut body = String::new();
            s.read_to_string(&mut body).ok()?;
            body.lines().find_map(|l| {
                l.strip_prefix(&format!("{name} "))
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .await
        .ok()
        .flatten()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of node {} ---", self.id);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A set of coordinator processes in temporary directories.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The admin key `cluster init` printed (empty before).
    pub key: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` coordinators (not yet a cluster) with `extra_args` each.
    pub fn start(n: usize, extra_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = Arc::new(Mutex::new(String::new()));
        let nodes = (1..=n as u64)
            .map(|id| {
                let mut node = Node {
                    id,
                    grpc: format!("127.0.0.1:{}", free_port()),
                    http: format!("127.0.0.1:{}", free_port()),
                    data_dir: dir.path().join(format!("node-{id}")),
                    extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
                    key: key.clone(),
                    child: None,
                    log_path: dir.path().join(format!("node-{id}.log")),
                };
                node.start();
                node
            })
            .collect();
        Cluster {
            nodes,
            key,
            _dir: dir,
        }
    }

    /// Starts `n` coordinators and forms one cluster: node 1 bootstraps, the
    /// others join through the SDK.
    pub async fn form(n: usize, extra_args: &[&str]) -> Cluster {
        let cluster = Cluster::start(n, extra_args);
        let first = cluster.nodes[0].client();
        let init = wait_for("node 1 to accept init", Duration::from_secs(20), || async {
            first.cluster_init(vec![]).await.ok()
        })
        .await;
        *cluster.key.lock().expect("key lock") = init.admin_key;
        let client = cluster.client();
        for node in &cluster.nodes[1..] {
            let grpc = node.grpc.clone();
            wait_for(
                &format!("node {} to join", node.id),
                Duration::from_secs(30),
                || {
                    let client = &client;
                    let grpc = grpc.clone();
                    async move { client.cluster_join(node.id, &grpc, false).await.ok() }
                },
            )
            .await;
        }
        cluster
    }

    /// A client that knows every node, with the admin key.
    pub fn client(&self) -> Client {
        self.client_as(&self.admin_key())
    }

    /// A client that knows every node, with `key`.
    pub fn client_as(&self, key: &str) -> Client {
        Client::new(self.nodes.iter().map(|n| n.grpc.clone()))
            .expect("valid addresses")
            .with_timeout(Duration::from_secs(15))
            .with_key(key)
    }

    /// Starts one more coordinator (not a member yet) with `extra_args`.
    pub fn add_node(&mut self, extra_args: &[&str]) -> &mut Node {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let mut node = Node {
            id,
            grpc: format!("127.0.0.1:{}", free_port()),
            http: format!("127.0.0.1:{}", free_port()),
            data_dir: self._dir.path().join(format!("node-{id}")),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            key: self.key.clone(),
            child: None,
            log_path: self._dir.path().join(format!("node-{id}.log")),
        };
        node.start();
        self.nodes.push(node);
        self.nodes.last_mut().expect("just pushed")
    }

    pub fn admin_key(&self) -> String {
        self.key.lock().expect("key lock").clone()
    }

    pub fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node id")
    }

    /// Waits until a running node reports a leader that the running nodes
    /// agree on, other than `not`.
    pub async fn leader(&self, not: Option<u64>) -> u64 {
        wait_for("an agreed leader", Duration::from_secs(30), || async {
            let mut leaders = Vec::new();
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let status: ClusterStatus = node.client().cluster_status().await.ok()?;
                leaders.push(status.leader_id?);
            }
            let first = *leaders.first()?;
            (leaders.iter().all(|l| *l == first) && Some(first) != not).then_some(first)
        })
        .await
    }

    /// The agreed leader's id and a node that follows it.
    pub async fn follower(&self) -> (u64, &Node) {
        let leader = self.leader(None).await;
        let follower = self
            .nodes
            .iter()
            .find(|n| n.id != leader)
            .expect("a follower");
        (leader, follower)
    }
}

/// A valid model spec.
pub fn spec(name: &str, version: &str) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        version: version.into(),
        engine: "vllm".into(),
        artifact_uri: format!("hf://talon-tests/{name}"),
        memory_mib: 16_000,
        latency_slo_ms: 500,
        min_replicas: 1,
        max_replicas: 3,
        priority: "normal".into(),
        labels: Default::default(),
    }
}

/// The model names a node has applied (local, non-linearizable read).
pub async fn model_names(node: &Node) -> Option<std::collections::BTreeSet<String>> {
    let models = node.client().list_models(false).await.ok()?;
    Some(models.into_iter().map(|m| m.name).collect())
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Option<std::process::Child>);

impl Proc {
    /// Agents keep their credential files in a directory of the test run,
    /// not in the source tree.
    pub fn spawn(program: &str, args: &[&str]) -> Proc {
        Proc::spawn_with_env(program, args, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        static WORK: OnceLock<tempfile::TempDir> = OnceLock::new();
        let work = WORK.get_or_init(|| tempfile::tempdir().expect("temp dir"));
        let child = Command::new(bin(program))
            .current_dir(work.path())
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Proc(Some(child))
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit: its
    /// exit status, or `None` if it was still running (it is then
    /// killed).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.0.take()?;
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -TERM {pid} failed");
        // a thread waits for the exit; this one for the thread, until `within`
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(within) {
            Ok(status) => status.ok(),
            Err(_) => {
                // still running: killed, and the waiting thread reaps it
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                None
            }
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A virtualenv under the target directory (made once, reused by later
/// runs) in which `import` works, after `pip install packages`.
pub fn python_venv(name: &str, import: &str, packages: &[&str]) -> PathBuf {
    // tests that share a virtualenv run at once: one makes it, the others
    // wait and find it made
    static MAKING: Mutex<()> = Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = bin_dir().join(name);
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", &format!("import {import}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(
            made.success(),
            "could not create a virtualenv at {}",
            venv.display()
        );
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(packages)
            .status()
            .expect("pip install");
        assert!(installed.success(), "pip install {packages:?} failed");
    }
    python
}

/// Runs `script` (under `tests/python/`) with `python` and `args` off the
/// async runtime; asserts that it succeeded and printed every line of
/// `checks`.
pub async fn run_python_checks(python: PathBuf, script: &str, args: Vec<String>, checks: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(args)
            .output()
            .expect("run python")
    })
    .await
    .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in checks {
        assert!(stdout.contains(check), "{check} missing: {stdout}");
    }
}

/// One coordinator that accepts agents with `token`, and agent `n1` (one
/// simulated H100) registered with it.
pub async fn one_node_cluster(token: &str) -> (Cluster, Proc) {
    let cluster = Cluster::form(1, &["--join-token", token]).await;
    let agent = sim_agent("n1", &cluster.nodes[0].grpc, token, &[]);
    let client = cluster.client();
    wait_for("the node", Duration::from_secs(90), || async {
        client.get_node("n1").await.ok()
    })
    .await;
    (cluster, agent)
}

/// A `talon-agent` process for node `node_id` with one simulated H100,
/// joining `coordinators` (comma-separated) with `token`, serving
/// replicas on a free port; `extra` flags after.
pub fn sim_agent(node_id: &str, coordinators: &str, token: &str, extra: &[&str]) -> Proc {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--node-id",
        node_id,
        "--coordinators",
        coordinators,
        "--join-token",
        token,
        "--sim-gpus",
        "h100-sxm:1",
        "--http-listen",
        &listen,
    ];
    args.extend_from_slice(extra);
    Proc::spawn("talon-agent", &args)
}
