//! The [`Mirror`] the engine writes through: job records go to `replicas` memcached nodes
//! picked on the consistent-hash ring, in pipelined batches, and the engine hears about a job
//! only once every copy is acknowledged.
//!
//! Shape:
//! - `write`/`delete` run under the engine's lock: they pick nodes, note the job in the live
//!   window and hand ops to per-connection writer tasks through bounded channels (a full
//!   channel refuses the write; nothing here waits).
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
//! The live window holds 6 bytes per sequence number from the low watermark to the highest
//! written: whether the job is live, which nodes may hold a copy (deletes go to all of them),
//! which confirmed one.

mod dispatch;
mod prober;
mod repairer;
mod status;
mod window;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{Histogram, IntCounter};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::metrics::PersistMetrics;
use super::record::{self, Origin};
use super::ring::Ring;
use super::Settings;
use crate::engine::{Engine, JobRecord, Mirror, MirrorRefused};
use crate::http::Health;
use window::{Window, LIVE};

pub(super) use prober::probe;

/// Most nodes a cluster may have (node sets are 16-bit masks; one bit is reserved).
pub const MAX_NODES: usize = 15;

/// A job write's outcome for the engine: `(seq, Ok | Err(reason))`.
type Completion = (u64, Result<(), String>);

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
    error: Mutex<Option<String>>,
    /// Completion of a takeover copy.
    done_slot: Mutex<Option<tokio::sync::oneshot::Sender<Result<(), String>>>>,
}

enum Op {
    Set { job: Arc<JobWrite>, queued: Instant },
    Delete { seq: u64, queued: Instant },
}

struct Node {
    addr: String,
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
    /// Last probe figures for the status JSON.
    evictions: AtomicU64,
    can_evict: AtomicBool,
    items: AtomicU64,
    bytes: AtomicU64,
    limit_bytes: AtomicU64,
}

struct State {
    window: Window,
    /// Highest sequence number ever written (the high watermark).
    high: u64,
    /// Deletes that could not reach a node yet, replayed when it returns with its data.
    pending_deletes: Vec<Vec<u64>>,
}

/// Most deletes kept per unreachable node; past it the oldest are dropped (and logged): those
/// records may come back at the next recovery, which at-least-once allows.
const MAX_PENDING_DELETES: usize = 2_000_000;

