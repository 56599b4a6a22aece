//! The durable queue: every background job is mirrored to a memcached cluster before its
//! client hears JOB_CREATED, and read back at start-up.
//!
//! - [`client`]: a small memcached meta-protocol client (pipelined, acknowledged `ms`/`md`/`mg`).
//! - [`ring`]: consistent hashing that picks the nodes of each job's copies.
//! - [`record`]: keys (enumerable by design: sequence numbers and watermark keys) and values.
//! - [`mirror`]: the engine's [`crate::engine::Mirror`]: batching writer tasks, node tracking,
//!   repair of lost copies.
//! - [`recovery`]: reading a node id's queue back without listing memcached's keys.
//! - [`kv`]: a replicated key-value store for the server's own state (settings, schedules,
//!   dead letters, cached results, leases).
//! - [`takeover`]: moving a dead node's queue into this server, once.
//! - [`lease`]: leases in memcached, fencing, and automatic takeover of dead peers.
//! - [`metrics`]: the `gearhouse_memcached_*` and recovery metrics.
//!
//! Start-up recovery runs in a `gearhouse.recovery` span (node id, nodes, jobs, attempts)
//! with its progress as events inside; the mirror adds `gearhouse.repair`,
//! `gearhouse.node_down` and `gearhouse.node_up` spans. Every mutex here guards plain data,
//! is never held across an `.await` or a log line, and is taken with [`lock`], which
//! recovers from poisoning: a panic elsewhere must not stop the queue's durability.

pub mod client;
pub mod kv;
pub mod lease;
pub mod metrics;
pub mod mirror;
pub mod on_request;
pub mod record;
pub mod recovery;
pub mod ring;
pub mod takeover;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, OnFailure};
use crate::engine::{Engine, Mirror};
use crate::http::Health;

pub use mirror::MemcachedMirror;

/// Locks `m`, recovering the data if a thread panicked while holding it (every mutex in
/// persistence guards plain data that stays consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why persistence could not start or recover.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PersistError {
    #[error("persistence configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("recovery: {0}")]
    Recovery(String),
    #[error("shutting down before recovery completed")]
    Shutdown,
}

/// Persistence settings resolved from the `[persistence]` section.
#[derive(Debug, Clone)]
pub struct Settings {
    pub nodes: Vec<String>,
    pub namespace: String,
    pub node_id: String,
    /// Copies per job (already resolved from 0 = automatic and capped at the node count).
    pub replicas: usize,
    /// Refuse a job that cannot be made durable, or keep it in memory only.
    pub on_failure: OnFailure,
    pub write_timeout: Duration,
    pub connections_per_node: usize,
    pub max_batch: usize,
    pub max_pending_writes: usize,
    /// Deletes kept per node that cannot take them yet (the oldest half dropped past it).
    pub max_pending_deletes: usize,
    pub recover_from_node: String,
    pub repair_interval: Duration,
    /// Seconds a peer's lease must be missing before its queue is taken over; 0 = never.
    pub takeover_after_s: u64,
    /// Lease renewal interval in ms; 0 = derived from `takeover_after_s`.
    pub lease_renew_ms: u64,
}

fn check_key_part(what: &str, v: &str) -> Result<(), PersistError> {
    if v.is_empty() || v.len() > 100 || !client::is_valid_key(v.as_bytes()) || v.contains(':') {
        return Err(PersistError::Config(format!(
            "{what} {v:?} must be 1 to 100 printable characters without spaces or ':' (it is part of memcached keys)"
        )));
    }
    Ok(())
}

impl Settings {
    /// Settings from the configuration; `None` when no memcached node is configured.
    pub fn from_config(cfg: &Config) -> Result<Option<Settings>, PersistError> {
        let p = &cfg.persistence;
        if p.memcached.is_empty() {
            return Ok(None);
        }
        Self::build(cfg, &p.memcached).map(Some)
    }

