//! The job engine: every queued and running job, every function and what each connection is
//! doing, behind one lock. Requests become state changes here; answers to the requesting
//! connection are appended to its write buffer, and packets for other connections (NOOP wake-ups,
//! WORK_* results) go through their bounded outbound channels. Nothing here awaits, so the engine
//! is a synchronous state machine that its unit tests drive directly (`tests.rs`); slow I/O
//! (memcached, span export) happens in tasks fed by the [`Mirror`] seam.
//!
//! One `impl Engine`, spread by subject:
//! - `mod.rs`: the handle, the locked [`State`], connections (connect, disconnect, client
//!   options), and sending to other connections.
//! - [`seams`]: the [`Mirror`] and [`JobObserver`] traits and the values that cross them.
//! - [`job`]: the per-job and per-function structs, sized for a million queued jobs.
//! - [`clock`]: the one clock (tokio's, so tests pause it) for timings, timers and epochs.
//! - [`submit`]: SUBMIT_JOB*, coalescing on unique ids, and the mirror's write acknowledgements.
//! - [`worker`]: CAN_DO, PRE_SLEEP, wake-ups, GRAB_JOB*, WORK_*, requeue and job removal.
//! - [`timers`]: epoch jobs, CAN_DO_TIMEOUT and rate-limit refills, and the task that fires them.
//! - [`settings`]: per-function settings in force (config file, run-time changes) and their views.
//! - [`limits`]: per-function rate and concurrency limits on the grab path.
//! - [`restore`]: putting recovered jobs back, and the records the mirror re-reads.
//! - [`aliases`]: handles kept by jobs taken over from another node (`H:<that node>:<n>`).
//! - [`snapshots`]: GET_STATUS, the admin and metrics views, and the admin mutations.
//! - [`pages`]: large admin listings a page (a bounded walk under the lock) at a time.
//!
//! Log lines decided while the lock is held are queued in [`State`] and written by the guard
//! ([`Locked`]) after it releases the lock, so a slow log sink never stalls the job path.

mod aliases;
mod clock;
mod job;
mod limits;
mod pages;
mod restore;
mod seams;
mod settings;
mod snapshots;
mod submit;
#[cfg(test)]
mod tests;
mod timers;
mod worker;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use bytes::{Bytes, BytesMut};
// hashbrown's maps (foldhash) rather than std's SipHash: keys here are sequence numbers and
// connection ids, hashed on every packet.
use hashbrown::{HashMap, HashTable};
use slab::Slab;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::codec::{put_response, PacketType};
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::seq_index::SeqIndex;

use clock::Clock;
use job::{Function, Job};
use timers::Timer;

pub use pages::{Page, PAGE_CONNECTIONS, PAGE_FUNCTIONS, PAGE_SLOTS};
pub use seams::{
    EndedJob, JobEvent, JobObserver, JobOutcome, JobRecord, Mirror, MirrorRefused, OutcomeSink,
    PeerInfo, SettingsSink,
};
pub use settings::{FunctionSettingsInfo, LimitStats, MaxQueue, SettingsView};
pub use snapshots::{ConnInfo, FunctionStat, JobInfo, Totals};
pub use submit::SubmitOutcome;

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
    /// WORK_EXCEPTION goes to every client, as if each had sent OPTION_REQ exceptions
    /// (gearmand's `--exceptions`).
    pub exceptions: bool,
    /// Per-function settings from `[functions."<name>"]`, applied when a function is created.
    pub functions: std::collections::BTreeMap<String, crate::functions::FunctionSettings>,
}

impl Default for EngineConfig {
    /// The shipped defaults (`config/default.toml`, the one place they are written), with the
    /// node id `gearhouse` instead of the host name.
    fn default() -> Self {
        let mut c = crate::config::Config::default();
        c.engine.node_id = "gearhouse".into();
        c.engine_config()
    }
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
    clock: Clock,
    /// Wakes the timer task when an earlier deadline is added.
    timer_wake: Notify,
    metrics: Arc<Metrics>,
    mirror: Option<Arc<dyn Mirror>>,
    observer: Option<Arc<dyn JobObserver>>,
    /// The result cache and dead-letter store, once the server has built them.
    outcomes: OnceLock<Arc<dyn OutcomeSink>>,
    /// Where run-time settings changes are reported (their memcached mirror), once built.
    settings_sinks: std::sync::RwLock<Vec<Arc<dyn SettingsSink>>>,
    limit_metrics: limits::LimitMetrics,
    /// Set while this server cannot renew its lease in memcached: its durable jobs are not
    /// handed out, since a peer may be taking them over.
    fenced: AtomicBool,
    /// Handles of jobs taken over from other nodes (empty, and skipped, nearly always).
    aliases: aliases::Aliases,
}

