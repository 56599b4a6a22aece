//! Telemetry: logging setup, and one OpenTelemetry trace per job exported over OTLP/HTTP.
//!
//! A trace per job: a root span `job <function>` from submit to the final outcome, a child
//! `queue <function>` span for every wait in a queue, a child `attempt <function>` span for every
//! time a worker held the job (a requeued job shows two attempts and two waits), and a
//! `persist <function>` span for the durable write a background job waited for, when a memcached
//! mirror is configured.
//!
//! How it stays off the job path: the engine calls [`JobTracer`] (its [`JobObserver`]) with the
//! engine lock held, so each call only appends a small event (what happened, to which job,
//! when) to an outbox; nothing is looked up or allocated per job on that path (short strings
//! are kept inline), and the trace id is a keyed hash of the job's sequence number, so it needs
//! no storage. An export thread, woken once a batch of events is ready, assembles each job's
//! record, writes its spans with their recorded start and end times straight into OTLP protobuf
//! ([`otlp`]) when the job ends, and POSTs them in batches. The outbox is bounded
//! (`tracing.max_queue` events): past it new jobs are not traced and are counted in
//! `gearhouse_trace_jobs_untraced_total`, and a failed export is counted in
//! `gearhouse_trace_spans_dropped_total`, so a slow or dead collector costs traces, never
//! throughput.
//!
//! Spans are made after the fact, rather than opened and closed through the OpenTelemetry SDK
//! as the job moves: log lines about the job carry its trace id while it still runs (the SDK
//! tracer draws a fresh id for every root span), and the SDK's span objects and exporter, fed
//! from the engine's lock, cost about half of the server's CPU per job on the benchmark
//! (measured: 0.73x throughput with traces at 100%), against a 10% budget.
//!
//! Settings come from the standard `OTEL_*` variables, then the `[tracing]` config section
//! (see [`TraceSettings::resolve`]). Tracing is off when no endpoint is set.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;
use prometheus::{IntCounter, IntGauge};

use crate::config::{LogSection, TracingSection};
use crate::engine::{
    JobEvent, JobObserver, JobOutcome, JobRecord, Mirror, MirrorRefused, PeerInfo,
};
use crate::metrics::Metrics;
use crate::protocol::Priority;

mod otlp;

/// Why tracing could not start (the server then runs without it).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{var}={value:?} is not supported: gearhouse exports OTLP over HTTP (protobuf); set it to http/protobuf and point the endpoint at the collector's OTLP/HTTP port (usually 4318)")]
    UnsupportedProtocol { var: &'static str, value: String },
    #[error("cannot build the OTLP exporter for {endpoint}: {why}")]
    Exporter { endpoint: String, why: String },
    #[error("cannot start the span export thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Sets up `tracing` output on stderr: plain text, or one JSON object per line (fields at the
/// top level, so a job's `trace_id` is a top-level key for log shippers).
pub fn init_logging(cfg: &LogSection) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: log files and journald get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cfg.format == crate::config::LogFormat::Json {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

/// Starts job tracing as configured (the `OTEL_*` process environment and `[tracing]`), or
/// returns `None` when it is off or cannot start (logged: the server runs without traces).
pub fn start(cfg: &crate::config::Config, metrics: &Metrics) -> Option<Arc<JobTracer>> {
    let settings = match TraceSettings::resolve(&cfg.tracing, |k| std::env::var(k).ok()) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            tracing::error!("job tracing is off: {e}");
            return None;
        }
    };
    match JobTracer::start(settings, &cfg.engine_config().node_id, metrics) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!("job tracing is off: {e}");
            None
        }
    }
}

/// Trace export settings after the `OTEL_*` environment and the config file are combined.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// Full URL of the OTLP/HTTP traces endpoint (`.../v1/traces`).
    pub endpoint: String,
    pub service_name: String,
    /// Share of jobs traced, 0 to 1.
    pub sample_ratio: f64,
    /// Spans waiting for export before new ones are dropped.
    pub max_queue: usize,
    /// Jobs followed at once; jobs submitted past it are not traced (and counted).
    pub max_jobs_in_flight: usize,
    /// Largest batch per export request.
    pub max_export_batch: usize,
    /// Longest time a finished span waits before its batch is sent.
    pub schedule_delay: Duration,
    /// Longest time one export request may take.
    pub timeout: Duration,
    /// Extra HTTP headers for the collector (`OTEL_EXPORTER_OTLP_HEADERS`), e.g. credentials.
    pub headers: Vec<(String, String)>,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource_attributes: Vec<(String, String)>,
}

