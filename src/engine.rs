//! The job engine: every queued and running job, every function and what each connection is
//! doing, behind one lock. Requests become state changes here; answers to the requesting
//! connection are appended to its write buffer, and packets for other connections (NOOP wake-ups,
//! WORK_* results) go through their bounded outbound channels. Nothing here awaits: slow I/O
//! (memcached, span export) happens in tasks fed by the [`Mirror`] seam.
//!
//! Memory per queued job is kept small on purpose (the target is 1,000,000 queued 64-byte jobs in
//! well under 250 MB): jobs live in a slab, queues hold 8-byte slab references, the unique index
//! holds 4-byte slab keys, and the unique id and payload share one allocation.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
// hashbrown's maps (foldhash) rather than std's SipHash: keys here are sequence numbers and
// connection ids, hashed on every packet.
use hashbrown::{HashMap, HashTable};
use slab::Slab;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::codec::{put_response, response, split_args, PacketType};
use crate::metrics::{FunctionMetrics, Metrics};
use crate::protocol::{GrabKind, Priority, ProtocolError, Submit, WorkKind};
use crate::seq_index::SeqIndex;

/// Connection ids come from a counter, never from file descriptors.
pub type ConnId = u64;

/// Engine settings (see `config/default.toml` for their documentation).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Middle part of job handles: `H:<node_id>:<seq>`.
    pub node_id: String,
    /// Attempts after which a job is dropped with WORK_FAIL (0 = retry forever).
    pub job_retries: u32,
    /// Sleeping workers woken per queued job (0 = all of them, as gearmand does by default).
    pub worker_wakeup: u32,
    /// Queued jobs allowed per function and priority unless `maxqueue` says otherwise (0 = no limit).
    pub max_queue_per_function: u32,
    /// Distinct functions the server keeps (CAN_DO or submit of a new one past it is refused).
    pub max_functions: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            node_id: "gearhouse".into(),
            job_retries: 0,
            worker_wakeup: 1,
            max_queue_per_function: 10_000_000,
            max_functions: 10_000,
        }
    }
}

/// A background job as the durable mirror stores it, and as recovery hands it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub seq: u64,
    pub function: Bytes,
    pub unique: Bytes,
    pub data: Bytes,
    pub priority: Priority,
    pub epoch: Option<u64>,
    pub reducer: Option<Bytes>,
    pub attempts: u32,
}

/// Why the mirror would not take a write.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct MirrorRefused(pub String);

/// The seam to durable storage. Calls never block: the mirror queues the work and reports a
/// write's outcome with [`Engine::persisted`].
pub trait Mirror: Send + Sync + 'static {
    /// Queues a durable write of a background job.
    fn write(&self, record: JobRecord) -> Result<(), MirrorRefused>;
    /// Queues the removal of a job's record (it completed, failed or was cancelled).
    fn delete(&self, seq: u64);
}

/// How a job ended, for observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Complete,
    Fail,
    Exception,
    /// Cancelled by `cancel job`, or a foreground job whose clients all left before it ran.
    Cancelled,
    /// Dropped after `engine.job_retries` attempts.
    Dropped,
    /// Its durable write failed: the client got ERROR QUEUE_ERROR.
    Refused,
}

impl JobOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Complete => "complete",
            JobOutcome::Fail => "fail",
            JobOutcome::Exception => "exception",
            JobOutcome::Cancelled => "cancelled",
            JobOutcome::Dropped => "dropped",
            JobOutcome::Refused => "refused",
        }
    }
}

/// A connection as observers see it.
#[derive(Debug, Clone, Copy)]
pub struct PeerInfo<'a> {
    pub conn: ConnId,
    pub peer: SocketAddr,
    /// SET_CLIENT_ID value, `-` when none was set.
    pub client_id: &'a [u8],
}

/// A new job, as observers see it.
#[derive(Debug, Clone, Copy)]
pub struct JobEvent<'a> {
    pub seq: u64,
    pub handle: &'a [u8],
    pub function: &'a [u8],
    pub unique: &'a [u8],
    pub priority: Priority,
    pub background: bool,
    pub client: Option<PeerInfo<'a>>,
}

