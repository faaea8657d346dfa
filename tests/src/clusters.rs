//! Three-member clusters of real processes on loopback, for benchmarks:
//! Talon coordinators and etcd members, each with its own data directory,
//! started, killed with SIGKILL and restarted.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use talon_client::Client;
use tonic::transport::{Channel, Endpoint};

use crate::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::etcdserverpb::StatusRequest;
use crate::netlab::NetLab;
pub use crate::writers::{Writer, WriterPool};

/// A port that was free a moment ago and that this process has not handed
/// out before.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Option<std::collections::HashSet<u16>>> =
        std::sync::Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        let mut given = GIVEN.lock().expect("port set");
        if port == 0 || given.get_or_insert_with(Default::default).insert(port) {
            return port;
        }
    }
}

/// Which store a cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Talon,
    Etcd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Talon => "talon",
            Kind::Etcd => "etcd",
        }
    }
}

struct Member {
    id: u64,
    /// Client address (Talon gRPC / etcd client URL host:port).
    client_addr: String,
    /// Talon: the HTTP address; etcd: the peer address.
    http_addr: String,
    args: Vec<String>,
    /// Extra environment (a skewed clock's libfaketime).
    env: Vec<(String, String)>,
    program: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Member {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running three-member cluster.
pub struct BenchCluster {
    pub kind: Kind,
    members: Vec<Member>,
    data_dirs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

/// Polls until `f` succeeds or `timeout` passes.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

/// Certificates for TLS runs: one CA and a certificate per member name
/// (`c1`.. for Talon, `e1`.. for etcd), all for 127.0.0.1.
pub struct TlsFiles {
    pub dir: PathBuf,
    pub ca: Vec<u8>,
}

static TLS: std::sync::OnceLock<TlsFiles> = std::sync::OnceLock::new();

/// Turns TLS on for every cluster this process starts afterwards: makes the
/// CA and certificates with `talon cert` in `dir`.
pub fn enable_tls(talon_bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let talon = talon_bin.join("talon");
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(&talon).args(args).output()?;
        if !out.status.success() {
            bail!("talon {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let d = dir.to_str().context("utf-8 path")?;
    run(&["cert", "init", "--dir", d])?;
    for prefix in ["c", "e"] {
        for i in 1..=5 {
            run(&[
                "cert",
                "issue",
                "--dir",
                d,
                "--kind",
                "coordinator",
                "--name",
                &format!("{prefix}{i}"),
                "--host",
                "127.0.0.1",
                "--host",
                "localhost",
            ])?;
        }
    }
    let ca = std::fs::read(dir.join("ca.pem"))?;
    let _ = TLS.set(TlsFiles {
        dir: dir.to_path_buf(),
        ca,
    });
    Ok(())
}

/// The TLS files, when TLS is on.
pub fn tls() -> Option<&'static TlsFiles> {
    TLS.get()
}

/// `client` with TLS when it is on.
pub fn talon_client(client: Client) -> Client {
    match tls() {
        Some(t) => client.with_tls(t.ca.clone()),
        None => client,
    }
}

fn scheme() -> &'static str {
    if tls().is_some() {
        "https"
    } else {
        "http"
    }
}

pub(crate) fn channel(addr: &str) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(format!("{}://{addr}", scheme()))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true);
    if let Some(t) = tls() {
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca)),
        )?;
    }
    Ok(endpoint.connect_lazy())
}

impl BenchCluster {
    /// Starts three members of `kind` under `base` (a disk-backed directory).
    /// `talon_bin` is the directory holding `talon-coordinator`.
    pub async fn start(kind: Kind, base: &Path, talon_bin: &Path) -> anyhow::Result<BenchCluster> {
        BenchCluster::start_n(kind, 3, base, talon_bin, &[]).await
    }

