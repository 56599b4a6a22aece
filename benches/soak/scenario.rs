//! The soak itself: a mixed workload against one gearhouse for a fixed duration, with failures
//! injected on a schedule, then a drain and the accounting. The benchmark (`main.rs`) runs it
//! for half an hour; `tests/soak_short.rs` runs the same code for ~20 s (it includes this file,
//! `cluster.rs`, `ledger.rs` and `report.rs` with `#[path]`, so there is one soak, not a copy).
//!
//! The parts, each a task on the crate's own client (`gearhouse::client::Connection`):
//! - producers: background submits, one in flight per connection so every JOB_CREATED belongs
//!   to a known id, paced to `bg_rate` in total over several functions and priorities; the
//!   payload carries the id (`b<id>:...`), the ledger marks it acknowledged. The first producer
//!   submits epoch jobs due `epoch_delay` later: they keep a standing queue (and its copies in
//!   memcached) of about `bg_rate / producers * epoch_delay` jobs, so a restarted memcached
//!   really loses copies the repairer must rewrite (the other jobs run within milliseconds);
//! - foreground clients: SUBMIT_JOB and wait for WORK_COMPLETE, the round trip is the latency;
//! - churners: a connection per `churn_jobs` background jobs (connect, submit, close);
//! - workers: GRAB_JOB_UNIQ, mark the id run, WORK_COMPLETE; PRE_SLEEP when idle. Every
//!   `crash_every` the next worker to receive a job "crashes": it drops its connection holding
//!   the job (the server puts it back, another worker runs it: a duplicate, at-least-once) and
//!   reconnects;
//! - chaos: every `restart_every` one memcached node (round robin) is killed and started empty on
//!   its port; the next restart waits until the server reports every job at two copies again;
//! - the sampler: the server's VmRSS and open descriptors every `sample_every`, and one table
//!   row per `window`.
//!
//! At the end the load stops, workers run until no acknowledged job is left unrun and the queues
//! are empty (or `drain_timeout`), and the ledger counts the lost and the duplicated.
//! Submits are never cancelled half-way (stop is checked between jobs), so "acknowledged" is
//! exact: an id is marked exactly when its JOB_CREATED was read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gearhouse::client::{with_timeout, ClientError, Connection, Job};
use gearhouse::protocol::{GrabKind, Priority};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::cluster::{self, ClusterError, Memcached, Server};
use crate::ledger::Ledger;
use crate::report::{percentile_ms, Report, Restart, Row, Totals};

/// Background functions; producers and churners spread their jobs over them.
pub const BG_FUNCTIONS: [&str; 3] = ["soak-resize", "soak-mail", "soak-index"];
/// The foreground function.
pub const FG_FUNCTION: &str = "soak-render";
const PRIORITIES: [Priority; 3] = [Priority::Normal, Priority::High, Priority::Low];
/// How long one request may take before the connection counts as broken.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the repair after a memcached restart.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(120);

/// Which server the soak drives.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start three memcached (`-M -m mem_mb -U 0`) and `binary serve --config config
    /// --memcached a,b,c` with two replicas; the server's log goes into `log_dir`.
    Spawn {
        binary: PathBuf,
        config: PathBuf,
        log_dir: PathBuf,
        mem_mb: u32,
    },
    /// A server already running (its memcached are not the soak's: no restarts); `pid` enables
    /// the footprint samples.
    External { addr: SocketAddr, pid: Option<u32> },
}

/// The shape of a run (see the module doc; `main.rs` documents the defaults).
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Target,
    /// Load time (the drain comes after it).
    pub duration: Duration,
    /// Background submits per second over all producers.
    pub bg_rate: f64,
    pub producers: usize,
    pub fg_clients: usize,
    /// Foreground submits per second per client (each waits for its result first).
    pub fg_rate: f64,
    pub churners: usize,
    /// Background jobs per churned connection.
    pub churn_jobs: u32,
    pub workers: usize,
    /// One worker crash per interval; zero: none.
    pub crash_every: Duration,
    /// One memcached restart per interval; zero: none.
    pub restart_every: Duration,
    pub sample_every: Duration,
    /// One table row per window (a whole number of samples).
    pub window: Duration,
    pub drain_timeout: Duration,
    /// Payload bytes (the id prefix included).
    pub payload: usize,
    /// The first producer's jobs are epoch jobs due this much later; zero: no epoch jobs.
    pub epoch_delay: Duration,
}