/// Follows each job through its life (the tracing layer implements it). Called with the engine
/// lock held: implementations must only record and hand work to a task, never block.
pub trait JobObserver: Send + Sync + 'static {
    /// A new job was accepted (coalesced submits join an existing job and are not reported).
    fn submitted(&self, job: &JobEvent<'_>);
    /// The job entered a queue, where workers can take it (after its durable write, its epoch,
    /// or a requeue).
    fn queued(&self, seq: u64);
    /// A worker took the job; `attempt` counts from 1.
    fn assigned(&self, seq: u64, attempt: u32, worker: &PeerInfo<'_>);
    /// The attempt in progress ended without a result; the job goes back to the queue or is
    /// dropped (then `finished(Dropped)` follows).
    fn requeued(&self, seq: u64, reason: &str);
    /// The job is gone.
    fn finished(&self, seq: u64, outcome: JobOutcome);
}

/// Cloneable handle to the engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

struct Shared {
    /// A plain mutex: every critical section is short, never awaits, and the job path needs
    /// one consistent view of jobs, queues and connections (2 cores: no sharding gain).
    state: Mutex<State>,
    cfg: EngineConfig,
    handle_prefix: Bytes,
    started: Instant,
    /// Wakes the timer task when an earlier deadline is added.
    timer_wake: Notify,
    metrics: Arc<Metrics>,
    mirror: Option<Arc<dyn Mirror>>,
    observer: Option<Arc<dyn JobObserver>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    /// Waiting for the mirror to confirm its write; not visible to workers yet.
    Persisting,
    /// An epoch job whose time has not come.
    Scheduled,
    Queued,
    Running(ConnId),
}

struct Job {
    seq: u64,
    func: u32,
    priority: Priority,
    background: bool,
    /// A record of this job exists (or is being written) in the mirror.
    persisted: bool,
    state: JobState,
    attempts: u32,
    unique_len: u32,
    /// Unique id followed by the data: one allocation.
    payload: Box<[u8]>,
    /// Nanoseconds since start at which the job entered its current state.
    since_ns: u64,
    extra: Option<Box<JobExtra>>,
}

#[derive(Default)]
struct JobExtra {
    reducer: Option<Bytes>,
    epoch: Option<u64>,
    /// Foreground clients that receive the job's WORK_* packets.
    waiters: Vec<ConnId>,
    /// Connections whose JOB_CREATED waits for the mirror's confirmation.
    pending_acks: Vec<ConnId>,
    status: Option<(Bytes, Bytes)>,
}

impl Job {
    /// A job in state Queued with no extra state; the unique id and data share one allocation.
    #[allow(clippy::too_many_arguments)]
    fn new(
        seq: u64,
        func: u32,
        priority: Priority,
        background: bool,
        attempts: u32,
        unique: &[u8],
        data: &[u8],
        since_ns: u64,
    ) -> Job {
        let mut payload = Vec::with_capacity(unique.len() + data.len());
        payload.extend_from_slice(unique);
        payload.extend_from_slice(data);
        Job {
            seq,
            func,
            priority,
            background,
            persisted: false,
            state: JobState::Queued,
            attempts,
            unique_len: unique.len() as u32,
            payload: payload.into_boxed_slice(),
            since_ns,
            extra: None,
        }
    }

    fn unique(&self) -> &[u8] {
        &self.payload[..self.unique_len as usize]
    }
    fn data(&self) -> &[u8] {
        &self.payload[self.unique_len as usize..]
    }
    /// What this job coalesces on (see [`coalesce_key`]).
    fn coalesce_key(&self) -> &[u8] {
        coalesce_key(self.unique(), self.data())
    }
    fn extra(&mut self) -> &mut JobExtra {
        self.extra.get_or_insert_with(Default::default)
    }
    fn waiters(&self) -> &[ConnId] {
        self.extra
            .as_ref()
            .map(|e| e.waiters.as_slice())
            .unwrap_or(&[])
    }
    fn reducer(&self) -> Option<&Bytes> {
        self.extra.as_ref().and_then(|e| e.reducer.as_ref())
    }
}

/// A queue entry: slab key plus the low bits of the job's sequence number, so an entry whose
/// job was cancelled (and whose slot was reused) is recognised and skipped.
#[derive(Clone, Copy)]
struct QueueRef {
    slot: u32,
    tag: u32,
}

struct Function {
    name: Bytes,
    queues: [VecDeque<QueueRef>; 3],
    /// Live entries per priority (queues may hold stale entries of cancelled jobs).
    queued: [u32; 3],
    running: u32,
    scheduled: u32,
    workers: u32,
    /// Per-priority limits set by the `maxqueue` admin command (None = the configured default).
    max_queue: Option<[u32; 3]>,
    /// Workers that said PRE_SLEEP, with the sleep generation they said it in.
    sleepers: Vec<(ConnId, u32)>,
    metrics: FunctionMetrics,
}

impl Function {
    fn total_queued(&self) -> u64 {
        self.queued.iter().map(|&n| n as u64).sum()
    }
}

struct Ability {
    func: u32,
    timeout_ms: Option<u32>,
}

struct Conn {
    peer: SocketAddr,
    tx: mpsc::Sender<Bytes>,
    kill: CancellationToken,
    client_id: Bytes,
    abilities: Vec<Ability>,
    sleeping: bool,
    sleep_gen: u32,
    /// Jobs this worker holds: (slot, seq).
    holding: Vec<(u32, u64)>,
    /// Foreground jobs this client waits on: (slot, seq).
    waiting: Vec<(u32, u64)>,
    exceptions: bool,
    /// Rotates the starting function of each grab so functions of one priority share workers.
    rotate: usize,
    is_client: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    EpochDue { slot: u32, seq: u64 },
    WorkTimeout { slot: u32, seq: u64, attempt: u32 },
}

struct State {
    jobs: Slab<Job>,
    by_seq: SeqIndex,
    uniques: HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
    functions: Slab<Function>,
    function_ids: HashMap<Bytes, u32>,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    next_seq: u64,
    timers: BinaryHeap<Reverse<(u64, Timer)>>,
}

/// What a submit turned into, for the connection that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// JOB_CREATED was written to the connection's buffer.
    Created,
    /// JOB_CREATED (or ERROR) will arrive through the outbound channel once the mirror answers.
    Pending,
    /// ERROR was written to the connection's buffer.
    Refused,
}

/// A snapshot of one function for `status`, metrics and the JSON API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FunctionStat {
    pub name: String,
    #[serde(skip)]
    pub name_bytes: Bytes,
    #[serde(skip)]
    pub label: String,
    pub queued: [u32; 3],
    pub running: u32,
    pub scheduled: u32,
    pub workers: u32,
}

/// A snapshot of one connection for the `workers` admin command.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: ConnId,
    pub peer: SocketAddr,
    pub client_id: Bytes,
    pub functions: Vec<Bytes>,
}

/// A snapshot of one job for `show jobs`.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub handle: Bytes,
    pub attempts: u32,
    pub queued: bool,
}

/// Totals for metrics and health.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub jobs: usize,
    pub epoch_waiting: u64,
    pub clients: u64,
    pub workers: u64,
    pub connections: u64,
}

/// The key a job coalesces on within its function: its unique id, except that the unique "-"
/// means "the payload" (gearmand 1.1.20 and Perl Gearman::Client's documented `uniq => '-'`).
/// Empty = never coalesces.
fn coalesce_key<'a>(unique: &'a [u8], data: &'a [u8]) -> &'a [u8] {
    if unique == b"-" {
        data
    } else {
        unique
    }
}

