//! Prometheus metrics: one registry per server, counters and histograms updated on the job path,
//! and gauges filled from an engine snapshot at scrape time.
//!
//! Function names come from clients, so the number of distinct `function` label values is capped
//! ([`FunctionLabels`]); functions past the cap share the label `__other__`.
//!
//! Counters whose label values are known in advance start at 0 rather than appearing on their
//! first increment, so `rate()` and alerts see a series from the first scrape: the protocol
//! error kinds at [`Metrics::new`], and each function's per-priority/mode counters and refusal
//! reasons when the function is first seen ([`Metrics::for_function`]).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::codec::{CodecError, PacketType};
use crate::protocol::{ErrorCode, Priority};

/// The label value that functions past the label cap share.
pub const OTHER_FUNCTION: &str = "__other__";

/// Buckets for queue wait and run times: 50 µs to 5 minutes, so sub-millisecond waits resolve.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Every metric the server exports, registered on its own registry.
pub struct Metrics {
    pub registry: Registry,
    labels: Mutex<FunctionLabels>,
    pub jobs_submitted: IntCounterVec,
    pub jobs_completed: IntCounterVec,
    pub jobs_failed: IntCounterVec,
    pub jobs_exceptions: IntCounterVec,
    pub jobs_retried: IntCounterVec,
    pub jobs_timed_out: IntCounterVec,
    pub jobs_coalesced: IntCounterVec,
    pub jobs_refused: IntCounterVec,
    pub job_queued_seconds: HistogramVec,
    pub job_running_seconds: HistogramVec,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub connections_refused: IntCounter,
    pub connections_overflowed: IntCounter,
    pub packets_in: IntCounterVec,
    /// `packets_in` resolved per packet type (indexed by type number) to keep lookups off the hot path.
    packets_in_by_type: Vec<IntCounter>,
    pub packets_out: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub protocol_errors: IntCounterVec,
    pub admin_commands: IntCounterVec,
    /// TLS handshakes on the Gearman port, by result (ok, failed, timeout).
    pub tls_handshakes: IntCounterVec,
    /// Certificate reloads (SIGHUP), by result (ok, failed).
    pub tls_reloads: IntCounterVec,
    /// Requests refused by the access rules, by action (submit, register, admin).
    pub access_denied: IntCounterVec,
    /// How long each critical section held the engine lock.
    pub engine_lock_hold_seconds: Histogram,
    /// Connection turns ended by `server.turn_budget_us` (the task then yielded).
    pub turns_cut: IntCounter,
    // Gauges filled from the engine at scrape time (names kept from the gearmand exporter).
    pub up: IntGauge,
    pub version_info: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub fn_jobs: IntGaugeVec,
    pub fn_running: IntGaugeVec,
    pub fn_waiting: IntGaugeVec,
    pub fn_workers: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub epoch_jobs_waiting: IntGauge,
    pub queue_entries: IntGauge,
    pub clients_connected: IntGauge,
    pub workers_connected: IntGauge,
    pub function_labels_folded: IntGauge,
    // Job traces (see `telemetry`); registered even when tracing is off, so dashboards show 0.
    pub trace_spans_exported: IntCounter,
    pub trace_spans_dropped: IntCounterVec,
    pub trace_jobs_untraced: IntCounterVec,
    pub trace_jobs_in_flight: IntGauge,
    pub trace_export_seconds: Histogram,
}

/// Per-function handles, resolved once when a function is first seen so the job path does no
/// label lookups.
#[derive(Clone)]
pub struct FunctionMetrics {
    pub label: String,
    /// Indexed by priority, then background (0 = foreground).
    pub submitted: [[IntCounter; 2]; 3],
    pub completed: ByMode,
    pub failed: ByMode,
    pub exceptions: ByMode,
    pub retried: ByMode,
    pub timed_out: IntCounter,
    pub coalesced: ByMode,
    pub queued_seconds: Histogram,
    pub running_seconds: Histogram,
}

/// One counter per priority and mode (foreground/background) of a function.
#[derive(Clone)]
pub struct ByMode([[IntCounter; 2]; 3]);

impl ByMode {
    fn new(v: &IntCounterVec, label: &str) -> ByMode {
        ByMode(
            Priority::ALL.map(|p| {
                [MODES[0], MODES[1]].map(|m| v.with_label_values(&[label, p.as_str(), m]))
            }),
        )
    }

    /// Counts one job of priority `p`, background or not.
    pub fn inc(&self, p: Priority, background: bool) {
        self.0[p as usize][background as usize].inc();
    }
}

/// Why a submit was refused: the `reason` label of `gearhouse_jobs_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// `engine.max_functions` reached by a new function (counted under `__other__`).
    TooManyFunctions,
    /// The function's queue at that priority is at its limit (`maxqueue`).
    QueueFull,
    /// The durable mirror would not take the job.
    NotDurable,
}

