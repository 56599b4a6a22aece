//! Telemetry: logging setup, and one OpenTelemetry trace per job exported over OTLP/HTTP.
//!
//! A trace per job: a root span `job <function>` from submit to the final outcome, a child
//! `queue <function>` span for every wait in a queue, a child `attempt <function>` span for every
//! time a worker held the job (a requeued job shows two attempts and two waits), and a
//! `persist <function>` span for the durable write a background job waited for, when a memcached
//! mirror is configured.
//!
//! How it stays off the job path: the engine calls [`JobTracer`] (its [`JobObserver`]) with the
//! engine lock held, so each call only records a timestamp into a small per-job record (behind
//! its own mutex; lock order engine → tracer, never the reverse). When the job ends the record
//! moves, as one message, to an export thread that turns it into spans with their recorded
//! start and end times and sends them in batches. The export queue is bounded in spans
//! (`tracing.max_queue`): past it a finished job's spans are dropped and counted in
//! `gearhouse_trace_spans_dropped_total`, so a slow or dead collector costs spans, never
//! throughput. Spans are built as [`SpanData`] rather than through the SDK tracer because the
//! trace id is chosen at submit time (log lines about the job carry it while the job is still
//! running) and the SDK tracer always draws a fresh id for a root span.
//!
//! Settings come from the standard `OTEL_*` variables, then the `[tracing]` config section
//! (see [`TraceSettings::resolve`]). Tracing is off when no endpoint is set.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hashbrown::HashMap;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanExporter, SpanLinks,
};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, IntGauge};

use crate::config::{LogSection, TracingSection};
use crate::engine::{
    JobEvent, JobObserver, JobOutcome, JobRecord, Mirror, MirrorRefused, PeerInfo,
};
use crate::metrics::Metrics;
use crate::protocol::Priority;

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
    if cfg.format == "json" {
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
        Ok(Some(TraceSettings {
            endpoint,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| cfg.service_name.clone()),
            sample_ratio,
            max_queue: cfg.max_queue.max(1),
            max_jobs_in_flight: cfg.max_jobs_in_flight,
            max_export_batch: num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).max(1) as usize,
            schedule_delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY", 1000).max(1)),
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
    untraced: IntCounter,
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
            untraced: m.trace_jobs_untraced.clone(),
            in_flight: m.trace_jobs_in_flight.clone(),
            export_seconds: m.trace_export_seconds.clone(),
        }
    }
}

/// A connection as recorded in a trace.
#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    /// SET_CLIENT_ID, or `-` when none was set.
    id: Box<str>,
}

impl Peer {
    fn of(p: &PeerInfo<'_>) -> Peer {
        Peer {
            addr: p.peer,
            id: String::from_utf8_lossy(p.client_id).into(),
        }
    }

    /// The id an operator knows the connection by: its SET_CLIENT_ID, else its address.
    fn display_id(&self) -> String {
        if &*self.id == "-" || self.id.is_empty() {
            self.addr.to_string()
        } else {
            self.id.to_string()
        }
    }
}

#[derive(Debug)]
enum Segment {
    Queue {
        start: SystemTime,
        end: SystemTime,
    },
    Attempt {
        n: u32,
        start: SystemTime,
        end: SystemTime,
        worker: Peer,
        /// Why the attempt ended without a result (the job went back to the queue).
        requeued: Option<Box<str>>,
    },
}

/// What is recorded about one traced job while it lives.
#[derive(Debug)]
struct JobTrace {
    trace_id: TraceId,
    submitted: SystemTime,
    handle: Box<str>,
    function: Box<str>,
    unique: Box<str>,
    priority: Priority,
    background: bool,
    client: Option<Peer>,
    /// When its durable write was handed to the mirror, until the job became available.
    persist_since: Option<SystemTime>,
    /// Durable writes the job waited for: (start, end).
    persisted: Vec<(SystemTime, SystemTime)>,
    /// When it entered the queue it is in now.
    queued_since: Option<SystemTime>,
    /// The attempt in progress: (number, start, worker).
    running: Option<(u32, SystemTime, Peer)>,
    done: Vec<Segment>,
}

