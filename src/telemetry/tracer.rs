//! [`JobTracer`]: the engine's [`JobObserver`], called with the engine lock held. Each call
//! appends one small event (what happened, to which job, when) to a bounded outbox and returns;
//! it neither looks anything up nor logs nor allocates for short strings (kept inline).
//!
//! Every job's events are recorded, whatever the sampler will decide: tail sampling needs to see
//! the whole job before it can tell a failed or slow job from an ordinary one, and that decision
//! is made on the export thread ([`super::export`]), off the job path. The trace id is a keyed
//! hash of the job's sequence number, so it needs no storage and is known wherever the job is.

use std::collections::hash_map::RandomState;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::{JobEvent, JobObserver, JobOutcome, PeerInfo};
use crate::metrics::Metrics;
use crate::protocol::Priority;

use super::export::ExportLoop;
use super::sampling::TailSampler;
use super::settings::TraceSettings;
use super::spans::{trace_hex, trace_id};
use super::transport::JobSender;
use super::{TelemetryError, TraceMetrics};

/// A short string kept inline (function names and client ids usually are), so recording a
/// job neither allocates nor touches shared reference counts for them.
#[derive(Debug, Clone)]
pub(crate) enum Tiny {
    Inline(u8, [u8; 30]),
    Heap(Box<str>),
}

impl Tiny {
    pub(crate) fn new(b: &[u8]) -> Tiny {
        match std::str::from_utf8(b) {
            Ok(_) if b.len() <= 30 => {
                let mut buf = [0u8; 30];
                buf[..b.len()].copy_from_slice(b);
                Tiny::Inline(b.len() as u8, buf)
            }
            _ => Tiny::Heap(String::from_utf8_lossy(b).into()),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Only valid UTF-8 is stored inline.
            Tiny::Inline(n, b) => std::str::from_utf8(&b[..*n as usize]).unwrap_or(""),
            Tiny::Heap(s) => s,
        }
    }
}

/// A connection as recorded in a trace.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    /// SET_CLIENT_ID, or `-` when none was set.
    pub(crate) id: Tiny,
}

impl Peer {
    fn of(p: &PeerInfo<'_>) -> Peer {
        Peer {
            addr: p.peer,
            id: Tiny::new(p.client_id),
        }
    }
}

/// What happened to a job, as the engine reported it; the export thread assembles traces from
/// these, so the engine's lock is held only for an append.
#[derive(Debug)]
pub(crate) enum Event {
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
pub(crate) struct Outbox {
    pub(crate) events: Vec<Event>,
    /// Events were lost (the hard limit was reached): traces in progress are incomplete.
    pub(crate) gap: bool,
    /// Callers of [`JobTracer::flush`] waiting for everything before them to be exported.
    pub(crate) flush: Vec<mpsc::SyncSender<()>>,
    pub(crate) stop: bool,
}

#[derive(Default)]
pub(crate) struct Handoff {
    pub(crate) outbox: Mutex<Outbox>,
    pub(crate) wake: Condvar,
}

impl Handoff {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Follows jobs and exports one trace per kept job (see the module documentation).
pub struct JobTracer {
    /// Trace ids are a keyed hash of the job's sequence number: known wherever the job is,
    /// without storing them.
    id_keys: RandomState,
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
        let sampler = TailSampler::new(settings.sampling, settings.slow, &metrics.registry);
        // The exporter is built before the server starts: bad TLS files stop it here.
        let sender = JobSender::new(&settings)?;
        let export = ExportLoop::new(
            &settings,
            node_id,
            handoff.clone(),
            sender,
            sampler,
            id_keys.clone(),
            tm.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("gearhouse-otlp".into())
            .spawn(move || export.run())?;
        tracing::info!(
            endpoint = %settings.endpoint,
            protocol = ?settings.protocol,
            gzip = settings.gzip,
            service_name = %settings.service_name,
            sampling = ?settings.sampling,
            slow_ms = settings.slow.as_millis() as u64,
            "exporting job traces over OTLP"
        );
        Ok(Arc::new(JobTracer {
            id_keys,
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

    /// The trace id (32 hex digits) job `seq` has if its trace is kept.
    pub fn trace_id_of(&self, seq: u64) -> String {
        trace_hex(trace_id(&self.id_keys, seq))
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
    pub(crate) fn persist_started(&self, seq: u64) {
        self.push(Event::PersistStarted { seq, at: now_ns() }, false);
    }
}

impl JobObserver for JobTracer {
    fn submitted(&self, job: &JobEvent<'_>) {
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
        self.push(Event::Queued { seq, at: now_ns() }, false);
    }

    fn assigned(&self, seq: u64, attempt: u32, worker: &PeerInfo<'_>) {
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

    // No logging here: the engine lock is held. The export thread logs the requeue and the
    // drop with the job's trace and span ids.
    fn requeued(&self, seq: u64, reason: &str) {
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