fn hash_unique(h: &hashbrown::DefaultHashBuilder, func: u32, unique: &[u8]) -> u64 {
    let mut s = h.build_hasher();
    func.hash(&mut s);
    unique.hash(&mut s);
    s.finish()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends a server-initiated packet; a client that does not read its packets is disconnected
/// rather than buffered without bound. NOOPs are droppable: a full queue already holds a wake-up.
fn send(conn: &Conn, pkt: Bytes, droppable: bool, metrics: &Metrics) {
    match conn.tx.try_send(pkt) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) if droppable => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics.connections_overflowed.inc();
            tracing::warn!(peer = %conn.peer, "closing connection: its outbound queue is full (server.outbound_queue)");
            conn.kill.cancel();
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Sends one packet to each of `ids` that is still connected.
fn send_each(conns: &HashMap<ConnId, Conn>, ids: &[ConnId], pkt: &Bytes, metrics: &Metrics) {
    for id in ids {
        if let Some(c) = conns.get(id) {
            send(c, pkt.clone(), false, metrics);
        }
    }
}

impl Engine {
    /// A new engine; `mirror` is the durable store, if persistence is on.
    pub fn new(
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
        mirror: Option<Arc<dyn Mirror>>,
        observer: Option<Arc<dyn JobObserver>>,
    ) -> Self {
        let handle_prefix = Bytes::from(format!("H:{}:", cfg.node_id));
        Engine {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    jobs: Slab::new(),
                    by_seq: SeqIndex::new(),
                    uniques: HashTable::new(),
                    hasher: Default::default(),
                    functions: Slab::new(),
                    function_ids: HashMap::default(),
                    conns: HashMap::default(),
                    next_conn: 1,
                    next_seq: 1,
                    timers: BinaryHeap::new(),
                }),
                cfg,
                handle_prefix,
                started: Instant::now(),
                timer_wake: Notify::new(),
                metrics,
                mirror,
                observer,
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ns(&self) -> u64 {
        self.shared.started.elapsed().as_nanos() as u64
    }

    /// The wire handle of a job sequence number.
    pub fn handle_of(&self, seq: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(self.shared.handle_prefix.len() + 20);
        b.extend_from_slice(&self.shared.handle_prefix);
        b.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        b.freeze()
    }

    fn seq_of(&self, handle: &[u8]) -> Option<u64> {
        let rest = handle.strip_prefix(&self.shared.handle_prefix[..])?;
        std::str::from_utf8(rest).ok()?.parse().ok()
    }

    /// Registers a connection; its server-initiated packets go to `tx`, and `kill` closes it.
    pub fn connect(
        &self,
        peer: SocketAddr,
        tx: mpsc::Sender<Bytes>,
        kill: CancellationToken,
    ) -> ConnId {
        let mut st = self.lock();
        let id = st.next_conn;
        st.next_conn += 1;
        st.conns.insert(
            id,
            Conn {
                peer,
                tx,
                kill,
                client_id: Bytes::from_static(b"-"),
                abilities: Vec::new(),
                sleeping: false,
                sleep_gen: 0,
                holding: Vec::new(),
                waiting: Vec::new(),
                exceptions: false,
                rotate: 0,
                is_client: false,
            },
        );
        id
    }

    /// Forgets a connection: its jobs go back to the queue, its foreground-only queued jobs with
    /// no other waiter are cancelled, and its waits end.
    pub fn disconnect(&self, id: ConnId) {
        let mut st = self.lock();
        let Some(conn) = st.conns.remove(&id) else {
            return;
        };
        let now = self.now_ns();
        for a in &conn.abilities {
            if let Some(f) = st.functions.get_mut(a.func as usize) {
                f.workers = f.workers.saturating_sub(1);
            }
        }
        for (slot, seq) in conn.holding {
            self.requeue(&mut st, slot, seq, now, "worker disconnected");
        }
        for (slot, seq) in conn.waiting {
            let Some(job) = st.jobs.get_mut(slot as usize).filter(|j| j.seq == seq) else {
                continue;
            };
            if let Some(e) = job.extra.as_mut() {
                e.waiters.retain(|&w| w != id);
                e.pending_acks.retain(|&w| w != id);
            }
            let orphan = !job.background
                && job.waiters().is_empty()
                && matches!(job.state, JobState::Queued | JobState::Scheduled);
            if orphan {
                self.remove_job(&mut st, slot, JobOutcome::Cancelled);
            }
        }
        // A worker that was woken but left before grabbing must not strand queued work.
        for a in &conn.abilities {
            self.wake(&mut st, a.func, 0);
        }
    }

    fn function_id(&self, st: &mut State, name: &Bytes) -> Result<u32, ProtocolError> {
        if let Some(&id) = st.function_ids.get(name) {
            return Ok(id);
        }
        if st.functions.len() >= self.shared.cfg.max_functions {
            return Err(ProtocolError::new(
                "QUEUE_ERROR",
                format!(
                    "the server already knows {} functions (engine.max_functions)",
                    st.functions.len()
                ),
            ));
        }
        let id = st.functions.insert(Function {
            name: name.clone(),
            queues: Default::default(),
            queued: [0; 3],
            running: 0,
            scheduled: 0,
            workers: 0,
            max_queue: None,
            sleepers: Vec::new(),
            metrics: self.shared.metrics.for_function(name),
        }) as u32;
        st.function_ids.insert(name.clone(), id);
        Ok(id)
    }

    /// The job of `func` whose [`coalesce_key`] is `key`.
    fn find_unique(&self, st: &State, func: u32, key: &[u8]) -> Option<u32> {
        let h = hash_unique(&st.hasher, func, key);
        st.uniques
            .find(h, |&slot| {
                let j = &st.jobs[slot as usize];
                j.func == func && j.coalesce_key() == key
            })
            .copied()
    }

    /// Handles a SUBMIT_JOB* request.
    pub fn submit(&self, conn: ConnId, s: Submit, out: &mut BytesMut) -> SubmitOutcome {
        let mut st = self.lock();
        let st = &mut *st;
        let metrics = &self.shared.metrics;
        if let Some(c) = st.conns.get_mut(&conn) {
            c.is_client = true;
        }
        let func = match self.function_id(st, &s.function) {
            Ok(f) => f,
            Err(e) => {
                metrics.refused(
                    crate::metrics::OTHER_FUNCTION,
                    "too_many_functions",
                    s.priority,
                    s.background,
                );
                put_error(out, &e);
                return SubmitOutcome::Refused;
            }
        };
        // Coalesce on (function, unique); an empty unique never coalesces.
        let key = coalesce_key(&s.unique, &s.data);
        if !key.is_empty() {
            if let Some(slot) = self.find_unique(st, func, key) {
                return self.join(st, conn, slot, &s, out);
            }
        }
        let f = &st.functions[func as usize];
        let limit = match f.max_queue {
            Some(l) => l[s.priority as usize],
            None => self.shared.cfg.max_queue_per_function,
        };
        if limit > 0 && f.queued[s.priority as usize] >= limit {
            metrics.refused(&f.metrics.label, "queue_full", s.priority, s.background);
            put_error(
                out,
                &ProtocolError::new(
                    "QUEUE_ERROR",
                    format!(
                        "queue of {} at priority {} is full ({limit} jobs)",
                        String::from_utf8_lossy(&s.function),
                        s.priority.as_str()
                    ),
                ),
            );
            return SubmitOutcome::Refused;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let mut job = Job::new(
            seq,
            func,
            s.priority,
            s.background,
            0,
            &s.unique,
            &s.data,
            self.now_ns(),
        );
        if s.reducer.is_some() || s.epoch.is_some() || !s.background {
            let e = job.extra();
            e.reducer = s.reducer.clone();
            e.epoch = s.epoch;
            if !s.background {
                e.waiters.push(conn);
            }
        }
        let persist = s.background && self.shared.mirror.is_some();
        if persist {
            let record = JobRecord {
                seq,
                function: s.function.clone(),
                unique: s.unique.clone(),
                data: s.data.clone(),
                priority: s.priority,
                epoch: s.epoch,
                reducer: s.reducer.clone(),
                attempts: 0,
            };
            if let Err(why) = self.shared.mirror.as_ref().expect("mirror").write(record) {
                metrics.refused(
                    &st.functions[func as usize].metrics.label,
                    "not_durable",
                    s.priority,
                    s.background,
                );
                put_error(out, &ProtocolError::new("QUEUE_ERROR", why.0));
                return SubmitOutcome::Refused;
            }
            job.persisted = true;
            job.state = JobState::Persisting;
            job.extra().pending_acks.push(conn);
        }
        st.functions[func as usize].metrics.submitted[s.priority as usize][s.background as usize]
            .inc();
        let slot = self.insert_job(st, job);
        if !s.background {
            if let Some(c) = st.conns.get_mut(&conn) {
                c.waiting.push((slot, seq));
            }
        }
        if let Some(o) = &self.shared.observer {
            let handle = self.handle_of(seq);
            o.submitted(&JobEvent {
                seq,
                handle: &handle,
                function: &s.function,
                unique: &s.unique,
                priority: s.priority,
                background: s.background,
                client: st.conns.get(&conn).map(|c| peer_info(conn, c)),
            });
        }
        if persist {
            return SubmitOutcome::Pending;
        }
        put_response(out, PacketType::JOB_CREATED, &[&self.handle_of(seq)]);
        self.make_available(st, slot);
        SubmitOutcome::Created
    }

    /// A submit whose unique id matches a live job joins it.
    fn join(
        &self,
        st: &mut State,
        conn: ConnId,
        slot: u32,
        s: &Submit,
        out: &mut BytesMut,
    ) -> SubmitOutcome {
        let job = &mut st.jobs[slot as usize];
        let seq = job.seq;
        st.functions[job.func as usize]
            .metrics
            .coalesced
            .inc(s.priority, s.background);
        if !s.background {
            job.extra().waiters.push(conn);
            if let Some(c) = st.conns.get_mut(&conn) {
                c.waiting.push((slot, seq));
            }
        }
        let job = &mut st.jobs[slot as usize];
        // A background submit makes the job survive its foreground clients, and durable.
        let mut needs_write = false;
        if s.background && !job.background {
            job.background = true;
            needs_write = self.shared.mirror.is_some() && !job.persisted;
        }
        if needs_write {
            let record = self.record_of(st, slot);
            if let Err(why) = self.shared.mirror.as_ref().expect("mirror").write(record) {
                let job = &mut st.jobs[slot as usize];
                job.background = false;
                put_error(out, &ProtocolError::new("QUEUE_ERROR", why.0));
                return SubmitOutcome::Refused;
            }
            let job = &mut st.jobs[slot as usize];
            job.persisted = true;
            job.extra().pending_acks.push(conn);
            return SubmitOutcome::Pending;
        }
        let job = &mut st.jobs[slot as usize];
        let acked_later = job
            .extra
            .as_ref()
            .is_some_and(|e| !e.pending_acks.is_empty())
            || job.state == JobState::Persisting;
        if acked_later {
            job.extra().pending_acks.push(conn);
            return SubmitOutcome::Pending;
        }
        put_response(out, PacketType::JOB_CREATED, &[&self.handle_of(seq)]);
        SubmitOutcome::Created
    }

    fn record_of(&self, st: &State, slot: u32) -> JobRecord {
        let j = &st.jobs[slot as usize];
        JobRecord {
            seq: j.seq,
            function: st.functions[j.func as usize].name.clone(),
            unique: Bytes::copy_from_slice(j.unique()),
            data: Bytes::copy_from_slice(j.data()),
            priority: j.priority,
            epoch: j.extra.as_ref().and_then(|e| e.epoch),
            reducer: j.reducer().cloned(),
            attempts: j.attempts,
        }
    }

    fn insert_job(&self, st: &mut State, job: Job) -> u32 {
        let seq = job.seq;
        let func = job.func;
        let has_unique = !job.coalesce_key().is_empty();
        let slot = st.jobs.insert(job) as u32;
        st.by_seq.insert(seq, slot);
        if has_unique {
            let h = hash_unique(&st.hasher, func, st.jobs[slot as usize].coalesce_key());
            let (jobs, hasher) = (&st.jobs, &st.hasher);
            st.uniques.insert_unique(h, slot, |&s| {
                let j = &jobs[s as usize];
                hash_unique(hasher, j.func, j.coalesce_key())
            });
        }
        slot
    }

    /// Puts a job where workers can get it: the queue, or the timer heap for a future epoch.
    fn make_available(&self, st: &mut State, slot: u32) {
        let now_ns = self.now_ns();
        let job = &mut st.jobs[slot as usize];
        let epoch = job.extra.as_ref().and_then(|e| e.epoch);
        if let Some(epoch) = epoch {
            let now = unix_now();
            if epoch > now {
                job.state = JobState::Scheduled;
                let seq = job.seq;
                st.functions[job.func as usize].scheduled += 1;
                // Saturating: a far-future epoch must not wrap around into "due now".
                let due = (epoch - now)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(now_ns);
                self.add_timer(st, due, Timer::EpochDue { slot, seq });
                return;
            }
        }
        self.enqueue(st, slot, now_ns);
    }

    fn enqueue(&self, st: &mut State, slot: u32, now_ns: u64) {
        let job = &mut st.jobs[slot as usize];
        job.state = JobState::Queued;
        job.since_ns = now_ns;
        let (func, p, tag) = (job.func, job.priority as usize, job.seq as u32);
        let f = &mut st.functions[func as usize];
        f.queues[p].push_back(QueueRef { slot, tag });
        f.queued[p] += 1;
        if let Some(o) = &self.shared.observer {
            o.queued(st.jobs[slot as usize].seq);
        }
        self.wake(st, func, self.shared.cfg.worker_wakeup);
    }

    fn add_timer(&self, st: &mut State, due_ns: u64, t: Timer) {
        let earliest = st.timers.peek().map(|Reverse((d, _))| *d);
        st.timers.push(Reverse((due_ns, t)));
        if earliest.is_none_or(|e| due_ns < e) {
            self.shared.timer_wake.notify_one();
        }
    }

    /// Sends NOOP to up to `n` sleeping workers of `func` (0 = all), if it has queued jobs.
    fn wake(&self, st: &mut State, func: u32, n: u32) {
        let Some(f) = st.functions.get_mut(func as usize) else {
            return;
        };
        if f.total_queued() == 0 {
            return;
        }
        let mut woken = 0;
        while let Some((cid, gen)) = f.sleepers.pop() {
            let Some(c) = st.conns.get_mut(&cid) else {
                continue;
            };
            if !c.sleeping || c.sleep_gen != gen {
                continue;
            }
            c.sleeping = false;
            send(
                c,
                response(PacketType::NOOP, &[]),
                true,
                &self.shared.metrics,
            );
            woken += 1;
            if n != 0 && woken >= n {
                break;
            }
        }
    }

    /// Called by the mirror when a write completed (`Ok`) or failed for good (`Err(reason)`).
    pub fn persisted(&self, seq: u64, result: Result<(), MirrorRefused>) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(slot) = st.by_seq.get(seq) else {
            // Finished or cancelled while the write was in flight: make sure it is not resurrected.
            if result.is_ok() {
                if let Some(m) = &self.shared.mirror {
                    m.delete(seq);
                }
            }
            return;
        };
        let job = &mut st.jobs[slot as usize];
        let acks = job
            .extra
            .as_mut()
            .map(|e| std::mem::take(&mut e.pending_acks))
            .unwrap_or_default();
        // A plain background job needed `extra` only for its pending acks: free it (about
        // 200 bytes a job, which doubled the memory of a durable queue).
        if job.extra.as_ref().is_some_and(|e| {
            e.reducer.is_none()
                && e.epoch.is_none()
                && e.waiters.is_empty()
                && e.pending_acks.is_empty()
                && e.status.is_none()
        }) {
            job.extra = None;
        }
        match result {
            Ok(()) => {
                let pkt = response(PacketType::JOB_CREATED, &[&self.handle_of(seq)]);
                send_each(&st.conns, &acks, &pkt, &self.shared.metrics);
                if st.jobs[slot as usize].state == JobState::Persisting {
                    self.make_available(st, slot);
                }
            }
            Err(why) => {
                let job = &st.jobs[slot as usize];
                let label = st.functions[job.func as usize].metrics.label.clone();
                let err = ProtocolError::new("QUEUE_ERROR", why.0);
                let mut b = BytesMut::new();
                put_error(&mut b, &err);
                let pkt = b.freeze();
                for _ in &acks {
                    self.shared
                        .metrics
                        .refused(&label, "not_durable", job.priority, true);
                }
                send_each(&st.conns, &acks, &pkt, &self.shared.metrics);
                if job.state == JobState::Persisting {
                    self.remove_job(st, slot, JobOutcome::Refused);
                } else {
                    // It was already durable-less foreground work joined by a background submit.
                    st.jobs[slot as usize].persisted = false;
                }
            }
        }
    }

    /// Handles PRE_SLEEP: an immediate NOOP if work is waiting, else the worker sleeps.
    pub fn pre_sleep(&self, conn: ConnId, out: &mut BytesMut) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        let has_work = c.abilities.iter().any(|a| {
            st.functions
                .get(a.func as usize)
                .is_some_and(|f| f.total_queued() > 0)
        });
        if has_work {
            put_response(out, PacketType::NOOP, &[]);
            return;
        }
        c.sleeping = true;
        c.sleep_gen = c.sleep_gen.wrapping_add(1);
        let gen = c.sleep_gen;
        let funcs: Vec<u32> = c.abilities.iter().map(|a| a.func).collect();
        for func in funcs {
            if let Some(f) = st.functions.get_mut(func as usize) {
                // Drop stale entries once they clearly outnumber the live ones.
                if f.sleepers.len() > 64 && f.sleepers.len() > 4 * f.workers as usize {
                    let conns = &st.conns;
                    f.sleepers.retain(|(id, g)| {
                        conns
                            .get(id)
                            .is_some_and(|c| c.sleeping && c.sleep_gen == *g)
                            || *id == conn
                    });
                }
                f.sleepers.push((conn, gen));
            }
        }
    }

    /// Handles CAN_DO and CAN_DO_TIMEOUT.
    pub fn can_do(
        &self,
        conn: ConnId,
        function: &Bytes,
        timeout_ms: Option<u32>,
    ) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        let st = &mut *st;
        let func = self.function_id(st, function)?;
        let Some(c) = st.conns.get_mut(&conn) else {
            return Ok(());
        };
        // A timeout of 0 means none, whether the function is new or registered again. Like
        // gearmand 1.1.20, anything under 1000 ms counts as 1000 ms: libgearman, PHP, Perl and
        // Python document this number in seconds, so `addFunction(f, cb, ctx, 30)` must not
        // take jobs away from their worker after 30 ms.
        let timeout_ms = timeout_ms.filter(|&t| t > 0).map(|t| t.max(1000));
        if let Some(a) = c.abilities.iter_mut().find(|a| a.func == func) {
            a.timeout_ms = timeout_ms;
            return Ok(());
        }
        // Newest registered first, as gearmand scans them.
        c.abilities.insert(0, Ability { func, timeout_ms });
        st.functions[func as usize].workers += 1;
        Ok(())
    }

    /// Handles CANT_DO: the worker's jobs of that function go back to the queue.
    pub fn cant_do(&self, conn: ConnId, function: &Bytes) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(&func) = st.function_ids.get(function) else {
            return;
        };
        self.drop_abilities(st, conn, |f| f == func);
    }

    /// Handles RESET_ABILITIES.
    pub fn reset_abilities(&self, conn: ConnId) {
        let mut st = self.lock();
        self.drop_abilities(&mut st, conn, |_| true);
    }

    fn drop_abilities(&self, st: &mut State, conn: ConnId, which: impl Fn(u32) -> bool) {
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        let mut dropped = Vec::new();
        c.abilities.retain(|a| {
            let d = which(a.func);
            if d {
                dropped.push(a.func);
            }
            !d
        });
        let jobs = &st.jobs;
        let mut requeue = Vec::new();
        c.holding.retain(|&(slot, seq)| {
            let give_back = jobs
                .get(slot as usize)
                .is_some_and(|j| j.seq == seq && dropped.contains(&j.func));
            if give_back {
                requeue.push((slot, seq));
            }
            !give_back
        });
        for f in &dropped {
            if let Some(f) = st.functions.get_mut(*f as usize) {
                f.workers = f.workers.saturating_sub(1);
            }
        }
        let now = self.now_ns();
        for (slot, seq) in requeue {
            self.requeue(st, slot, seq, now, "worker gave up the function");
        }
    }

    /// Handles GRAB_JOB, GRAB_JOB_UNIQ and GRAB_JOB_ALL.
    pub fn grab(&self, conn: ConnId, kind: GrabKind, out: &mut BytesMut) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ns();
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        c.sleeping = false;
        let n = c.abilities.len();
        let start = c.rotate;
        c.rotate = c.rotate.wrapping_add(1);
        let mut found = None;
        'search: for p in Priority::ALL {
            for i in 0..n {
                let a = &c.abilities[(start + i) % n];
                let Some(f) = st.functions.get_mut(a.func as usize) else {
                    continue;
                };
                if f.queued[p as usize] == 0 {
                    continue;
                }
                while let Some(r) = f.queues[p as usize].pop_front() {
                    let live = st.jobs.get(r.slot as usize).is_some_and(|j| {
                        j.seq as u32 == r.tag && j.state == JobState::Queued && j.func == a.func
                    });
                    if live {
                        f.queued[p as usize] -= 1;
                        found = Some((r.slot, a.timeout_ms));
                        break 'search;
                    }
                }
            }
        }
        let Some((slot, timeout_ms)) = found else {
            put_response(out, PacketType::NO_JOB, &[]);
            return;
        };
        let job = &mut st.jobs[slot as usize];
        let f = &mut st.functions[job.func as usize];
        f.running += 1;
        f.metrics
            .queued_seconds
            .observe(now.saturating_sub(job.since_ns) as f64 / 1e9);
        job.state = JobState::Running(conn);
        job.attempts += 1;
        job.since_ns = now;
        let seq = job.seq;
        let attempt = job.attempts;
        c.holding.push((slot, seq));
        if let Some(o) = &self.shared.observer {
            o.assigned(seq, attempt, &peer_info(conn, c));
        }
        let handle = self.handle_of(seq);
        let fname = &f.name;
        match (kind, job.reducer()) {
            (GrabKind::Plain, _) => {
                put_response(out, PacketType::JOB_ASSIGN, &[&handle, fname, job.data()])
            }
            (GrabKind::All, Some(r)) => put_response(
                out,
                PacketType::JOB_ASSIGN_ALL,
                &[&handle, fname, job.unique(), r, job.data()],
            ),
            _ => put_response(
                out,
                PacketType::JOB_ASSIGN_UNIQ,
                &[&handle, fname, job.unique(), job.data()],
            ),
        }
        if let Some(ms) = timeout_ms {
            let due = now + ms as u64 * 1_000_000;
            self.add_timer(st, due, Timer::WorkTimeout { slot, seq, attempt });
        }
    }

    /// Handles WORK_* from a worker: forwards it to the job's clients and ends the job on a
    /// final result. `body` is the packet body as the worker sent it.
    pub fn work(
        &self,
        conn: ConnId,
        kind: WorkKind,
        handle: &Bytes,
        body: &Bytes,
        out: &mut BytesMut,
    ) {
        let mut st = self.lock();
        let st = &mut *st;
        let found = self.seq_of(handle).and_then(|seq| {
            let slot = st.by_seq.get(seq)?;
            (st.jobs[slot as usize].state == JobState::Running(conn)).then_some((slot, seq))
        });
        let Some((slot, seq)) = found else {
            put_error(
                out,
                &ProtocolError::new(
                    "JOB_NOT_FOUND",
                    format!(
                        "this connection holds no job {}",
                        String::from_utf8_lossy(handle)
                    ),
                ),
            );
            return;
        };
        let metrics = &self.shared.metrics;
        if kind == WorkKind::Status {
            if let Some(a) = split_args(body, 3) {
                st.jobs[slot as usize].extra().status = Some((a[1].clone(), a[2].clone()));
            }
        }
        let job = &st.jobs[slot as usize];
        if !job.waiters().is_empty() {
            let pkt = forward_packet(kind.packet_type(), body);
            let fail =
                (kind == WorkKind::Exception).then(|| response(PacketType::WORK_FAIL, &[handle]));
            for w in job.waiters() {
                let Some(c) = st.conns.get(w) else { continue };
                match &fail {
                    Some(fail) if !c.exceptions => send(c, fail.clone(), false, metrics),
                    _ => send(c, pkt.clone(), false, metrics),
                }
            }
        }
        if !kind.is_final() {
            return;
        }
        let now = self.now_ns();
        let f = &mut st.functions[job.func as usize];
        f.running = f.running.saturating_sub(1);
        f.metrics
            .running_seconds
            .observe(now.saturating_sub(job.since_ns) as f64 / 1e9);
        let outcome = match kind {
            WorkKind::Complete => {
                f.metrics.completed.inc(job.priority, job.background);
                JobOutcome::Complete
            }
            WorkKind::Fail => {
                f.metrics.failed.inc(job.priority, job.background);
                JobOutcome::Fail
            }
            _ => {
                f.metrics.exceptions.inc(job.priority, job.background);
                JobOutcome::Exception
            }
        };
        if let Some(c) = st.conns.get_mut(&conn) {
            if let Some(i) = c.holding.iter().position(|&(s, q)| s == slot && q == seq) {
                c.holding.swap_remove(i);
            }
        }
        self.remove_job(st, slot, outcome);
    }

    /// Removes a job everywhere (queue entries are left to be skipped lazily).
    fn remove_job(&self, st: &mut State, slot: u32, outcome: JobOutcome) {
        let job = st.jobs.remove(slot as usize);
        if let Some(o) = &self.shared.observer {
            o.finished(job.seq, outcome);
        }
        st.by_seq.remove(job.seq);
        if !job.coalesce_key().is_empty() {
            let h = hash_unique(&st.hasher, job.func, job.coalesce_key());
            if let Ok(e) = st.uniques.find_entry(h, |&s| s == slot) {
                e.remove();
            }
        }
        let f = &mut st.functions[job.func as usize];
        match job.state {
            JobState::Queued => f.queued[job.priority as usize] -= 1,
            JobState::Scheduled => f.scheduled -= 1,
            _ => {}
        }
        if let Some(e) = &job.extra {
            for w in &e.waiters {
                if let Some(c) = st.conns.get_mut(w) {
                    if let Some(i) = c
                        .waiting
                        .iter()
                        .position(|&(s, q)| s == slot && q == job.seq)
                    {
                        c.waiting.swap_remove(i);
                    }
                }
            }
            // Background submits that joined this job while its durable write was in flight
            // still need their answer: the job they asked for was accepted and has ended.
            if !e.pending_acks.is_empty() {
                let pkt = response(PacketType::JOB_CREATED, &[&self.handle_of(job.seq)]);
                send_each(&st.conns, &e.pending_acks, &pkt, &self.shared.metrics);
            }
        }
        if job.persisted {
            if let Some(m) = &self.shared.mirror {
                m.delete(job.seq);
            }
        }
    }

    /// Puts a running job back at the tail of its priority, or drops it with WORK_FAIL once it
    /// has used `job_retries` attempts.
    fn requeue(&self, st: &mut State, slot: u32, seq: u64, now: u64, why: &str) {
        let Some(job) = st.jobs.get_mut(slot as usize).filter(|j| j.seq == seq) else {
            return;
        };
        if !matches!(job.state, JobState::Running(_)) {
            return;
        }
        if let Some(o) = &self.shared.observer {
            o.requeued(seq, why);
        }
        let f = &mut st.functions[job.func as usize];
        f.running = f.running.saturating_sub(1);
        let retries = self.shared.cfg.job_retries;
        if retries > 0 && job.attempts >= retries {
            tracing::warn!(handle = %String::from_utf8_lossy(&self.handle_of(seq)), attempts = job.attempts,
                "dropping job after {} attempts ({why}; engine.job_retries)", job.attempts);
            f.metrics.failed.inc(job.priority, job.background);
            let pkt = response(PacketType::WORK_FAIL, &[&self.handle_of(seq)]);
            send_each(&st.conns, job.waiters(), &pkt, &self.shared.metrics);
            // Still marked Running (its running count already released): remove_job leaves the
            // queue counters alone.
            self.remove_job(st, slot, JobOutcome::Dropped);
            return;
        }
        if !job.background && job.waiters().is_empty() {
            // A foreground job whose clients all left while it ran: nobody would get its
            // result, so it is not run again (gearmand's ignore_job).
            tracing::debug!(handle = %String::from_utf8_lossy(&self.handle_of(seq)), "dropped: {why}, and no client waits for it");
            self.remove_job(st, slot, JobOutcome::Cancelled);
            return;
        }
        f.metrics.retried.inc(job.priority, job.background);
        // The next attempt starts from scratch: GET_STATUS must not report the lost worker's
        // progress (gearmand resets it to 0/0 on requeue too).
        if let Some(e) = job.extra.as_mut() {
            e.status = None;
        }
        tracing::debug!(handle = %String::from_utf8_lossy(&self.handle_of(seq)), "requeued: {why}");
        self.enqueue(st, slot, now);
    }

    /// Handles GET_STATUS.
    pub fn get_status(&self, handle: &Bytes, out: &mut BytesMut) {
        let st = self.lock();
        let job = self
            .seq_of(handle)
            .and_then(|seq| st.by_seq.get(seq))
            .map(|s| &st.jobs[s as usize]);
        let (known, running, num, den) = status_fields(job);
        put_response(
            out,
            PacketType::STATUS_RES,
            &[handle, known, running, &num, &den],
        );
    }

    /// Handles GET_STATUS_UNIQUE (the unique id is looked up in every function).
    pub fn get_status_unique(&self, unique: &Bytes, out: &mut BytesMut) {
        let st = self.lock();
        let job = if unique.is_empty() {
            None
        } else {
            st.functions
                .iter()
                .find_map(|(id, _)| self.find_unique(&st, id as u32, unique))
                .map(|s| &st.jobs[s as usize])
        };
        let (known, running, num, den) = status_fields(job);
        let waiting = job.map(|j| j.waiters().len()).unwrap_or(0).to_string();
        put_response(
            out,
            PacketType::STATUS_RES_UNIQUE,
            &[unique, known, running, &num, &den, waiting.as_bytes()],
        );
    }

    /// Handles SET_CLIENT_ID.
    pub fn set_client_id(&self, conn: ConnId, id: Bytes) {
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.client_id = if id.is_empty() {
                Bytes::from_static(b"-")
            } else {
                id
            };
        }
    }

    /// Handles OPTION_REQ; only `exceptions` exists.
    pub fn set_option(&self, conn: ConnId, name: &Bytes) -> Result<(), ProtocolError> {
        if &name[..] != b"exceptions" {
            return Err(ProtocolError::new(
                "UNKNOWN_OPTION",
                format!("unknown option {:?}", String::from_utf8_lossy(name)),
            ));
        }
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.exceptions = true;
            c.is_client = true;
        }
        Ok(())
    }

    /// The earliest timer deadline, if any (nanoseconds since start).
    fn next_deadline(&self) -> Option<u64> {
        self.lock().timers.peek().map(|Reverse((d, _))| *d)
    }

    /// Fires due timers: epoch jobs become queued, timed-out jobs are requeued.
    pub fn fire_timers(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ns();
        while let Some(Reverse((due, t))) = st.timers.peek().copied() {
            if due > now {
                break;
            }
            st.timers.pop();
            match t {
                Timer::EpochDue { slot, seq } => {
                    let Some(job) = st.jobs.get(slot as usize).filter(|j| j.seq == seq) else {
                        continue;
                    };
                    if job.state == JobState::Scheduled {
                        st.functions[job.func as usize].scheduled -= 1;
                        self.enqueue(st, slot, now);
                    }
                }
                Timer::WorkTimeout { slot, seq, attempt } => {
                    let Some(job) = st.jobs.get(slot as usize).filter(|j| j.seq == seq) else {
                        continue;
                    };
                    let JobState::Running(worker) = job.state else {
                        continue;
                    };
                    if job.attempts != attempt {
                        continue;
                    }
                    if let Some(c) = st.conns.get_mut(&worker) {
                        c.holding.retain(|&(s, q)| !(s == slot && q == seq));
                    }
                    self.requeue(st, slot, seq, now, "worker passed its CAN_DO_TIMEOUT");
                }
            }
        }
    }

    /// Runs the timer loop (epoch jobs, worker timeouts) until `shutdown`.
    pub async fn run_timers(self, shutdown: CancellationToken) {
        loop {
            let next = self.next_deadline();
            let sleep = async {
                match next {
                    Some(d) => {
                        let at = self.shared.started + Duration::from_nanos(d);
                        tokio::time::sleep_until(at.into()).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.shared.timer_wake.notified() => continue,
                _ = sleep => self.fire_timers(),
            }
        }
    }

    /// Puts recovered jobs back, in sequence order, keeping their handles; later handles
    /// continue after the highest recovered one. Returns how many were restored.
    pub fn restore(&self, mut records: Vec<JobRecord>, next_seq_floor: u64) -> usize {
        records.sort_by_key(|r| r.seq);
        let mut st = self.lock();
        let st = &mut *st;
        let mut n = 0;
        for r in records {
            if st.by_seq.contains(r.seq) {
                continue;
            }
            let Ok(func) = self.function_id(st, &r.function) else {
                tracing::error!(
                    seq = r.seq,
                    "cannot restore job: too many functions (engine.max_functions)"
                );
                continue;
            };
            let key = coalesce_key(&r.unique, &r.data);
            if !key.is_empty() && self.find_unique(st, func, key).is_some() {
                // The same (function, unique) twice: keep the older one, drop the duplicate record.
                if let Some(m) = &self.shared.mirror {
                    m.delete(r.seq);
                }
                continue;
            }
            let mut job = Job::new(
                r.seq,
                func,
                r.priority,
                true,
                r.attempts,
                &r.unique,
                &r.data,
                self.now_ns(),
            );
            job.persisted = true;
            if r.epoch.is_some() || r.reducer.is_some() {
                let e = job.extra();
                e.epoch = r.epoch;
                e.reducer = r.reducer;
            }
            st.next_seq = st.next_seq.max(r.seq + 1);
            let slot = self.insert_job(st, job);
            self.make_available(st, slot);
            n += 1;
        }
        st.next_seq = st.next_seq.max(next_seq_floor);
        n
    }

    /// The next sequence number a job will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Records of the live, mirrored jobs among `seqs` (the mirror rewrites lost copies).
    pub fn persisted_records(&self, seqs: &[u64]) -> Vec<JobRecord> {
        let st = self.lock();
        seqs.iter()
            .filter_map(|&seq| st.by_seq.get(seq))
            .filter(|&slot| st.jobs[slot as usize].persisted)
            .map(|slot| self.record_of(&st, slot))
            .collect()
    }

    // ---- snapshots and admin operations ----

    /// Per-function counts, sorted by name.
    pub fn function_stats(&self) -> Vec<FunctionStat> {
        let st = self.lock();
        let mut v: Vec<FunctionStat> = st
            .functions
            .iter()
            .map(|(_, f)| FunctionStat {
                name: String::from_utf8_lossy(&f.name).into_owned(),
                name_bytes: f.name.clone(),
                label: f.metrics.label.clone(),
                queued: f.queued,
                running: f.running,
                scheduled: f.scheduled,
                workers: f.workers,
            })
            .collect();
        v.sort_by(|a, b| a.name_bytes.cmp(&b.name_bytes));
        v
    }

    /// Totals for metrics.
    pub fn totals(&self) -> Totals {
        let st = self.lock();
        let mut t = Totals {
            jobs: st.jobs.len(),
            ..Default::default()
        };
        t.epoch_waiting = st.functions.iter().map(|(_, f)| f.scheduled as u64).sum();
        for c in st.conns.values() {
            t.connections += 1;
            if !c.abilities.is_empty() {
                t.workers += 1;
            }
            if c.is_client {
                t.clients += 1;
            }
        }
        t
    }

    /// Every connection with its registered functions, by connection id.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let st = self.lock();
        let mut v: Vec<ConnInfo> = st
            .conns
            .iter()
            .map(|(&id, c)| ConnInfo {
                id,
                peer: c.peer,
                client_id: c.client_id.clone(),
                functions: c
                    .abilities
                    .iter()
                    .filter_map(|a| st.functions.get(a.func as usize).map(|f| f.name.clone()))
                    .collect(),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Every live job (for `show jobs`), by sequence.
    pub fn jobs(&self) -> Vec<JobInfo> {
        let st = self.lock();
        let mut v: Vec<(u64, JobInfo)> = st
            .jobs
            .iter()
            .map(|(_, j)| {
                (
                    j.seq,
                    JobInfo {
                        handle: self.handle_of(j.seq),
                        attempts: j.attempts,
                        queued: j.state == JobState::Queued,
                    },
                )
            })
            .collect();
        v.sort_by_key(|(s, _)| *s);
        v.into_iter().map(|(_, j)| j).collect()
    }

    /// Unique ids of live jobs (for `show unique jobs`).
    pub fn uniques(&self) -> Vec<Bytes> {
        let st = self.lock();
        st.jobs
            .iter()
            .filter(|(_, j)| j.unique_len > 0)
            .map(|(_, j)| Bytes::copy_from_slice(j.unique()))
            .collect()
    }

    /// `maxqueue`: sets per-priority limits for a function (creating it if needed).
    pub fn set_max_queue(&self, function: &Bytes, limits: [u32; 3]) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        let id = self.function_id(&mut st, function)?;
        st.functions[id as usize].max_queue = Some(limits);
        Ok(())
    }

    /// `create function`.
    pub fn create_function(&self, function: &Bytes) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        self.function_id(&mut st, function).map(|_| ())
    }

    /// `drop function`: only a function with no jobs and no workers.
    pub fn drop_function(&self, function: &Bytes) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        let Some(&id) = st.function_ids.get(function) else {
            return Err(ProtocolError::new("UNKNOWN_FUNCTION", "no such function"));
        };
        let f = &st.functions[id as usize];
        if f.total_queued() > 0 || f.running > 0 || f.scheduled > 0 || f.workers > 0 {
            return Err(ProtocolError::new(
                "FUNCTION_IN_USE",
                "function has jobs or workers",
            ));
        }
        let has_jobs = st.jobs.iter().any(|(_, j)| j.func == id);
        if has_jobs {
            return Err(ProtocolError::new("FUNCTION_IN_USE", "function has jobs"));
        }
        st.functions.remove(id as usize);
        st.function_ids.remove(function);
        Ok(())
    }

    /// `cancel job`: removes a queued (not running) job; its clients get WORK_FAIL.
    pub fn cancel_job(&self, handle: &Bytes) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        let st = &mut *st;
        let slot = self
            .seq_of(handle)
            .and_then(|seq| st.by_seq.get(seq))
            .ok_or_else(|| ProtocolError::new("JOB_NOT_FOUND", "no such job"))?;
        let job = &st.jobs[slot as usize];
        if matches!(job.state, JobState::Running(_)) {
            return Err(ProtocolError::new(
                "JOB_RUNNING",
                "job is running on a worker",
            ));
        }
        let pkt = response(PacketType::WORK_FAIL, &[handle]);
        send_each(&st.conns, job.waiters(), &pkt, &self.shared.metrics);
        self.remove_job(st, slot, JobOutcome::Cancelled);
        Ok(())
    }
}