impl JobTrace {
    fn close_queue(&mut self, now: SystemTime) {
        if let Some(start) = self.queued_since.take() {
            self.done.push(Segment::Queue { start, end: now });
        }
    }

    fn close_attempt(&mut self, now: SystemTime, requeued: Option<&str>) {
        if let Some((n, start, worker)) = self.running.take() {
            self.done.push(Segment::Attempt {
                n,
                start,
                end: now,
                worker,
                requeued: requeued.map(Into::into),
            });
        }
    }

    fn span_count(&self) -> usize {
        1 + self.done.len() + self.persisted.len()
    }
}

/// What the tracer holds while jobs live.
#[derive(Default)]
struct Inflight {
    /// Traced jobs by sequence number.
    jobs: HashMap<u64, JobTrace>,
    /// A durable write handed to the mirror for a job not reported yet: (seq, when).
    early_write: Option<(u64, SystemTime)>,
}

/// A job that ended, on its way to the export thread.
struct Finished {
    trace: JobTrace,
    outcome: JobOutcome,
    end: SystemTime,
}

enum Msg {
    Job(Box<Finished>),
    /// Export what is waiting now, then answer.
    Flush(mpsc::SyncSender<()>),
}

/// Follows jobs and exports one trace per job (see the module documentation).
pub struct JobTracer {
    /// Traced jobs by sequence number. Locked only while the engine lock is held (engine →
    /// tracer), for a map operation and a few timestamps; the export thread never takes it.
    jobs: Mutex<Inflight>,
    ids: RandomIdGenerator,
    /// A job is traced when the low 63 bits of its trace id are below this (as the
    /// OpenTelemetry TraceIdRatioBased sampler decides); `u64::MAX` = every job.
    sample_bound: u64,
    max_in_flight: usize,
    max_queue: usize,
    /// Spans handed to the export thread and not yet exported or dropped.
    pending: Arc<AtomicUsize>,
    tx: mpsc::Sender<Msg>,
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

impl JobTracer {
    /// Starts the export thread; `node_id` becomes the resource's `service.instance.id`.
    pub fn start(
        settings: TraceSettings,
        node_id: &str,
        metrics: &Metrics,
    ) -> Result<Arc<JobTracer>, TelemetryError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: settings.endpoint.clone(),
                why: e.to_string(),
            })?;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", node_id.to_string()),
            ])
            .build();
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let tm = TraceMetrics::new(metrics);
        let export = ExportLoop {
            rx,
            exporter,
            resource,
            scope: InstrumentationScope::builder("gearhouse")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            ids: RandomIdGenerator::default(),
            pending: pending.clone(),
            metrics: tm.clone(),
            batch: Vec::new(),
            max_batch: settings.max_export_batch,
            delay: settings.schedule_delay,
            last_error_log: None,
        };
        let thread = std::thread::Builder::new()
            .name("gearhouse-otlp".into())
            .spawn(move || export.run())?;
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
            jobs: Mutex::new(Inflight::default()),
            ids: RandomIdGenerator::default(),
            sample_bound,
            max_in_flight: settings.max_jobs_in_flight,
            max_queue: settings.max_queue,
            pending,
            tx,
            thread: Mutex::new(Some(thread)),
            metrics: tm,
            settings,
        }))
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &TraceSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inflight> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The trace id of a job that is being traced.
    pub fn trace_id_of(&self, seq: u64) -> Option<TraceId> {
        self.lock().jobs.get(&seq).map(|t| t.trace_id)
    }

    fn sampled(&self, id: TraceId) -> bool {
        if self.sample_bound == u64::MAX {
            return true;
        }
        let b = id.to_bytes();
        let low = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")) >> 1;
        low < self.sample_bound
    }

    /// Exports every finished job's spans now; waits at most `timeout`. Blocking: call it
    /// from a blocking context.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack_tx)).is_err() {
            return false;
        }
        ack_rx.recv_timeout(timeout).is_ok()
    }

    /// Flushes, then stops the export thread (jobs still running are not exported).
    /// Blocking: call it from a blocking context.
    pub fn shutdown(&self, timeout: Duration) {
        if !self.flush(timeout) {
            tracing::warn!("trace export did not finish within {timeout:?} at shutdown");
        }
        let untraced = self.lock().jobs.len();
        if untraced > 0 {
            tracing::info!(
                jobs = untraced,
                "jobs still queued or running at shutdown are not exported as traces"
            );
        }
        // The thread ends when the last sender goes; it is detached if it is still busy.
        self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn finish(&self, mut t: JobTrace, outcome: JobOutcome) {
        let now = SystemTime::now();
        t.close_queue(now);
        t.close_attempt(now, None);
        if let Some(start) = t.persist_since.take() {
            t.persisted.push((start, now));
        }
        let n = t.span_count();
        let before = self.pending.fetch_add(n, Ordering::Relaxed);
        if before + n > self.max_queue {
            self.pending.fetch_sub(n, Ordering::Relaxed);
            self.metrics.dropped_queue_full.inc_by(n as u64);
            return;
        }
        let msg = Msg::Job(Box::new(Finished {
            trace: t,
            outcome,
            end: now,
        }));
        if self.tx.send(msg).is_err() {
            self.pending.fetch_sub(n, Ordering::Relaxed);
            self.metrics.dropped_shutdown.inc_by(n as u64);
        }
    }

    /// Records that a durable write of job `seq` was handed to the mirror.
    fn persist_started(&self, seq: u64) {
        let now = SystemTime::now();
        let mut g = self.lock();
        match g.jobs.get_mut(&seq) {
            Some(t) => {
                t.persist_since.get_or_insert(now);
            }
            // A new job's write is handed over just before `submitted` reports the job.
            None => g.early_write = Some((seq, now)),
        }
    }
}

