//! The deploy files, started for real where this machine can: the systemd
//! units' command lines run as plain processes (their `--check` first),
//! SIGTERM drains and stops each binary with status 0, and the example
//! configurations are valid.

use std::time::Duration;

use crate::harness::{bin, free_port, wait_for, Proc};

/// The command lines of `key=` in a systemd unit, split into words.
fn exec_lines(unit: &str, key: &str) -> Vec<Vec<String>> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// `line` with the unit's paths replaced: binaries by the built ones,
/// `/etc/talon/NAME` by the test's files.
fn localize(line: &[String], files: &[(&str, String)]) -> (String, Vec<String>) {
    let program = line[0]
        .strip_prefix("/usr/local/bin/")
        .unwrap_or_else(|| panic!("unit runs {} from elsewhere", line[0]))
        .to_string();
    let args = line[1..]
        .iter()
        .map(|a| {
            files
                .iter()
                .find(|(from, _)| a == from)
                .map_or_else(|| a.clone(), |(_, to)| to.clone())
        })
        .collect();
    (program, args)
}

fn unit(name: &str) -> String {
    let path = format!("{}/../deploy/systemd/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs a unit's `ExecStartPre` lines (each must succeed) and starts its
/// `ExecStart`.
fn start_unit(name: &str, files: &[(&str, String)]) -> Proc {
    let text = unit(name);
    assert!(
        text.contains("KillSignal=SIGTERM"),
        "{name} stops with SIGTERM"
    );
    for line in exec_lines(&text, "ExecStartPre") {
        let (program, args) = localize(&line, files);
        let out = std::process::Command::new(bin(&program))
            .args(&args)
            .output()
            .expect("run ExecStartPre");
        assert!(
            out.status.success(),
            "{name} ExecStartPre {line:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let start = exec_lines(&text, "ExecStart");
    assert_eq!(start.len(), 1, "{name} has one ExecStart");
    let (program, args) = localize(&start[0], files);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn(&program, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_start_and_sigterm_drains_and_stops_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (grpc, http, agent_http) = (free_port(), free_port(), free_port());
    let token = "deploy-test-join-token-0123";
    let data = dir.path().join("coordinator");
    let coordinator_toml = dir.path().join("coordinator.toml");
    std::fs::write(
        &coordinator_toml,
        format!(
            "node_id = 1\ndata_dir = {data:?}\nlisten = \"127.0.0.1:{grpc}\"\n\
             http_listen = \"127.0.0.1:{http}\"\nbootstrap = true\n\n[agents]\njoin_token = \"{token}\"\n"
        ),
    )
    .expect("coordinator.toml");
    let agent_toml = dir.path().join("agent.toml");
    let credential = dir.path().join("agent.credential");
    let logs = dir.path().join("engine-logs");
    std::fs::write(
        &agent_toml,
        format!(
            "node_id = \"unit-host\"\ncoordinators = [\"127.0.0.1:{grpc}\"]\njoin_token = \"{token}\"\n\
             probe = \"simulated\"\nsim_gpus = \"l4:1\"\nhttp_listen = \"127.0.0.1:{agent_http}\"\n\
             credential_file = {credential:?}\nengine_log_dir = {logs:?}\n"
        ),
    )
    .expect("agent.toml");
    let files = [
        (
            "/etc/talon/coordinator.toml",
            coordinator_toml.display().to_string(),
        ),
        ("/etc/talon/agent.toml", agent_toml.display().to_string()),
    ];
    let mut coordinator = start_unit("talon-coordinator.service", &files);
    let key_file = data.join("admin.key");
    let key = wait_for("the first admin key", Duration::from_secs(60), || {
        let key_file = key_file.clone();
        async move { Some(std::fs::read_to_string(&key_file).ok()?.trim().to_string()) }
    })
    .await;
    let mut agent = start_unit("talon-agent.service", &files);
    let client = talon_client::Client::pinned(&format!("127.0.0.1:{grpc}"))
        .expect("client")
        .with_key(key);
    wait_for("the agent registered", Duration::from_secs(90), || async {
        client
            .get_node("unit-host")
            .await
            .ok()
            .filter(|n| n.state == "ready")
    })
    .await;
    let spec = talon_tests::model_spec("unit-model", "simulated", 4_000, 1);
    client.create_model(spec).await.expect("model");
    wait_for("a replica ready", Duration::from_secs(60), || async {
        let list = client.list_replicas("unit-model").await.ok()?;
        list.replicas
            .iter()
            .find(|r| r.state == "ready")
            .map(|_| ())
    })
    .await;

    // SIGTERM: the agent drains its replica and exits 0, then the
    // coordinator, within the units' TimeoutStopSec
    let status = tokio::task::spawn_blocking(move || {
        let status = agent.terminate(Duration::from_secs(60));
        (agent, status)
    })
    .await
    .expect("join");
    assert!(
        status.1.is_some_and(|s| s.success()),
        "the agent did not exit 0 on SIGTERM: {:?}",
        status.1
    );
    let status =
        tokio::task::spawn_blocking(move || coordinator.terminate(Duration::from_secs(20)))
            .await
            .expect("join");
    assert!(
        status.is_some_and(|s| s.success()),
        "the coordinator did not exit 0 on SIGTERM: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talon_up_stops_with_status_0_on_sigterm() {
    let mut up = crate::serving::talon_up(&["--host", "l4:1", "--demo-replicas", "1"]).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = up._proc.terminate(Duration::from_secs(30));
        (up, status)
    })
    .await
    .expect("join")
    .1;
    assert!(
        status.is_some_and(|s| s.success()),
        "talon up did not exit 0 on SIGTERM: {status:?}"
    );
}

#[test]
fn the_example_agent_configuration_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.example.toml");
    let out = std::process::Command::new(bin("talon-agent"))
        // no NVIDIA driver here: the file's nvml probe is swapped for a
        // simulated one, every other key is checked as written
        .args([
            "--config",
            path,
            "--check",
            "--probe",
            "simulated",
            "--sim-gpus",
            "l4:1",
        ])
        // as the unit's EnvironmentFile gives it
        .env("TALON_JOIN_TOKEN", "example-join-token-0123")
        .output()
        .expect("run talon-agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Kubernetes manifests pass the schema check of the Kubernetes
/// version the validator ships (strict: an unknown field fails), and
/// their containers' command lines are accepted by the real binaries
/// (`--check`).
#[test]
fn the_kubernetes_manifests_pass_the_schema_check_and_their_commands_the_binaries() {
    let python =
        crate::harness::python_venv("k8s-venv", "kubernetes_validate", &["kubernetes-validate"]);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let manifests: Vec<String> = ["coordinator.yaml", "node-agent.yaml"]
        .iter()
        .map(|f| format!("{root}/deploy/kubernetes/{f}"))
        .collect();
    let out = std::process::Command::new(python.with_file_name("kubernetes-validate"))
        .arg("--strict")
        .args(&manifests)
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    for resource in [
        "statefulset/talon-coordinator",
        "poddisruptionbudget/talon-coordinator",
        "service/talon-gateway",
        "daemonset/talon-agent",
    ] {
        assert!(
            report.contains(&format!("passed for resource {resource}")),
            "{resource} not validated: {report}"
        );
    }

    let out = std::process::Command::new(&python)
        .arg(format!("{root}/tests/python/k8s_commands.py"))
        .args(&manifests)
        .output()
        .expect("run k8s_commands.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let containers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let text = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let of = |workload: &str| {
        containers
            .iter()
            .find(|c| c["workload"] == workload)
            .unwrap_or_else(|| panic!("no {workload} in {containers:?}"))
            .clone()
    };
    // the agent's flags, with the downward API's values
    let agent = of("daemonset/talon-agent");
    assert_eq!(text(&agent["command"]), ["/usr/local/bin/talon-agent"]);
    assert!(text(&agent["env"]).contains(&"TALON_JOIN_TOKEN".to_string()));
    let args: Vec<String> = text(&agent["args"])
        .into_iter()
        .map(|a| {
            a.replace("$(NODE_NAME)", "gpu-node-1")
                .replace("$(POD_IP)", "10.0.0.7")
        })
        .collect();
    let out = std::process::Command::new(bin("talon-agent"))
        .args(&args)
        // no NVIDIA driver here: the probe is simulated, the rest as written
        .args(["--check", "--probe", "simulated", "--sim-gpus", "l4:1"])
        .env("TALON_JOIN_TOKEN", "k8s-join-token-0123456789")
        .output()
        .expect("run talon-agent");
    assert!(
        out.status.success(),
        "the DaemonSet's agent flags: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the coordinator's start script, as pod 0 runs it
    let coordinator = of("statefulset/talon-coordinator");
    let script = text(&coordinator["args"]).join("\n");
    let exec = script
        .split("exec ")
        .nth(1)
        .expect("the script execs the coordinator")
        .replace("\\\n", " ")
        .replace("$((ord + 1))", "1")
        .replace("$boot", "true")
        .replace("${HOSTNAME}", "talon-coordinator-0");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[0], "talon-coordinator", "{exec}");
    let out = std::process::Command::new(bin("talon-coordinator"))
        .args(&words[1..])
        .arg("--check")
        .env("TALON_JOIN_TOKEN", "k8s-join-token-0123456789")
        .output()
        .expect("run talon-coordinator");
    assert!(
        out.status.success(),
        "the StatefulSet's coordinator flags {words:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The compose file's services, run as plain processes on this host (no
/// Docker engine here): each container's addresses become loopback ports,
/// its volumes directories of the test. The two coordinators that do not
/// bootstrap are joined as the file's comment says, both agents register
/// through any coordinator, and SIGTERM stops every process with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_services_form_a_cluster_of_three_with_two_agents() {
    let python = tokio::task::spawn_blocking(|| {
        crate::harness::python_venv("k8s-venv", "kubernetes_validate", &["kubernetes-validate"])
    })
    .await
    .expect("venv");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = std::process::Command::new(&python)
        .arg(format!("{root}/tests/python/compose_commands.py"))
        .arg(format!("{root}/deploy/compose.yaml"))
        .output()
        .expect("run compose_commands.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("JSON");
    let names: Vec<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(names, ["a1", "a2", "c1", "c2", "c3"]);
    let dir = tempfile::tempdir().expect("temp dir");
    // each service's own addresses, and how the others name them
    let ports: std::collections::BTreeMap<&str, (u16, u16)> = names
        .iter()
        .map(|n| (*n, (free_port(), free_port())))
        .collect();
    let mut procs = Vec::new();
    for (name, s) in &services {
        let (main, second) = ports[name.as_str()];
        let mut swaps: Vec<(String, String)> = vec![
            ("0.0.0.0:7400".into(), format!("127.0.0.1:{main}")),
            ("0.0.0.0:7480".into(), format!("127.0.0.1:{second}")),
            ("0.0.0.0:7481".into(), format!("127.0.0.1:{main}")),
            (
                "/var/lib/talon/data".into(),
                dir.path().join(name).join("data").display().to_string(),
            ),
            (
                "/var/lib/talon-agent/credential".into(),
                dir.path()
                    .join(name)
                    .join("credential")
                    .display()
                    .to_string(),
            ),
        ];
        for (other, (p, _)) in &ports {
            swaps.push((format!("{other}:7400"), format!("127.0.0.1:{p}")));
            swaps.push((format!("{other}:7481"), format!("127.0.0.1:{p}")));
        }
        let word = |w: &str| {
            swaps
                .iter()
                .fold(w.to_string(), |w, (from, to)| w.replace(from, to))
        };
        let entry: Vec<String> = s["entrypoint"]
            .as_array()
            .expect("entrypoint")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let program = entry[0]
            .strip_prefix("/usr/local/bin/")
            .expect("a Talon binary")
            .to_string();
        let args: Vec<String> = s["command"]
            .as_array()
            .expect("command")
            .iter()
            .filter_map(|v| v.as_str().map(word))
            .collect();
        // `${VAR:-default}` as compose reads it with no .env
        let env: Vec<(String, String)> = s["environment"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let v = v.as_str().unwrap_or_default();
                        let v = v
                            .strip_prefix("${")
                            .and_then(|v| v.strip_suffix('}'))
                            .and_then(|v| v.split_once(":-"))
                            .map_or(v, |(_, default)| default);
                        (k.clone(), v.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        procs.push((name.clone(), Proc::spawn_with_env(&program, &args, &env)));
    }
    let key_file = dir.path().join("c1/data/admin.key");
    let key = wait_for("c1's first admin key", Duration::from_secs(60), || {
        let key_file = key_file.clone();
        async move { Some(std::fs::read_to_string(&key_file).ok()?.trim().to_string()) }
    })
    .await;
    let client = talon_client::Client::pinned(&format!("127.0.0.1:{}", ports["c1"].0))
        .expect("client")
        .with_key(key);
    for (id, name) in [(2, "c2"), (3, "c3")] {
        let addr = format!("127.0.0.1:{}", ports[name].0);
        wait_for(
            &format!("{name} joined"),
            Duration::from_secs(60),
            || async { client.cluster_join(id, &addr, false).await.ok() },
        )
        .await;
    }
    wait_for(
        "both agents registered",
        Duration::from_secs(90),
        || async {
            let nodes = client.list_nodes().await.ok()?;
            let ready = nodes.iter().filter(|n| n.state == "ready").count();
            (ready == 2).then_some(())
        },
    )
    .await;
    let status = client.cluster_status().await.expect("status");
    assert_eq!(
        status.members.iter().filter(|m| m.voter).count(),
        3,
        "{status:?}"
    );

    // agents first (they drain), then the coordinators
    procs.sort_by_key(|(name, _)| !name.starts_with('a'));
    let stopped = tokio::task::spawn_blocking(move || {
        procs
            .into_iter()
            .map(|(name, mut p)| {
                let status = p.terminate(Duration::from_secs(30));
                (name, status)
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("join");
    for (name, status) in stopped {
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} did not exit 0 on SIGTERM: {status:?}"
        );
    }
}

/// The CLI's long operations show progress and end with a summary:
/// waiting for a model, draining a node (its replica moves), and `talon
/// top` showing the traffic sent meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_waits_drains_and_shows_live_traffic() {
    let up =
        crate::serving::talon_up(&["--host", "l4:1", "--host", "l4:1", "--demo-replicas", "1"])
            .await;
    let talon = |args: &[&str]| {
        let out = std::process::Command::new(bin("talon"))
            .args(["--endpoints", &up.grpc])
            .args(args)
            .env("TALON_KEY", &up.key)
            .output()
            .expect("run talon");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = talon(&["model", "wait", "demo", "--timeout-s", "60"]);
    assert!(
        ok && out.contains("1 replica(s) ready on sim-"),
        "{out}{err}"
    );

    // top over two seconds, while requests are sent
    let top = {
        let (http, key) = (up.http.clone(), up.key.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin("talon"))
                .args(["top", "--http", &http, "--interval-s", "2", "--rounds", "1"])
                .env("TALON_KEY", key)
                .output()
                .expect("run talon top")
        })
    };
    let client = talon_tests::http_client(&up.key);
    let url = format!("http://{}/v1/chat/completions", up.http);
    let body = serde_json::json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    // requests one after another until top has shown its table
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !top.is_finished() && std::time::Instant::now() < until {
        let r = client.post(&url).json(&body).send().await.expect("send");
        assert_eq!(r.status().as_u16(), 200);
    }
    let top = top.await.expect("join");
    let table = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("demo "))
        .unwrap_or_else(|| panic!("no demo row: {table}"));
    let rate: f64 = row
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("REQ/S");
    assert!(rate > 0.0, "{table}");

    // drain the node that holds the replica, and wait for it to move
    let admin = talon_client::Client::pinned(&up.grpc)
        .expect("client")
        .with_key(up.key.clone());
    let node = admin
        .list_replicas("demo")
        .await
        .expect("replicas")
        .replicas[0]
        .node_id
        .clone();
    let (ok, out, err) = talon(&["node", "drain", &node, "--wait", "--timeout-s", "90"]);
    assert!(
        ok && out.contains(&format!("node {node} drained: 1 replica(s) moved")),
        "{out}{err}"
    );
    let (ok, out, err) = talon(&["model", "wait", "demo", "--timeout-s", "60"]);
    assert!(ok && !out.contains(&format!("on {node} ")), "{out}{err}");
}
