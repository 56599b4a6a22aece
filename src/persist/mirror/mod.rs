//! The [`Mirror`] the engine writes through: job records go to `replicas` memcached nodes
//! picked on the consistent-hash ring, in pipelined batches, and the engine hears about a job
//! only once every copy is acknowledged.
//!
//! Shape:
//! - `write`/`delete` run under the engine's lock: they pick nodes, note the job in the live
//!   window and hand ops to per-connection writer tasks through bounded channels (a full
//!   channel refuses the write; nothing here waits, and nothing here logs: what needs a log
//!   line is handed to a task).
//! - One writer task per memcached connection takes up to `max_batch` queued ops, sends them
//!   in one write headed by this connection's watermark key, reads the in-order replies and
//!   then reports confirmed jobs to the engine ([`Engine::persisted`]). A job's ops always use
//!   the same connection of a node (`seq % connections_per_node`), so its delete can never
//!   overtake its write.
//! - A failed node is marked down at once; its pending writes move to the next node on the
//!   ring, and its deletes are kept and replayed when it returns with its data.
//! - The prober watches every node (`stats`: pid and start time to notice a memcached that
//!   restarted empty, eviction settings and counters); the repair task rewrites copies that
//!   were lost so each live job has `replicas` again.
//!
//! Files: [`window`] (the live window), [`dispatch`] (write and delete dispatch, reroute,
//! finish), [`writer`] (the writer task), [`prober`] (node health), [`repairer`] (lost
//! copies), [`error`] (why a write failed), [`throttle`] (rate-limited warnings), [`status`]
//! (`/api/v1/status`). Outcomes are [`WriteError`] values inside the mirror and become text
//! only at the engine's seam ([`crate::engine::MirrorRefused`]).

mod dispatch;
mod error;
mod prober;
mod repairer;
mod status;
mod throttle;
mod window;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{Histogram, IntCounter};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::metrics::PersistMetrics;
use super::record::{self, Origin};
use super::ring::Ring;
use super::{lock, Settings};
use crate::config::OnFailure;
use crate::engine::{Engine, JobRecord, Mirror, MirrorRefused};
use crate::http::Health;
use throttle::Throttle;
use window::{Window, LIVE};

pub use error::{NodeFailure, Shortfall, WriteError};
pub(super) use prober::probe;

/// Most nodes a cluster may have (node sets are 16-bit masks; one bit is reserved).
pub const MAX_NODES: usize = 15;

/// A job write's outcome for the engine.
type Completion = (u64, Result<(), WriteError>);

/// Where a takeover copy's outcome goes (text: the takeover's own seam).
type TakeoverDone = oneshot::Sender<Result<(), WriteError>>;

/// Why a write was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    /// A submit waits for it: report to the engine.
    Submit,
    /// A submit with `on_failure = accept_in_memory`: always report success to the engine.
    BestEffort,
    /// Restoring the replica count of a live job: nobody waits.
    Repair,
    /// A takeover copy at start-up: the takeover waits on `done`.
    Takeover,
}

/// One job record being written to one or more nodes.
struct JobWrite {
    seq: u64,
    key: Bytes,
    value: Bytes,
    kind: WriteKind,
    /// Ops still in flight.
    remaining: AtomicU32,
    /// Nodes tried so far (a failed op moves to a node not in this set).
    tried: AtomicU32,
    /// Copies confirmed.
    copies: AtomicU32,
    /// The first failure (the one the client hears about).
    error: Mutex<Option<WriteError>>,
    /// Completion of a takeover copy.
    done_slot: Mutex<Option<TakeoverDone>>,
}

enum Op {
    Set { job: Arc<JobWrite>, queued: Instant },
    Delete { seq: u64, queued: Instant },
}

