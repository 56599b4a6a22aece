//! Logging, and spans for the server's own operations.
//!
//! One subscriber: the fmt layer (text or JSON on stderr, filtered by `log.level`) and, when an
//! OTLP endpoint is configured, a `tracing-opentelemetry` layer feeding an SDK tracer provider
//! whose batch processor exports through `opentelemetry-otlp` to the same collector, with the
//! same protocol, TLS, headers, compression and resource as the job traces.
//!
//! The OpenTelemetry layer has a filter of its own: only spans named `gearhouse.*` (recovery,
//! takeover, repair, node up/down, shutdown, admin commands, start-up) and what happens inside
//! them reach it, so spans on the job path never do, and callsites above `info` are never even
//! asked about (the filter's level hint keeps `debug!` on the hot path a static no-op).
//!
//! Log lines written inside such a span carry its `trace_id` and `span_id` (top-level keys in
//! JSON, `trace_id=… span_id=…` at the end of a text line), so a log search leads to the trace.

use std::sync::OnceLock;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{dynamic_filter_fn, EnvFilter};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{Config, LogFormat, LogSection};

use super::settings::{Protocol, TraceSettings};
use super::{transport, TelemetryError};

/// Prefix of the spans exported by the operations pipeline.
pub const OPERATION_PREFIX: &str = "gearhouse.";

/// The installed subscriber, for looking up OpenTelemetry contexts while formatting (the
/// current dispatcher is not reachable from inside an event's dispatch).
static DISPATCH: OnceLock<tracing::Dispatch> = OnceLock::new();

/// Sets up `tracing` output on stderr only (no span export): for the one-shot commands.
pub fn init_logging(cfg: &LogSection) {
    install(cfg, None);
}

/// Keeps the operation-span pipeline alive; dropping it flushes what is buffered (bounded by
/// the export timeout) and stops it.
#[must_use = "dropping it stops exporting operation spans"]
pub struct OperationTracing {
    provider: Option<SdkTracerProvider>,
}

impl OperationTracing {
    /// Whether operation spans are exported.
    pub fn is_on(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for OperationTracing {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("operation spans: export at shutdown failed: {e}");
            }
        }
    }
}

/// Sets up logging and, when tracing is configured (`OTEL_*`, `[tracing]`), the export of the
/// server's own `gearhouse.*` spans. Errors name the setting that cannot be used; the server
/// must not start with them.
pub fn init_logging_and_tracing(cfg: &Config) -> Result<OperationTracing, TelemetryError> {
    let settings = TraceSettings::resolve(&cfg.tracing, |k| std::env::var(k).ok())?;
    let provider = match &settings {
        Some(s) => Some(operation_provider(s, &cfg.engine_config().node_id)?),
        None => None,
    };
    install(&cfg.log, provider.as_ref().map(|p| p.tracer("gearhouse")));
    Ok(OperationTracing { provider })
}

/// The SDK tracer provider for operation spans: AlwaysOn (they are few), batch processor on
/// its own thread, opentelemetry-otlp's exporter on the transport's channel or client.
fn operation_provider(
    s: &TraceSettings,
    node_id: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let compression = s.gzip.then_some(opentelemetry_otlp::Compression::Gzip);
    let build_error = |e: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter {
        endpoint: s.endpoint.clone(),
        why: e.to_string(),
    };
    let exporter = match s.protocol {
        Protocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_channel(transport::grpc_channel(s)?)
                .with_metadata(transport::grpc_metadata(s)?)
                .with_timeout(s.timeout);
            if let Some(c) = compression {
                b = b.with_compression(c);
            }
            b.build().map_err(build_error)?
        }
        Protocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(transport::OpsHttpClient::new(s)?)
                .with_endpoint(s.endpoint.clone())
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_headers(s.headers.iter().cloned().collect())
                .with_timeout(s.timeout);
            if let Some(c) = compression {
                b = b.with_compression(c);
            }
            b.build().map_err(build_error)?
        }
    };
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(
            s.resource(node_id)
                .into_iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k, v)),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_batch_exporter(exporter)
        .build())
}

fn install(cfg: &LogSection, tracer: Option<opentelemetry_sdk::trace::SdkTracer>) {
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // JSON: fields at the top level, so a job's `trace_id` is a top-level key for log shippers.
    let fmt = if cfg.format == LogFormat::Json {
        fmt.json()
            .flatten_event(true)
            .map_event_format(|f| WithTraceIds {
                inner: f,
                json: true,
            })
            .with_filter(filter)
            .boxed()
    } else {
        fmt.map_event_format(|f| WithTraceIds {
            inner: f,
            json: false,
        })
        .with_filter(filter)
        .boxed()
    };
    let otel = tracer.map(|t| {
        let ops = dynamic_filter_fn(|meta, cx| {
            meta.name().starts_with(OPERATION_PREFIX) || cx.lookup_current().is_some()
        })
        .with_callsite_filter(|meta| {
            if *meta.level() > tracing::Level::INFO {
                tracing::subscriber::Interest::never()
            } else {
                tracing::subscriber::Interest::sometimes()
            }
        })
        .with_max_level_hint(LevelFilter::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(t)
            .with_filter(ops)
    });
    let dispatch: tracing::Dispatch = tracing_subscriber::registry().with(fmt).with(otel).into();
    let _ = DISPATCH.set(dispatch.clone());
    // A second call (tests) keeps the first subscriber.
    let _ = dispatch.try_init();
}

/// Adds the OpenTelemetry `trace_id` and `span_id` of the innermost exported span around an
/// event to its log line.
struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let ids = match (ctx.event_scope(), DISPATCH.get()) {
            (Some(scope), Some(d)) => scope
                .filter_map(|span| tracing_opentelemetry::get_otel_context(&span.id(), d))
                .map(|cx| cx.span().span_context().clone())
                .find(|sc| sc.is_valid()),
            _ => None,
        };
        let Some(sc) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(
            ctx,
            // Buffered without colour: only lines inside operation spans take this way.
            Writer::new(&mut line),
            event,
        )?;
        if self.json {
            match line.strip_prefix('{') {
                Some(rest) => write!(
                    writer,
                    "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                    sc.trace_id(),
                    sc.span_id()
                ),
                None => writer.write_str(&line),
            }
        } else {
            writeln!(
                writer,
                "{} trace_id={} span_id={}",
                line.trim_end_matches('\n'),
                sc.trace_id(),
                sc.span_id()
            )
        }
    }
}