impl Shared {
    /// The wire handle of a job sequence number: the handle it kept from another node, if it
    /// was taken over, else `H:<node_id>:<seq>`.
    fn handle_of(&self, seq: u64) -> Bytes {
        if let Some(h) = self.aliases.handle(seq) {
            return h;
        }
        self.local_handle(seq)
    }

    /// `H:<node_id>:<seq>`.
    fn local_handle(&self, seq: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(self.handle_prefix.len() + 20);
        b.extend_from_slice(&self.handle_prefix);
        b.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        b.freeze()
    }
}

/// The handle node `node_id` gives its job `seq` (`H:<node_id>:<seq>`), as a takeover names the
/// jobs it moves.
pub fn node_handle(node_id: &str, seq: u64) -> Bytes {
    Bytes::from(format!("H:{node_id}:{seq}"))
}

/// What a worker registered with CAN_DO (or CAN_DO_TIMEOUT).
struct Ability {
    func: u32,
    timeout_ms: Option<u32>,
}

/// One connection's part of the engine state.
struct Conn {
    peer: SocketAddr,
    tx: mpsc::Sender<Bytes>,
    kill: CancellationToken,
    client_id: Bytes,
    abilities: Vec<Ability>,
    sleeping: bool,
    sleep_gen: u32,
    /// Its last grab is parked until a rate-limited function's next token (see `limits`).
    parked: bool,
    /// Jobs this worker holds: (slot, seq).
    holding: Vec<(u32, u64)>,
    /// Foreground jobs this client waits on: (slot, seq).
    waiting: Vec<(u32, u64)>,
    exceptions: bool,
    /// Rotates the starting function of each grab so functions of one priority share workers.
    rotate: usize,
    is_client: bool,
}

/// Everything the lock guards.
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
    /// Settings changed at run time, by function name (kept when a function is dropped).
    runtime_settings: std::collections::BTreeMap<String, crate::functions::FunctionSettings>,
    /// Log lines to write once the lock is released (empty, and unallocated, nearly always).
    deferred: Vec<Deferred>,
    /// Jobs with a kept handle that ended under the lock: their aliases are released after
    /// the log lines above, which may name them (empty, and unallocated, nearly always).
    ended_aliases: Vec<u64>,
}

/// Why a running job lost its attempt (for observers and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequeueReason {
    /// The worker's connection closed.
    Disconnected,
    /// CANT_DO or RESET_ABILITIES for the job's function.
    GaveUpFunction,
}

impl RequeueReason {
    /// The reason as observers (span events) and log lines spell it.
    fn as_str(self) -> &'static str {
        match self {
            RequeueReason::Disconnected => "worker disconnected",
            RequeueReason::GaveUpFunction => "worker gave up the function",
        }
    }
}

impl std::fmt::Display for RequeueReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A log line decided under the lock, written by [`Locked`] after it releases the lock.
enum Deferred {
    /// A connection was closed for not reading its packets.
    OutboundFull { peer: SocketAddr },
    /// A job was dropped after `engine.job_retries` attempts.
    RetriesExhausted {
        seq: u64,
        attempts: u32,
        why: RequeueReason,
    },
    /// A running foreground job lost its attempt and no client waits for it any more.
    Abandoned { seq: u64, why: RequeueReason },
    /// A running job went back to its queue.
    Requeued { seq: u64, why: RequeueReason },
    /// A recovered job was not restored: the function table is full.
    NotRestored { seq: u64 },
    /// A worker passed its CAN_DO_TIMEOUT: the job failed.
    TimedOut { seq: u64, attempts: u32 },
    /// A taken-over job could not keep its handle: another job here answers to it.
    HandleInUse { seq: u64, handle: Bytes },
}