impl JobObserver for JobTracer {
    fn submitted(&self, job: &JobEvent<'_>) {
        let trace_id = self.ids.new_trace_id();
        if !self.sampled(trace_id) {
            return;
        }
        let mut g = self.lock();
        let persist_since = match g.early_write.take() {
            Some((seq, t)) if seq == job.seq => Some(t),
            _ => None,
        };
        let jobs = &mut g.jobs;
        if jobs.len() >= self.max_in_flight {
            self.metrics.untraced.inc();
            return;
        }
        jobs.insert(
            job.seq,
            JobTrace {
                trace_id,
                // The job's life starts with its durable write, when it has one.
                submitted: persist_since.unwrap_or_else(SystemTime::now),
                handle: String::from_utf8_lossy(job.handle).into(),
                function: String::from_utf8_lossy(job.function).into(),
                unique: String::from_utf8_lossy(job.unique).into(),
                priority: job.priority,
                background: job.background,
                client: job.client.as_ref().map(Peer::of),
                persist_since,
                persisted: Vec::new(),
                queued_since: None,
                running: None,
                done: Vec::new(),
            },
        );
        self.metrics.in_flight.set(jobs.len() as i64);
    }

    fn queued(&self, seq: u64) {
        if let Some(t) = self.lock().jobs.get_mut(&seq) {
            let now = SystemTime::now();
            if let Some(start) = t.persist_since.take() {
                t.persisted.push((start, now));
            }
            t.queued_since = Some(now);
        }
    }

    fn assigned(&self, seq: u64, attempt: u32, worker: &PeerInfo<'_>) {
        if let Some(t) = self.lock().jobs.get_mut(&seq) {
            let now = SystemTime::now();
            t.close_queue(now);
            t.running = Some((attempt, now, Peer::of(worker)));
        }
    }

    fn requeued(&self, seq: u64, reason: &str) {
        if let Some(t) = self.lock().jobs.get_mut(&seq) {
            let attempt = t.running.as_ref().map(|r| r.0).unwrap_or(0);
            t.close_attempt(SystemTime::now(), Some(reason));
            tracing::info!(
                trace_id = %t.trace_id,
                handle = %t.handle,
                function = %t.function,
                attempt,
                reason,
                "job attempt ended without a result"
            );
        }
    }