    /// Starts `n` members; `extra` arguments go to every Talon coordinator.
    pub async fn start_n(
        kind: Kind,
        n: usize,
        base: &Path,
        talon_bin: &Path,
        extra: &[&str],
    ) -> anyhow::Result<BenchCluster> {
        BenchCluster::start_on(kind, n, base, talon_bin, extra, None, None).await
    }

    /// [`BenchCluster::start_n`], each member `i` on host `i` of `lab` when
    /// one is given (its own address, ports 7400 and 7401), on loopback
    /// otherwise; with `clocks`, each member's wall clock can be skewed.
    pub async fn start_on(
        kind: Kind,
        n: usize,
        base: &Path,
        talon_bin: &Path,
        extra: &[&str],
        lab: Option<&NetLab>,
        clocks: Option<&crate::clocks::Clocks>,
    ) -> anyhow::Result<BenchCluster> {
        let dir = tempfile::Builder::new()
            .prefix(kind.name())
            .tempdir_in(base)?;
        if let Some(lab) = lab {
            if lab.hosts() < n {
                bail!("the lab has {} hosts for {n} members", lab.hosts());
            }
        }
        let host = |i: usize| match lab {
            Some(lab) => lab.addr(i),
            None => "127.0.0.1".to_string(),
        };
        let ports: Vec<(u16, u16)> = match lab {
            Some(_) => vec![(7400, 7401); n],
            None => (0..n).map(|_| (free_port(), free_port())).collect(),
        };
        let mut members = Vec::new();
        let mut data_dirs = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let data = dir.path().join(format!("{}-{id}", kind.name()));
            data_dirs.push(data.clone());
            let (program, args) = match kind {
                Kind::Talon => {
                    let mut args = vec![
                        "--node-id".to_string(),
                        id.to_string(),
                        "--listen".into(),
                        format!("{}:{client}", host(i)),
                        "--http-listen".into(),
                        format!("{}:{peer}", host(i)),
                        "--data-dir".into(),
                        data.display().to_string(),
                    ];
                    if id == 1 {
                        args.push("--bootstrap".into());
                    }
                    if let Some(t) = tls() {
                        let file =
                            |ext: &str| t.dir.join(format!("c{id}.{ext}")).display().to_string();
                        args.extend([
                            "--tls-ca-file".to_string(),
                            t.dir.join("ca.pem").display().to_string(),
                            "--tls-cert-file".into(),
                            file("pem"),
                            "--tls-key-file".into(),
                            file("key"),
                            "--raft-listen".into(),
                            format!("127.0.0.1:{}", free_port()),
                        ]);
                    }
                    args.extend(extra.iter().map(|a| a.to_string()));
                    (talon_bin.join("talon-coordinator"), args)
                }
                Kind::Etcd => {
                    let initial: Vec<String> = ports
                        .iter()
                        .enumerate()
                        .map(|(j, (_, p))| format!("e{}={}://{}:{p}", j + 1, scheme(), host(j)))
                        .collect();
                    let sch = scheme();
                    let mut args = vec![
                        "--name".to_string(),
                        format!("e{id}"),
                        "--data-dir".into(),
                        data.display().to_string(),
                        "--listen-client-urls".into(),
                        format!("{sch}://{}:{client}", host(i)),
                        "--advertise-client-urls".into(),
                        format!("{sch}://{}:{client}", host(i)),
                        "--listen-peer-urls".into(),
                        format!("{sch}://{}:{peer}", host(i)),
                        "--initial-advertise-peer-urls".into(),
                        format!("{sch}://{}:{peer}", host(i)),
                        "--initial-cluster".into(),
                        initial.join(","),
                        "--initial-cluster-state".into(),
                        "new".into(),
                        "--initial-cluster-token".into(),
                        "talon-bench".into(),
                        "--log-level".into(),
                        "warn".into(),
                    ];
                    // The TLS row: clients over TLS, members over mutual TLS,
                    // as Talon's coordinators are.
                    if let Some(t) = tls() {
                        let file =
                            |ext: &str| t.dir.join(format!("e{id}.{ext}")).display().to_string();
                        let ca = t.dir.join("ca.pem").display().to_string();
                        args.extend([
                            "--cert-file".to_string(),
                            file("pem"),
                            "--key-file".into(),
                            file("key"),
                            "--peer-cert-file".into(),
                            file("pem"),
                            "--peer-key-file".into(),
                            file("key"),
                            "--peer-trusted-ca-file".into(),
                            ca,
                            "--peer-client-cert-auth".into(),
                        ]);
                    }
                    (PathBuf::from("etcd"), args)
                }
            };
            // In a lab the member runs inside its host's namespace (`ip
            // netns exec` execs it: the child's pid is the member's).
            let (program, args) = match lab {
                Some(lab) => {
                    let mut wrapped = lab.exec_prefix(i);
                    wrapped.push(program.display().to_string());
                    wrapped.extend(args);
                    (PathBuf::from("ip"), wrapped)
                }
                None => (program, args),
            };
            let mut m = Member {
                id,
                client_addr: format!("{}:{client}", host(i)),
                http_addr: format!("{}:{peer}", host(i)),
                args,
                env: match clocks {
                    Some(c) => c.env(i)?,
                    None => Vec::new(),
                },
                program,
                child: None,
                log: dir.path().join(format!("{}-{id}.log", kind.name())),
            };
            m.start()?;
            members.push(m);
        }
        let cluster = BenchCluster {
            kind,
            members,
            data_dirs,
            _dir: dir,
        };
        if kind == Kind::Talon {
            let key = cluster.admin_key().await?;
            let first = talon_client(Client::pinned(cluster.members[0].client_addr.clone())?)
                .with_key(&key);
            poll("talon node 1 to lead", Duration::from_secs(30), || async {
                first
                    .cluster_status()
                    .await
                    .ok()
                    .filter(|s| s.leader_id == Some(1))
            })
            .await?;
            for m in &cluster.members[1..] {
                first.cluster_join(m.id, &m.client_addr, false).await?;
            }
        }
        cluster.leader(None).await?;
        Ok(cluster)
    }

    /// Client addresses of all members.
    pub fn addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_addr.clone()).collect()
    }

    /// Client addresses of the running members.
    pub fn running_addrs(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_addr.clone())
            .collect()
    }

    /// The leader's member index as seen by every running member, waiting
    /// until they agree on one that is not `not`.
    pub async fn leader(&self, not: Option<usize>) -> anyhow::Result<usize> {
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.running(i))
            .collect();
        self.agreed_leader(&running, not, "an agreed leader", Duration::from_secs(60))
            .await
    }

    /// The leader every member in `members` names, once they agree on one
    /// of them that is not `not`.
    async fn agreed_leader(
        &self,
        members: &[usize],
        not: Option<usize>,
        what: &str,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let views: Vec<(usize, String)> = members
            .iter()
            .map(|&i| (i, self.members[i].client_addr.clone()))
            .collect();
        let kind = self.kind;
        poll(what, timeout, || {
            let views = views.clone();
            async move {
                // (member's index, its own name, the leader it names).
                let mut named = Vec::new();
                for (i, addr) in &views {
                    let (me, leader) = leader_view(kind, addr).await?;
                    named.push((*i, me, leader));
                }
                let leader = named.first()?.2.clone();
                if !named.iter().all(|v| v.2 == leader) {
                    return None;
                }
                let idx = named.iter().find(|v| v.1 == leader).map(|v| v.0)?;
                (Some(idx) != not).then_some(idx)
            }
        })
        .await
    }

    /// The HTTP address of member `index` (Talon: the gateway and /metrics).
    pub fn http_addr(&self, index: usize) -> String {
        self.members[index].http_addr.clone()
    }

    /// The process id of member `index`, while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.members[index].child.as_ref().map(Child::id)
    }

    pub fn addr(&self, index: usize) -> String {
        self.members[index].client_addr.clone()
    }

    pub fn kill(&mut self, index: usize) {
        self.members[index].kill();
    }

    /// Whether member `index` runs (it may be paused).
    pub fn running(&self, index: usize) -> bool {
        self.members[index].child.is_some()
    }

    /// Stops member `index` with SIGSTOP (`resume` continues it).
    pub fn pause(&self, index: usize) -> anyhow::Result<()> {
        self.signal(index, "STOP")
    }

    pub fn resume(&self, index: usize) -> anyhow::Result<()> {
        self.signal(index, "CONT")
    }

    fn signal(&self, index: usize, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid(index).context("the member is not running")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// The leader that every member in `members` names, once they agree on
    /// one of them (the majority side of a partition; the minority may
    /// still name its old leader).
    pub async fn leader_among(
        &self,
        members: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        self.agreed_leader(members, None, "a leader agreed by the majority", timeout)
            .await
    }

    /// Waits until member `index` has applied what the leader had when the
    /// wait began (a restarted member has caught up).
    pub async fn caught_up(&self, index: usize) -> anyhow::Result<()> {
        let leader = self.leader(None).await?;
        let target = log_index(self.kind, &self.members[leader].client_addr)
            .await
            .context("reading the leader's log index")?;
        let addr = self.members[index].client_addr.clone();
        let kind = self.kind;
        poll(
            "the restarted member to catch up",
            Duration::from_secs(60),
            || {
                let addr = addr.clone();
                async move {
                    log_index(kind, &addr)
                        .await
                        .filter(|i| *i >= target)
                        .map(|_| ())
                }
            },
        )
        .await
    }

    /// The first admin key (Talon): written by the bootstrapping member 1
    /// into its data directory; waits until the cluster has recorded it.
    pub async fn admin_key(&self) -> anyhow::Result<String> {
        if self.kind != Kind::Talon {
            return Ok(String::new());
        }
        let path = self.data_dirs[0].join("admin.key");
        let addr = self.members[0].client_addr.clone();
        poll("the first admin key", Duration::from_secs(30), || {
            let path = path.clone();
            let addr = addr.clone();
            async move {
                let key = std::fs::read_to_string(&path).ok()?.trim().to_string();
                let client = talon_client(Client::pinned(addr).ok()?).with_key(&key);
                client.who_am_i().await.ok().map(|_| key)
            }
        })
        .await
    }

    /// Starts a killed member again on its data directory (a Talon node 1
    /// does not bootstrap again: its log is not empty).
    pub fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.members[index].start()
    }
}