/// Counters the tasks bump and the sampler turns into rows.
#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    refused: AtomicU64,
    runs: AtomicU64,
    fg_done: AtomicU64,
    fg_failed: AtomicU64,
    errors: AtomicU64,
    crashes: AtomicU64,
    crashes_bg: AtomicU64,
    restarts: AtomicU64,
    churn_connections: AtomicU64,
    foreign: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn totals(&self) -> Totals {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            acked: g(&self.acked),
            refused: g(&self.refused),
            runs: g(&self.runs),
            fg_done: g(&self.fg_done),
            fg_failed: g(&self.fg_failed),
            errors: g(&self.errors),
            crashes: g(&self.crashes),
            crashes_bg: g(&self.crashes_bg),
            churn_connections: g(&self.churn_connections),
            foreign: g(&self.foreign),
        }
    }
}

/// State every task of a run shares.
struct Shared {
    addr: SocketAddr,
    settings: Settings,
    ledger: Ledger,
    counters: Counters,
    /// Foreground latencies of the current window, microseconds; swapped out by the sampler.
    latencies_us: Mutex<Vec<u32>>,
    /// Set by the crash schedule; the next worker that receives a job takes it and crashes.
    crash_next: AtomicBool,
    /// The sampler found the server process gone: nothing left to drain.
    server_gone: AtomicBool,
    fg_ids: AtomicU64,
    last_refusal: Mutex<Option<String>>,
    /// Stops producers, foreground clients, churners and the chaos schedules.
    stop_load: CancellationToken,
    /// Stops the workers, after the drain.
    stop_workers: CancellationToken,
    started: Instant,
}

impl Shared {
    /// The payload of a job: its kind (`b` background, `f` foreground), its id, padding.
    fn payload(&self, kind: char, id: u64) -> Vec<u8> {
        let mut p = format!("{kind}{id}:").into_bytes();
        p.resize(self.settings.payload.max(p.len()), b'.');
        p
    }

    fn connect_error(&self) {
        Counters::bump(&self.counters.errors);
    }
}

