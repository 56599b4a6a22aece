//! Telemetry: logging, one OpenTelemetry trace per job, and spans for the server's own
//! operations, exported over OTLP (gRPC or HTTP/protobuf, TLS, gzip, headers) with the
//! opentelemetry-rust crates.
//!
//! Two pipelines share one configuration ([`settings`]) and one transport ([`transport`]):
//!
//! - Job traces take a fast path. The engine calls [`JobTracer`] (its
//!   [`crate::engine::JobObserver`]) with its lock held, so each call only appends a small event
//!   to a bounded outbox ([`tracer`]). The export thread ([`export`]) assembles each job's
//!   record, lets the tail sampler ([`sampling`]) decide when the job ends, builds
//!   opentelemetry-proto `Span` messages ([`spans`]) and sends them through
//!   opentelemetry-proto's tonic client or as an OTLP/HTTP body. The outbox is bounded
//!   (`tracing.max_queue` events): past it new jobs are not traced
//!   (`gearhouse_trace_jobs_untraced_total`), and a failed export is counted in
//!   `gearhouse_trace_spans_dropped_total`, so a slow or dead collector costs traces, never
//!   throughput.
//! - Operation spans (`gearhouse.*`: recovery, takeover, repair, admin commands, ...) go through
//!   `tracing-opentelemetry`, the SDK's tracer provider and `opentelemetry-otlp`'s exporter
//!   ([`logging`]). They are rare, so the SDK's per-span cost does not matter there.
//!
//! Why the job path does not use the SDK as well: README, "Which tracing crates, and why".

mod export;
mod logging;
mod sampling;
mod settings;
mod spans;
mod traced_mirror;
mod tracer;
mod transport;

use std::sync::Arc;

use prometheus::{IntCounter, IntGauge};

use crate::metrics::Metrics;

pub use logging::{init_logging, init_logging_and_tracing, OperationTracing, OPERATION_PREFIX};
pub use settings::{Protocol, Sampling, TraceSettings};
pub use traced_mirror::{traced_mirror, TracedMirror};
pub use tracer::JobTracer;

/// Why tracing cannot start as configured. The server refuses to start with it: a setting that
/// cannot be honoured is reported, never silently ignored.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{var}={value:?} is not supported: {hint}")]
    Unsupported {
        var: &'static str,
        value: String,
        hint: &'static str,
    },
    #[error("cannot use {var} {path}: {why}")]
    File {
        var: &'static str,
        path: String,
        why: String,
    },
    #[error("cannot build the OTLP exporter for {endpoint}: {why}")]
    Exporter { endpoint: String, why: String },
    #[error("cannot start the span export thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Starts job tracing as configured (the `OTEL_*` process environment and `[tracing]`):
/// `Ok(None)` when it is off, an error when a setting cannot be honoured.
pub fn start(
    cfg: &crate::config::Config,
    metrics: &Metrics,
) -> Result<Option<Arc<JobTracer>>, TelemetryError> {
    let Some(settings) = TraceSettings::resolve(&cfg.tracing, |k| std::env::var(k).ok())? else {
        return Ok(None);
    };
    JobTracer::start(settings, &cfg.engine_config().node_id, metrics).map(Some)
}

/// The trace metrics, resolved once.
#[derive(Clone)]
pub(crate) struct TraceMetrics {
    exported: IntCounter,
    dropped_queue_full: IntCounter,
    dropped_export_failed: IntCounter,
    dropped_shutdown: IntCounter,
    untraced_queue_full: IntCounter,
    untraced_in_flight: IntCounter,
    in_flight: IntGauge,
    export_seconds: prometheus::Histogram,
}

impl TraceMetrics {
    fn new(m: &Metrics) -> Self {
        let dropped = |r: &str| m.trace_spans_dropped.with_label_values(&[r]);
        TraceMetrics {
            exported: m.trace_spans_exported.clone(),
            dropped_queue_full: dropped("queue_full"),
            dropped_export_failed: dropped("export_failed"),
            dropped_shutdown: dropped("shutdown"),
            untraced_queue_full: m.trace_jobs_untraced.with_label_values(&["queue_full"]),
            untraced_in_flight: m
                .trace_jobs_untraced
                .with_label_values(&["in_flight_limit"]),
            in_flight: m.trace_jobs_in_flight.clone(),
            export_seconds: m.trace_export_seconds.clone(),
        }
    }
}