struct Node {
    /// `host:port`, shared with the errors that name it.
    addr: Arc<str>,
    up: AtomicBool,
    /// Why it is down (shown in refusals, logs and /api/v1/status).
    reason: Mutex<String>,
    down_since: Mutex<Option<Instant>>,
    /// `(pid, start time)` from `stats`: a change means memcached restarted empty.
    identity: Mutex<Option<(u64, u64)>>,
    conns: Vec<mpsc::Sender<Op>>,
    /// Bumped each time the node goes down: writers drop connections of an older generation.
    gen: AtomicU64,
    write_s: Histogram,
    delete_s: Histogram,
    write_errors: IntCounter,
    delete_errors: IntCounter,
    /// `gearhouse_memcached_write_failures_total` by [`NodeFailure`].
    failures: [IntCounter; NodeFailure::ALL.len()],
    /// WARN lines about refusals, by [`NodeFailure`].
    warnings: [Throttle; NodeFailure::ALL.len()],
    /// Deletes dropped because too many waited for this node (logged by the prober).
    dropped_deletes: AtomicU64,
    /// `gearhouse_memcached_deletes_dropped_total` of this node.
    deletes_dropped: IntCounter,
    /// Last probe figures for the status JSON.
    evictions: AtomicU64,
    can_evict: AtomicBool,
    items: AtomicU64,
    bytes: AtomicU64,
    limit_bytes: AtomicU64,
}

impl Node {
    /// A node not contacted yet, with its metric series created (at 0, so that `increase()`
    /// sees the first event and dashboards have a series on a healthy server).
    fn new(addr: &str, conns: Vec<mpsc::Sender<Op>>, metrics: &PersistMetrics) -> Node {
        metrics.init_node(addr);
        Node {
            addr: Arc::from(addr),
            up: AtomicBool::new(false),
            reason: Mutex::new("not contacted yet".into()),
            down_since: Mutex::new(Some(Instant::now())),
            identity: Mutex::new(None),
            conns,
            gen: AtomicU64::new(0),
            write_s: metrics.write_seconds.with_label_values(&[addr]),
            delete_s: metrics.delete_seconds.with_label_values(&[addr]),
            write_errors: metrics.errors.with_label_values(&[addr, "write"]),
            delete_errors: metrics.errors.with_label_values(&[addr, "delete"]),
            failures: NodeFailure::ALL
                .map(|f| metrics.write_failures.with_label_values(&[addr, f.label()])),
            warnings: NodeFailure::ALL.map(|_| Throttle::default()),
            dropped_deletes: AtomicU64::new(0),
            deletes_dropped: metrics.deletes_dropped.with_label_values(&[addr]),
            evictions: AtomicU64::new(0),
            can_evict: AtomicBool::new(false),
            items: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            limit_bytes: AtomicU64::new(0),
        }
    }
}

struct State {
    window: Window,
    /// Highest sequence number ever written (the high watermark).
    high: u64,
    /// Deletes that could not reach a node yet, replayed when it returns with its data (at
    /// most `persistence.max_pending_deletes` per node: see [`Inner::keep_delete`]).
    pending_deletes: Vec<Vec<u64>>,
}

pub(super) struct Inner {
    pub(super) s: Settings,
    ring: Ring,
    nodes: Vec<Node>,
    /// Read by every writer per batch, written twice (attach, detach).
    engine: RwLock<Option<Engine>>,
    /// The window and pending deletes: plain data changed under the engine's lock (dispatch)
    /// and once per batch by the writers, never held across an `.await`.
    state: Mutex<State>,
    /// Submit writes in flight (bounded by `max_pending_writes`).
    pending: AtomicUsize,
    pub(super) metrics: Arc<PersistMetrics>,
    /// Watermarks as last computed, read by writers for the head of each batch.
    low: AtomicU64,
    high: AtomicU64,
    receivers: Mutex<Vec<(usize, usize, mpsc::Receiver<Op>)>>,
    /// Jobs accepted in memory only at dispatch (no node up, `accept_in_memory`): the
    /// completion task counts, logs and reports them, outside the engine's lock.
    in_memory_tx: mpsc::UnboundedSender<u64>,
    in_memory_rx: Mutex<Option<mpsc::UnboundedReceiver<u64>>>,
    repair_wake: Notify,
    started: AtomicBool,
    not_durable_logged: AtomicU64,
    health: OnceLock<Arc<Health>>,
    /// Deletes held back by writers (see `writer::DELETE_DELAY`).
    deferred: AtomicUsize,
    /// Set at shutdown: writers send held-back deletes at once.
    flushing: AtomicBool,
    /// The zero of [`Inner::clock_ms`].
    epoch: Instant,
}

/// The memcached mirror (cheap to clone).
#[derive(Clone)]
pub struct MemcachedMirror {
    pub(super) inner: Arc<Inner>,
}