/// Runs the soak: starts what `settings.target` says, loads, injects failures, drains, counts.
pub async fn run(settings: Settings) -> Result<Report, ClusterError> {
    let (nodes, server) = match &settings.target {
        Target::Spawn {
            binary,
            config,
            log_dir,
            mem_mb,
        } => {
            let mem_mb = *mem_mb;
            let nodes = tokio::task::spawn_blocking(move || {
                (0..3)
                    .map(|_| Memcached::start(mem_mb))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .expect("memcached start thread")?;
            let addrs: Vec<String> = nodes.iter().map(Memcached::addr).collect();
            let server = Server::start(binary, config, &addrs, log_dir).await?;
            (Some(Arc::new(Mutex::new(nodes))), Some(server))
        }
        Target::External { .. } => (None, None),
    };
    let (addr, pid, http) = match (&server, &settings.target) {
        (Some(s), _) => (s.addr, Some(s.pid()), Some(s.http)),
        (None, Target::External { addr, pid }) => (*addr, *pid, None),
        (None, Target::Spawn { .. }) => unreachable!("a spawned target has a server"),
    };
    let sh = Arc::new(Shared {
        addr,
        settings: settings.clone(),
        ledger: Ledger::default(),
        counters: Counters::default(),
        latencies_us: Mutex::new(Vec::new()),
        crash_next: AtomicBool::new(false),
        server_gone: AtomicBool::new(false),
        fg_ids: AtomicU64::new(0),
        last_refusal: Mutex::new(None),
        stop_load: CancellationToken::new(),
        stop_workers: CancellationToken::new(),
        started: Instant::now(),
    });
    println!("{}", Row::header());

    let workers: Vec<_> = (0..settings.workers)
        .map(|_| tokio::spawn(worker(sh.clone())))
        .collect();
    let mut load = Vec::new();
    for i in 0..settings.producers {
        load.push(tokio::spawn(producer(sh.clone(), i)));
    }
    for _ in 0..settings.fg_clients {
        load.push(tokio::spawn(foreground(sh.clone())));
    }
    for i in 0..settings.churners {
        load.push(tokio::spawn(churner(sh.clone(), i)));
    }
    load.push(tokio::spawn(crash_schedule(sh.clone())));
    let restarts = tokio::spawn(restart_schedule(sh.clone(), nodes.clone(), http));
    let sampler = tokio::spawn(sampler(sh.clone(), pid));

    tokio::select! {
        _ = tokio::time::sleep(settings.duration) => {}
        _ = sh.stop_load.cancelled() => {} // the sampler saw the server die
    }
    sh.stop_load.cancel();
    for t in load {
        let _ = t.await;
    }
    let restarts = restarts.await.expect("restart schedule");
    let drained = drain(&sh).await;
    sh.stop_workers.cancel();
    for t in workers {
        let _ = t.await;
    }
    let (rows, samples) = sampler.await.expect("sampler");
    let server_alive = pid.is_none_or(|p| cluster::footprint(p).is_some());

    let tally = sh.ledger.tally();
    let report = Report {
        elapsed: sh.started.elapsed(),
        tally,
        totals: sh.counters.totals(),
        last_refusal: sh.last_refusal.lock().expect("refusal lock").clone(),
        lost_sample: if tally.lost > 0 {
            sh.ledger.lost_sample(10)
        } else {
            Vec::new()
        },
        rows,
        samples,
        restarts,
        drained,
        server_alive,
        server_log: server.as_ref().map(|s| s.log.clone()),
    };
    drop(server);
    drop(nodes);
    Ok(report)
}

/// Background submits at `bg_rate / producers` per second, one in flight.
async fn producer(sh: Arc<Shared>, index: usize) {
    let s = &sh.settings;
    let function = BG_FUNCTIONS[index % BG_FUNCTIONS.len()];
    let priority = PRIORITIES[(index + index / BG_FUNCTIONS.len()) % PRIORITIES.len()];
    let period = Duration::from_secs_f64(s.producers as f64 / s.bg_rate.max(0.001));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut conn: Option<Connection> = None;
    loop {
        tokio::select! {
            _ = sh.stop_load.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Connection::connect(sh.addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    sh.connect_error();
                    continue;
                }
            },
        };
        let epoch = (index == 0 && !s.epoch_delay.is_zero()).then(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (now + s.epoch_delay).as_secs()
        });
        if submit_background(&sh, c, function, priority, epoch)
            .await
            .is_err()
        {
            conn = None;
        }
    }
}

/// One background submit with a fresh id; Err when the connection is no longer usable.
async fn submit_background(
    sh: &Shared,
    c: &mut Connection,
    function: &str,
    priority: Priority,
    epoch: Option<u64>,
) -> Result<(), ClientError> {
    let id = sh.ledger.issue();
    let data = sh.payload('b', id);
    let mut job = Job::new(function, &data).priority(priority);
    if let Some(at) = epoch {
        job = job.epoch(at);
    }
    match with_timeout(REQUEST_TIMEOUT, c.submit_background(&job)).await {
        Ok(_) => {
            sh.ledger.acked(id);
            Counters::bump(&sh.counters.acked);
            Ok(())
        }
        Err(e) if e.is_refusal() => {
            Counters::bump(&sh.counters.refused);
            *sh.last_refusal.lock().expect("refusal lock") = Some(e.to_string());
            Ok(())
        }
        Err(e) => {
            sh.connect_error();
            Err(e)
        }
    }
}

/// Foreground round trips at `fg_rate` per second; the latency goes into the current window.
async fn foreground(sh: Arc<Shared>) {
    let period = Duration::from_secs_f64(1.0 / sh.settings.fg_rate.max(0.001));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut conn: Option<Connection> = None;
    loop {
        tokio::select! {
            _ = sh.stop_load.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Connection::connect(sh.addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    sh.connect_error();
                    continue;
                }
            },
        };
        let id = sh.fg_ids.fetch_add(1, Ordering::Relaxed);
        let data = sh.payload('f', id);
        let t0 = Instant::now();
        match with_timeout(REQUEST_TIMEOUT, c.submit(&Job::new(FG_FUNCTION, &data))).await {
            Ok(outcome) if outcome.result().is_some() => {
                let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                sh.latencies_us.lock().expect("latency lock").push(us);
                Counters::bump(&sh.counters.fg_done);
            }
            Ok(_) => Counters::bump(&sh.counters.fg_failed),
            Err(e) if e.is_refusal() => Counters::bump(&sh.counters.fg_failed),
            Err(_) => {
                sh.connect_error();
                conn = None;
            }
        }
    }
}