    /// Settings for `nodes` with the rest from `cfg`.
    pub fn build(cfg: &Config, nodes: &[String]) -> Result<Settings, PersistError> {
        let p = &cfg.persistence;
        let mut seen = HashSet::new();
        for n in nodes {
            if !seen.insert(n) {
                return Err(PersistError::Config(format!(
                    "memcached node {n} is listed twice"
                )));
            }
            if !n.contains(':') {
                return Err(PersistError::Config(format!(
                    "memcached node {n:?} must be host:port"
                )));
            }
        }
        if nodes.len() > mirror::MAX_NODES {
            return Err(PersistError::Config(format!(
                "at most {} memcached nodes are supported, {} are configured",
                mirror::MAX_NODES,
                nodes.len()
            )));
        }
        let node_id = cfg.node_id();
        check_key_part("persistence.namespace", &p.namespace)?;
        check_key_part("engine.node_id", &node_id)?;
        if !p.recover_from_node.is_empty() {
            check_key_part("persistence.recover_from_node", &p.recover_from_node)?;
            if p.recover_from_node == node_id {
                return Err(PersistError::Config(
                    "persistence.recover_from_node names this server's own node id".into(),
                ));
            }
        }
        let auto = if nodes.len() >= 2 { 2 } else { 1 };
        let mut replicas = if p.replicas == 0 { auto } else { p.replicas };
        if replicas > nodes.len() {
            tracing::warn!(
                replicas,
                nodes = nodes.len(),
                "persistence.replicas is larger than the number of memcached nodes; using {}",
                nodes.len()
            );
            replicas = nodes.len();
        }
        if p.connections_per_node == 0 || p.connections_per_node > recovery::MAX_META_KEYS {
            return Err(PersistError::Config(format!(
                "persistence.connections_per_node must be 1 to {}",
                recovery::MAX_META_KEYS
            )));
        }
        Ok(Settings {
            nodes: nodes.to_vec(),
            namespace: p.namespace.clone(),
            node_id,
            replicas,
            on_failure: p.on_failure,
            write_timeout: Duration::from_millis(p.write_timeout_ms.max(1)),
            connections_per_node: p.connections_per_node,
            max_batch: p.max_batch.max(1),
            max_pending_writes: p.max_pending_writes.max(1),
            max_pending_deletes: p.max_pending_deletes.max(2),
            recover_from_node: p.recover_from_node.clone(),
            repair_interval: Duration::from_millis(p.repair_interval_ms.max(50)),
            takeover_after_s: p.takeover_after_s,
            lease_renew_ms: p.lease_renew_ms,
        })
    }
}

/// Hands memory freed by recovery (read buffers of whole chunks) back to the system, so a
/// recovered queue costs no more than the same queue built by submits.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Persistence as the app uses it: a mirror for the engine, then recovery and the
/// background tasks.
pub struct Persistence {
    pub settings: Settings,
    mirror: MemcachedMirror,
    metrics: Arc<metrics::PersistMetrics>,
    kv: Arc<kv::Kv>,
    liveness: Arc<lease::Liveness>,
    /// The dead-letter store takeovers move dead nodes' letters into (set by the app).
    letters: takeover::LetterStore,
    /// Operators' `takeover` requests, answered by the lease watcher once started.
    requests: on_request::TakeoverRequests,
    requests_rx: Mutex<Option<tokio::sync::mpsc::Receiver<on_request::TakeoverRequest>>>,
}

impl Persistence {
    /// Creates the mirror (no I/O yet); register its metrics on `registry`.
    pub fn new(settings: Settings, registry: &prometheus::Registry) -> Persistence {
        let metrics = Arc::new(metrics::PersistMetrics::new(registry));
        let mirror = MemcachedMirror::new(settings.clone(), metrics.clone());
        let kv = Arc::new(kv::Kv::from_settings(&settings));
        let liveness = lease::Liveness::new(&settings, kv.clone(), registry);
        let (requests, rx) = on_request::channel();
        Persistence {
            settings,
            mirror,
            metrics,
            kv,
            liveness,
            letters: Default::default(),
            requests,
            requests_rx: Mutex::new(Some(rx)),
        }
    }

    /// Where the admin command `takeover` sends its requests (answered once the server is up).
    pub fn takeover_requests(&self) -> on_request::TakeoverRequests {
        self.requests.clone()
    }

    /// The dead-letter store that takeovers move a dead node's letters into.
    pub fn set_dead_letters(&self, store: Arc<crate::dead_letters::DeadLetters>) {
        let _ = self.letters.set(store);
    }

    /// The mirror to give [`Engine::new`].
    pub fn mirror(&self) -> Arc<dyn Mirror> {
        Arc::new(self.mirror.clone())
    }

    pub fn memcached_mirror(&self) -> &MemcachedMirror {
        &self.mirror
    }

    /// What a takeover task needs.
    fn mover(&self) -> takeover::Mover {
        takeover::Mover {
            settings: self.settings.clone(),
            mirror: self.mirror.clone(),
            metrics: self.metrics.clone(),
            kv: self.kv.clone(),
            letters: self.letters.clone(),
        }
    }