pub(super) struct Inner {
    pub(super) s: Settings,
    ring: Ring,
    nodes: Vec<Node>,
    engine: RwLock<Option<Engine>>,
    state: Mutex<State>,
    /// Submit writes in flight (bounded by `max_pending_writes`).
    pending: AtomicUsize,
    pub(super) metrics: Arc<PersistMetrics>,
    /// Watermarks as last computed, read by writers for the head of each batch.
    low: AtomicU64,
    high: AtomicU64,
    receivers: Mutex<Vec<(usize, usize, mpsc::Receiver<Op>)>>,
    immediate_tx: mpsc::UnboundedSender<Completion>,
    immediate_rx: Mutex<Option<mpsc::UnboundedReceiver<Completion>>>,
    repair_wake: Notify,
    started: AtomicBool,
    not_durable_logged: AtomicU64,
    health: std::sync::OnceLock<Arc<Health>>,
    /// Deletes held back by writers (see `DELETE_DELAY`).
    deferred: AtomicUsize,
    /// Set at shutdown: writers send held-back deletes at once.
    flushing: AtomicBool,
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
                metrics.node_up.with_label_values(&[addr]).set(0);
                Node {
                    addr: addr.clone(),
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
                    evictions: AtomicU64::new(0),
                    can_evict: AtomicBool::new(false),
                    items: AtomicU64::new(0),
                    bytes: AtomicU64::new(0),
                    limit_bytes: AtomicU64::new(0),
                }
            })
            .collect();
        let (immediate_tx, immediate_rx) = mpsc::unbounded_channel();
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
                immediate_tx,
                immediate_rx: Mutex::new(Some(immediate_rx)),
                repair_wake: Notify::new(),
                started: AtomicBool::new(false),
                not_durable_logged: AtomicU64::new(0),
                health: std::sync::OnceLock::new(),
                deferred: AtomicUsize::new(0),
                flushing: AtomicBool::new(false),
            }),
        }
    }

    /// Gives the mirror the engine it reports to.
    pub fn attach(&self, engine: Engine) {
        *self.inner.engine.write().unwrap_or_else(|p| p.into_inner()) = Some(engine);
    }

    /// Breaks the engine ↔ mirror reference cycle at shutdown.
    pub fn detach(&self) {
        *self.inner.engine.write().unwrap_or_else(|p| p.into_inner()) = None;
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
                *inner.nodes[i].identity.lock().unwrap() = Some(identity);
                inner.mark_up(i);
            }
            Err(why) => inner.mark_down(i, &why),
        }
    }

    /// Puts recovered jobs in the live window: `may` = nodes that may hold a copy, `ok` =
    /// nodes where it was read back. Called before [`Engine::restore`], which may delete
    /// duplicates through the mirror.
    pub(super) fn note_recovered(&self, jobs: &[(u64, u16, u16)]) {
        let mut st = self.inner.lock();
        for &(seq, may, ok) in jobs {
            let s = st.window.entry(seq);
            s.flags = LIVE;
            s.may |= may;
            s.ok |= ok;
        }
    }

    /// Sets the watermarks after recovery (`high` = highest sequence number seen anywhere).
    pub(super) fn set_watermarks(&self, high: u64) {
        let mut st = self.inner.lock();
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
        for (node, conn, rx) in inner.receivers.lock().unwrap().drain(..) {
            tokio::spawn(writer::writer(inner.clone(), node, conn, rx));
        }
        if let Some(mut rx) = inner.immediate_rx.lock().unwrap().take() {
            let inner = inner.clone();
            tokio::spawn(async move {
                while let Some((seq, r)) = rx.recv().await {
                    inner.pending.fetch_sub(1, Ordering::SeqCst);
                    if let Some(e) = inner.engine() {
                        e.persisted(seq, r.map_err(MirrorRefused));
                    }
                }
            });
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
    /// copies; resolves once all are confirmed (or one failed).
    pub(super) fn write_takeover(
        &self,
        r: &JobRecord,
        origin: &Origin,
    ) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = &self.inner;
        let mut st = inner.lock();
        let value = record::encode(r, Some(origin));
        match inner.dispatch_write(&mut st, r.seq, value, WriteKind::Takeover, Some(tx)) {
            Ok(()) => {}
            Err((why, tx)) => {
                if let Some(tx) = tx {
                    let _ = tx.send(Err(why));
                }
            }
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

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn engine(&self) -> Option<Engine> {
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        if up < self.s.replicas && !self.s.accept_in_memory {
            health.set_not_durable(Some(self.not_enough_nodes(up)));
        } else {
            health.set_not_durable(None);
        }
    }
}

impl Mirror for MemcachedMirror {
    fn write(&self, record: JobRecord) -> Result<(), MirrorRefused> {
        let inner = &self.inner;
        if inner.pending.load(Ordering::SeqCst) >= inner.s.max_pending_writes {
            return Err(MirrorRefused(format!(
                "{} job writes are already waiting for memcached (persistence.max_pending_writes); memcached is slower than the submit rate: retry later or add memcached capacity",
                inner.s.max_pending_writes
            )));
        }
        let kind = if inner.s.accept_in_memory {
            WriteKind::BestEffort
        } else {
            WriteKind::Submit
        };
        let value = record::encode(&record, None);
        let mut st = inner.lock();
        inner
            .dispatch_write(&mut st, record.seq, value, kind, None)
            .map_err(|(why, _)| MirrorRefused(why))
    }

    fn delete(&self, seq: u64) {
        let inner = &self.inner;
        let mut st = inner.lock();
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