impl Deferred {
    /// Queues a debug-level line only when it would be written, so the job path allocates
    /// nothing for lines nobody reads.
    fn debug(log: &mut Vec<Deferred>, line: Deferred) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            log.push(line);
        }
    }

    fn write(self, shared: &Shared) {
        let handle = |seq| String::from_utf8_lossy(&shared.handle_of(seq)).into_owned();
        match self {
            Deferred::OutboundFull { peer } => tracing::warn!(
                %peer,
                "closing connection: its outbound queue is full (server.outbound_queue)"
            ),
            Deferred::RetriesExhausted { seq, attempts, why } => tracing::warn!(
                handle = %handle(seq),
                attempts,
                "dropping job after {attempts} attempts ({why}; engine.job_retries)"
            ),
            Deferred::Abandoned { seq, why } => tracing::debug!(
                handle = %handle(seq),
                "dropped: {why}, and no client waits for it"
            ),
            Deferred::Requeued { seq, why } => {
                tracing::debug!(handle = %handle(seq), "requeued: {why}")
            }
            Deferred::TimedOut { seq, attempts } => tracing::warn!(
                handle = %handle(seq),
                attempts,
                "job failed: its worker passed its CAN_DO_TIMEOUT; clients got WORK_FAIL"
            ),
            Deferred::NotRestored { seq } => tracing::error!(
                seq,
                "cannot restore job: too many functions (engine.max_functions)"
            ),
            Deferred::HandleInUse { seq, handle: old } => tracing::warn!(
                old_handle = %String::from_utf8_lossy(&old),
                handle = %handle(seq),
                "a taken-over job gets a new handle: another job here already answers to its old one (its node reused the number after a restart)"
            ),
        }
    }
}

/// The engine lock, held. Dereferences to [`State`]; on drop it releases the lock first and
/// then writes the log lines queued in `State::deferred`.
struct Locked<'a> {
    /// Always `Some` until drop takes it.
    guard: Option<MutexGuard<'a, State>>,
    shared: &'a Shared,
    /// When the lock was taken (for `gearhouse_engine_lock_hold_seconds`).
    since: std::time::Instant,
}

impl Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_deref().expect("held until drop")
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_deref_mut().expect("held until drop")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        let lines = std::mem::take(&mut guard.deferred);
        let ended = std::mem::take(&mut guard.ended_aliases);
        drop(guard);
        self.shared
            .metrics
            .engine_lock_hold_seconds
            .observe(self.since.elapsed().as_secs_f64());
        for line in lines {
            line.write(self.shared);
        }
        if !ended.is_empty() {
            self.shared.aliases.remove(&ended);
        }
    }
}

/// Sends a server-initiated packet; a client that does not read its packets is disconnected
/// rather than buffered without bound. NOOPs are droppable: a full queue already holds a wake-up.
fn send(conn: &Conn, pkt: Bytes, droppable: bool, metrics: &Metrics, log: &mut Vec<Deferred>) {
    match conn.tx.try_send(pkt) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) if droppable => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics.connections_overflowed.inc();
            log.push(Deferred::OutboundFull { peer: conn.peer });
            conn.kill.cancel();
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Sends one packet to each of `ids` that is still connected.
fn send_each(
    conns: &HashMap<ConnId, Conn>,
    ids: &[ConnId],
    pkt: &Bytes,
    metrics: &Metrics,
    log: &mut Vec<Deferred>,
) {
    for id in ids {
        if let Some(c) = conns.get(id) {
            send(c, pkt.clone(), false, metrics, log);
        }
    }
}

fn peer_info(id: ConnId, c: &Conn) -> PeerInfo<'_> {
    PeerInfo {
        conn: id,
        peer: c.peer,
        client_id: &c.client_id,
    }
}