    /// Starts renewing this node's lease, recovers the queue into `engine` (retrying while
    /// memcached is unreachable), starts the writer, prober and repair tasks, takes over
    /// `recover_from_node` if configured, warns about queues nobody owns, and starts watching
    /// the peers' leases. Returns once the server may accept clients.
    pub async fn start(
        &self,
        engine: &Engine,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> Result<(), PersistError> {
        self.mirror.attach(engine.clone());
        let s = &self.settings;
        tracing::info!(
            nodes = %s.nodes.join(","),
            replicas = s.replicas,
            namespace = %s.namespace,
            node_id = %s.node_id,
            "persistence on: background jobs are acknowledged only after memcached stored {}; recovering the queue before accepting clients",
            copies(s.replicas)
        );
        // The lease is held from the start: a long recovery must not look like a dead node.
        tokio::spawn(self.liveness.clone().renew_forever(
            engine.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        let span = tracing::info_span!(
            "gearhouse.recovery",
            node_id = %s.node_id,
            nodes = %s.nodes.join(","),
            jobs = tracing::field::Empty,
            attempts = tracing::field::Empty,
        );
        let origins = self
            .recover_until_done(engine, &health, &shutdown)
            .instrument(span)
            .await?;
        health.set_not_durable(None);
        self.mirror.start(health.clone(), shutdown.clone());
        if !s.recover_from_node.is_empty() {
            let span = tracing::info_span!(
                "gearhouse.takeover",
                from_node = %s.recover_from_node,
                into_node = %s.node_id,
            );
            loop {
                let none = HashSet::new();
                let already = origins.get(&s.recover_from_node).unwrap_or(&none);
                match takeover::run(&self.mover(), engine, &s.recover_from_node, already)
                    .instrument(span.clone())
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!("taking over node {}: {e}", s.recover_from_node);
                        tokio::select! {
                            _ = shutdown.cancelled() => return Err(PersistError::Shutdown),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        }
        health.set_persistence_status(self.mirror.status_json());
        self.warn_about_unowned_queues().await;
        // Taken once: `start` runs once per server (a second start would answer no request).
        let requests = lock(&self.requests_rx)
            .take()
            .unwrap_or_else(|| tokio::sync::mpsc::channel(1).1);
        tokio::spawn(self.liveness.clone().watch_forever(
            self.mover(),
            engine.clone(),
            origins,
            health,
            requests,
            shutdown,
        ));
        Ok(())
    }

    /// At start-up (issue 10): a warning for each other node id of the namespace whose queue
    /// holds jobs while no live server renews its lease, with what will or can move them.
    async fn warn_about_unowned_queues(&self) {
        let s = &self.settings;
        let Ok(ids) = self.liveness.registry().await else {
            return;
        };
        let mut cl: Option<recovery::Cluster> = None;
        for id in ids.iter().filter(|i| **i != s.node_id) {
            if self.liveness.is_live(id).await.unwrap_or(true) {
                continue;
            }
            if let Ok(Some(v)) = self.kv.get(&record::takeover_key(&s.namespace, id)).await {
                if takeover::parse_lock(&v).1 {
                    continue;
                }
            }
            if cl.is_none() {
                cl = Some(recovery::Cluster::open(s).await);
            }
            let Some(c) = cl.as_mut() else { continue };
            let Ok(Some((low, high))) = c.watermarks(&s.namespace, id).await else {
                continue;
            };
            if low > high {
                continue;
            }
            match self.liveness.timing().takeover_after {
                Some(after) => tracing::warn!(
                    node = %id,
                    low,
                    high,
                    "memcached holds queued jobs of node {id} (sequence numbers {low}..={high}) and no live server renews its lease: automatic takeover moves them to this server or a peer once the lease has been missing for {} s (persistence.takeover_after_s), unless node {id} comes back first",
                    after.as_secs()
                ),
                None => tracing::warn!(
                    node = %id,
                    low,
                    high,
                    "memcached holds queued jobs of node {id} (sequence numbers {low}..={high}) and no live server renews its lease; automatic takeover is off (persistence.takeover_after_s = 0): move them with `gearhouse recover --from-node {id} --memcached {} --server <this server's address>`, or start this server with persistence.recover_from_node = \"{id}\"",
                    s.nodes.join(",")
                ),
            }
        }
    }

    /// At start-up, this node's own takeover lock: a completed one is deleted (a peer moved the
    /// queue while this server was away; what is left is ours again and the next takeover must
    /// be possible); one in progress by a live peer makes recovery wait (an error: retried).
    async fn release_own_takeover_lock(&self) -> Result<(), PersistError> {
        let s = &self.settings;
        let key = record::takeover_key(&s.namespace, &s.node_id);
        let unreachable = |e: kv::KvError| {
            PersistError::Unreachable(format!("reading this node's takeover lock: {e}"))
        };
        let Some(v) = self.kv.get(&key).await.map_err(unreachable)? else {
            return Ok(());
        };
        let (owner, done) = takeover::parse_lock(&v);
        if !done && self.liveness.is_live(&owner).await.map_err(unreachable)? {
            return Err(PersistError::Recovery(format!(
                "node {owner} is taking this node's queue over; recovery waits until it is done"
            )));
        }
        if done {
            tracing::warn!(
                "node {owner} took this node's queue over while it was away; recovering what is left"
            );
        } else {
            tracing::warn!(
                "{owner} started taking this node's queue over and stopped (no lease): recovering the queue; jobs it copied but did not delete yet may run twice"
            );
        }
        self.kv.delete(&key).await.map_err(unreachable)?;
        Ok(())
    }

    /// Recovery attempts, one a second while memcached cannot be read, until one completes.
    async fn recover_until_done(
        &self,
        engine: &Engine,
        health: &Health,
        shutdown: &CancellationToken,
    ) -> Result<HashMap<String, HashSet<u64>>, PersistError> {
        let s = &self.settings;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.recover(engine).await {
                Ok(origins) => {
                    tracing::Span::current().record("attempts", attempt);
                    self.metrics.recovery_failed.set(0);
                    return Ok(origins);
                }
                Err(e) => {
                    self.metrics.recovery_failed.set(1);
                    health.set_not_durable(Some(e.to_string()));
                    health.set_persistence_status(serde_json::json!({
                        "enabled": true, "recovering": true, "error": e.to_string(),
                        "nodes": s.nodes,
                    }));
                    tracing::error!(attempt, "{e}");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(PersistError::Shutdown),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// One recovery attempt. Returns the origins (node id and sequence numbers there) of jobs
    /// already taken over, so a takeover interrupted by a crash does not move them twice.
    async fn recover(
        &self,
        engine: &Engine,
    ) -> Result<HashMap<String, HashSet<u64>>, PersistError> {
        let s = &self.settings;
        let started = Instant::now();
        let mut cl = recovery::Cluster::open(s).await;
        let unreachable = cl.unreachable_mask();
        for (i, id) in cl.identities.iter().enumerate() {
            self.mirror
                .set_node_state(i, id.ok_or_else(|| cl.why[i].clone()));
        }
        // Unreachable nodes are reported by the cluster check, with its advice.
        cl.check_readable(s.replicas)?;
        self.release_own_takeover_lock().await?;
        let mut origins: HashMap<String, HashSet<u64>> = HashMap::new();
        let mut restored = 0usize;
        let mut scan = recovery::RangeScan::begin(&mut cl, s, &s.node_id, "recovery").await?;
        let (mut read_time, mut restore_time) = (Duration::ZERO, Duration::ZERO);
        loop {
            let t = Instant::now();
            let Some(found) = scan.next(&mut cl, s).await? else {
                break;
            };
            read_time += t.elapsed();
            let t = Instant::now();
            let marks: Vec<(u64, u16, u16)> = found
                .iter()
                .map(|f| (f.record.seq, f.ok | f.may | unreachable, f.ok))
                .collect();
            self.mirror.note_recovered(&marks);
            let mut records = Vec::with_capacity(found.len());
            for f in found {
                if let Some((node, seq)) = f.origin {
                    origins.entry(node).or_default().insert(seq);
                }
                records.push(f.record);
            }
            restored += engine.restore(records, 0);
            restore_time += t.elapsed();
        }
        let high = scan.high;
        engine.restore(Vec::new(), high + 1);
        self.mirror.set_watermarks(high);
        let (low, high) = self.mirror.watermarks();
        cl.reset_watermarks(&s.namespace, &s.node_id, s.connections_per_node, low, high)
            .await?;
        let down = cl.unreachable();
        drop(cl);
        // malloc_trim walks the whole heap (tens of ms after a million jobs): off the runtime.
        let _ = tokio::task::spawn_blocking(release_free_memory).await;
        let took = started.elapsed();
        tracing::Span::current().record("jobs", restored);
        self.metrics.recovered.inc_by(restored as u64);
        self.metrics.recovery_duration.set(took.as_secs_f64());
        tracing::info!(
            jobs = restored,
            seconds = took.as_secs_f64(),
            next_handle = %String::from_utf8_lossy(&engine.handle_of(engine.next_seq())),
            read_s = read_time.as_secs_f64(),
            restore_s = restore_time.as_secs_f64(),
            "recovery complete: {restored} jobs restored from memcached in {:.3} s",
            took.as_secs_f64()
        );
        if !down.is_empty() {
            tracing::warn!(
                "recovered while some memcached nodes were unreachable: {}",
                down.join(", ")
            );
        }
        Ok(origins)
    }

    /// Waits for in-flight writes (at shutdown), then releases the engine.
    pub async fn stop(&self, grace: Duration) {
        self.mirror.flush(grace).await;
        self.mirror.detach();
    }
}

/// "1 copy", "2 copies".
pub(crate) fn copies(n: usize) -> String {
    if n == 1 {
        "1 copy".into()
    } else {
        format!("{n} copies")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn copies_reads_as_english() {
        assert_eq!(super::copies(1), "1 copy");
        assert_eq!(super::copies(2), "2 copies");
    }
}
