//! Long operations that show their progress (a bar on a terminal, via
//! indicatif; nothing on a pipe) and end with a one-line summary:
//! `talon node drain --wait`, `talon model wait`, and `talon top`, the
//! live per-model traffic of a coordinator.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::{Client, ClientError};
use indicatif::{ProgressBar, ProgressStyle};

/// How often a wait asks the cluster again.
const POLL: Duration = Duration::from_millis(500);

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn timed_out(what: String) -> ClientError {
    ClientError::Status(tonic::Status::deadline_exceeded(what))
}

/// Waits until no replica is placed on `node` (a drain moved them all).
pub async fn wait_drained(
    client: &Client,
    node: &str,
    timeout: Duration,
) -> Result<(), ClientError> {
    let started = Instant::now();
    let on_node =
        |list: &[talon_proto::v1::Replica]| list.iter().filter(|r| r.node_id == node).count();
    let first = on_node(&client.list_replicas("").await?.replicas);
    let bar = bar(first as u64, &format!("draining {node}"));
    let mut poll = tokio::time::interval(POLL);
    loop {
        let left = on_node(&client.list_replicas("").await?.replicas);
        bar.set_position(first.saturating_sub(left) as u64);
        if left == 0 {
            bar.finish_and_clear();
            println!(
                "node {node} drained: {first} replica(s) moved in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bar.abandon();
            return Err(timed_out(format!(
                "{left} of {first} replica(s) are still on {node} after {} s; see `talon replica list` for why",
                timeout.as_secs()
            )));
        }
        poll.tick().await;
    }
}

/// Waits until `model` has its `min_replicas` replicas of its newest
/// version ready.
pub async fn wait_ready(
    client: &Client,
    model: &str,
    timeout: Duration,
) -> Result<(), ClientError> {
    let started = Instant::now();
    let m = client.get_model(model, false).await?;
    let newest = m
        .versions
        .last()
        .map(|v| v.version.clone())
        .unwrap_or_default();
    let want = m.min_replicas.max(1) as usize;
    let bar = bar(want as u64, &format!("{model} {newest} ready"));
    let mut poll = tokio::time::interval(POLL);
    loop {
        let list = client.list_replicas(model).await?.replicas;
        let ready = list
            .iter()
            .filter(|r| r.version == newest && r.state == "ready")
            .count();
        bar.set_position(ready.min(want) as u64);
        if ready >= want {
            bar.finish_and_clear();
            let nodes: std::collections::BTreeSet<&str> = list
                .iter()
                .filter(|r| r.version == newest && r.state == "ready")
                .map(|r| r.node_id.as_str())
                .collect();
            println!(
                "model {model} {newest}: {ready} replica(s) ready on {} in {:.1} s",
                nodes.into_iter().collect::<Vec<_>>().join(", "),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bar.abandon();
            let states: Vec<String> = list
                .iter()
                .map(|r| format!("{}={}", r.id, r.state))
                .collect();
            return Err(timed_out(format!(
                "{ready} of {want} replica(s) of {model} {newest} ready after {} s ({})",
                timeout.as_secs(),
                if states.is_empty() {
                    "none placed".to_string()
                } else {
                    states.join(", ")
                }
            )));
        }
        poll.tick().await;
    }
}

/// One scrape's per-model figures: requests and tokens so far, and the
/// latency histogram's cumulative buckets.
#[derive(Clone, Default)]
struct Sample {
    requests: f64,
    tokens: f64,
    buckets: Vec<(f64, f64)>,
    running: f64,
    waiting: f64,
}

/// Reads `vllm:*` samples per model out of a `/metrics` text.
fn parse(text: &str) -> BTreeMap<String, Sample> {
    let mut out: BTreeMap<String, Sample> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("vllm:")) {
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = head.split_once('{').unwrap_or((head, ""));
        let label = |key: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.trim_end_matches('}').strip_prefix(&format!("{key}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let Some(model) = label("model_name") else {
            continue;
        };
        let s = out.entry(model).or_default();
        match name {
            "vllm:e2e_request_latency_seconds_count" => s.requests += value,
            "vllm:generation_tokens_total" => s.tokens += value,
            "vllm:num_requests_running" => s.running += value,
            "vllm:num_requests_waiting" => s.waiting += value,
            "vllm:e2e_request_latency_seconds_bucket" => {
                let le = label("le").and_then(|l| {
                    if l == "+Inf" {
                        Some(f64::INFINITY)
                    } else {
                        l.parse().ok()
                    }
                });
                if let Some(le) = le {
                    s.buckets.push((le, value));
                }
            }
            _ => {}
        }
    }
    out
}

/// The `q` quantile of the requests between two cumulative histograms (the
/// upper bound of the bucket it falls in).
fn quantile(before: &[(f64, f64)], now: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - was)
        })
        .collect();
    let total = delta.iter().map(|(_, n)| *n).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

