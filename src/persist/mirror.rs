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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prometheus::{Histogram, IntCounter};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::client::{self, ClientError, Connection, Reply};
use super::metrics::PersistMetrics;
use super::record::{self, Origin};
use super::ring::{self, Ring};
use super::Settings;
use crate::engine::{Engine, JobRecord, Mirror, MirrorRefused};
use crate::http::Health;

/// Most nodes a cluster may have (node sets are 16-bit masks; one bit is reserved).
pub const MAX_NODES: usize = 15;

const LIVE: u8 = 1;
/// A write (submit or repair) for this job is in flight.
const PENDING: u8 = 2;

#[derive(Clone, Copy, Default)]
struct Slot {
    flags: u8,
    /// Nodes that may hold a copy (a write was sent there).
    may: u16,
    /// Nodes that confirmed a copy.
    ok: u16,
}

/// Live jobs by sequence number, from `base` (the low watermark) on.
#[derive(Default)]
struct Window {
    base: u64,
    slots: VecDeque<Slot>,
}

impl Window {
    fn get(&self, seq: u64) -> Option<&Slot> {
        seq.checked_sub(self.base)
            .and_then(|i| self.slots.get(i as usize))
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        seq.checked_sub(self.base)
            .and_then(|i| self.slots.get_mut(i as usize))
    }

    /// The slot of `seq`, growing the window either way.
    fn entry(&mut self, seq: u64) -> &mut Slot {
        if self.slots.is_empty() {
            self.base = seq;
        }
        while seq < self.base {
            self.slots.push_front(Slot::default());
            self.base -= 1;
        }
        let i = (seq - self.base) as usize;
        if i >= self.slots.len() {
            self.slots.resize(i + 1, Slot::default());
        }
        &mut self.slots[i]
    }

    /// Drops finished jobs from the front: the low watermark moves up.
    fn trim(&mut self) {
        while let Some(s) = self.slots.front() {
            if s.flags & LIVE != 0 {
                break;
            }
            self.slots.pop_front();
            self.base += 1;
        }
        if self.slots.capacity() > 4096 && self.slots.capacity() > 4 * self.slots.len() {
            self.slots.shrink_to(self.slots.len() * 2);
        }
    }