/// Parses `key=value,key2=value2` with percent-encoded values, as the OTEL variables write
/// headers and resource attributes.
fn key_values(s: &str) -> Vec<(String, String)> {
    fn unescape(v: &str) -> String {
        let b = v.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Some(x) = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(x);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), unescape(v.trim())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

const TRACES_PATH: &str = "/v1/traces";

fn traces_url(base: &str) -> String {
    let base = base.trim();
    if base.trim_end_matches('/').ends_with(TRACES_PATH) {
        return base.to_string();
    }
    format!("{}{}", base.trim_end_matches('/'), TRACES_PATH)
}

impl TraceSettings {
    /// Combines `env` (the `OTEL_*` variables, which win) with the `[tracing]` config section.
    /// `Ok(None)` means tracing is off: no endpoint, `OTEL_SDK_DISABLED=true`,
    /// `OTEL_TRACES_EXPORTER=none`, or a sampler that keeps nothing.
    ///
    /// - endpoint: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is, else `OTEL_EXPORTER_OTLP_ENDPOINT`
    ///   or `tracing.otlp_endpoint` with `/v1/traces` appended.
    /// - protocol: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL` must be
    ///   `http/protobuf` (`http/json` is sent as protobuf to the same OTLP/HTTP endpoint, which
    ///   collectors accept; `grpc` is refused).
    /// - service name: `OTEL_SERVICE_NAME`, else `tracing.service_name`.
    /// - sampler: `OTEL_TRACES_SAMPLER` (`always_on`, `always_off`, `traceidratio`, and their
    ///   `parentbased_` forms, which are the same here since jobs arrive without a parent) with
    ///   `OTEL_TRACES_SAMPLER_ARG`, else `tracing.sample_ratio`.
    /// - batching: `OTEL_BSP_SCHEDULE_DELAY` (ms, default 1000), `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`
    ///   (default 512).
    /// - requests: `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT` (ms,
    ///   default 10000), `OTEL_EXPORTER_OTLP_TRACES_HEADERS` / `OTEL_EXPORTER_OTLP_HEADERS`.
    /// - resource: `OTEL_RESOURCE_ATTRIBUTES`.
    pub fn resolve(
        cfg: &TracingSection,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TraceSettings>, TelemetryError> {
        let var = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        if var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none")) {
            return Ok(None);
        }
        let endpoint = if let Some(e) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            e
        } else if let Some(e) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            traces_url(&e)
        } else if !cfg.otlp_endpoint.trim().is_empty() {
            traces_url(&cfg.otlp_endpoint)
        } else {
            return Ok(None);
        };
        for pv in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = var(pv) {
                match p.as_str() {
                    "http/protobuf" => {}
                    "http/json" => tracing::warn!(
                        "{pv}=http/json: sending OTLP as http/protobuf to the same endpoint instead"
                    ),
                    _ => {
                        return Err(TelemetryError::UnsupportedProtocol {
                            var: if pv.contains("TRACES") {
                                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                            } else {
                                "OTEL_EXPORTER_OTLP_PROTOCOL"
                            },
                            value: p,
                        })
                    }
                }
                break;
            }
        }
        let arg = var("OTEL_TRACES_SAMPLER_ARG").and_then(|a| a.parse::<f64>().ok());
        let sample_ratio = match var("OTEL_TRACES_SAMPLER").as_deref() {
            Some("always_on") | Some("parentbased_always_on") => 1.0,
            Some("always_off") | Some("parentbased_always_off") => 0.0,
            Some("traceidratio") | Some("parentbased_traceidratio") => arg.unwrap_or(1.0),
            Some(other) => {
                tracing::warn!(
                    "OTEL_TRACES_SAMPLER={other} is not supported; using tracing.sample_ratio"
                );
                cfg.sample_ratio
            }
            None => arg.unwrap_or(cfg.sample_ratio),
        }
        .clamp(0.0, 1.0);
        if sample_ratio <= 0.0 {
            return Ok(None);
        }
        let num = |k: &str, d: u64| var(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(d);
        let either = |a: &str, b: &str| var(a).or_else(|| var(b));
        if let Some(c) = either(
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ) {
            if c != "none" {
                tracing::warn!(
                    "OTLP compression {c:?} is not supported: spans are sent uncompressed"
                );
            }
        }
        let timeout_ms = either(
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        )
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(10_000)
        .max(1);
        Ok(Some(TraceSettings {
            endpoint,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| cfg.service_name.clone()),
            sample_ratio,
            max_queue: cfg.max_queue.max(1),
            max_jobs_in_flight: cfg.max_jobs_in_flight,
            max_export_batch: num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).max(1) as usize,
            schedule_delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY", 1000).max(1)),
            timeout: Duration::from_millis(timeout_ms),
            headers: either(
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "OTEL_EXPORTER_OTLP_HEADERS",
            )
            .map(|h| key_values(&h))
            .unwrap_or_default(),
            resource_attributes: var("OTEL_RESOURCE_ATTRIBUTES")
                .map(|h| key_values(&h))
                .unwrap_or_default(),
        }))
    }
}