impl RefusalReason {
    /// The reasons a known function's submits can be refused for.
    pub const PER_FUNCTION: [RefusalReason; 2] =
        [RefusalReason::QueueFull, RefusalReason::NotDurable];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::TooManyFunctions => "too_many_functions",
            RefusalReason::QueueFull => "queue_full",
            RefusalReason::NotDurable => "not_durable",
        }
    }
}

/// `kind` label values of `gearhouse_protocol_errors_total`: framing errors (named by the
/// codec), frame timeouts, and the codes a parsed request is refused with.
pub fn protocol_error_kinds() -> Vec<&'static str> {
    let framing = [
        CodecError::BadMagic([0; 4]),
        CodecError::UnknownType(0),
        CodecError::TooLarge { len: 0, max: 0 },
        CodecError::AdminLineTooLong { max: 0 },
        CodecError::Io(std::io::Error::other("")),
    ];
    let mut kinds: Vec<&'static str> = framing.iter().map(CodecError::kind).collect();
    kinds.push("frame_timeout");
    kinds.extend(ErrorCode::PARSE.map(ErrorCode::as_str));
    kinds
}

/// `mode` label values, indexed by the background flag.
const MODES: [&str; 2] = ["foreground", "background"];

/// Caps the number of distinct function label values.
#[derive(Debug)]
pub struct FunctionLabels {
    cap: usize,
    seen: HashSet<String>,
    folded: u64,
}

impl FunctionLabels {
    pub fn new(cap: usize) -> Self {
        FunctionLabels {
            cap,
            seen: HashSet::new(),
            folded: 0,
        }
    }

