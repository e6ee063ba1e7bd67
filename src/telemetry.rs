//! Logs and traces: the process's `tracing` subscriber (text or JSON lines
//! on stderr) and, when an OTLP endpoint is given, OpenTelemetry span export
//! over OTLP/HTTP.
//!
//! Owns the subscriber's set-up and the W3C trace context at meshbox's
//! edges: continuing a caller's `traceparent` ([`traced`]) and
//! passing the current span on to a server in a request's `_meta`
//! ([`upstream_meta`]). Layers record spans with `tracing` macros only and
//! never name OpenTelemetry.
//!
//! Cost when no endpoint is set: the per-call spans are at DEBUG level, so
//! with the default log level their call sites are disabled once and for all,
//! and [`upstream_meta`] is one relaxed atomic load and a task-local lookup
//! (a caller's `traceparent` is passed on as it came, [`traced`]).

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use serde_json::{Map, Value};
use tracing::{Level, Metadata, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Whether spans are exported (an OTLP endpoint was set).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// `_meta` keys of the W3C trace context (MCP 2026-07-28 reserves them).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the spans it happened in
    /// (`mesh` and `service` for everything about a service).
    Json,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// `MESHBOX_LOG` wins over it.
    pub default_level: &'static str,
    pub ansi: bool,
    /// OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (`/v1/traces` is
    /// added when the URL has no path).
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint `{endpoint}` must be an http:// URL")]
    Scheme { endpoint: String },
    #[error("cannot export spans to `{endpoint}`")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Keeps the span exporter; [`shutdown`](Self::shutdown) flushes it.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still queued (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.shutdown();
        }
    }
}

/// The full URL spans are posted to.
fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let rest = endpoint
        .strip_prefix("http://")
        .filter(|r| !r.is_empty())
        .ok_or_else(|| TelemetryError::Scheme {
            endpoint: endpoint.to_owned(),
        })?;
    Ok(match rest.find('/') {
        Some(i) if rest[i..].len() > 1 => endpoint.to_owned(),
        _ => format!("http://{}/v1/traces", rest.trim_end_matches('/')),
    })
}

/// What the span exporter takes: meshbox's spans (per-call ones are at
/// DEBUG), and its events at INFO and above (they become span events).
fn exported(m: &Metadata<'_>) -> bool {
    m.target().starts_with("meshbox")
        && if m.is_span() {
            *m.level() <= Level::DEBUG
        } else {
            *m.level() <= Level::INFO
        }
}

/// Installs the process's subscriber. Call it outside any async runtime
/// (the exporter's HTTP client runs on a thread of its own).
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = || {
        EnvFilter::try_from_env("MESHBOX_LOG")
            .unwrap_or_else(|_| EnvFilter::new(config.default_level))
    };
    let fmt = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(config.ansi)
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    let (otel, provider) = match &config.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let url = traces_url(endpoint)?;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(std::time::Duration::from_secs(5))
                .build()
                .map_err(|source| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name("meshbox").build())
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("meshbox"))
                .with_filter(filter_fn(exported));
            EXPORTING.store(true, Ordering::Relaxed);
            (Some(layer), Some(provider))
        }
    };
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}

/// Whether spans are exported by this process.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

struct Getter<'a, F>(F, std::marker::PhantomData<&'a str>);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Getter<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Makes `span` continue the caller's trace, given how to read the
/// caller's headers (or `_meta`) by name. A missing or malformed
/// `traceparent` leaves `span` a root.
fn continue_trace<'a>(span: &Span, get: impl Fn(&str) -> Option<&'a str>) {
    if !exporting() || span.is_disabled() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Getter(get, std::marker::PhantomData));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

struct MetaInjector<'a>(&'a mut Map<String, Value>);

impl Injector for MetaInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), Value::String(value));
    }
}

tokio::task_local! {
    /// The caller's trace context as `_meta` entries, while spans are not
    /// exported (when they are, the call's span carries it).
    static CALLER_TRACE: Map<String, Value>;
}

/// A caller's W3C trace context read by name from its headers, checked by
/// the propagator and written back as `_meta` entries; `None` when there is
/// no valid `traceparent`.
fn caller_meta<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Map<String, Value>> {
    let propagator = TraceContextPropagator::new();
    let cx = propagator.extract(&Getter(get, std::marker::PhantomData));
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut meta = Map::new();
    propagator.inject_context(&cx, &mut MetaInjector(&mut meta));
    (!meta.is_empty()).then_some(meta)
}

/// Runs `call` in `span`, continuing the caller's trace (its headers read
/// by name): when spans are exported, the caller's `traceparent` becomes
/// the span's parent ([`continue_trace`]); when they are not, it still
/// reaches the server as it came ([`upstream_meta`] gives it while `call`
/// runs).
pub async fn traced<'a, F: std::future::Future>(
    span: Span,
    get: impl Fn(&str) -> Option<&'a str>,
    call: F,
) -> F::Output {
    continue_trace(&span, &get);
    let call = tracing::Instrument::instrument(call, span);
    if exporting() || get(TRACEPARENT).is_none() {
        return call.await;
    }
    match caller_meta(get) {
        Some(meta) => CALLER_TRACE.scope(meta, call).await,
        None => call.await,
    }
}

/// `_meta` entries that carry the trace to a server (`traceparent`,
/// `tracestate`): the current span's, so the server's own spans join the
/// trace, when spans are exported; else the caller's as it came (see
/// [`traced`]), if it sent one.
pub fn upstream_meta() -> Option<Map<String, Value>> {
    if !exporting() {
        return CALLER_TRACE.try_with(Map::clone).ok();
    }
    let cx = Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut meta = Map::new();
    TraceContextPropagator::new().inject_context(&cx, &mut MetaInjector(&mut meta));
    (!meta.is_empty()).then_some(meta)
}

/// Records a finished call's outcome on the current span (a call span
/// declares the field), when spans are exported.
pub fn record_outcome(outcome: &'static str) {
    if exporting() {
        Span::current().record("outcome", outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_trace_context_is_checked_and_passed_as_it_came() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = |tp: &'static str, ts: &'static str| {
            move |name: &str| match name {
                TRACEPARENT => Some(tp),
                TRACESTATE => Some(ts),
                _ => None,
            }
        };
        let meta = caller_meta(headers(tp, "a=1,b=2")).unwrap();
        assert_eq!(meta[TRACEPARENT], tp);
        assert_eq!(meta[TRACESTATE], "a=1,b=2");
        for bad in [
            "",
            "00-zz-yy-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert_eq!(caller_meta(headers(bad, "a=1")), None, "{bad:?}");
        }
    }

    #[test]
    fn endpoint_urls() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/custom/path").unwrap(),
            "http://collector:4318/custom/path"
        );
        assert!(matches!(
            traces_url("https://x:4318"),
            Err(TelemetryError::Scheme { .. })
        ));
        assert!(traces_url("http://").is_err());
    }

    #[test]
    fn nothing_is_propagated_without_an_exporter() {
        // No subscriber exports in unit tests.
        assert_eq!(upstream_meta(), None);
    }
}
