//! Support for Talon's multi-process tests (`it/`) and the benchmark driver
//! (`talon-bench`): starting real Talon and etcd clusters on loopback.

pub mod clocks;
pub mod clusters;
pub mod hf;
pub mod linearizability;
pub mod llama;
pub mod netlab;
pub mod writers;

/// etcd's gRPC messages, the subset the benchmarks use.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// A `file://` artifact for model `name` that exists on this machine (a
/// small placeholder file under the temp directory, made on first use):
/// agents resolve artifacts before an engine starts.
pub fn artifact_file(name: &str) -> String {
    let dir = std::env::temp_dir().join("talon-test-models");
    let path = dir.join(format!("{name}.gguf"));
    if !path.exists() {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(&path, b"GGUF placeholder for tests");
    }
    format!("file://{}", path.display())
}

/// A model spec for tests and benchmarks: one version `v1` of `name` with
/// `replicas` replicas of `memory_mib` each.
pub fn model_spec(
    name: &str,
    engine: &str,
    memory_mib: u64,
    replicas: u32,
) -> talon_client::ModelSpec {
    talon_client::ModelSpec {
        name: name.into(),
        version: "v1".into(),
        engine: engine.into(),
        artifact_uri: artifact_file(name),
        memory_mib,
        latency_slo_ms: 1_000,
        min_replicas: replicas,
        max_replicas: replicas.max(1),
        priority: "normal".into(),
        labels: Default::default(),
    }
}

/// POSTs a JSON `body` to `http://addr/path` over HTTP/1.0 (the connection
/// closes after the answer) with `key` as its Bearer credential (none when
/// empty): the status code and the body, or `None` when the connection
/// failed or nothing came back within 60 s.
pub fn http_post(addr: &str, path: &str, body: &str, key: &str) -> Option<(u16, String)> {
    http_post_with(addr, path, body, key, &[]).map(|(status, _, body)| (status, body))
}

/// [`http_post`] with `headers` added: the status, the head (status line
/// and headers, lowercased) and the body.
pub fn http_post_with(
    addr: &str,
    path: &str,
    body: &str,
    key: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .ok()?;
    let mut extra = if key.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {key}\r\n")
    };
    for (name, value) in headers {
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: x\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_ascii_lowercase(), body.to_string()))
}

/// An HTTP client that sends `key` as its Bearer credential on every
/// request.
pub fn http_client(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(v) = format!("Bearer {key}").parse() {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// How one streamed request (`"stream": true`, server-sent events) went.
#[derive(Debug, Default)]
pub struct Streamed {
    pub status: u16,
    /// The replica that served it (`x-talon-replica`).
    pub replica: Option<String>,
    /// The OpenAI chunk objects, in order.
    pub chunks: Vec<serde_json::Value>,
    /// The text of the chunks, joined.
    pub text: String,
    /// Whether `[DONE]` arrived.
    pub done: bool,
    /// The message of an `error` event, or of an error response.
    pub error: Option<String>,
    /// When the first chunk and the end arrived, from the request.
    pub first_at: Option<std::time::Duration>,
    pub end_at: std::time::Duration,
}

/// POSTs a streaming request to `http://addr/path` and reads its events to
/// the end (or until the connection breaks). `started` hears the serving
/// replica's id when the first chunk arrives.
pub async fn sse_post(
    client: &reqwest::Client,
    addr: &str,
    path: &str,
    body: &serde_json::Value,
    started: Option<&tokio::sync::mpsc::UnboundedSender<String>>,
) -> Streamed {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let start = std::time::Instant::now();
    let mut out = Streamed::default();
    let response = match client
        .post(format!("http://{addr}{path}"))
        .json(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("request failed: {e}"));
            out.end_at = start.elapsed();
            return out;
        }
    };
    out.status = response.status().as_u16();
    out.replica = response
        .headers()
        .get("x-talon-replica")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    if !response.status().is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        out.error = body["error"]["message"].as_str().map(String::from);
        out.end_at = start.elapsed();
        return out;
    }
    let mut events = response.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let Ok(event) = event else {
            out.error = Some("the stream broke".into());
            break;
        };
        if event.data == "[DONE]" {
            out.done = true;
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
        if let Some(m) = v["error"]["message"].as_str() {
            out.error = Some(m.to_string());
            break;
        }
        if out.first_at.is_none() {
            out.first_at = Some(start.elapsed());
            if let Some(tx) = started {
                let _ = tx.send(out.replica.clone().unwrap_or_default());
            }
        }
        let piece = v["choices"][0]["delta"]["content"]
            .as_str()
            .or_else(|| v["choices"][0]["text"].as_str())
            .unwrap_or_default();
        out.text.push_str(piece);
        out.chunks.push(v);
    }
    out.end_at = start.elapsed();
    out
}