/// `talon top`: every `interval`, the per-model traffic of the coordinator
/// at `http` (its `/metrics`): requests and tokens per second, p50 and p99
/// latency over the interval, requests running and waiting on replicas
/// (as the leader reports them). `rounds` tables, 0 for until Ctrl-C.
pub async fn top(http: &str, interval: Duration, rounds: u32) -> Result<(), ClientError> {
    let client = reqwest::Client::new();
    let url = format!("http://{http}/metrics");
    let scrape = || async {
        let text = client
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| ClientError::Status(tonic::Status::unavailable(format!("{url}: {e}"))))?
            .text()
            .await
            .map_err(|e| ClientError::Status(tonic::Status::unavailable(format!("{url}: {e}"))))?;
        Ok::<_, ClientError>((Instant::now(), parse(&text)))
    };
    let mut before = scrape().await?;
    let mut shown = 0;
    loop {
        tokio::time::sleep(interval).await;
        let now = scrape().await?;
        let secs = now.0.duration_since(before.0).as_secs_f64().max(1e-3);
        if rounds != 1 {
            print!("\x1b[2J\x1b[H");
        }
        println!(
            "{:<24} {:>8} {:>10} {:>9} {:>9} {:>8} {:>8}",
            "MODEL", "REQ/S", "TOKENS/S", "P50 MS", "P99 MS", "RUNNING", "WAITING"
        );
        for (model, s) in &now.1 {
            let b = before.1.get(model).cloned().unwrap_or_default();
            let ms = |q: f64| {
                quantile(&b.buckets, &s.buckets, q).map_or("-".to_string(), |v| {
                    if v.is_infinite() {
                        ">60000".into()
                    } else {
                        format!("{:.0}", v * 1000.0)
                    }
                })
            };
            println!(
                "{:<24} {:>8.1} {:>10.1} {:>9} {:>9} {:>8} {:>8}",
                model,
                (s.requests - b.requests).max(0.0) / secs,
                (s.tokens - b.tokens).max(0.0) / secs,
                ms(0.5),
                ms(0.99),
                s.running,
                s.waiting
            );
        }
        shown += 1;
        if rounds > 0 && shown >= rounds {
            return Ok(());
        }
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_reads_rates_and_quantiles_from_two_scrapes() {
        let a = "vllm:e2e_request_latency_seconds_count{model_name=\"m\"} 10\n\
                 vllm:e2e_request_latency_seconds_bucket{le=\"0.5\",model_name=\"m\"} 10\n\
                 vllm:e2e_request_latency_seconds_bucket{le=\"1.0\",model_name=\"m\"} 10\n\
                 vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 10\n";
        let b = "vllm:e2e_request_latency_seconds_count{model_name=\"m\"} 30\n\
                 vllm:e2e_request_latency_seconds_bucket{le=\"0.5\",model_name=\"m\"} 28\n\
                 vllm:e2e_request_latency_seconds_bucket{le=\"1.0\",model_name=\"m\"} 30\n\
                 vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 30\n\
                 vllm:num_requests_running{model_name=\"m\",replica=\"m@v1-0\"} 3\n";
        let (a, b) = (parse(a), parse(b));
        assert_eq!(b["m"].requests - a["m"].requests, 20.0);
        assert_eq!(b["m"].running, 3.0);
        // of the 20 new requests, 18 took ≤ 0.5 s and 2 up to 1 s
        assert_eq!(quantile(&a["m"].buckets, &b["m"].buckets, 0.5), Some(0.5));
        assert_eq!(quantile(&a["m"].buckets, &b["m"].buckets, 0.99), Some(1.0));
        assert_eq!(quantile(&b["m"].buckets, &b["m"].buckets, 0.5), None);
    }
}