/// Appends `ERROR code text`.
pub fn put_error(out: &mut BytesMut, e: &ProtocolError) {
    put_response(
        out,
        PacketType::ERROR,
        &[e.code.as_str().as_bytes(), e.text.as_bytes()],
    );
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
        let limit_metrics = limits::LimitMetrics::new(&metrics.registry);
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
                    runtime_settings: Default::default(),
                    deferred: Vec::new(),
                    ended_aliases: Vec::new(),
                }),
                cfg,
                handle_prefix,
                clock: Clock::start(),
                timer_wake: Notify::new(),
                metrics,
                mirror,
                observer,
                outcomes: OnceLock::new(),
                settings_sinks: Default::default(),
                limit_metrics,
                fenced: AtomicBool::new(false),
                aliases: Default::default(),
            }),
        }
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Sets the sink that keeps what outlives jobs (result cache, dead letters). Only the first
    /// call counts: it is set once at start-up.
    pub fn set_outcome_sink(&self, sink: Arc<dyn OutcomeSink>) {
        let _ = self.shared.outcomes.set(sink);
    }

    /// Adds a listener for run-time changes of per-function settings (their memcached mirror,
    /// the result cache's TTLs).
    pub fn set_settings_sink(&self, sink: Arc<dyn SettingsSink>) {
        self.shared
            .settings_sinks
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sink);
    }

    /// Fences (true) or unfences this server's durable jobs: while fenced, workers are not
    /// given jobs that have a record in memcached (another server may be taking them over);
    /// jobs that live only in memory still run.
    pub fn set_fenced(&self, fenced: bool) {
        self.shared.fenced.store(fenced, Ordering::SeqCst);
        if !fenced {
            // Workers told NO_JOB while fenced sleep: wake them for the work that waited.
            let mut st = self.lock();
            let funcs: Vec<u32> = st.functions.iter().map(|(i, _)| i as u32).collect();
            for f in funcs {
                self.wake(&mut st, f, 0);
            }
        }
    }

    /// True while [`Engine::set_fenced`] holds durable jobs back.
    pub fn is_fenced(&self) -> bool {
        self.shared.fenced.load(Ordering::SeqCst)
    }

    /// The settings the engine was started with.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// Takes the engine lock. A panic under the lock leaves state that every step keeps
    /// consistent on its own, so a poisoned lock is used rather than taking the server down.
    fn lock(&self) -> Locked<'_> {
        Locked {
            guard: Some(
                self.shared
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            ),
            shared: &self.shared,
            since: std::time::Instant::now(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.shared.clock.now_ns()
    }

    /// The wire handle of a job sequence number (the one it kept, for a taken-over job).
    pub fn handle_of(&self, seq: u64) -> Bytes {
        self.shared.handle_of(seq)
    }

    /// The job sequence number a wire handle names: a kept handle of a taken-over job, or
    /// `H:<node_id>:<seq>` of a job that has no kept handle.
    fn seq_of(&self, handle: &[u8]) -> Option<u64> {
        let local = self.parse_local(handle);
        self.shared.aliases.resolve(handle, local)
    }

    /// The number in a handle of this node's form.
    fn parse_local(&self, handle: &[u8]) -> Option<u64> {
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
        self.connect_client(peer, tx, kill, Bytes::new(), false)
    }

    /// [`Engine::connect`] followed by SET_CLIENT_ID `client_id` (empty: none) and, with
    /// `exceptions`, OPTION_REQ exceptions, in one turn of the lock: an in-process client
    /// (`LocalClient`, one per HTTP request) would otherwise take it three times to get there.
    pub fn connect_client(
        &self,
        peer: SocketAddr,
        tx: mpsc::Sender<Bytes>,
        kill: CancellationToken,
        client_id: Bytes,
        exceptions: bool,
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
                client_id: if client_id.is_empty() {
                    Bytes::from_static(b"-")
                } else {
                    client_id
                },
                abilities: Vec::new(),
                sleeping: false,
                sleep_gen: 0,
                parked: false,
                holding: Vec::new(),
                waiting: Vec::new(),
                exceptions: exceptions || self.shared.cfg.exceptions,
                rotate: 0,
                // As after OPTION_REQ; otherwise its first submit says so.
                is_client: exceptions,
            },
        );
        id
    }

    /// Forgets a connection: its jobs go back to the queue, its foreground-only queued jobs with
    /// no other waiter are cancelled, and its waits end.
    pub fn disconnect(&self, id: ConnId) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(conn) = st.conns.remove(&id) else {
            return;
        };
        let now = self.now_ns();
        for a in &conn.abilities {
            if let Some(f) = st.functions.get_mut(a.func as usize) {
                f.workers = f.workers.saturating_sub(1);
            }
        }
        let worker = Some((conn.peer, conn.client_id.clone()));
        for (slot, seq) in conn.holding {
            self.requeue(st, slot, seq, now, RequeueReason::Disconnected, &worker);
        }
        self.end_waits(st, id, &conn.waiting);
        // A worker that was woken but left before grabbing must not strand queued work.
        for a in &conn.abilities {
            self.wake(st, a.func, 0);
        }
    }

    /// A client left: it stops waiting on `waiting`, and a foreground job that nobody waits
    /// for any more and that has not started is cancelled.
    fn end_waits(&self, st: &mut State, id: ConnId, waiting: &[(u32, u64)]) {
        for &(slot, seq) in waiting {
            let Some(job) = st.jobs.get_mut(slot as usize).filter(|j| j.seq == seq) else {
                continue;
            };
            if let Some(e) = job.extra.as_mut() {
                e.waiters.retain(|&w| w != id);
                e.pending_acks.retain(|&w| w != id);
            }
            let orphan = !job.background
                && job.waiters().is_empty()
                && matches!(job.state, job::JobState::Queued | job::JobState::Scheduled);
            if orphan {
                self.remove_job(st, slot, JobOutcome::Cancelled);
            }
        }
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
                ErrorCode::UnknownOption,
                format!("unknown option {:?}", String::from_utf8_lossy(name)),
            ));
        }
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.exceptions = true;
            c.is_client = true;
        }
        Ok(())
    }
}