/// A connection per `churn_jobs` background jobs: connect, submit, close, pause.
async fn churner(sh: Arc<Shared>, index: usize) {
    let mut n = index;
    while !sh.stop_load.is_cancelled() {
        let Ok(mut c) = Connection::connect(sh.addr).await else {
            sh.connect_error();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        for _ in 0..sh.settings.churn_jobs {
            let function = BG_FUNCTIONS[n % BG_FUNCTIONS.len()];
            n += 1;
            if submit_background(&sh, &mut c, function, Priority::Normal, None)
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = c.shutdown().await;
        drop(c);
        Counters::bump(&sh.counters.churn_connections);
        tokio::select! {
            _ = sh.stop_load.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// A worker for every soak function; reconnects after its crashes and broken connections.
async fn worker(sh: Arc<Shared>) {
    while !sh.stop_workers.is_cancelled() {
        let mut c = match connect_worker(&sh).await {
            Ok(c) => c,
            Err(_) => {
                sh.connect_error();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Ends when the connection is dropped: a crash, an error, or the stop.
        loop {
            let grabbed = tokio::select! {
                _ = sh.stop_workers.cancelled() => return,
                r = with_timeout(REQUEST_TIMEOUT, c.grab(GrabKind::Uniq)) => r,
            };
            match grabbed {
                Ok(Some(job)) => {
                    record_run(&sh, &job.data);
                    if sh.crash_next.swap(false, Ordering::SeqCst) {
                        // Holding the job, without WORK_COMPLETE: the server must hand it to
                        // another worker.
                        Counters::bump(&sh.counters.crashes);
                        if job.data.first() == Some(&b'b') {
                            Counters::bump(&sh.counters.crashes_bg);
                        }
                        drop(c);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                    if c.complete(&job.handle, b"ok").await.is_err() {
                        sh.connect_error();
                        break;
                    }
                }
                Ok(None) => {
                    if c.pre_sleep().await.is_err() {
                        sh.connect_error();
                        break;
                    }
                    // A NOOP wakes us; the timeout only guards against a lost one.
                    tokio::select! {
                        _ = sh.stop_workers.cancelled() => return,
                        r = tokio::time::timeout(Duration::from_secs(1), c.wait_noop()) => {
                            if let Ok(Err(_)) = r {
                                sh.connect_error();
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.is_refusal() => sh.connect_error(),
                Err(_) => {
                    sh.connect_error();
                    break;
                }
            }
        }
    }
}

async fn connect_worker(sh: &Shared) -> Result<Connection, ClientError> {
    let mut c = Connection::connect(sh.addr).await?;
    for f in BG_FUNCTIONS.iter().chain([&FG_FUNCTION]) {
        c.put(gearhouse::codec::PacketType::CAN_DO, &[f.as_bytes()]);
    }
    c.flush().await?;
    Ok(c)
}

/// Marks the job's id run (background) and counts the run.
fn record_run(sh: &Shared, data: &[u8]) {
    Counters::bump(&sh.counters.runs);
    if data.first() != Some(&b'b') {
        return;
    }
    let id = data[1..]
        .split(|&b| b == b':')
        .next()
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse::<u64>().ok());
    if !id.is_some_and(|id| sh.ledger.ran(id)) {
        Counters::bump(&sh.counters.foreign);
    }
}

/// Every `crash_every`, arms one worker crash.
async fn crash_schedule(sh: Arc<Shared>) {
    let every = sh.settings.crash_every;
    if every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = sh.stop_load.cancelled() => return,
            _ = tokio::time::sleep(every) => sh.crash_next.store(true, Ordering::SeqCst),
        }
    }
}

/// Every `restart_every`, restarts the next memcached node empty and waits for the repair.
async fn restart_schedule(
    sh: Arc<Shared>,
    nodes: Option<Arc<Mutex<Vec<Memcached>>>>,
    http: Option<SocketAddr>,
) -> Vec<Restart> {
    let mut done = Vec::new();
    let (Some(nodes), Some(http)) = (nodes, http) else {
        return done;
    };
    let every = sh.settings.restart_every;
    if every.is_zero() {
        return done;
    }
    for k in 1u32.. {
        let due = sh.started + every * k;
        tokio::select! {
            _ = sh.stop_load.cancelled() => return done,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        let node = (k as usize - 1) % 3;
        let at = Instant::now();
        let list = nodes.clone();
        let restarted = tokio::task::spawn_blocking(move || {
            list.lock().expect("nodes lock")[node].restart_empty()
        })
        .await
        .expect("restart thread");
        if let Err(e) = restarted {
            eprintln!("soak: {e}");
            sh.stop_load.cancel();
            return done;
        }
        Counters::bump(&sh.counters.restarts);
        // The server probes nodes every 500 ms: give it time to notice before asking.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut repaired_after_s = None;
        while at.elapsed() < REPAIR_TIMEOUT {
            if cluster::is_repaired(http, node).await {
                repaired_after_s = Some(at.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        done.push(Restart {
            node,
            at_s: (at - sh.started).as_secs_f64(),
            repaired_after_s,
        });
    }
    done
}

/// Samples the server's footprint every `sample_every` and emits a row per `window`, until the
/// workers stop; returns the rows and the samples.
async fn sampler(sh: Arc<Shared>, pid: Option<u32>) -> (Vec<Row>, Vec<(f64, cluster::Footprint)>) {
    let s = &sh.settings;
    let per_window = (s.window.as_secs_f64() / s.sample_every.as_secs_f64())
        .round()
        .max(1.0) as u32;
    let mut tick = tokio::time::interval(s.sample_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    let mut rows = Vec::new();
    let mut samples = Vec::new();
    let mut last = sh.counters.totals();
    let mut restarts_seen = 0;
    let mut n = 0u32;
    let mut window_fp = None;
    loop {
        let stopping = tokio::select! {
            _ = sh.stop_workers.cancelled() => true,
            _ = tick.tick() => false,
        };
        let now = sh.started.elapsed().as_secs_f64();
        if let Some(pid) = pid {
            match tokio::task::spawn_blocking(move || cluster::footprint(pid))
                .await
                .expect("footprint thread")
            {
                Some(fp) => {
                    samples.push((now, fp));
                    window_fp = Some(fp);
                }
                None => {
                    if !sh.server_gone.swap(true, Ordering::SeqCst) {
                        eprintln!("soak: the server (pid {pid}) is gone");
                    }
                    sh.stop_load.cancel();
                }
            }
        }
        n += 1;
        if n.is_multiple_of(per_window) || stopping {
            let t = sh.counters.totals();
            let restarts = sh.counters.restarts.load(Ordering::Relaxed);
            let mut lat = std::mem::take(&mut *sh.latencies_us.lock().expect("latency lock"));
            lat.sort_unstable();
            let row = Row {
                index: rows.len() + 1,
                end_s: now,
                acked: t.acked - last.acked,
                runs: t.runs - last.runs,
                fg_done: t.fg_done - last.fg_done,
                p50_ms: percentile_ms(&lat, 0.50),
                p99_ms: percentile_ms(&lat, 0.99),
                max_ms: lat.last().map(|&v| f64::from(v) / 1000.0),
                footprint: window_fp,
                crashes: t.crashes - last.crashes,
                restarts: restarts - restarts_seen,
                errors: t.errors - last.errors,
                is_drain: sh.stop_load.is_cancelled(),
            };
            println!("{}", row.line());
            rows.push(row);
            last = t;
            restarts_seen = restarts;
        }
        if stopping {
            return (rows, samples);
        }
    }
}

/// After the load: lets the workers run until every acknowledged id ran and the soak's queues
/// are empty, or `drain_timeout`. True when drained.
async fn drain(sh: &Shared) -> bool {
    let deadline = Instant::now() + sh.settings.drain_timeout;
    while Instant::now() < deadline && !sh.server_gone.load(Ordering::SeqCst) {
        if sh.ledger.pending() == 0 && queues_empty(sh.addr).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// True when `status` lists no queued or running job of any soak function.
async fn queues_empty(addr: SocketAddr) -> bool {
    let Ok(mut c) = Connection::connect(addr).await else {
        return false;
    };
    for f in BG_FUNCTIONS.iter().chain([&FG_FUNCTION]) {
        match c.function_status(f).await {
            Ok(Some((0, _, _)) | None) => {}
            _ => return false,
        }
    }
    true
}