    fn low(&self) -> u64 {
        self.base
    }
}

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
            tokio::spawn(writer(inner.clone(), node, conn, rx));
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
        tokio::spawn(prober(inner.clone(), health, shutdown.clone()));
        tokio::spawn(repairer(inner.clone(), shutdown));
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

    fn mark_down(&self, i: usize, why: &str) {
        let n = &self.nodes[i];
        *n.reason.lock().unwrap() = why.to_string();
        n.gen.fetch_add(1, Ordering::SeqCst);
        if n.up.swap(false, Ordering::SeqCst) {
            *n.down_since.lock().unwrap() = Some(Instant::now());
            self.metrics.node_up.with_label_values(&[&n.addr]).set(0);
            tracing::error!(node = %n.addr, "memcached node is down: {why}");
            self.refresh_health();
        }
    }

    fn mark_up(&self, i: usize) {
        let n = &self.nodes[i];
        if !n.up.swap(true, Ordering::SeqCst) {
            *n.down_since.lock().unwrap() = None;
            n.reason.lock().unwrap().clear();
            self.metrics.node_up.with_label_values(&[&n.addr]).set(1);
            tracing::info!(node = %n.addr, "memcached node is up");
            self.repair_wake.notify_one();
            self.refresh_health();
        }
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

    /// Why a job cannot get `replicas` copies right now.
    fn not_enough_nodes(&self, have: usize) -> String {
        let down: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.up.load(Ordering::SeqCst))
            .map(|n| format!("{} ({})", n.addr, n.reason.lock().unwrap()))
            .collect();
        format!(
            "cannot make the job durable: {} copies needed (persistence.replicas) but only {have} of {} memcached nodes are up; down: {}; start them or lower persistence.replicas",
            self.s.replicas,
            self.nodes.len(),
            down.join(", ")
        )
    }

    /// Picks nodes and queues the ops of one record write. On refusal returns the reason (and
    /// the completion sender back).
    #[allow(clippy::type_complexity)]
    fn dispatch_write(
        &self,
        st: &mut State,
        seq: u64,
        value: Bytes,
        kind: WriteKind,
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) -> Result<
        (),
        (
            String,
            Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
        ),
    > {
        let key = record::job_key(&self.s.namespace, &self.s.node_id, seq);
        let h = ring::hash(&key);
        let targets = self.ring.pick(h, self.s.replicas, |n| self.is_up(n));
        let best_effort = kind == WriteKind::BestEffort;
        if targets.len() < self.s.replicas && !best_effort {
            return Err((self.not_enough_nodes(targets.len()), done));
        }
        let conn = (seq % self.s.connections_per_node as u64) as usize;
        // Reserve room on every target first, so a job is never half-queued.
        let mut permits = Vec::with_capacity(targets.len());
        for &t in &targets {
            match self.nodes[t].conns[conn].try_reserve() {
                Ok(p) => permits.push(p),
                Err(_) => {
                    if best_effort {
                        continue;
                    }
                    return Err((
                        format!(
                            "memcached {} is not keeping up: its write queue is full (persistence.max_pending_writes); retry later or add memcached capacity",
                            self.nodes[t].addr
                        ),
                        done,
                    ));
                }
            }
        }
        let mask = targets.iter().fold(0u32, |m, &t| m | 1 << t);
        let job = Arc::new(JobWrite {
            seq,
            key,
            value,
            kind,
            remaining: AtomicU32::new(permits.len() as u32),
            tried: AtomicU32::new(mask),
            copies: AtomicU32::new(0),
            error: Mutex::new(None),
            done_slot: Mutex::new(done),
        });
        let slot = st.window.entry(seq);
        slot.flags |= LIVE | PENDING;
        slot.may |= mask as u16;
        if permits.is_empty() {
            slot.flags &= !PENDING;
        }
        if seq > st.high {
            st.high = seq;
        }
        self.publish_watermarks(st);
        if kind != WriteKind::Repair {
            self.pending.fetch_add(1, Ordering::SeqCst);
        }
        if permits.is_empty() {
            // Best effort with no node reachable: accepted in memory only.
            self.metrics.not_durable.inc();
            self.log_not_durable(&self.not_enough_nodes(0));
            let _ = self.immediate_tx.send((seq, Ok(())));
            return Ok(());
        }
        let now = Instant::now();
        for p in permits {
            p.send(Op::Set {
                job: job.clone(),
                queued: now,
            });
        }
        Ok(())
    }

    fn log_not_durable(&self, why: &str) {
        // At most one line a second.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.not_durable_logged.swap(secs, Ordering::Relaxed) != secs {
            tracing::error!("accepting a background job in memory only (persistence.on_failure = accept_in_memory): {why}");
        }
    }

    /// Sends deletes of `seq` to every node in `nodes`; unreachable ones keep it for later.
    fn dispatch_delete(&self, st: &mut State, seq: u64, nodes: u16) {
        let conn = (seq % self.s.connections_per_node as u64) as usize;
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            if nodes & (1 << i) == 0 {
                continue;
            }
            let sent = self.is_up(i)
                && self.nodes[i].conns[conn]
                    .try_send(Op::Delete { seq, queued: now })
                    .is_ok();
            if !sent {
                let list = &mut st.pending_deletes[i];
                if list.len() >= MAX_PENDING_DELETES {
                    list.drain(..list.len() / 2);
                    tracing::error!(node = %self.nodes[i].addr,
                        "too many deletes waiting for this memcached node; finished jobs kept there may run again after a restart");
                }
                list.push(seq);
            }
        }
    }

    /// A job write finished on every node it was sent to.
    fn finish(&self, job: &JobWrite, completions: &mut Vec<Completion>) {
        let error = job.error.lock().unwrap().take();
        let copies = job.copies.load(Ordering::SeqCst) as usize;
        match job.kind {
            WriteKind::Submit => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                completions.push((job.seq, error.map_or(Ok(()), Err)));
            }
            WriteKind::BestEffort => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                if copies < self.s.replicas {
                    self.metrics.not_durable.inc();
                    self.log_not_durable(error.as_deref().unwrap_or("too few memcached nodes"));
                }
                completions.push((job.seq, Ok(())));
            }
            WriteKind::Takeover => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                if let Some(tx) = job.done_slot.lock().unwrap().take() {
                    let _ = tx.send(error.map_or(Ok(()), Err));
                }
            }
            WriteKind::Repair => {}
        }
    }

    /// Moves a set whose node failed to the next usable node; false if there is none.
    fn reroute(&self, st: &mut State, job: &Arc<JobWrite>, failed: usize) -> bool {
        let live = st.window.get(job.seq).is_some_and(|s| s.flags & LIVE != 0);
        if !live {
            return false;
        }
        let tried = job.tried.fetch_or(1 << failed, Ordering::SeqCst) | 1 << failed;
        let h = ring::hash(&job.key);
        let Some(&next) = self
            .ring
            .pick(h, 1, |n| self.is_up(n) && tried & (1 << n) == 0)
            .first()
        else {
            return false;
        };
        let conn = (job.seq % self.s.connections_per_node as u64) as usize;
        let op = Op::Set {
            job: job.clone(),
            queued: Instant::now(),
        };
        if self.nodes[next].conns[conn].try_send(op).is_err() {
            return false;
        }
        job.tried.fetch_or(1 << next, Ordering::SeqCst);
        if let Some(s) = st.window.get_mut(job.seq) {
            s.may |= 1 << next;
        }
        true
    }

    /// Node `i` restarted empty: none of its copies exist any more.
    fn forget_node(&self, i: usize) {
        let mut st = self.lock();
        let bit = !(1u16 << i);
        for s in st.window.slots.iter_mut() {
            s.may &= bit;
            s.ok &= bit;
        }
        st.pending_deletes[i].clear();
        drop(st);
        self.repair_wake.notify_one();
    }

    fn status_json(&self) -> serde_json::Value {
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|n| {
                let id = *n.identity.lock().unwrap();
                serde_json::json!({
                    "address": n.addr,
                    "up": n.up.load(Ordering::SeqCst),
                    "reason": n.reason.lock().unwrap().clone(),
                    "pid": id.map(|i| i.0),
                    "items": n.items.load(Ordering::Relaxed),
                    "bytes": n.bytes.load(Ordering::Relaxed),
                    "limit_maxbytes": n.limit_bytes.load(Ordering::Relaxed),
                    "evictions": n.evictions.load(Ordering::Relaxed),
                    "eviction_enabled": n.can_evict.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({
            "enabled": true,
            "namespace": self.s.namespace,
            "node_id": self.s.node_id,
            "replicas": self.s.replicas,
            "on_failure": if self.s.accept_in_memory { "accept_in_memory" } else { "refuse" },
            "pending_writes": self.pending.load(Ordering::SeqCst),
            "replicas_below_target": self.metrics.replicas_below_target.get(),
            "low_watermark": self.low.load(Ordering::SeqCst),
            "high_watermark": self.high.load(Ordering::SeqCst),
            "nodes": nodes,
        })
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

/// What happened to one op of a batch.
enum Outcome {
    Ok,
    /// The node answered with an error for this item.
    Refused(String),
    /// The node failed (connection, timeout): the op may move elsewhere.
    NodeFailed(String),
}

/// Turns memcached's item errors into advice.
fn explain(addr: &str, reply: &Reply, value_len: usize) -> String {
    match reply {
        Reply::ServerError(m) if m.contains("out of memory") => format!(
            "memcached {addr} refused the write: out of memory ({m}); start it with more -m (memory in MB), and keep -M so it never evicts queued jobs"
        ),
        Reply::ServerError(m) if m.contains("too large") => format!(
            "memcached {addr} refused the write: the job record ({value_len} bytes) is larger than its item size limit ({m}); start memcached with a larger -I (e.g. -I 16m) or send smaller payloads"
        ),
        Reply::ServerError(m) => format!("memcached {addr} refused the write: SERVER_ERROR {m}"),
        Reply::ClientError(m) => format!("memcached {addr} refused the write: CLIENT_ERROR {m}"),
        other => format!("memcached {addr} refused the write: unexpected reply {other:?}"),
    }
}

/// Deletes wait this long for company: a batch of deletes costs memcached one wake-up instead
/// of one per job. (A crash inside this window can run a just-finished job again.)
const DELETE_DELAY: Duration = Duration::from_millis(5);

/// Sequence numbers a watermark key covers beyond the highest written, so most batches need
/// no watermark write. (Handles after a restart skip at most this many numbers.)
const HIGH_RESERVE: u64 = 4096;

/// One writer task per connection of a node.
async fn writer(inner: Arc<Inner>, node: usize, conn_idx: usize, mut rx: mpsc::Receiver<Op>) {
    let addr = inner.nodes[node].addr.clone();
    let meta_key = record::meta_key(&inner.s.namespace, &inner.s.node_id, conn_idx);
    let timeout = inner.s.write_timeout;
    let max_batch = inner.s.max_batch.max(1);
    let idle = inner.s.repair_interval.min(Duration::from_secs(1));
    let mut conn: Option<Connection> = None;
    let mut conn_gen = 0u64;
    // The range this connection's watermark key covers on the node (empty: none written).
    let mut covered = (u64::MAX, 0u64);
    let mut incoming: Vec<Op> = Vec::with_capacity(max_batch);
    let mut batch: Vec<Op> = Vec::with_capacity(max_batch);
    let mut deferred: Vec<Op> = Vec::new();
    let mut deferred_since: Option<Instant> = None;
    let mut last_refresh = Instant::now();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(max_batch);
    let mut completions = Vec::new();
    loop {
        incoming.clear();
        let wait = match deferred_since {
            Some(_) if inner.flushing.load(Ordering::SeqCst) => Duration::from_millis(1),
            Some(t) => (t + DELETE_DELAY).saturating_duration_since(Instant::now()),
            None => idle,
        };
        tokio::select! {
            n = rx.recv_many(&mut incoming, max_batch) => {
                if n == 0 {
                    return;
                }
                if n < max_batch {
                    // Let other tasks add to this batch before it goes out.
                    tokio::task::yield_now().await;
                    while incoming.len() < max_batch {
                        match rx.try_recv() {
                            Ok(op) => incoming.push(op),
                            Err(_) => break,
                        }
                    }
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
        batch.clear();
        for op in incoming.drain(..) {
            match op {
                Op::Set { .. } => batch.push(op),
                Op::Delete { .. } => {
                    deferred_since.get_or_insert_with(Instant::now);
                    inner.deferred.fetch_add(1, Ordering::SeqCst);
                    deferred.push(op);
                }
            }
        }
        let deletes_due = deferred.len() >= max_batch
            || deferred_since.is_some_and(|t| t.elapsed() >= DELETE_DELAY)
            || (!deferred.is_empty() && inner.flushing.load(Ordering::SeqCst));
        let (low, high) = (
            inner.low.load(Ordering::SeqCst),
            inner.high.load(Ordering::SeqCst),
        );
        // Advance the low watermark now and then, so recovery reads a short range.
        let refresh = covered.0 != u64::MAX
            && low > covered.0
            && last_refresh.elapsed() >= idle
            && inner.is_up(node);
        if batch.is_empty() && !deletes_due && !refresh {
            continue;
        }
        if !batch.is_empty() || deletes_due {
            inner.deferred.fetch_sub(deferred.len(), Ordering::SeqCst);
            batch.append(&mut deferred);
            deferred_since = None;
        }
        outcomes.clear();
        if !inner.is_up(node) {
            let why = format!(
                "memcached {addr} is down ({})",
                inner.nodes[node].reason.lock().unwrap()
            );
            conn = None;
            outcomes.extend(batch.iter().map(|_| Outcome::NodeFailed(why.clone())));
        } else {
            let gen = inner.nodes[node].gen.load(Ordering::SeqCst);
            if gen != conn_gen {
                conn = None;
            }
            if conn.is_none() {
                covered = (u64::MAX, 0);
                match Connection::connect(&addr, timeout).await {
                    Ok(c) => {
                        conn = Some(c);
                        conn_gen = gen;
                    }
                    Err(e) => {
                        inner
                            .metrics
                            .errors
                            .with_label_values(&[&addr, "connect"])
                            .inc();
                        inner.mark_down(node, &e.to_string());
                    }
                }
            }
            match conn.as_mut() {
                None => {
                    let why = format!("memcached {addr} is unreachable");
                    outcomes.extend(batch.iter().map(|_| Outcome::NodeFailed(why.clone())));
                }
                Some(c) => {
                    // A batch that needs it starts with this connection's watermark key
                    // (decided after connecting: a new connection covers nothing yet).
                    let needs_cover = batch.iter().any(|op| match op {
                        Op::Set { job, .. } => job.seq < covered.0 || job.seq > covered.1,
                        Op::Delete { .. } => false,
                    });
                    let meta =
                        (needs_cover || refresh).then(|| (low, high.max(covered.1) + HIGH_RESERVE));
                    // Sets first (each answered), then quiet deletes (answered only when
                    // they fail, or NF) and `mn`. Moving deletes after the sets keeps every
                    // job's delete after its write.
                    let sets = {
                        let (mut s, mut d): (Vec<Op>, Vec<Op>) =
                            batch.drain(..).partition(|op| matches!(op, Op::Set { .. }));
                        let n = s.len();
                        s.append(&mut d);
                        batch = s;
                        n
                    };
                    let deletes = batch.len() - sets;
                    buf.clear();
                    if let Some((lo, hi)) = meta {
                        client::put_set(&mut buf, &meta_key, &record::encode_meta(lo, hi));
                    }
                    for op in &batch {
                        match op {
                            Op::Set { job, .. } => client::put_set(&mut buf, &job.key, &job.value),
                            Op::Delete { seq, .. } => client::put_quiet_delete(
                                &mut buf,
                                &record::job_key(&inner.s.namespace, &inner.s.node_id, *seq),
                            ),
                        }
                    }
                    if deletes > 0 {
                        client::put_noop(&mut buf);
                    }
                    let skip = meta.is_some() as usize;
                    let mut meta_reply = None;
                    let mut replies: Vec<Reply> = Vec::with_capacity(sets);
                    let mut delete_error: Option<Reply> = None;
                    let r = c
                        .exchange_then_noop(&buf, sets + skip, deletes > 0, timeout, |i, reply| {
                            if i < skip {
                                meta_reply = Some(reply);
                            } else if i < skip + sets {
                                replies.push(reply);
                            } else if !matches!(
                                reply,
                                Reply::NoOp | Reply::NotFound | Reply::Stored
                            ) {
                                delete_error.get_or_insert(reply);
                            }
                        })
                        .await;
                    match r {
                        Ok(()) => {
                            let meta_ok = meta.is_none() || meta_reply == Some(Reply::Stored);
                            if let (Some(m), true) = (meta, meta_ok) {
                                covered = m;
                                last_refresh = Instant::now();
                            }
                            for (op, reply) in batch[..sets].iter().zip(replies.iter()) {
                                let Op::Set { job, .. } = op else {
                                    continue;
                                };
                                outcomes.push(match reply {
                                    Reply::Stored if meta_ok => Outcome::Ok,
                                    Reply::Stored => Outcome::Refused(explain(
                                        &addr,
                                        meta_reply.as_ref().unwrap_or(&Reply::Miss),
                                        job.value.len(),
                                    )),
                                    other => {
                                        Outcome::Refused(explain(&addr, other, job.value.len()))
                                    }
                                });
                            }
                            // A failed quiet delete does not say which: retry them all later.
                            outcomes.extend((0..deletes).map(|_| match &delete_error {
                                None => Outcome::Ok,
                                Some(e) => Outcome::NodeFailed(format!("{e:?}")),
                            }));
                        }
                        Err(e) => {
                            conn = None;
                            inner
                                .metrics
                                .errors
                                .with_label_values(&[&addr, "batch"])
                                .inc();
                            let why = match &e {
                                ClientError::Timeout(_) => format!(
                                    "memcached {addr} did not answer within {} ms (persistence.write_timeout_ms)",
                                    timeout.as_millis()
                                ),
                                e => format!("memcached {addr}: {e}"),
                            };
                            inner.mark_down(node, &why);
                            outcomes.extend(batch.iter().map(|_| Outcome::NodeFailed(why.clone())));
                        }
                    }
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        settle(&inner, node, &batch, &outcomes, &mut completions);
        if !completions.is_empty() {
            if let Some(e) = inner.engine() {
                for (seq, r) in completions.drain(..) {
                    e.persisted(seq, r.map_err(MirrorRefused));
                }
            }
            completions.clear();
        }
    }
}

/// Applies a batch's outcomes to the window and the jobs (one lock for the whole batch).
fn settle(
    inner: &Inner,
    node: usize,
    batch: &[Op],
    outcomes: &[Outcome],
    completions: &mut Vec<Completion>,
) {
    let now = Instant::now();
    let n = &inner.nodes[node];
    let mut st = inner.lock();
    let mut finished: Vec<&Arc<JobWrite>> = Vec::new();
    for (op, outcome) in batch.iter().zip(outcomes) {
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
                        n.write_errors.inc();
                        job.error.lock().unwrap().get_or_insert_with(|| why.clone());
                    }
                    Outcome::NodeFailed(why) => {
                        n.write_errors.inc();
                        if inner.reroute(&mut st, job, node) {
                            continue;
                        }
                        job.error.lock().unwrap().get_or_insert_with(|| {
                            if job.kind == WriteKind::Submit {
                                format!("{why}; {}", inner.not_enough_nodes(inner.up_count()))
                            } else {
                                why.clone()
                            }
                        });
                    }
                }
                if job.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                    if let Some(s) = st.window.get_mut(job.seq) {
                        s.flags &= !PENDING;
                    }
                    finished.push(job);
                }
            }
            Op::Delete { seq, queued } => match outcome {
                Outcome::Ok => n
                    .delete_s
                    .observe(now.saturating_duration_since(*queued).as_secs_f64()),
                _ => {
                    n.delete_errors.inc();
                    st.pending_deletes[node].push(*seq);
                }
            },
        }
    }
    drop(st);
    for job in finished {
        inner.finish(job, completions);
    }
    inner
        .metrics
        .pending_writes
        .set(inner.pending.load(Ordering::SeqCst) as i64);
}

/// Parses `stats` into the identity `(pid, start time)` and the eviction counter.
fn identity_of(stats: &[(String, String)]) -> Option<((u64, u64), u64)> {
    let get = |k: &str| {
        stats
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    let pid = get("pid")?;
    let boot = get("time")?.saturating_sub(get("uptime")?);
    Some(((pid, boot), get("evictions").unwrap_or(0)))
}

/// Connects to a node and reads its identity and eviction settings.
pub(super) async fn probe(
    addr: &str,
    timeout: Duration,
) -> Result<((u64, u64), u64, bool, Vec<(String, String)>), ClientError> {
    let mut c = Connection::connect(addr, timeout).await?;
    let stats = c.stats(None, timeout).await?;
    let settings = c.stats(Some("settings"), timeout).await?;
    let (identity, evictions) = identity_of(&stats)
        .ok_or_else(|| ClientError::Protocol("stats without pid/time/uptime".into()))?;
    let can_evict = settings.iter().any(|(k, v)| k == "evictions" && v == "on");
    Ok((identity, evictions, can_evict, stats))
}

/// Watches every node: marks nodes up/down, notices restarts and evictions, keeps the health
/// and status current.
async fn prober(inner: Arc<Inner>, health: Arc<Health>, shutdown: CancellationToken) {
    let period = Duration::from_millis(500).min(inner.s.repair_interval);
    let timeout = inner.s.write_timeout.min(Duration::from_secs(2));
    let mut warned_evict = vec![false; inner.nodes.len()];
    let mut last_evictions = vec![0u64; inner.nodes.len()];
    loop {
        for i in 0..inner.nodes.len() {
            let n = &inner.nodes[i];
            match probe(&n.addr, timeout).await {
                Ok((identity, evictions, can_evict, stats)) => {
                    let get = |k: &str| {
                        stats
                            .iter()
                            .find(|(n, _)| n == k)
                            .and_then(|(_, v)| v.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    n.items.store(get("curr_items"), Ordering::Relaxed);
                    n.bytes.store(get("bytes"), Ordering::Relaxed);
                    n.limit_bytes
                        .store(get("limit_maxbytes"), Ordering::Relaxed);
                    let previous = n.identity.lock().unwrap().replace(identity);
                    if previous.is_some_and(|p| p != identity) {
                        tracing::warn!(node = %n.addr, old_pid = previous.map(|p| p.0), new_pid = identity.0,
                            "memcached restarted and lost its copies of the queue; rewriting them in the background");
                        // Writers must not use connections to the old process.
                        inner.mark_down(i, "restarted");
                        inner.forget_node(i);
                    }
                    n.evictions.store(evictions, Ordering::Relaxed);
                    n.can_evict.store(can_evict, Ordering::Relaxed);
                    inner
                        .metrics
                        .evictions
                        .with_label_values(&[&n.addr])
                        .set(evictions as i64);
                    inner
                        .metrics
                        .eviction_enabled
                        .with_label_values(&[&n.addr])
                        .set(can_evict as i64);
                    if can_evict && !warned_evict[i] {
                        warned_evict[i] = true;
                        tracing::error!(node = %n.addr,
                            "memcached can evict items (it was started without -M): when it fills up it silently drops queued jobs; restart it with -M and enough -m");
                    }
                    if evictions > last_evictions[i] {
                        tracing::error!(node = %n.addr, evictions,
                            "memcached has evicted items: queued jobs may have been lost; run it with -M and more -m");
                    }
                    last_evictions[i] = evictions;
                    inner.mark_up(i);
                }
                Err(e) => {
                    inner
                        .metrics
                        .errors
                        .with_label_values(&[&n.addr, "probe"])
                        .inc();
                    inner.mark_down(i, &e.to_string());
                }
            }
        }
        inner.refresh_health();
        health.set_persistence_status(inner.status_json());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Restores missing copies and replays deletes for nodes that came back.
async fn repairer(inner: Arc<Inner>, shutdown: CancellationToken) {
    const MAX_PER_ROUND: usize = 20_000;
    // After a full round, the next one follows shortly (a node that came back empty may need
    // a million copies); otherwise once per interval or when woken.
    let mut more = false;
    loop {
        let pause = if more {
            Duration::from_millis(100)
        } else {
            inner.s.repair_interval
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = inner.repair_wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        // A node down for less than one interval is given time to come back.
        let grace_mask: u16 = inner
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.down_since
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() < inner.s.repair_interval)
            })
            .fold(0, |m, (i, _)| m | 1 << i);
        let up = inner.up_mask();
        let mut todo = Vec::new();
        {
            let mut st = inner.lock();
            let st = &mut *st;
            // Replay deletes to nodes that are back.
            for i in 0..inner.nodes.len() {
                if up & (1 << i) == 0 || st.pending_deletes[i].is_empty() {
                    continue;
                }
                let list = std::mem::take(&mut st.pending_deletes[i]);
                let conn_n = inner.s.connections_per_node as u64;
                let now = Instant::now();
                let mut rest = Vec::new();
                for seq in list {
                    let c = (seq % conn_n) as usize;
                    if inner.nodes[i].conns[c]
                        .try_send(Op::Delete { seq, queued: now })
                        .is_err()
                    {
                        rest.push(seq);
                    }
                }
                st.pending_deletes[i] = rest;
            }
            let mut below = 0i64;
            let base = st.window.base;
            for (k, s) in st.window.slots.iter().enumerate() {
                if s.flags & LIVE == 0 || s.flags & PENDING != 0 {
                    continue;
                }
                let have = (s.ok & up).count_ones() as usize;
                if have < inner.s.replicas {
                    below += 1;
                    let with_grace = (s.ok & (up | grace_mask)).count_ones() as usize;
                    if with_grace < inner.s.replicas && todo.len() < MAX_PER_ROUND {
                        todo.push(base + k as u64);
                    }
                }
            }
            inner.metrics.replicas_below_target.set(below);
        }
        more = todo.len() == MAX_PER_ROUND;
        if todo.is_empty() || up == 0 {
            continue;
        }
        let Some(engine) = inner.engine() else {
            continue;
        };
        let records = engine.persisted_records(&todo);
        let mut st = inner.lock();
        let mut sent = 0usize;
        for r in records {
            let Some(s) = st.window.get(r.seq).copied() else {
                continue;
            };
            if s.flags & LIVE == 0 || s.flags & PENDING != 0 {
                continue;
            }
            let key = record::job_key(&inner.s.namespace, &inner.s.node_id, r.seq);
            let have = s.ok & up;
            let need = inner.s.replicas.saturating_sub(have.count_ones() as usize);
            let targets = inner.ring.pick(ring::hash(&key), need, |n| {
                inner.is_up(n) && have & (1 << n) == 0
            });
            if targets.is_empty() {
                continue;
            }
            let conn = (r.seq % inner.s.connections_per_node as u64) as usize;
            let mask = targets.iter().fold(0u32, |m, &t| m | 1 << t) | have as u32;
            let job = Arc::new(JobWrite {
                seq: r.seq,
                key,
                value: record::encode(&r, None),
                kind: WriteKind::Repair,
                remaining: AtomicU32::new(0),
                tried: AtomicU32::new(mask),
                copies: AtomicU32::new(0),
                error: Mutex::new(None),
                done_slot: Mutex::new(None),
            });
            let now = Instant::now();
            let mut queued = 0;
            for &t in &targets {
                job.remaining.fetch_add(1, Ordering::SeqCst);
                let op = Op::Set {
                    job: job.clone(),
                    queued: now,
                };
                if inner.nodes[t].conns[conn].try_send(op).is_ok() {
                    queued += 1;
                } else {
                    job.remaining.fetch_sub(1, Ordering::SeqCst);
                }
            }
            if queued > 0 {
                let slot = st.window.entry(r.seq);
                slot.flags |= PENDING;
                slot.may |= mask as u16;
                sent += 1;
            }
        }
        drop(st);
        if sent > 0 {
            tracing::info!(
                jobs = sent,
                "rewriting job records to restore persistence.replicas copies"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_tracks_live_jobs_and_the_low_watermark() {
        let mut w = Window::default();
        for seq in 10..20 {
            w.entry(seq).flags = LIVE;
        }
        assert_eq!(w.low(), 10);
        // An older job rewritten later (a foreground job joined by a background submit).
        w.entry(5).flags = LIVE;
        assert_eq!(w.low(), 5);
        w.get_mut(5).unwrap().flags = 0;
        w.trim();
        assert_eq!(w.low(), 10);
        // Finishing out of order moves the watermark only past the oldest live job.
        w.get_mut(12).unwrap().flags = 0;
        w.trim();
        assert_eq!(w.low(), 10);
        for seq in [10, 11] {
            w.get_mut(seq).unwrap().flags = 0;
        }
        w.trim();
        assert_eq!(w.low(), 13);
        assert!(w.get(12).is_none() && w.get(13).is_some());
        for seq in 13..20 {
            w.get_mut(seq).unwrap().flags = 0;
        }
        w.trim();
        assert_eq!((w.low(), w.slots.len()), (20, 0));
        // An empty window restarts at the next job.
        w.entry(30).flags = LIVE;
        assert_eq!(w.low(), 30);
    }
}