impl MemcachedMirror {
    pub fn new(s: Settings, metrics: Arc<PersistMetrics>) -> MemcachedMirror {
        let ring = Ring::new(&s.nodes);
        let per_conn = (s.max_pending_writes / (s.nodes.len() * s.connections_per_node)).max(1024);
        let mut receivers = Vec::new();
        let nodes = s
            .nodes
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let conns = (0..s.connections_per_node)
                    .map(|c| {
                        let (tx, rx) = mpsc::channel(per_conn);
                        receivers.push((i, c, rx));
                        tx
                    })
                    .collect();
                Node::new(addr, conns, &metrics)
            })
            .collect();
        let (in_memory_tx, in_memory_rx) = mpsc::unbounded_channel();
        let n = s.nodes.len();
        MemcachedMirror {
            inner: Arc::new(Inner {
                s,
                ring,
                nodes,
                engine: RwLock::new(None),
                state: Mutex::new(State {
                    window: Window::default(),
                    high: 0,
                    pending_deletes: vec![Vec::new(); n],
                }),
                pending: AtomicUsize::new(0),
                metrics,
                low: AtomicU64::new(1),
                high: AtomicU64::new(0),
                receivers: Mutex::new(receivers),
                in_memory_tx,
                in_memory_rx: Mutex::new(Some(in_memory_rx)),
                repair_wake: Notify::new(),
                started: AtomicBool::new(false),
                not_durable_logged: AtomicU64::new(0),
                health: OnceLock::new(),
                deferred: AtomicUsize::new(0),
                flushing: AtomicBool::new(false),
                epoch: Instant::now(),
            }),
        }
    }

    /// Gives the mirror the engine it reports to.
    pub fn attach(&self, engine: Engine) {
        self.inner.set_engine(Some(engine));
    }

    /// Breaks the engine ↔ mirror reference cycle at shutdown.
    pub fn detach(&self) {
        self.inner.set_engine(None);
    }

    /// Job writes waiting for memcached.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::SeqCst)
    }

    /// Marks node `i` up or down as recovery found it (before the writers start).
    pub(super) fn set_node_state(&self, i: usize, up: Result<(u64, u64), String>) {
        let inner = &self.inner;
        match up {
            Ok(identity) => {
                *lock(&inner.nodes[i].identity) = Some(identity);
                inner.mark_up(i);
            }
            Err(why) => inner.mark_down(i, &why),
        }
    }

    /// Puts recovered jobs in the live window: `may` = nodes that may hold a copy, `ok` =
    /// nodes where it was read back. Called before [`Engine::restore`], which may delete
    /// duplicates through the mirror.
    pub(super) fn note_recovered(&self, jobs: &[(u64, u16, u16)]) {
        let mut st = self.inner.state();
        for &(seq, may, ok) in jobs {
            let s = st.window.entry(seq);
            s.flags = LIVE;
            s.may |= may;
            s.ok |= ok;
        }
    }

    /// Sets the watermarks after recovery (`high` = highest sequence number seen anywhere).
    pub(super) fn set_watermarks(&self, high: u64) {
        let mut st = self.inner.state();
        st.high = st.high.max(high);
        if st.window.slots.is_empty() {
            st.window.base = st.high + 1;
        }
        st.window.trim();
        self.inner.publish_watermarks(&st);
    }

    /// The current `(low, high)` watermarks.
    pub(super) fn watermarks(&self) -> (u64, u64) {
        (
            self.inner.low.load(Ordering::SeqCst),
            self.inner.high.load(Ordering::SeqCst),
        )
    }

    /// Starts the writer, prober, repair and completion tasks. Call once, after recovery.
    pub fn start(&self, health: Arc<Health>, shutdown: CancellationToken) {
        let inner = &self.inner;
        if inner.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = inner.health.set(health.clone());
        inner.refresh_health();
        let receivers = std::mem::take(&mut *lock(&inner.receivers));
        for (node, conn, rx) in receivers {
            tokio::spawn(writer::writer(inner.clone(), node, conn, rx));
        }
        let in_memory = lock(&inner.in_memory_rx).take();
        if let Some(rx) = in_memory {
            tokio::spawn(report_in_memory(inner.clone(), rx));
        }
        tokio::spawn(prober::prober(inner.clone(), health, shutdown.clone()));
        tokio::spawn(repairer::repairer(inner.clone(), shutdown));
    }

    /// Waits until no write is in flight and held-back deletes are sent, at most `grace`.
    pub async fn flush(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        self.inner.flushing.store(true, Ordering::SeqCst);
        while (self.pending() > 0 || self.inner.deferred.load(Ordering::SeqCst) > 0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Writes a record taken over from another node under this node's keys, with `replicas`
    /// copies; resolves once all are confirmed (or one failed, with why).
    pub(super) fn write_takeover(
        &self,
        r: &JobRecord,
        origin: &Origin,
    ) -> oneshot::Receiver<Result<(), WriteError>> {
        let (tx, rx) = oneshot::channel();
        let inner = &self.inner;
        let value = record::encode(r, Some(origin));
        let refused = {
            let mut st = inner.state();
            inner
                .dispatch_write(&mut st, r.seq, value, WriteKind::Takeover, Some(tx))
                .err()
        };
        if let Some((why, Some(tx))) = refused {
            let _ = tx.send(Err(why));
        }
        rx
    }

    /// A JSON description of the nodes for /api/v1/status.
    pub fn status_json(&self) -> serde_json::Value {
        self.inner.status_json()
    }

    /// Nodes currently up.
    pub fn nodes_up(&self) -> usize {
        self.inner.up_count()
    }
}

/// Reports jobs accepted in memory only at dispatch: counted, logged (at most once a second)
/// and confirmed to the engine, all outside the engine's lock.
async fn report_in_memory(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<u64>) {
    while let Some(seq) = rx.recv().await {
        inner.pending.fetch_sub(1, Ordering::SeqCst);
        inner.metrics.not_durable.inc();
        inner.log_not_durable(None);
        if let Some(e) = inner.engine() {
            e.persisted(seq, Ok(()));
        }
    }
}

impl Inner {
    /// The window and pending deletes.
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The engine to report to (`None` before `attach` and after `detach`). Like [`lock`],
    /// a poisoned lock is recovered: it holds a plain handle.
    fn engine(&self) -> Option<Engine> {
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_engine(&self, engine: Option<Engine>) {
        *self.engine.write().unwrap_or_else(|p| p.into_inner()) = engine;
    }

    /// Milliseconds since the mirror was created (the clock of rate-limited warnings).
    fn clock_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_up(&self, i: usize) -> bool {
        self.nodes[i].up.load(Ordering::SeqCst)
    }

    fn up_count(&self) -> usize {
        (0..self.nodes.len()).filter(|&i| self.is_up(i)).count()
    }

    fn up_mask(&self) -> u16 {
        (0..self.nodes.len())
            .filter(|&i| self.is_up(i))
            .fold(0, |m, i| m | 1 << i)
    }

    fn publish_watermarks(&self, st: &State) {
        self.low.store(st.window.low(), Ordering::SeqCst);
        self.high.store(st.high, Ordering::SeqCst);
    }

    /// Tells /readyz whether writes can be made durable now (refuse mode only: with
    /// accept_in_memory the server keeps taking jobs).
    fn refresh_health(&self) {
        let Some(health) = self.health.get() else {
            return;
        };
        let up = self.up_count();
        if up < self.s.replicas && self.s.on_failure == OnFailure::Refuse {
            health.set_not_durable(Some(self.shortfall(up).to_string()));
        } else {
            health.set_not_durable(None);
        }
    }
}

impl Mirror for MemcachedMirror {
    fn write(&self, record: JobRecord) -> Result<(), MirrorRefused> {
        let inner = &self.inner;
        if inner.pending.load(Ordering::SeqCst) >= inner.s.max_pending_writes {
            return Err(WriteError::TooManyPending {
                limit: inner.s.max_pending_writes,
            }
            .into());
        }
        let kind = match inner.s.on_failure {
            OnFailure::AcceptInMemory => WriteKind::BestEffort,
            OnFailure::Refuse => WriteKind::Submit,
        };
        let value = record::encode(&record, None);
        let mut st = inner.state();
        inner
            .dispatch_write(&mut st, record.seq, value, kind, None)
            .map_err(|(why, _)| why.into())
    }

    fn delete(&self, seq: u64) {
        let inner = &self.inner;
        let mut st = inner.state();
        let nodes = match st.window.get_mut(seq) {
            Some(s) => {
                s.flags &= !LIVE;
                s.may
            }
            // Outside the window (a late confirmation of a job long gone): every node.
            None => (1u16 << inner.nodes.len()) - 1,
        };
        inner.dispatch_delete(&mut st, seq, nodes);
        st.window.trim();
        inner.publish_watermarks(&st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::metrics::ERROR_OPS;
    use crate::protocol::Priority;

    const NODES: [&str; 2] = ["10.0.0.1:11211", "10.0.0.2:11211"];

    /// A mirror of two nodes nobody contacted yet (no I/O: nothing is started).
    fn mirror() -> (MemcachedMirror, prometheus::Registry) {
        let cfg = crate::config::Config::default();
        let nodes: Vec<String> = NODES.iter().map(|s| s.to_string()).collect();
        let s = Settings::build(&cfg, &nodes).unwrap();
        let registry = prometheus::Registry::new();
        let m = MemcachedMirror::new(s, Arc::new(PersistMetrics::new(&registry)));
        (m, registry)
    }

    fn exposition(registry: &prometheus::Registry) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn every_node_series_exists_at_zero_before_anything_happens() {
        let (_m, registry) = mirror();
        let text = exposition(&registry);
        for node in NODES {
            let mut expected: Vec<String> = NodeFailure::ALL
                .iter()
                .map(|f| {
                    format!(
                        "gearhouse_memcached_write_failures_total{{node=\"{node}\",reason=\"{}\"}} 0",
                        f.label()
                    )
                })
                .collect();
            expected.extend(ERROR_OPS.iter().map(|op| {
                format!("gearhouse_memcached_errors_total{{node=\"{node}\",op=\"{op}\"}} 0")
            }));
            expected.push(format!("gearhouse_memcached_node_up{{node=\"{node}\"}} 0"));
            expected.push(format!(
                "gearhouse_memcached_evictions{{node=\"{node}\"}} 0"
            ));
            expected.push(format!(
                "gearhouse_memcached_write_seconds_count{{node=\"{node}\"}} 0"
            ));
            for series in expected {
                assert!(text.lines().any(|l| l == series), "no {series} in\n{text}");
            }
        }
    }

    #[test]
    fn a_write_without_enough_nodes_is_refused_with_what_to_do() {
        let (m, registry) = mirror();
        let refused = m
            .write(JobRecord {
                seq: 7,
                function: Bytes::from_static(b"f"),
                unique: Bytes::new(),
                data: Bytes::from_static(b"d"),
                priority: Priority::Normal,
                epoch: None,
                reducer: None,
                attempts: 0,
                handle: None,
            })
            .unwrap_err()
            .0;
        assert_eq!(
            refused,
            "cannot make the job durable: 2 copies needed (persistence.replicas) but only 0 of 2 memcached nodes are up; down: 10.0.0.1:11211 (not contacted yet), 10.0.0.2:11211 (not contacted yet); start them or lower persistence.replicas"
        );
        // Nothing was queued or counted against a node.
        assert_eq!(m.pending(), 0);
        assert!(m.inner.state().window.get(7).is_none());
        assert!(!exposition(&registry).lines().any(|l| l
            .starts_with("gearhouse_memcached_write_failures_total")
            && !l.ends_with(" 0")));
        let status = m.status_json();
        assert_eq!(status["on_failure"], "refuse");
        assert_eq!(status["nodes"][1]["reason"], "not contacted yet");
    }

    /// Deletes a node cannot take are kept for it, at most `persistence.max_pending_deletes`:
    /// past that the oldest half goes, counted, and the newest are kept.
    #[test]
    fn deletes_kept_for_an_unreachable_node_are_bounded() {
        let cfg = crate::config::Config::default();
        let nodes: Vec<String> = NODES.iter().map(|s| s.to_string()).collect();
        let mut s = Settings::build(&cfg, &nodes).unwrap();
        s.max_pending_deletes = 100;
        let registry = prometheus::Registry::new();
        let m = MemcachedMirror::new(s, Arc::new(PersistMetrics::new(&registry)));
        // Neither node was ever contacted: every delete is kept for both.
        for seq in 1..=1_000 {
            let mut st = m.inner.state();
            m.inner.dispatch_delete(&mut st, seq, 0b11);
        }
        let st = m.inner.state();
        for list in &st.pending_deletes {
            assert!(list.len() <= 100, "{} deletes kept", list.len());
            assert_eq!(list.last(), Some(&1_000), "the newest delete is kept");
            assert!(list.windows(2).all(|w| w[0] < w[1]), "in order");
        }
        let kept = st.pending_deletes[0].len() as u64;
        drop(st);
        let text = exposition(&registry);
        for node in NODES {
            let line = format!(
                "gearhouse_memcached_deletes_dropped_total{{node=\"{node}\"}} {}",
                1_000 - kept
            );
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }
}