    fn finished(&self, seq: u64, outcome: JobOutcome) {
        let (t, left) = {
            let mut g = self.lock();
            let t = g.jobs.remove(&seq);
            (t, g.jobs.len())
        };
        let Some(t) = t else { return };
        self.metrics.in_flight.set(left as i64);
        match outcome {
            JobOutcome::Dropped | JobOutcome::Refused => tracing::warn!(
                trace_id = %t.trace_id,
                handle = %t.handle,
                function = %t.function,
                outcome = outcome.as_str(),
                "job ended without running to completion"
            ),
            JobOutcome::Fail | JobOutcome::Exception => tracing::debug!(
                trace_id = %t.trace_id,
                handle = %t.handle,
                function = %t.function,
                outcome = outcome.as_str(),
                "job failed"
            ),
            _ => {}
        }
        self.finish(t, outcome);
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

/// Turns finished jobs into spans and exports them in batches, on its own thread.
struct ExportLoop {
    rx: mpsc::Receiver<Msg>,
    exporter: opentelemetry_otlp::SpanExporter,
    resource: Resource,
    scope: InstrumentationScope,
    ids: RandomIdGenerator,
    pending: Arc<AtomicUsize>,
    metrics: TraceMetrics,
    batch: Vec<SpanData>,
    max_batch: usize,
    delay: Duration,
    last_error_log: Option<Instant>,
}

impl ExportLoop {
    fn run(mut self) {
        self.exporter.set_resource(&self.resource);
        let mut oldest: Option<Instant> = None;
        loop {
            let wait = match oldest {
                Some(t) => self.delay.saturating_sub(t.elapsed()),
                None => Duration::from_secs(3600),
            };
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Job(f)) => {
                    self.add(*f);
                    oldest.get_or_insert_with(Instant::now);
                    if self.batch.len() >= self.max_batch {
                        self.export();
                        oldest = None;
                    }
                }
                Ok(Msg::Flush(ack)) => {
                    // Take whatever else already arrived, then send it all.
                    while let Ok(m) = self.rx.try_recv() {
                        match m {
                            Msg::Job(f) => self.add(*f),
                            Msg::Flush(a) => {
                                let _ = a.try_send(());
                            }
                        }
                        if self.batch.len() >= self.max_batch {
                            self.export();
                        }
                    }
                    self.export();
                    oldest = None;
                    let _ = ack.try_send(());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.export();
                    oldest = None;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.export();
                    let _ = self.exporter.shutdown();
                    return;
                }
            }
        }
    }

    fn export(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let n = batch.len();
        let started = Instant::now();
        let result = futures::executor::block_on(self.exporter.export(batch));
        self.metrics
            .export_seconds
            .observe(started.elapsed().as_secs_f64());
        self.pending.fetch_sub(n, Ordering::Relaxed);
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

    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        trace_id: TraceId,
        span_id: SpanId,
        parent: SpanId,
        kind: SpanKind,
        name: String,
        (start, end): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: kind,
            name: Cow::Owned(name),
            start_time: start,
            end_time: end.max(start),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }

    /// Adds the spans of one finished job to the batch.
    fn add(&mut self, f: Finished) {
        let t = f.trace;
        let root_id = self.ids.new_span_id();
        let func = t.function.to_string();
        let common = |op: &'static str, op_type: Option<&'static str>| {
            let mut a = vec![
                KeyValue::new("messaging.system", "gearman"),
                KeyValue::new("messaging.destination.name", func.clone()),
                KeyValue::new("messaging.operation.name", op),
                KeyValue::new("messaging.message.id", t.handle.to_string()),
                KeyValue::new("gearman.handle", t.handle.to_string()),
            ];
            if let Some(ty) = op_type {
                a.push(KeyValue::new("messaging.operation.type", ty));
            }
            a
        };
        let error = |what: &str| Status::Error {
            description: Cow::Owned(what.to_string()),
        };

        let mut root_attrs = common("submit", Some("send"));
        root_attrs.extend([
            KeyValue::new("gearman.unique", t.unique.to_string()),
            KeyValue::new("gearman.priority", t.priority.as_str()),
            KeyValue::new("gearman.background", t.background),
            KeyValue::new("gearman.outcome", f.outcome.as_str()),
            KeyValue::new(
                "gearman.attempts",
                t.done
                    .iter()
                    .filter(|s| matches!(s, Segment::Attempt { .. }))
                    .count() as i64,
            ),
        ]);
        if let Some(c) = &t.client {
            root_attrs.extend([
                KeyValue::new("gearman.client_id", c.display_id()),
                KeyValue::new("messaging.client.id", c.display_id()),
                KeyValue::new("network.peer.address", c.addr.ip().to_string()),
                KeyValue::new("network.peer.port", c.addr.port() as i64),
            ]);
        }
        // The worker that produced the final result, on the root too (for searching by worker).
        if let Some(Segment::Attempt {
            worker,
            requeued: None,
            ..
        }) = t.done.last()
        {
            root_attrs.push(KeyValue::new("gearman.worker_id", worker.display_id()));
        }
        let root_status = match f.outcome {
            JobOutcome::Complete | JobOutcome::Cancelled => Status::Unset,
            JobOutcome::Fail => error("the worker sent WORK_FAIL"),
            JobOutcome::Exception => error("the worker sent WORK_EXCEPTION"),
            JobOutcome::Dropped => error("dropped after engine.job_retries attempts"),
            JobOutcome::Refused => error("its durable write failed (ERROR QUEUE_ERROR)"),
        };
        let root = self.span(
            t.trace_id,
            root_id,
            SpanId::INVALID,
            SpanKind::Server,
            format!("job {func}"),
            (t.submitted, f.end),
            root_attrs,
            root_status,
        );

        for &(start, end) in &t.persisted {
            let s = self.span(
                t.trace_id,
                self.ids.new_span_id(),
                root_id,
                SpanKind::Internal,
                format!("persist {func}"),
                (start, end),
                common("persist", None),
                Status::Unset,
            );
            self.batch.push(s);
        }
        let last_attempt = t
            .done
            .iter()
            .rposition(|s| matches!(s, Segment::Attempt { .. }));
        for (i, seg) in t.done.iter().enumerate() {
            let s = match seg {
                Segment::Queue { start, end } => {
                    let mut a = common("queue", None);
                    a.push(KeyValue::new("gearman.priority", t.priority.as_str()));
                    self.span(
                        t.trace_id,
                        self.ids.new_span_id(),
                        root_id,
                        SpanKind::Internal,
                        format!("queue {func}"),
                        (*start, *end),
                        a,
                        Status::Unset,
                    )
                }
                Segment::Attempt {
                    n,
                    start,
                    end,
                    worker,
                    requeued,
                } => {
                    let mut a = common("process", Some("process"));
                    a.extend([
                        KeyValue::new("gearman.attempt", *n as i64),
                        KeyValue::new("gearman.worker_id", worker.display_id()),
                        KeyValue::new("messaging.consumer.group.name", func.clone()),
                        KeyValue::new("network.peer.address", worker.addr.ip().to_string()),
                        KeyValue::new("network.peer.port", worker.addr.port() as i64),
                    ]);
                    let status = match requeued {
                        Some(why) => {
                            a.push(KeyValue::new("gearman.requeue_reason", why.to_string()));
                            error(why)
                        }
                        None if Some(i) == last_attempt => match f.outcome {
                            JobOutcome::Fail => error("the worker sent WORK_FAIL"),
                            JobOutcome::Exception => error("the worker sent WORK_EXCEPTION"),
                            _ => Status::Unset,
                        },
                        None => Status::Unset,
                    };
                    self.span(
                        t.trace_id,
                        self.ids.new_span_id(),
                        root_id,
                        SpanKind::Internal,
                        format!("attempt {func}"),
                        (*start, *end),
                        a,
                        status,
                    )
                }
            };
            self.batch.push(s);
        }
        self.batch.push(root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
