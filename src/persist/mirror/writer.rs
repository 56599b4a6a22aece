//! The writer task of one memcached connection. Each turn of its loop is five named steps:
//!
//! 1. [`Writer::collect`]: wait for ops, take what is queued (up to `max_batch`); deletes are
//!    held back up to [`DELETE_DELAY`] so that many travel together.
//! 2. [`Writer::due`]: decide what goes now: the sets, the held deletes once due, a watermark
//!    refresh.
//! 3. [`Writer::send`]: (re)connect if needed, write the batch in one pipeline headed by this
//!    connection's watermark key when it needs one, read the in-order replies into one
//!    [`Outcome`] per op.
//! 4. [`settle`]: apply the outcomes to the window and the jobs, under one lock per batch.
//! 5. [`Writer::report`]: tell the engine which jobs are durable or refused, outside every lock.
//!
//! A failed batch is counted and explained between steps 3 and 4 ([`Writer::count_failures`]),
//! also outside the lock; refusals that need an operator (out of memory, too large) are logged
//! at most once per node and reason per [`WARN_PERIOD`].
//!
//! The steady state allocates nothing per job: the op, outcome, reply, completion and
//! finished-index vectors and the request buffer live in the [`Writer`] and are reused; an
//! outcome that is `Ok` carries no data, and a whole-batch failure is stored once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::error::{NodeFailure, WriteError};
use super::window::{LIVE, PENDING};
use super::{Completion, Inner, Op, WriteKind};
use crate::engine::MirrorRefused;
use crate::persist::client::{self, Connection, Reply};
use crate::persist::{lock, record};

/// Deletes wait this long for company: a batch of deletes costs memcached one wake-up instead
/// of one per job. (A crash inside this window can run a just-finished job again.)
const DELETE_DELAY: Duration = Duration::from_millis(5);

/// Sequence numbers a watermark key covers beyond the highest written, so most batches need
/// no watermark write. (Handles after a restart skip at most this many numbers.)
const HIGH_RESERVE: u64 = 4096;

/// At most one WARN line per node and refusal reason in this period (the lines in between
/// are counted and reported with the next one, or by the prober).
pub(super) const WARN_PERIOD: Duration = Duration::from_secs(10);

/// What happened to one op of a batch.
enum Outcome {
    Ok,
    /// The node answered with an error for this item; the node is fine, the op stays failed.
    Refused(WriteError),
    /// The node failed (connection, timeout, down; for quiet deletes: any error). A set may
    /// move to another node; a delete is kept for the node's return. The reason is the
    /// batch's [`Writer::failure`].
    NodeFailed,
}

/// What step 2 decided goes out now.
struct Due {
    low: u64,
    high: u64,
    /// Advance the watermark key even if no set needs it (recovery then reads a short range).
    refresh: bool,
}

/// One writer task per connection of a node.
pub(super) async fn writer(
    inner: Arc<Inner>,
    node: usize,
    conn_idx: usize,
    mut rx: mpsc::Receiver<Op>,
) {
    let mut w = Writer::new(inner, node, conn_idx);
    while w.collect(&mut rx).await {
        let Some(due) = w.due() else {
            continue;
        };
        w.send(due).await;
        if w.batch.is_empty() {
            continue;
        }
        w.count_failures();
        settle(
            &w.inner,
            node,
            &w.batch,
            &w.outcomes,
            w.failure.as_ref(),
            &mut w.finished,
            &mut w.completions,
        );
        w.report();
    }
}

/// The state of one writer task, reused from batch to batch.
struct Writer {
    inner: Arc<Inner>,
    node: usize,
    addr: Arc<str>,
    meta_key: Bytes,
    timeout: Duration,
    max_batch: usize,
    /// Longest wait for ops, and the period of watermark refreshes.
    idle: Duration,
    conn: Option<Connection>,
    /// The node's generation the connection belongs to (see `Node::gen`).
    conn_gen: u64,
    /// The range this connection's watermark key covers on the node (empty: none written).
    covered: (u64, u64),
    last_refresh: Instant,
    incoming: Vec<Op>,
    /// The ops going out now: sets first, then deletes.
    batch: Vec<Op>,
    /// Deletes held back since `deferred_since`.
    deferred: Vec<Op>,
    deferred_since: Option<Instant>,
    buf: BytesMut,
    /// Replies to the batch's sets.
    replies: Vec<Reply>,
    /// One per op of `batch`.
    outcomes: Vec<Outcome>,
    /// Why the batch failed as a whole (the reason of every [`Outcome::NodeFailed`] set).
    failure: Option<WriteError>,
    /// Some op was not `Ok` (step 3 → the failure counting step).
    any_failed: bool,
    /// Indexes in `batch` of sets whose write finished on every node.
    finished: Vec<usize>,
    completions: Vec<Completion>,
}