    /// The label value for a function name: the name while under the cap, else `__other__`.
    pub fn label_for(&mut self, name: &[u8]) -> String {
        let name = String::from_utf8_lossy(name).into_owned();
        if self.seen.contains(&name) {
            return name;
        }
        if self.seen.len() < self.cap {
            self.seen.insert(name.clone());
            return name;
        }
        self.folded += 1;
        OTHER_FUNCTION.to_string()
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    /// Registers every metric; `function_label_cap` bounds distinct `function` label values.
    pub fn new(function_label_cap: usize) -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector");
        let fpm = &["function", "priority", "mode"];
        let packets_in = counter_vec(
            &r,
            "gearhouse_packets_received_total",
            "Packets received, by type",
            &["type"],
        );
        let packets_in_by_type = (0..=42u32)
            .map(|n| {
                let name = PacketType::try_from(n)
                    .map(|t| t.name())
                    .unwrap_or("UNKNOWN");
                packets_in.with_label_values(&[name])
            })
            .collect();
        let f = &["function"];
        let m = Metrics {
            labels: Mutex::new(FunctionLabels::new(function_label_cap)),
            jobs_submitted: counter_vec(&r, "gearhouse_jobs_submitted_total", "Jobs accepted, by function, priority and mode (foreground/background); coalesced submits not included", fpm),
            jobs_completed: counter_vec(&r, "gearhouse_jobs_completed_total", "Jobs a worker completed (WORK_COMPLETE)", fpm),
            jobs_failed: counter_vec(&r, "gearhouse_jobs_failed_total", "Jobs that failed (WORK_FAIL, or dropped after job_retries attempts)", fpm),
            jobs_exceptions: counter_vec(&r, "gearhouse_jobs_exceptions_total", "Jobs that ended with WORK_EXCEPTION", fpm),
            jobs_retried: counter_vec(&r, "gearhouse_jobs_retried_total", "Jobs put back in the queue after their worker disconnected, timed out or gave up the function", fpm),
            jobs_timed_out: counter_vec(&r, "gearhouse_jobs_timed_out_total", "Jobs failed because their worker passed its CAN_DO_TIMEOUT (also counted in gearhouse_jobs_failed_total)", f),
            jobs_coalesced: counter_vec(&r, "gearhouse_jobs_coalesced_total", "Submits that joined an existing job with the same unique id, by the joining submit's priority and mode", fpm),
            jobs_refused: counter_vec(&r, "gearhouse_jobs_refused_total", "Submits refused with an ERROR, by reason, priority and mode", &["function", "reason", "priority", "mode"]),
            job_queued_seconds: histogram_vec(&r, "gearhouse_job_queued_seconds", "Time from submit (or requeue) to assignment to a worker", f),
            job_running_seconds: histogram_vec(&r, "gearhouse_job_running_seconds", "Time from assignment to the worker's final result", f),
            connections: gauge(&r, "gearhouse_connections", "Open connections"),
            connections_total: counter(&r, "gearhouse_connections_accepted_total", "Connections accepted"),
            connections_refused: counter(&r, "gearhouse_connections_refused_total", "Connections closed at once: server.max_connections was reached, or the queue was still being recovered at start-up"),
            connections_overflowed: counter(&r, "gearhouse_connections_overflowed_total", "Connections closed because they did not read their packets (server.outbound_queue full)"),
            packets_in,
            packets_in_by_type,
            packets_out: counter(&r, "gearhouse_packets_sent_total", "Packets sent"),
            bytes_in: counter(&r, "gearhouse_bytes_received_total", "Bytes received"),
            bytes_out: counter(&r, "gearhouse_bytes_sent_total", "Bytes sent"),
            protocol_errors: counter_vec(&r, "gearhouse_protocol_errors_total", "Requests refused or connections closed for bad input, by kind", &["kind"]),
            admin_commands: counter_vec(&r, "gearhouse_admin_commands_total", "Admin text commands, by command and outcome", &["command", "outcome"]),
            tls_handshakes: counter_vec(&r, "gearhouse_tls_handshakes_total", "TLS handshakes on the Gearman port, by result (ok, failed, timeout)", &["result"]),
            tls_reloads: counter_vec(&r, "gearhouse_tls_reloads_total", "TLS certificate reloads on SIGHUP, by result (ok, failed: the previous certificate stays)", &["result"]),
            turns_cut: counter(&r, "gearhouse_connection_turns_cut_total", "Times a connection used server.turn_budget_us handling its pipelined requests and yielded its runtime thread to the others before reading on"),
            access_denied: counter_vec(&r, "gearhouse_access_denied_total", "Requests refused by the access rules (access.rules), by action (submit, register, admin)", &["action"]),
            up: gauge(&r, "gearman_up", "1 while the server answers"),
            version_info: gauge_vec(&r, "gearman_version_info", "Server version", &["version"]),
            build_info: gauge_vec(&r, "gearhouse_build_info", "Build information", &["version", "rustc"]),
            fn_jobs: gauge_vec(&r, "gearman_jobs", "Jobs queued or running, by function (as the gearmand exporter)", f),
            fn_running: gauge_vec(&r, "gearman_jobs_running", "Jobs running, by function", f),
            fn_waiting: gauge_vec(&r, "gearman_jobs_waiting", "Jobs waiting for a worker, by function", f),
            fn_workers: gauge_vec(&r, "gearman_workers", "Workers that can do the function", f),
            queue_depth: gauge_vec(&r, "gearhouse_queue_depth", "Jobs waiting, by function and priority", &["function", "priority"]),
            epoch_jobs_waiting: gauge(&r, "gearhouse_epoch_jobs_waiting", "Epoch jobs waiting for their time"),
            queue_entries: gauge(&r, "gearhouse_engine_queue_entries", "Entries in the functions' priority queues, including those of jobs that ended while queued (compacted once they outnumber the live ones)"),
            clients_connected: gauge(&r, "gearhouse_clients_connected", "Connections that submitted jobs or asked for status"),
            workers_connected: gauge(&r, "gearhouse_workers_connected", "Connections that registered at least one function"),
            function_labels_folded: gauge(&r, "gearhouse_function_labels_folded", "Functions whose label was folded into __other__ (metrics.max_function_labels)"),
            trace_spans_exported: counter(&r, "gearhouse_trace_spans_exported_total", "Job trace spans the OTLP collector accepted"),
            trace_spans_dropped: counter_vec(&r, "gearhouse_trace_spans_dropped_total", "Job trace spans dropped: export queue full (tracing.max_queue), export failed, or shutdown", &["reason"]),
            trace_jobs_untraced: counter_vec(
                &r,
                "gearhouse_trace_jobs_untraced_total",
                "Sampled jobs not traced: the export queue was full (tracing.max_queue), or tracing.max_jobs_in_flight jobs were already followed",
                &["reason"],
            ),
            trace_jobs_in_flight: gauge(&r, "gearhouse_trace_jobs_in_flight", "Jobs being followed for a trace (queued or running)"),
            engine_lock_hold_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "gearhouse_engine_lock_hold_seconds",
                        "How long each critical section held the engine lock (every request, page of a listing, timer and metrics read takes it once)",
                    )
                    .buckets(vec![1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5]),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            trace_export_seconds: {
                let h = Histogram::with_opts(HistogramOpts::new("gearhouse_trace_export_seconds", "Time to send one batch of spans to the OTLP collector").buckets(LATENCY_BUCKETS.to_vec())).expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            registry: r,
        };
        for kind in protocol_error_kinds() {
            m.protocol_errors.with_label_values(&[kind]);
        }
        for p in Priority::ALL {
            for mode in MODES {
                m.jobs_refused.with_label_values(&[
                    OTHER_FUNCTION,
                    RefusalReason::TooManyFunctions.as_str(),
                    p.as_str(),
                    mode,
                ]);
            }
        }
        for reason in ["queue_full", "export_failed", "shutdown"] {
            m.trace_spans_dropped.with_label_values(&[reason]);
        }
        for reason in ["queue_full", "in_flight_limit"] {
            m.trace_jobs_untraced.with_label_values(&[reason]);
        }
        m.up.set(1);
        m.version_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("RUSTC_VERSION").unwrap_or("unknown"),
            ])
            .set(1);
        m
    }

    /// Resolves the metric handles of a function seen for the first time.
    pub fn for_function(&self, name: &[u8]) -> FunctionMetrics {
        let label = {
            // FunctionLabels stays consistent across a panic (one insert), so poison is ignored.
            let mut l = self.labels.lock().unwrap_or_else(PoisonError::into_inner);
            let label = l.label_for(name);
            self.function_labels_folded.set(l.folded as i64);
            label
        };
        let sub = |p: Priority, mode: &str| {
            self.jobs_submitted
                .with_label_values(&[label.as_str(), p.as_str(), mode])
        };
        let by_mode = |v: &IntCounterVec| ByMode::new(v, &label);
        for reason in RefusalReason::PER_FUNCTION {
            for p in Priority::ALL {
                for mode in MODES {
                    self.jobs_refused.with_label_values(&[
                        label.as_str(),
                        reason.as_str(),
                        p.as_str(),
                        mode,
                    ]);
                }
            }
        }
        FunctionMetrics {
            submitted: Priority::ALL.map(|p| [sub(p, "foreground"), sub(p, "background")]),
            completed: by_mode(&self.jobs_completed),
            failed: by_mode(&self.jobs_failed),
            exceptions: by_mode(&self.jobs_exceptions),
            retried: by_mode(&self.jobs_retried),
            timed_out: self.jobs_timed_out.with_label_values(&[label.as_str()]),
            coalesced: by_mode(&self.jobs_coalesced),
            queued_seconds: self.job_queued_seconds.with_label_values(&[label.as_str()]),
            running_seconds: self
                .job_running_seconds
                .with_label_values(&[label.as_str()]),
            label,
        }
    }

    /// Counts a received packet.
    pub fn packet_in(&self, kind: PacketType) {
        self.packets_in_by_type[kind as usize].inc();
    }

    /// Counts a refused submit.
    pub fn refused(&self, label: &str, reason: RefusalReason, p: Priority, background: bool) {
        self.jobs_refused
            .with_label_values(&[
                label,
                reason.as_str(),
                p.as_str(),
                MODES[background as usize],
            ])
            .inc();
    }

    /// Encodes every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf8 metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_labels_fold_past_the_cap() {
        let mut l = FunctionLabels::new(2);
        assert_eq!(l.label_for(b"a"), "a");
        assert_eq!(l.label_for(b"b"), "b");
        assert_eq!(l.label_for(b"c"), OTHER_FUNCTION);
        assert_eq!(l.label_for(b"a"), "a");
        assert_eq!(l.folded, 1);
    }

    fn sample(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        m.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .find(|s| {
                labels.iter().all(|(k, v)| {
                    s.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|s| s.get_counter().value() as u64)
    }

    #[test]
    fn counters_with_known_labels_start_at_zero() {
        let m = Metrics::new(10);
        for kind in [
            "bad_magic",
            "packet_too_large",
            "frame_timeout",
            "INVALID_PACKET",
        ] {
            assert_eq!(
                sample(&m, "gearhouse_protocol_errors_total", &[("kind", kind)]),
                Some(0),
                "{kind}"
            );
        }
        let too_many = [
            ("function", OTHER_FUNCTION),
            ("reason", "too_many_functions"),
        ];
        assert_eq!(
            sample(&m, "gearhouse_jobs_refused_total", &too_many),
            Some(0)
        );
        let refused = [
            ("function", "resize"),
            ("reason", "queue_full"),
            ("priority", "low"),
            ("mode", "background"),
        ];
        assert_eq!(sample(&m, "gearhouse_jobs_refused_total", &refused), None);
        let f = m.for_function(b"resize");
        for reason in ["queue_full", "not_durable"] {
            let labels = [
                ("function", "resize"),
                ("reason", reason),
                ("priority", "low"),
                ("mode", "background"),
            ];
            assert_eq!(
                sample(&m, "gearhouse_jobs_refused_total", &labels),
                Some(0),
                "{reason}"
            );
        }
        let retried = [
            ("function", "resize"),
            ("priority", "high"),
            ("mode", "foreground"),
        ];
        assert_eq!(
            sample(&m, "gearhouse_jobs_retried_total", &retried),
            Some(0)
        );
        m.refused(&f.label, RefusalReason::QueueFull, Priority::Low, true);
        assert_eq!(
            sample(&m, "gearhouse_jobs_refused_total", &refused),
            Some(1)
        );
    }
}