/// The trace metrics, resolved once.
#[derive(Clone)]
struct TraceMetrics {
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

/// A short string kept inline (function names and client ids usually are), so recording a
/// job neither allocates nor touches shared reference counts for them.
#[derive(Debug, Clone)]
enum Tiny {
    Inline(u8, [u8; 30]),
    Heap(Box<str>),
}

impl Tiny {
    fn new(b: &[u8]) -> Tiny {
        match std::str::from_utf8(b) {
            Ok(_) if b.len() <= 30 => {
                let mut buf = [0u8; 30];
                buf[..b.len()].copy_from_slice(b);
                Tiny::Inline(b.len() as u8, buf)
            }
            _ => Tiny::Heap(String::from_utf8_lossy(b).into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Only valid UTF-8 is stored inline.
            Tiny::Inline(n, b) => std::str::from_utf8(&b[..*n as usize]).unwrap_or(""),
            Tiny::Heap(s) => s,
        }
    }
}

/// A connection as recorded in a trace.
#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    /// SET_CLIENT_ID, or `-` when none was set.
    id: Tiny,
}

impl Peer {
    fn of(p: &PeerInfo<'_>) -> Peer {
        Peer {
            addr: p.peer,
            id: Tiny::new(p.client_id),
        }
    }
}

#[derive(Debug)]
enum Segment {
    Queue {
        start: u64,
        end: u64,
    },
    Attempt {
        n: u32,
        start: u64,
        end: u64,
        worker: Peer,
        /// Why the attempt ended without a result (the job went back to the queue).
        requeued: Option<Box<str>>,
    },
}

/// The closed waits and attempts of a job (allocated when the first wait ends).
#[derive(Debug, Default)]
struct Segments(Vec<Segment>);

impl Segments {
    fn push(&mut self, s: Segment) {
        self.0.push(s)
    }