fn peer_info(id: ConnId, c: &Conn) -> PeerInfo<'_> {
    PeerInfo {
        conn: id,
        peer: c.peer,
        client_id: &c.client_id,
    }
}

fn status_fields(job: Option<&Job>) -> (&'static [u8], &'static [u8], Bytes, Bytes) {
    match job {
        None => (
            b"0",
            b"0",
            Bytes::from_static(b"0"),
            Bytes::from_static(b"0"),
        ),
        Some(j) => {
            let running: &'static [u8] = if matches!(j.state, JobState::Running(_)) {
                b"1"
            } else {
                b"0"
            };
            let (n, d) = j
                .extra
                .as_ref()
                .and_then(|e| e.status.clone())
                .unwrap_or((Bytes::from_static(b"0"), Bytes::from_static(b"0")));
            (b"1", running, n, d)
        }
    }
}

/// Re-frames a worker's WORK_* body as a response packet for clients.
fn forward_packet(kind: PacketType, body: &Bytes) -> Bytes {
    let mut b = BytesMut::with_capacity(crate::codec::HEADER_LEN + body.len());
    put_response(&mut b, kind, &[body]);
    b.freeze()
}

/// Appends `ERROR code text`.
pub fn put_error(out: &mut BytesMut, e: &ProtocolError) {
    put_response(
        out,
        PacketType::ERROR,
        &[e.code.as_bytes(), e.text.as_bytes()],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-job footprint is what makes 1,000,000 queued jobs fit in well under 250 MB.
    #[test]
    fn job_struct_stays_small() {
        assert!(
            std::mem::size_of::<Job>() <= 80,
            "Job is {} bytes",
            std::mem::size_of::<Job>()
        );
        assert_eq!(std::mem::size_of::<QueueRef>(), 8);
    }
}
