//! The export thread: assembles each job's record from the events [`super::JobTracer`]
//! appended, asks the tail sampler whether to keep it when the job ends, turns kept jobs into
//! spans ([`super::spans`]) and sends them in batches ([`super::transport`]).
//!
//! It also writes the log lines about jobs that the engine's observer must not write under the
//! engine lock: a requeued attempt (with the attempt's span id) and a dropped or refused job
//! (with the root's span id), both with the job's trace id. Such jobs are always kept by the
//! tail sampler, so the ids in the log are ids of an exported trace.

use std::collections::hash_map::RandomState;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use crate::engine::JobOutcome;
use crate::protocol::Priority;

use super::sampling::{Finished, TailSampler};
use super::settings::TraceSettings;
use super::spans::{self, span_hex, trace_hex, trace_id, Batch};
use super::tracer::{Event, Handoff, Peer, Tiny};
use super::transport::JobSender;
use super::TraceMetrics;

/// A closed wait or attempt of a job.
#[derive(Debug)]
pub(crate) enum Segment {
    Queue {
        start: u64,
        end: u64,
    },
    Attempt {
        n: u32,
        span_id: u64,
        start: u64,
        end: u64,
        worker: Peer,
        /// Why the attempt ended without a result (the job went back to the queue).
        requeued: Option<Box<str>>,
    },
}

/// The closed waits and attempts of a job (allocated when the first wait ends).
#[derive(Debug, Default)]
pub(crate) struct Segments(Vec<Segment>);

impl Segments {
    fn push(&mut self, s: Segment) {
        self.0.push(s)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Segment> {
        self.0.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// The attempt in progress.
#[derive(Debug)]
pub(crate) struct Running {
    n: u32,
    span_id: u64,
    start: u64,
    worker: Peer,
}

/// What the export thread knows about one job while it lives.
#[derive(Debug)]
pub(crate) struct JobTrace {
    pub(crate) submitted: u64,
    pub(crate) root_span: u64,
    pub(crate) function: Tiny,
    pub(crate) unique: Option<Box<str>>,
    pub(crate) priority: Priority,
    pub(crate) background: bool,
    pub(crate) client: Option<Peer>,
    /// When its durable write was handed to the mirror, until the job became available.
    persist_since: Option<u64>,
    /// The durable write the job waited for: (start, end).
    pub(crate) persisted: Option<(u64, u64)>,
    /// When it entered the queue it is in now.
    queued_since: Option<u64>,
    /// Boxed, as only running jobs have one.
    running: Option<Box<Running>>,
    pub(crate) done: Segments,
}

impl JobTrace {
    fn close_queue(&mut self, now: u64) {
        if let Some(start) = self.queued_since.take() {
            self.done.push(Segment::Queue { start, end: now });
        }
    }

    fn close_attempt(&mut self, now: u64, requeued: Option<Box<str>>) {
        if let Some(r) = self.running.take() {
            let Running {
                n,
                span_id,
                start,
                worker,
            } = *r;
            self.done.push(Segment::Attempt {
                n,
                span_id,
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

    pub(crate) fn span_count(&self) -> usize {
        1 + self.done.len() + self.persisted.is_some() as usize
    }

    pub(crate) fn attempts(&self) -> usize {
        self.done
            .iter()
            .filter(|s| matches!(s, Segment::Attempt { .. }))
            .count()
    }

    /// What the tail sampler looks at.
    fn summary(&self, outcome: JobOutcome) -> Finished {
        let (mut wait, mut run) = (0, 0);
        for s in self.done.iter() {
            match s {
                Segment::Queue { start, end } => wait = wait.max(end.saturating_sub(*start)),
                Segment::Attempt { start, end, .. } => run = run.max(end.saturating_sub(*start)),
            }
        }
        Finished {
            outcome,
            attempts: self.attempts(),
            longest_wait_ns: wait,
            longest_run_ns: run,
        }
    }
}

/// Assembles traces from events and exports them in batches, on its own thread.
pub(crate) struct ExportLoop {
    handoff: Arc<Handoff>,
    sender: JobSender,
    sampler: TailSampler,
    id_keys: RandomState,
    /// Jobs still queued or running.
    jobs: HashMap<u64, JobTrace>,
    max_in_flight: usize,
    metrics: TraceMetrics,
    batch: Batch,
    max_batch: usize,
    delay: Duration,
    /// A durable write reported before its job: (seq, when).
    early_write: Option<(u64, u64)>,
    last_error_log: Option<Instant>,
}

impl ExportLoop {
    pub(crate) fn new(
        s: &TraceSettings,
        node_id: &str,
        handoff: Arc<Handoff>,
        sender: JobSender,
        sampler: TailSampler,
        id_keys: RandomState,
        metrics: TraceMetrics,
    ) -> ExportLoop {
        ExportLoop {
            handoff,
            sender,
            sampler,
            id_keys,
            jobs: HashMap::new(),
            max_in_flight: s.max_jobs_in_flight,
            metrics,
            batch: Batch::new(spans::resource(&s.resource(node_id)), node_id),
            max_batch: s.max_export_batch,
            delay: s.schedule_delay,
            early_write: None,
            last_error_log: None,
        }
    }

    pub(crate) fn run(mut self) {
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
                let early = self
                    .early_write
                    .take()
                    .filter(|(s, _)| *s == seq)
                    .map(|(_, t)| t);
                let root_span = self.batch.span_id();
                self.jobs.insert(
                    seq,
                    JobTrace {
                        submitted: early.unwrap_or(at),
                        root_span,
                        function,
                        unique,
                        priority,
                        background,
                        client,
                        persist_since: early,
                        persisted: None,
                        queued_since: None,
                        running: None,
                        done: Segments::default(),
                    },
                );
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
                let span_id = self.batch.span_id();
                if let Some(t) = self.jobs.get_mut(&seq) {
                    t.close_queue(at);
                    t.running = Some(Box::new(Running {
                        n: attempt,
                        span_id,
                        start: at,
                        worker,
                    }));
                }
            }
            Event::Requeued { seq, at, reason } => {
                if let Some(t) = self.jobs.get_mut(&seq) {
                    if let Some(r) = &t.running {
                        tracing::info!(
                            trace_id = %trace_hex(trace_id(&self.id_keys, seq)),
                            span_id = %span_hex(r.span_id),
                            handle = %self.batch.handle(seq),
                            reason = &*reason,
                            "job attempt ended without a result"
                        );
                    }
                    t.close_attempt(at, Some(reason));
                }
            }
            Event::Finished { seq, at, outcome } => {
                if let Some(mut t) = self.jobs.remove(&seq) {
                    t.close_queue(at);
                    t.close_attempt(at, None);
                    t.close_persist(at);
                    let trace = trace_id(&self.id_keys, seq);
                    if matches!(outcome, JobOutcome::Dropped | JobOutcome::Refused) {
                        tracing::warn!(
                            trace_id = %trace_hex(trace),
                            span_id = %span_hex(t.root_span),
                            handle = %self.batch.handle(seq),
                            outcome = outcome.as_str(),
                            "job ended without running to completion"
                        );
                    }
                    if self.sampler.keep(trace, &t.summary(outcome)) {
                        self.batch.push_job(trace, seq, &t, outcome, at);
                        if self.batch.len() >= self.max_batch {
                            self.export();
                        }
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
        let req = self.batch.take_request();
        let started = Instant::now();
        let result = self.sender.send(req);
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
}
