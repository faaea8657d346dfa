//! OpenTelemetry end to end: a coordinator and an agent export spans over
//! OTLP/gRPC to a real collector endpoint served in this test (the
//! opentelemetry-proto collector service), and one request's trace runs
//! from the caller's `traceparent` through the gateway (request,
//! admission, routing, the try), the agent (request, batching or the
//! engine) to the engine process, which receives the agent's
//! `traceparent` (talon-fake-engine echoes it in its answer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::{json, Value};

use crate::harness::{bin_dir, free_port, wait_for, Cluster, Proc};

/// A span as the collector received it.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("collector lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Got {
                    service: service.clone(),
                    name: s.name.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    attributes: s
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(&a.value)))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const TOKEN: &str = "tracing-test-token-0123";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_caller_through_gateway_and_agent_to_the_engine() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let cluster = Cluster::form(
        1,
        &[
            "--join-token",
            TOKEN,
            "--telemetry-interval-ms",
            "200",
            "--otlp-endpoint",
            &endpoint,
        ],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    let key = cluster.admin_key();
    let logs = tempfile::tempdir().expect("temp dir");
    let listen = format!("127.0.0.1:{}", free_port());
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // the built-in `test` engine profile: talon-fake-engine on PATH
    let _agent = Proc::spawn_with_env(
        "talon-agent",
        &[
            "--node-id",
            "traced",
            "--coordinators",
            &grpc,
            "--sim-gpus",
            "l4:1",
            "--http-listen",
            &listen,
            "--engine",
            "test",
            "--engine-log-dir",
            logs.path().to_str().expect("utf-8"),
            "--otlp-endpoint",
            &endpoint,
        ],
        &[("TALON_JOIN_TOKEN", TOKEN), ("PATH", &path)],
    );
    let client = cluster.client();
    client
        .create_model(talon_tests::model_spec("echo", "test", 1_000, 1))
        .await
        .expect("model");
    wait_for("echo ready", Duration::from_secs(60), || async {
        let list = client.list_replicas("echo").await.ok()?;
        list.replicas
            .first()
            .filter(|r| r.state == "ready")
            .map(|_| ())
    })
    .await;

    // the caller's trace
    let answer: Value = talon_tests::http_client(&key)
        .post(format!("http://{http}/v1/chat/completions"))
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "trace me"}]}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("JSON");
    // the engine got a traceparent of the same trace, from a span of Talon's
    let sent = answer["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert!(
        parts.len() == 4 && parts[1] == TRACE && parts[2] != CALLER_SPAN,
        "the engine's traceparent: {answer}"
    );

    let names = [
        "gateway.request",
        "gateway.admission",
        "gateway.route",
        "gateway.attempt",
        "agent.request",
    ];
    let spans = wait_for(
        "the trace's spans at the collector",
        Duration::from_secs(40),
        || async {
            let spans: Vec<Got> = collector
                .spans
                .lock()
                .expect("collector lock")
                .iter()
                .filter(|s| s.trace_id == TRACE)
                .cloned()
                .collect();
            names
                .iter()
                .all(|n| spans.iter().any(|s| s.name == *n))
                .then_some(spans)
        },
    )
    .await;
    let one = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
    };
    let request = one("gateway.request");
    assert_eq!(request.service, "talon-coordinator");
    assert_eq!(request.parent, CALLER_SPAN, "continues the caller's span");
    assert_eq!(
        request.attributes.get("model").map(String::as_str),
        Some("echo")
    );
    assert_eq!(
        request.attributes.get("status").map(String::as_str),
        Some("200")
    );
    assert_eq!(one("gateway.admission").parent, request.span_id);
    let route = one("gateway.route");
    assert_eq!(route.parent, request.span_id);
    let attempt = one("gateway.attempt");
    assert_eq!(attempt.parent, route.span_id);
    assert_eq!(
        attempt.attributes.get("outcome").map(String::as_str),
        Some("ok")
    );
    assert_eq!(
        attempt.attributes.get("node").map(String::as_str),
        Some("traced")
    );
    let served = one("agent.request");
    assert_eq!(served.service, "talon-agent");
    assert_eq!(
        served.parent, attempt.span_id,
        "the agent continues the try"
    );
    assert_eq!(
        parts[2], served.span_id,
        "the engine continues the agent's span"
    );
    // the engine batches itself: the agent's span for handing it over
    assert!(
        spans
            .iter()
            .any(|s| (s.name == "agent.engine" || s.name == "agent.batch")
                && s.parent == served.span_id),
        "{spans:?}"
    );
    server.abort();
}