impl Writer {
    fn new(inner: Arc<Inner>, node: usize, conn_idx: usize) -> Writer {
        let max_batch = inner.s.max_batch.max(1);
        Writer {
            addr: inner.nodes[node].addr.clone(),
            meta_key: record::meta_key(&inner.s.namespace, &inner.s.node_id, conn_idx),
            timeout: inner.s.write_timeout,
            max_batch,
            idle: inner.s.repair_interval.min(Duration::from_secs(1)),
            conn: None,
            conn_gen: 0,
            covered: (u64::MAX, 0),
            last_refresh: Instant::now(),
            incoming: Vec::with_capacity(max_batch),
            batch: Vec::with_capacity(max_batch),
            deferred: Vec::new(),
            deferred_since: None,
            buf: BytesMut::with_capacity(64 * 1024),
            replies: Vec::with_capacity(max_batch),
            outcomes: Vec::with_capacity(max_batch),
            failure: None,
            any_failed: false,
            finished: Vec::with_capacity(max_batch),
            completions: Vec::new(),
            inner,
            node,
        }
    }

    /// Step 1: waits for ops (at most until held deletes are due, or `idle`), takes what is
    /// queued and sorts it into sets (`batch`) and held deletes. False once every sender is
    /// gone (the mirror was dropped).
    async fn collect(&mut self, rx: &mut mpsc::Receiver<Op>) -> bool {
        self.incoming.clear();
        let wait = match self.deferred_since {
            Some(_) if self.inner.flushing.load(Ordering::SeqCst) => Duration::from_millis(1),
            Some(t) => (t + DELETE_DELAY).saturating_duration_since(Instant::now()),
            None => self.idle,
        };
        tokio::select! {
            n = rx.recv_many(&mut self.incoming, self.max_batch) => {
                if n == 0 {
                    return false;
                }
                if n < self.max_batch {
                    // Let other tasks add to this batch before it goes out.
                    tokio::task::yield_now().await;
                    while self.incoming.len() < self.max_batch {
                        match rx.try_recv() {
                            Ok(op) => self.incoming.push(op),
                            Err(_) => break,
                        }
                    }
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
        self.batch.clear();
        for op in self.incoming.drain(..) {
            match op {
                Op::Set { .. } => self.batch.push(op),
                Op::Delete { .. } => {
                    self.deferred_since.get_or_insert_with(Instant::now);
                    self.inner.deferred.fetch_add(1, Ordering::SeqCst);
                    self.deferred.push(op);
                }
            }
        }
        true
    }

    /// Step 2: whether anything goes out now; if so the due deletes join the batch after the
    /// sets (so every job's delete follows its write on this connection).
    fn due(&mut self) -> Option<Due> {
        let inner = &self.inner;
        let deletes_due = self.deferred.len() >= self.max_batch
            || self
                .deferred_since
                .is_some_and(|t| t.elapsed() >= DELETE_DELAY)
            || (!self.deferred.is_empty() && inner.flushing.load(Ordering::SeqCst));
        let (low, high) = (
            inner.low.load(Ordering::SeqCst),
            inner.high.load(Ordering::SeqCst),
        );
        // Advance the low watermark now and then, so recovery reads a short range.
        let refresh = self.covered.0 != u64::MAX
            && low > self.covered.0
            && self.last_refresh.elapsed() >= self.idle
            && inner.is_up(self.node);
        if self.batch.is_empty() && !deletes_due && !refresh {
            return None;
        }
        if !self.batch.is_empty() || deletes_due {
            inner
                .deferred
                .fetch_sub(self.deferred.len(), Ordering::SeqCst);
            self.batch.append(&mut self.deferred);
            self.deferred_since = None;
        }
        Some(Due { low, high, refresh })
    }

    /// Step 3: sends the batch and fills `outcomes` (one per op).
    async fn send(&mut self, due: Due) {
        self.outcomes.clear();
        self.failure = None;
        self.any_failed = false;
        let Some(mut c) = self.connection().await else {
            return;
        };
        // A batch that needs it starts with this connection's watermark key (decided after
        // connecting: a new connection covers nothing yet).
        let covered = self.covered;
        let needs_cover = self.batch.iter().any(|op| match op {
            Op::Set { job, .. } => job.seq < covered.0 || job.seq > covered.1,
            Op::Delete { .. } => false,
        });
        let meta =
            (needs_cover || due.refresh).then(|| (due.low, due.high.max(covered.1) + HIGH_RESERVE));
        // Sets first (each answered), then quiet deletes (answered only when they fail, or
        // NF) and `mn`. `collect` and `due` already put the deletes after the sets.
        let sets = self
            .batch
            .iter()
            .position(|op| matches!(op, Op::Delete { .. }))
            .unwrap_or(self.batch.len());
        let deletes = self.batch.len() - sets;
        self.encode(meta, deletes > 0);
        let skip = meta.is_some() as usize;
        let mut meta_reply = None;
        let mut delete_error: Option<Reply> = None;
        self.replies.clear();
        let replies = &mut self.replies;
        let r = c
            .exchange_then_noop(
                &self.buf,
                sets + skip,
                deletes > 0,
                self.timeout,
                |i, reply| {
                    if i < skip {
                        meta_reply = Some(reply);
                    } else if i < skip + sets {
                        replies.push(reply);
                    } else if !matches!(reply, Reply::NoOp | Reply::NotFound | Reply::Stored) {
                        delete_error.get_or_insert(reply);
                    }
                },
            )
            .await;
        if let Err(e) = r {
            // The connection is out of step: `c` is dropped.
            self.inner
                .metrics
                .errors
                .with_label_values(&[&*self.addr, "batch"])
                .inc();
            let why = WriteError::from_client(&self.addr, e);
            self.inner.mark_down(self.node, &why.to_string());
            self.fail_batch(why);
            return;
        }
        self.conn = Some(c);
        let meta_ok = meta.is_none() || meta_reply == Some(Reply::Stored);
        if let (Some(m), true) = (meta, meta_ok) {
            self.covered = m;
            self.last_refresh = Instant::now();
        }
        let mut failed = !meta_ok;
        for (op, reply) in self.batch[..sets].iter().zip(&self.replies) {
            let Op::Set { job, .. } = op else {
                continue;
            };
            let outcome = match reply {
                Reply::Stored if meta_ok => Outcome::Ok,
                // The watermark key was refused: the copy could not be found by a recovery.
                Reply::Stored => Outcome::Refused(WriteError::from_reply(
                    &self.addr,
                    meta_reply.as_ref().unwrap_or(&Reply::Miss),
                    job.value.len(),
                )),
                other => {
                    Outcome::Refused(WriteError::from_reply(&self.addr, other, job.value.len()))
                }
            };
            failed |= !matches!(outcome, Outcome::Ok);
            self.outcomes.push(outcome);
        }
        // A failed quiet delete does not say which: retry them all later.
        let deletes_ok = delete_error.is_none();
        self.any_failed = failed || !deletes_ok;
        self.outcomes.extend((0..deletes).map(|_| {
            if deletes_ok {
                Outcome::Ok
            } else {
                Outcome::NodeFailed
            }
        }));
    }

    /// The connection to use, (re)connected when the node's generation moved on; `None` when
    /// the node is down or unreachable (the batch is then failed).
    async fn connection(&mut self) -> Option<Connection> {
        let inner = self.inner.clone();
        let n = &inner.nodes[self.node];
        if !n.up.load(Ordering::SeqCst) {
            self.conn = None;
            let reason = lock(&n.reason).clone();
            self.fail_batch(WriteError::NodeDown {
                node: self.addr.clone(),
                reason,
            });
            return None;
        }
        let gen = n.gen.load(Ordering::SeqCst);
        if gen != self.conn_gen {
            self.conn = None;
        }
        if let Some(c) = self.conn.take() {
            return Some(c);
        }
        self.covered = (u64::MAX, 0);
        match Connection::connect(&self.addr, self.timeout).await {
            Ok(c) => {
                self.conn_gen = gen;
                Some(c)
            }
            Err(e) => {
                inner
                    .metrics
                    .errors
                    .with_label_values(&[&*self.addr, "connect"])
                    .inc();
                inner.mark_down(self.node, &e.to_string());
                self.fail_batch(WriteError::from_client(&self.addr, e));
                None
            }
        }
    }

    /// The request: the watermark key if `meta`, the sets, the quiet deletes, `mn`.
    fn encode(&mut self, meta: Option<(u64, u64)>, noop: bool) {
        let s = &self.inner.s;
        self.buf.clear();
        if let Some((lo, hi)) = meta {
            client::put_set(&mut self.buf, &self.meta_key, &record::encode_meta(lo, hi));
        }
        for op in &self.batch {
            match op {
                Op::Set { job, .. } => client::put_set(&mut self.buf, &job.key, &job.value),
                Op::Delete { seq, .. } => client::put_quiet_delete(
                    &mut self.buf,
                    &record::job_key(&s.namespace, &s.node_id, *seq),
                ),
            }
        }
        if noop {
            client::put_noop(&mut self.buf);
        }
    }

    /// Every op of the batch failed with the node.
    fn fail_batch(&mut self, why: WriteError) {
        self.outcomes
            .extend(self.batch.iter().map(|_| Outcome::NodeFailed));
        self.failure = Some(why);
        self.any_failed = true;
    }

    /// Counts the batch's failures per node and reason, and warns (rate-limited) about
    /// refusals an operator must fix. Runs outside every lock.
    fn count_failures(&self) {
        if !self.any_failed {
            return;
        }
        let n = &self.inner.nodes[self.node];
        let batch_reason = self.failure.as_ref().and_then(WriteError::node_failure);
        for (op, outcome) in self.batch.iter().zip(&self.outcomes) {
            match (op, outcome) {
                (_, Outcome::Ok) => {}
                (Op::Set { .. }, Outcome::Refused(e)) => {
                    n.write_errors.inc();
                    if let Some(f) = e.node_failure() {
                        n.failures[f as usize].inc();
                        self.warn(f, e);
                    }
                }
                (Op::Set { .. }, Outcome::NodeFailed) => {
                    n.write_errors.inc();
                    if let Some(f) = batch_reason {
                        n.failures[f as usize].inc();
                    }
                }
                (Op::Delete { .. }, _) => n.delete_errors.inc(),
            }
        }
    }

    /// A WARN line for a refusal, at most one per node and reason per [`WARN_PERIOD`].
    fn warn(&self, f: NodeFailure, e: &WriteError) {
        if !f.needs_operator() {
            return;
        }
        let now = self.inner.clock_ms();
        let throttle = &self.inner.nodes[self.node].warnings[f as usize];
        match throttle.allow(now, WARN_PERIOD.as_millis() as u64) {
            None => {}
            Some(0) => tracing::warn!(node = %self.addr, reason = f.label(), "{e}"),
            Some(suppressed) => tracing::warn!(
                node = %self.addr,
                reason = f.label(),
                suppressed,
                "{e} ({suppressed} more like it in the last {} s were not logged)",
                WARN_PERIOD.as_secs()
            ),
        }
    }

    /// Step 5: tells the engine about the jobs whose writes finished.
    fn report(&mut self) {
        if self.completions.is_empty() {
            return;
        }
        if let Some(e) = self.inner.engine() {
            for (seq, r) in self.completions.drain(..) {
                e.persisted(seq, r.map_err(MirrorRefused::from));
            }
        }
        self.completions.clear();
    }
}

/// Step 4: applies a batch's outcomes to the window and the jobs (one lock for the whole
/// batch), then finishes the writes that every node answered.
fn settle(
    inner: &Inner,
    node: usize,
    batch: &[Op],
    outcomes: &[Outcome],
    failure: Option<&WriteError>,
    finished: &mut Vec<usize>,
    completions: &mut Vec<Completion>,
) {
    let now = Instant::now();
    let n = &inner.nodes[node];
    finished.clear();
    let mut st = inner.state();
    for (i, (op, outcome)) in batch.iter().zip(outcomes).enumerate() {
        match op {
            Op::Set { job, queued } => {
                match outcome {
                    Outcome::Ok => {
                        n.write_s
                            .observe(now.saturating_duration_since(*queued).as_secs_f64());
                        job.copies.fetch_add(1, Ordering::SeqCst);
                        if let Some(s) = st.window.get_mut(job.seq) {
                            if s.flags & LIVE != 0 {
                                s.ok |= 1 << node;
                            }
                        }
                    }
                    Outcome::Refused(why) => {
                        lock(&job.error).get_or_insert_with(|| why.clone());
                    }
                    Outcome::NodeFailed => {
                        if inner.reroute(&mut st, job, node) {
                            continue;
                        }
                        lock(&job.error).get_or_insert_with(|| {
                            let cause = failure.cloned().unwrap_or_else(|| WriteError::NodeDown {
                                node: n.addr.clone(),
                                reason: String::new(),
                            });
                            if job.kind == WriteKind::Submit {
                                WriteError::NoSpareNode {
                                    cause: Box::new(cause),
                                    shortfall: inner.shortfall(inner.up_count()),
                                }
                            } else {
                                cause
                            }
                        });
                    }
                }
                if job.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                    if let Some(s) = st.window.get_mut(job.seq) {
                        s.flags &= !PENDING;
                    }
                    finished.push(i);
                }
            }
            Op::Delete { seq, queued } => match outcome {
                Outcome::Ok => n
                    .delete_s
                    .observe(now.saturating_duration_since(*queued).as_secs_f64()),
                _ => inner.keep_delete(&mut st, node, *seq),
            },
        }
    }
    drop(st);
    for &i in finished.iter() {
        if let Op::Set { job, .. } = &batch[i] {
            inner.finish(job, completions);
        }
    }
    inner
        .metrics
        .pending_writes
        .set(inner.pending.load(Ordering::SeqCst) as i64);
}
