//! Logs and traces for Talon's binaries.
//!
//! [`init`] installs one `tracing` subscriber: logs to stderr (text or JSON,
//! filtered by `RUST_LOG`) and, when an OTLP endpoint is configured (in the
//! binary's configuration, or the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! / `OTEL_EXPORTER_OTLP_ENDPOINT`), every span of Talon's own crates
//! exported over OTLP/gRPC in batches (`OTEL_BSP_*` tune them). Spans from
//! dependencies (hyper, h2, tonic) are logged by the filter's rules but
//! never exported.
//!
//! A request carries its trace between processes as a W3C `traceparent`
//! header: [`continue_from`] makes a span the child of the caller's,
//! [`headers_for`] gives the headers for a call made inside a span. Without
//! an exporter spans have no trace ids and nothing is sent.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// Its companion (vendor state), passed on when present.
pub const TRACESTATE: &str = "tracestate";

/// The `[tracing]` section of a coordinator's or agent's configuration.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// OTLP/gRPC collector to export spans to (`http://host:4317`); unset:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// and no export when those are unset too.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces kept, 0 to 1 (default 1).
    pub sample_ratio: f64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

// a ratio is never NaN once validated, so equality is total
impl Eq for TraceConfig {}

impl TraceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.otlp_endpoint {
            check_endpoint(e).map_err(|m| format!("tracing.otlp_endpoint: {m}"))?;
        }
        check_ratio(self.sample_ratio).map_err(|m| format!("tracing.sample_ratio: {m}"))
    }

    /// The settings for `service`'s [`init`].
    pub fn settings(&self, service: &str, json_logs: bool, default_filter: &str) -> Settings {
        Settings {
            service: service.into(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            sample_ratio: self.sample_ratio,
            json_logs,
            default_filter: default_filter.into(),
        }
    }
}

/// What [`init`] sets up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `service.name` of the exported spans.
    pub service: String,
    /// An OTLP/gRPC collector (`http://host:4317`); `None`: the standard
    /// environment variables, and no export when they are unset.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces kept (0 to 1); a request that arrives with a
    /// sampled `traceparent` is always kept.
    pub sample_ratio: f64,
    /// Logs as JSON lines instead of text.
    pub json_logs: bool,
    /// The log filter when `RUST_LOG` is unset.
    pub default_filter: String,
}

impl Settings {
    pub fn new(service: &str) -> Settings {
        Settings {
            service: service.into(),
            otlp_endpoint: None,
            sample_ratio: 1.0,
            json_logs: false,
            default_filter: "info".into(),
        }
    }

    /// The endpoint spans go to, if any.
    pub fn endpoint(&self) -> Option<String> {
        self.otlp_endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok())
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty())
    }
}

/// Checks an OTLP endpoint: an `http://` or `https://` URL with a host.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint.parse().map_err(|e| {
        format!(
            "OTLP endpoint {endpoint:?} is not a URL ({e}); use e.g. http://otel-collector:4317"
        )
    })?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(format!(
            "OTLP endpoint {endpoint:?} needs http:// or https:// and a host, e.g. http://otel-collector:4317"
        )),
    }
}

/// Checks a sampling ratio.
pub fn check_ratio(ratio: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&ratio) {
        Ok(())
    } else {
        Err(format!(
            "the trace sample ratio is {ratio}; give a number from 0 (none) to 1 (every request)"
        ))
    }
}

/// Keeps the exporter; [`Guard::shutdown`] sends what is still buffered.
pub struct Guard {
    provider: Option<SdkTracerProvider>,
    endpoint: Option<String>,
}

impl Guard {
    /// Where spans go; `None` when they are not exported.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Flushes and stops the exporter (waits at most 10 s: the
    /// shutdown blocks until the last batch is sent, on a thread of its
    /// own so that the runtime keeps driving the connection).
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            let flush = tokio::task::spawn_blocking(move || provider.shutdown());
            let _ = tokio::time::timeout(Duration::from_secs(10), flush).await;
        }
    }
}

/// Installs the subscriber (once per process). Call it inside the Tokio
/// runtime: the OTLP client runs on it.
pub fn init(settings: &Settings) -> Result<Guard, String> {
    check_ratio(settings.sample_ratio)?;
    let endpoint = settings.endpoint();
    let provider = match &endpoint {
        None => None,
        Some(e) => {
            check_endpoint(e)?;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(e.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(|err| format!("OTLP exporter for {e}: {err}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(settings.service.clone())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                        settings.sample_ratio,
                    ))))
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.default_filter));
    // Logs are events only: a span is made only when it is exported, so
    // without an exporter the per-request spans cost a filter check each.
    let filter = filter.and(tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_event()
    }));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if settings.json_logs {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("talon"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("talon") && *meta.level() <= tracing::Level::INFO
            }))
    });
    // Not `.with(Option<layer>)`: a `None` layer answers "always" for
    // every callsite, which makes the registry create every span (openraft
    // and h2 debug spans included) and check every event on every call.
    let registry = tracing_subscriber::registry().with(logs);
    match spans {
        Some(spans) => registry.with(spans).try_init(),
        None => registry.try_init(),
    }
    .map_err(|e| format!("logging was already set up: {e}"))?;
    Ok(Guard { provider, endpoint })
}

struct Out<'a>(&'a mut http::HeaderMap);

impl Injector for Out<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct In<'a>(&'a http::HeaderMap);

impl Extractor for In<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Pairs<'a>(&'a [(String, String)]);

impl Extractor for Pairs<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

fn adopt(span: &tracing::Span, parent: opentelemetry::Context) {
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Makes `span` the child of the trace in `headers`' `traceparent`, when
/// there is a well-formed one (anything else is ignored).
pub fn continue_from(span: &tracing::Span, headers: &http::HeaderMap) {
    adopt(span, TraceContextPropagator::new().extract(&In(headers)));
}

/// [`continue_from`] for headers kept as (lowercase name, value) pairs.
pub fn continue_from_pairs(span: &tracing::Span, headers: &[(String, String)]) {
    adopt(span, TraceContextPropagator::new().extract(&Pairs(headers)));
}

/// The `traceparent` (and `tracestate`) that make the receiver's spans
/// children of `span`; empty when `span` is not traced.
pub fn headers_for(span: &tracing::Span) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut Out(&mut headers));
    headers
}

/// Just the `traceparent` value of [`headers_for`].
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    headers_for(span)
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_ratios_are_checked() {
        assert!(check_endpoint("http://collector:4317").is_ok());
        assert!(check_endpoint("https://10.0.0.1:4317").is_ok());
        let e = check_endpoint("collector:4317").unwrap_err();
        assert!(e.contains("http://"), "{e}");
        assert!(check_endpoint("ftp://x").is_err());
        assert!(check_ratio(0.25).is_ok());
        assert!(check_ratio(1.5).unwrap_err().contains("from 0"));
        assert!(check_ratio(f64::NAN).is_err());
    }

    #[test]
    fn a_span_without_an_exporter_sends_no_traceparent() {
        let span = tracing::info_span!("untraced");
        let mut headers = http::HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        continue_from(&span, &headers);
        assert!(traceparent(&span).is_none());
    }
}