    fn iter(&self) -> impl Iterator<Item = &Segment> {
        self.0.iter()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// What the export thread knows about one traced job while it lives.
#[derive(Debug)]
struct JobTrace {
    submitted: u64,
    function: Tiny,
    unique: Option<Box<str>>,
    priority: Priority,
    background: bool,
    client: Option<Peer>,
    /// When its durable write was handed to the mirror, until the job became available.
    persist_since: Option<u64>,
    /// The durable write the job waited for: (start, end).
    persisted: Option<(u64, u64)>,
    /// When it entered the queue it is in now.
    queued_since: Option<u64>,
    /// The attempt in progress: (number, start, worker); boxed, as only running jobs have one.
    running: Option<Box<(u32, u64, Peer)>>,
    done: Segments,
}

impl JobTrace {
    fn close_queue(&mut self, now: u64) {
        if let Some(start) = self.queued_since.take() {
            self.done.push(Segment::Queue { start, end: now });
        }
    }

    fn close_attempt(&mut self, now: u64, requeued: Option<Box<str>>) {
        if let Some(r) = self.running.take() {
            let (n, start, worker) = *r;
            self.done.push(Segment::Attempt {
                n,
                start,
                end: now,
                worker,
                requeued,
            });
        }
    }

    fn close_persist(&mut self, now: u64) {
        if let Some(start) = self.persist_since.take() {
            self.persisted.get_or_insert((start, now));
        }
    }

    fn span_count(&self) -> usize {
        1 + self.done.len() + self.persisted.is_some() as usize
    }

    fn attempts(&self) -> usize {
        self.done
            .iter()
            .filter(|s| matches!(s, Segment::Attempt { .. }))
            .count()
    }
}

/// What happened to a job, as the engine reported it; the export thread assembles traces from
/// these, so the engine's lock is held only for an append.
#[derive(Debug)]
enum Event {
    Submitted {
        seq: u64,
        at: u64,
        function: Tiny,
        unique: Option<Box<str>>,
        priority: Priority,
        background: bool,
        client: Option<Peer>,
    },
    PersistStarted {
        seq: u64,
        at: u64,
    },
    Queued {
        seq: u64,
        at: u64,
    },
    Assigned {
        seq: u64,
        at: u64,
        attempt: u32,
        worker: Peer,
    },
    Requeued {
        seq: u64,
        at: u64,
        reason: Box<str>,
    },
    Finished {
        seq: u64,
        at: u64,
        outcome: JobOutcome,
    },
}

/// Events waiting for the export thread. The thread is woken once a batch is ready (or on a
/// flush or stop), not per event: a wake-up per job would cost more than the job itself.
#[derive(Default)]
struct Outbox {
    events: Vec<Event>,
    /// Events were lost (the hard limit was reached): traces in progress are incomplete.
    gap: bool,
    /// Callers of [`JobTracer::flush`] waiting for everything before them to be exported.
    flush: Vec<mpsc::SyncSender<()>>,
    stop: bool,
}

#[derive(Default)]
struct Handoff {
    outbox: Mutex<Outbox>,
    wake: Condvar,
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Follows jobs and exports one trace per job (see the module documentation).
pub struct JobTracer {
    /// Trace ids are a keyed hash of the job's sequence number: known wherever the job is,
    /// without storing them.
    id_keys: RandomState,
    /// `H:<node_id>:`, as the engine prefixes handles.
    handle_prefix: String,
    /// A job is traced when the low 63 bits of its trace id are below this (as the
    /// OpenTelemetry TraceIdRatioBased sampler decides); `u64::MAX` = every job.
    sample_bound: u64,
    /// Events waiting past which new jobs are not traced (`tracing.max_queue`).
    max_queue: usize,
    /// Events waiting past which events are dropped (and traces in progress discarded).
    hard_limit: usize,
    handoff: Arc<Handoff>,
    /// Events in the outbox at which the export thread is woken.
    wake_at: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    metrics: TraceMetrics,
    settings: TraceSettings,
}

impl std::fmt::Debug for JobTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTracer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Nanoseconds since the Unix epoch: span times, 8 bytes.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A trace id as logs and trace backends print it.
fn trace_hex(id: u128) -> String {
    format!("{id:032x}")
}

fn trace_id(keys: &RandomState, seq: u64) -> u128 {
    let hi = keys.hash_one((seq, 0u8)) as u128;
    let lo = keys.hash_one((seq, 1u8)).max(1) as u128;
    (hi << 64) | lo
}

impl JobTracer {
    /// Starts the export thread; `node_id` is the engine's (job handles are `H:<node_id>:<n>`)
    /// and becomes the resource's `service.instance.id`.
    pub fn start(
        settings: TraceSettings,
        node_id: &str,
        metrics: &Metrics,
    ) -> Result<Arc<JobTracer>, TelemetryError> {
        let handoff = Arc::new(Handoff::default());
        let tm = TraceMetrics::new(metrics);
        let id_keys = RandomState::new();
        let mut res: Vec<(&str, otlp::Val<'_>)> = vec![
            ("service.name", otlp::Val::Str(&settings.service_name)),
            ("service.version", otlp::Val::Str(env!("CARGO_PKG_VERSION"))),
            ("service.instance.id", otlp::Val::Str(node_id)),
            ("telemetry.sdk.name", otlp::Val::Str("gearhouse")),
            ("telemetry.sdk.language", otlp::Val::Str("rust")),
        ];
        for (k, v) in &settings.resource_attributes {
            if !res.iter().any(|(rk, _)| rk == k) {
                res.push((k, otlp::Val::Str(v)));
            }
        }
        let resource = otlp::resource(&res);
        // The HTTP client is built on the export thread (outside the tokio runtime); its
        // errors come back before the server starts.
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let export = {
            let handoff = handoff.clone();
            let metrics = tm.clone();
            let s = settings.clone();
            let handle_prefix = format!("H:{node_id}:");
            let id_keys = id_keys.clone();
            move || {
                let sender = match otlp::Sender::new(&s.endpoint, &s.headers, s.timeout) {
                    Ok(x) => {
                        let _ = ready_tx.send(Ok(()));
                        x
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                ExportLoop {
                    handoff,
                    sender,
                    resource,
                    scope: otlp::scope("gearhouse", env!("CARGO_PKG_VERSION")),
                    ids: otlp::Ids::default(),
                    id_keys,
                    jobs: HashMap::new(),
                    max_in_flight: s.max_jobs_in_flight,
                    metrics,
                    batch: otlp::Batch::default(),
                    max_batch: s.max_export_batch,
                    delay: s.schedule_delay,
                    handle_prefix,
                    addr_text: HashMap::new(),
                    early_write: None,
                    last_error_log: None,
                }
                .run()
            }
        };
        let thread = std::thread::Builder::new()
            .name("gearhouse-otlp".into())
            .spawn(export)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                return Err(TelemetryError::Exporter {
                    endpoint: settings.endpoint.clone(),
                    why,
                })
            }
            Err(_) => {
                return Err(TelemetryError::Exporter {
                    endpoint: settings.endpoint.clone(),
                    why: "the export thread ended".into(),
                })
            }
        }
        let sample_bound = if settings.sample_ratio >= 1.0 {
            u64::MAX
        } else {
            (settings.sample_ratio * (1u64 << 63) as f64) as u64
        };
        tracing::info!(
            endpoint = %settings.endpoint,
            service_name = %settings.service_name,
            sample_ratio = settings.sample_ratio,
            "exporting one trace per job over OTLP/HTTP"
        );
        Ok(Arc::new(JobTracer {
            id_keys,
            handle_prefix: format!("H:{node_id}:"),
            sample_bound,
            max_queue: settings.max_queue,
            hard_limit: settings.max_queue.saturating_mul(4),
            wake_at: settings.max_export_batch,
            handoff,
            thread: Mutex::new(Some(thread)),
            metrics: tm,
            settings,
        }))
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &TraceSettings {
        &self.settings
    }

    /// The trace id (32 hex digits) job `seq` has if it is traced.
    pub fn trace_id_of(&self, seq: u64) -> String {
        trace_hex(trace_id(&self.id_keys, seq))
    }

    fn sampled(&self, seq: u64) -> bool {
        self.sample_bound == u64::MAX
            || (trace_id(&self.id_keys, seq) as u64 >> 1) < self.sample_bound
    }

    /// Hands an event to the export thread. `new_job`: refused (the job is not traced) once
    /// `max_queue` events wait; other events only past the hard limit, which discards the traces
    /// in progress.
    fn push(&self, ev: Event, new_job: bool) {
        let wake = {
            let mut o = self.handoff.lock();
            let n = o.events.len();
            if o.stop {
                return;
            }
            if new_job && n >= self.max_queue {
                drop(o);
                self.metrics.untraced_queue_full.inc();
                return;
            }
            if n >= self.hard_limit {
                o.gap = true;
                return;
            }
            o.events.push(ev);
            n + 1 == self.wake_at
        };
        if wake {
            self.handoff.wake.notify_one();
        }
    }

    /// Exports every finished job's spans now; waits at most `timeout`. Blocking: call it
    /// from a blocking context.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        {
            let mut o = self.handoff.lock();
            if o.stop {
                return false;
            }
            o.flush.push(ack_tx);
        }
        self.handoff.wake.notify_one();
        ack_rx.recv_timeout(timeout).is_ok()
    }

    /// Flushes, then stops the export thread (jobs still running are not exported).
    /// Blocking: call it from a blocking context.
    pub fn shutdown(&self, timeout: Duration) {
        if !self.flush(timeout) {
            tracing::warn!("trace export did not finish within {timeout:?} at shutdown");
        }
        self.handoff.lock().stop = true;
        self.handoff.wake.notify_one();
        // Detached: it ends after its current export (bounded by the exporter's timeout).
        self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Records that a durable write of job `seq` was handed to the mirror.
    fn persist_started(&self, seq: u64) {
        if self.sampled(seq) {
            self.push(Event::PersistStarted { seq, at: now_ns() }, false);
        }
    }
}

impl JobObserver for JobTracer {
    fn submitted(&self, job: &JobEvent<'_>) {
        if !self.sampled(job.seq) {
            return;
        }
        self.push(
            Event::Submitted {
                seq: job.seq,
                at: now_ns(),
                function: Tiny::new(job.function),
                unique: (!job.unique.is_empty())
                    .then(|| String::from_utf8_lossy(job.unique).into()),
                priority: job.priority,
                background: job.background,
                client: job.client.as_ref().map(Peer::of),
            },
            true,
        );
    }

    fn queued(&self, seq: u64) {
        if self.sampled(seq) {
            self.push(Event::Queued { seq, at: now_ns() }, false);
        }
    }

    fn assigned(&self, seq: u64, attempt: u32, worker: &PeerInfo<'_>) {
        if self.sampled(seq) {
            self.push(
                Event::Assigned {
                    seq,
                    at: now_ns(),
                    attempt,
                    worker: Peer::of(worker),
                },
                false,
            );
        }
    }

    fn requeued(&self, seq: u64, reason: &str) {
        if !self.sampled(seq) {
            return;
        }
        tracing::info!(
            trace_id = %self.trace_id_of(seq),
            handle = %format_args!("{}{}", self.handle_prefix, seq),
            reason,
            "job attempt ended without a result"
        );
        self.push(
            Event::Requeued {
                seq,
                at: now_ns(),
                reason: reason.into(),
            },
            false,
        );
    }

    fn finished(&self, seq: u64, outcome: JobOutcome) {
        if !self.sampled(seq) {
            return;
        }
        match outcome {
            JobOutcome::Dropped | JobOutcome::Refused => tracing::warn!(
                trace_id = %self.trace_id_of(seq),
                handle = %format_args!("{}{}", self.handle_prefix, seq),
                outcome = outcome.as_str(),
                "job ended without running to completion"
            ),
            JobOutcome::Fail | JobOutcome::Exception => tracing::debug!(
                trace_id = %self.trace_id_of(seq),
                handle = %format_args!("{}{}", self.handle_prefix, seq),
                outcome = outcome.as_str(),
                "job failed"
            ),
            _ => {}
        }
        self.push(
            Event::Finished {
                seq,
                at: now_ns(),
                outcome,
            },
            false,
        );
    }
}

/// Wraps the durable mirror so each job's trace gets a span for the write it waited for
/// (from the hand-over to the mirror until the engine made the job available).
pub struct TracedMirror {
    inner: Arc<dyn Mirror>,
    tracer: Arc<JobTracer>,
}

impl TracedMirror {
    pub fn wrap(inner: Arc<dyn Mirror>, tracer: Arc<JobTracer>) -> Arc<dyn Mirror> {
        Arc::new(TracedMirror { inner, tracer })
    }
}

/// The mirror the engine should use: wrapped for `persist` spans when tracing is on.
pub fn traced_mirror(
    mirror: Option<Arc<dyn Mirror>>,
    tracer: &Option<Arc<JobTracer>>,
) -> Option<Arc<dyn Mirror>> {
    match (mirror, tracer) {
        (Some(m), Some(t)) => Some(TracedMirror::wrap(m, t.clone())),
        (m, _) => m,
    }
}

impl Mirror for TracedMirror {
    fn write(&self, record: JobRecord) -> Result<(), MirrorRefused> {
        let seq = record.seq;
        let r = self.inner.write(record);
        if r.is_ok() {
            self.tracer.persist_started(seq);
        }
        r
    }

    fn delete(&self, seq: u64) {
        self.inner.delete(seq)
    }
}

/// Assembles traces from events and exports them in batches, on its own thread.
struct ExportLoop {
    handoff: Arc<Handoff>,
    sender: otlp::Sender,
    resource: Vec<u8>,
    scope: Vec<u8>,
    ids: otlp::Ids,
    id_keys: RandomState,
    /// Traced jobs still queued or running.
    jobs: HashMap<u64, JobTrace>,
    max_in_flight: usize,
    metrics: TraceMetrics,
    batch: otlp::Batch,
    max_batch: usize,
    delay: Duration,
    handle_prefix: String,
    /// `ip:port` of connections seen in traces.
    addr_text: HashMap<SocketAddr, Box<str>>,
    /// A durable write reported before its job: (seq, when).
    early_write: Option<(u64, u64)>,
    last_error_log: Option<Instant>,
}

impl ExportLoop {
    fn run(mut self) {
        let mut events = Vec::new();
        loop {
            let (flush, stop, gap) = {
                let mut o = self.handoff.lock();
                let deadline = Instant::now() + self.delay;
                while o.events.len() < self.max_batch && o.flush.is_empty() && !o.stop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    o = self
                        .handoff
                        .wake
                        .wait_timeout(o, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                // Swap buffers: the engine keeps appending to the (emptied) vector we held.
                std::mem::swap(&mut o.events, &mut events);
                (
                    std::mem::take(&mut o.flush),
                    o.stop,
                    std::mem::take(&mut o.gap),
                )
            };
            for ev in events.drain(..) {
                self.apply(ev);
            }
            if gap {
                // Events after these were lost: the traces in progress cannot be completed.
                let lost: usize = self.jobs.values().map(JobTrace::span_count).sum();
                self.metrics.dropped_queue_full.inc_by(lost as u64);
                self.jobs.clear();
            }
            self.metrics.in_flight.set(self.jobs.len() as i64);
            self.export();
            for ack in flush {
                let _ = ack.try_send(());
            }
            if stop {
                let lost: usize = self.jobs.values().map(JobTrace::span_count).sum();
                if lost > 0 {
                    self.metrics.dropped_shutdown.inc_by(lost as u64);
                    tracing::info!(
                        jobs = self.jobs.len(),
                        "jobs still queued or running at shutdown are not exported as traces"
                    );
                }
                return;
            }
        }
    }

    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Submitted {
                seq,
                at,
                function,
                unique,
                priority,
                background,
                client,
            } => {
                if self.jobs.len() >= self.max_in_flight {
                    self.metrics.untraced_in_flight.inc();
                    return;
                }
                // A durable write is handed to the mirror just before the job is reported.
                self.jobs.insert(
                    seq,
                    JobTrace {
                        submitted: at,
                        function,
                        unique,
                        priority,
                        background,
                        client,
                        persist_since: None,
                        persisted: None,
                        queued_since: None,
                        running: None,
                        done: Segments::default(),
                    },
                );
                if let Some(at) = self
                    .early_write
                    .take()
                    .filter(|(s, _)| *s == seq)
                    .map(|(_, t)| t)
                {
                    let t = self.jobs.get_mut(&seq).expect("just inserted");
                    t.persist_since = Some(at);
                    t.submitted = at;
                }
            }
            Event::PersistStarted { seq, at } => match self.jobs.get_mut(&seq) {
                Some(t) => {
                    t.persist_since.get_or_insert(at);
                }
                None => self.early_write = Some((seq, at)),
            },
            Event::Queued { seq, at } => {
                if let Some(t) = self.jobs.get_mut(&seq) {
                    t.close_persist(at);
                    t.queued_since = Some(at);
                }
            }
            Event::Assigned {
                seq,
                at,
                attempt,
                worker,
            } => {
                if let Some(t) = self.jobs.get_mut(&seq) {
                    t.close_queue(at);
                    t.running = Some(Box::new((attempt, at, worker)));
                }
            }
            Event::Requeued { seq, at, reason } => {
                if let Some(t) = self.jobs.get_mut(&seq) {
                    t.close_attempt(at, Some(reason));
                }
            }
            Event::Finished { seq, at, outcome } => {
                if let Some(mut t) = self.jobs.remove(&seq) {
                    t.close_queue(at);
                    t.close_attempt(at, None);
                    t.close_persist(at);
                    self.add(seq, &t, outcome, at);
                    if self.batch.len() >= self.max_batch {
                        self.export();
                    }
                }
            }
        }
    }

    fn export(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len();
        let body = self.batch.take_request(&self.resource, &self.scope);
        let started = Instant::now();
        let result = self.sender.send(body);
        self.metrics
            .export_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => self.metrics.exported.inc_by(n as u64),
            Err(e) => {
                self.metrics.dropped_export_failed.inc_by(n as u64);
                // One line a minute at most: a dead collector must not flood the log.
                let quiet = self
                    .last_error_log
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
                if !quiet {
                    self.last_error_log = Some(Instant::now());
                    tracing::warn!(spans = n, error = %e, "OTLP export failed; spans dropped (counted in gearhouse_trace_spans_dropped_total)");
                }
            }
        }
    }

    /// Adds the spans of one finished job to the batch.
    fn add(&mut self, seq: u64, t: &JobTrace, outcome: JobOutcome, end: u64) {
        use otlp::Val::{Bool, Int, Str};
        // Connections are long-lived: their addresses are formatted once, not per span.
        if self.addr_text.len() > 4096 {
            self.addr_text.clear();
        }
        let peers = t.client.iter().chain(t.done.iter().filter_map(|s| match s {
            Segment::Attempt { worker, .. } => Some(worker),
            _ => None,
        }));
        for p in peers {
            self.addr_text
                .entry(p.addr)
                .or_insert_with(|| p.addr.to_string().into());
        }
        let addr_text = &self.addr_text;
        let id_of = |p: &Peer| -> Cow<'_, str> {
            match p.id.as_str() {
                "-" | "" => Cow::Borrowed(addr_text.get(&p.addr).map(|s| &**s).unwrap_or("-")),
                id => Cow::Owned(id.to_string()),
            }
        };
        let tid = trace_id(&self.id_keys, seq);
        let root_id = self.ids.span_id();
        let func: &str = t.function.as_str();
        let handle = format!("{}{}", self.handle_prefix, seq);
        let handle = handle.as_str();
        let named = |prefix: &str| format!("{prefix}{func}");
        let common = [
            ("messaging.system", Str("gearman")),
            ("messaging.destination.name", Str(func)),
            ("gearman.handle", Str(handle)),
        ];

        // Every child span hangs off the root and differs only in these fields.
        let (batch, ids) = (&mut self.batch, &mut self.ids);
        let mut child = |name: &str, start, end, attrs: &[(&str, otlp::Val<'_>)], status| {
            batch.push(&otlp::SpanRec {
                trace_id: tid,
                span_id: ids.span_id(),
                parent: root_id,
                name,
                kind: otlp::KIND_INTERNAL,
                start,
                end,
                attrs,
                status,
            });
        };
        if let Some((start, end)) = t.persisted {
            let n = named("persist ");
            child(&n, start, end, &common, (otlp::STATUS_UNSET, ""));
        }
        let last_attempt = t.attempts();
        let mut attempt_no = 0;
        for seg in t.done.iter() {
            match seg {
                Segment::Queue { start, end } => {
                    let n = named("queue ");
                    child(&n, *start, *end, &common, (otlp::STATUS_UNSET, ""));
                }
                Segment::Attempt {
                    n: number,
                    start,
                    end,
                    worker,
                    requeued,
                } => {
                    attempt_no += 1;
                    let n = named("attempt ");
                    let worker_id = id_of(worker);
                    let status = match requeued {
                        Some(why) => (otlp::STATUS_ERROR, &**why),
                        None if attempt_no == last_attempt => match outcome {
                            JobOutcome::Fail => (otlp::STATUS_ERROR, "the worker sent WORK_FAIL"),
                            JobOutcome::Exception => {
                                (otlp::STATUS_ERROR, "the worker sent WORK_EXCEPTION")
                            }
                            _ => (otlp::STATUS_UNSET, ""),
                        },
                        None => (otlp::STATUS_UNSET, ""),
                    };
                    let mut attrs = [
                        common[0],
                        common[1],
                        common[2],
                        ("messaging.operation.type", Str("process")),
                        ("gearman.attempt", Int(*number as i64)),
                        ("gearman.worker_id", Str(&worker_id)),
                        ("gearman.requeue_reason", Str("")),
                    ];
                    let used = match requeued {
                        Some(why) => {
                            attrs[6].1 = Str(why);
                            attrs.len()
                        }
                        None => attrs.len() - 1,
                    };
                    child(&n, *start, *end, &attrs[..used], status);
                }
            }
        }

        // The root: the job from submit to its final outcome.
        let n = named("job ");
        let client_id = t.client.as_ref().map(id_of);
        let final_worker = match t.done.iter().last() {
            Some(Segment::Attempt {
                worker,
                requeued: None,
                ..
            }) => Some(id_of(worker)),
            _ => None,
        };
        let mut attrs = vec![
            common[0],
            common[1],
            common[2],
            ("messaging.operation.type", Str("send")),
            ("gearman.unique", Str(t.unique.as_deref().unwrap_or(""))),
            ("gearman.priority", Str(t.priority.as_str())),
            ("gearman.background", Bool(t.background)),
            ("gearman.outcome", Str(outcome.as_str())),
            ("gearman.attempts", Int(last_attempt as i64)),
        ];
        if let Some(id) = &client_id {
            attrs.push(("gearman.client_id", Str(id)));
        }
        if let Some(w) = &final_worker {
            attrs.push(("gearman.worker_id", Str(w)));
        }
        let status = match outcome {
            JobOutcome::Complete | JobOutcome::Cancelled => (otlp::STATUS_UNSET, ""),
            JobOutcome::Fail => (otlp::STATUS_ERROR, "the worker sent WORK_FAIL"),
            JobOutcome::Exception => (otlp::STATUS_ERROR, "the worker sent WORK_EXCEPTION"),
            JobOutcome::Dropped => (
                otlp::STATUS_ERROR,
                "dropped after engine.job_retries attempts",
            ),
            JobOutcome::Refused => (
                otlp::STATUS_ERROR,
                "its durable write failed (ERROR QUEUE_ERROR)",
            ),
        };
        self.batch.push(&otlp::SpanRec {
            trace_id: tid,
            span_id: root_id,
            parent: 0,
            name: &n,
            kind: otlp::KIND_SERVER,
            start: t.submitted,
            end,
            attrs: &attrs,
            status,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_sample_evenly() {
        let keys = RandomState::new();
        let ids: std::collections::HashSet<u128> =
            (0..10_000).map(|s| trace_id(&keys, s)).collect();
        assert_eq!(ids.len(), 10_000);
        // Ratio sampling looks at the low 63 bits: about half are below the middle.
        let low = ids
            .iter()
            .filter(|&&t| ((t as u64) >> 1) < (1u64 << 62))
            .count();
        assert!((4_500..5_500).contains(&low), "{low}");
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn off_without_an_endpoint() {
        let cfg = TracingSection::default();
        assert_eq!(TraceSettings::resolve(&cfg, env(&[])).unwrap(), None);
    }

    #[test]
    fn otel_variables_win_over_the_config_file() {
        let mut cfg = TracingSection::default();
        cfg.otlp_endpoint = "http://file:4318".into();
        cfg.sample_ratio = 0.5;
        let s = TraceSettings::resolve(&cfg, env(&[])).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://file:4318/v1/traces");
        assert_eq!(s.sample_ratio, 0.5);
        assert_eq!(s.service_name, "gearhouse");

        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_SERVICE_NAME", "queue-eu"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ];
        let s = TraceSettings::resolve(&cfg, env(&vars)).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(s.service_name, "queue-eu");
        assert_eq!(s.sample_ratio, 0.25);

        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:9999/custom",
            ),
        ];
        let s = TraceSettings::resolve(&cfg, env(&vars)).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://traces:9999/custom");
    }

    #[test]
    fn sampler_off_and_unsupported_protocols() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_SAMPLER", "always_off"),
        ];
        let cfg = TracingSection::default();
        assert_eq!(TraceSettings::resolve(&cfg, env(&vars)).unwrap(), None);
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        let e = TraceSettings::resolve(&cfg, env(&vars)).unwrap_err();
        assert!(e.to_string().contains("http/protobuf"), "{e}");
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert_eq!(TraceSettings::resolve(&cfg, env(&vars)).unwrap(), None);
    }
}