/// The member's applied (Talon) or Raft (etcd) log index.
pub async fn log_index(kind: Kind, addr: &str) -> Option<u64> {
    match kind {
        Kind::Talon => {
            let c = talon_client(Client::pinned(addr.to_string()).ok()?)
                .with_timeout(Duration::from_millis(500));
            c.cluster_status().await.ok()?.applied_index
        }
        Kind::Etcd => {
            let mut c = MaintenanceClient::new(channel(addr).ok()?);
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(Duration::from_millis(500));
            Some(c.status(req).await.ok()?.into_inner().raft_index)
        }
    }
}

/// How the member at `addr` names itself and its leader (Talon: gRPC
/// addresses; etcd: member ids), when it knows a leader.
pub async fn leader_view(kind: Kind, addr: &str) -> Option<(String, String)> {
    match kind {
        Kind::Talon => {
            let s = talon_client(Client::pinned(addr.to_string()).ok()?)
                .with_timeout(Duration::from_millis(500));
            let status = s.cluster_status().await.ok()?;
            status.leader_id?;
            Some((addr.to_string(), status.leader_addr))
        }
        Kind::Etcd => {
            let mut c = MaintenanceClient::new(channel(addr).ok()?);
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(Duration::from_millis(500));
            let status = c.status(req).await.ok()?.into_inner();
            if status.leader == 0 {
                return None;
            }
            Some((
                status.header?.member_id.to_string(),
                status.leader.to_string(),
            ))
        }
    }
}
