//! Leases, fencing and automatic takeover between servers that share a memcached cluster
//! (same `persistence.namespace`, distinct node ids).
//!
//! Keys (all through [`Kv`], so each has `replicas` copies):
//! - `<ns>:nodes`: the registry, the node ids that ever wrote to the namespace, separated by
//!   spaces. It is read-modify-written under a short claim (`<ns>:nodes:lock`, 5 s): memcached's
//!   `append` would be one round trip, but it fails on a missing key and, with two copies, one
//!   copy that missed an append stays short for ever; a rewrite of the whole (small) set makes
//!   the copies converge on the next registration. A node that finds itself missing (the key was
//!   lost with a memcached restart) registers again on its next tick.
//! - `<ns>:lease:<node_id>`: this node's lease, rewritten every `lease_renew_ms` with a TTL of
//!   three renewals (at least 2 s: memcached counts whole seconds).
//!
//! Fencing: a server that has not renewed for two thirds of the TTL stops handing out its
//! durable jobs ([`Engine::set_fenced`]) before its lease can lapse; a peer takes over only
//! after the lease has been gone for `takeover_after_s` more, so the fenced server is quiet
//! well before anyone else runs its jobs. After a successful renewal the server unfences unless
//! a peer took its queue over meanwhile (the takeover lock of its node id names someone else):
//! then it stays fenced, because every durable job it holds in memory is now the peer's, and
//! says so (log, `gearhouse_fenced`, `/api/v1/status`). Restarting it is the way out: at
//! start-up a server deletes its own completed takeover lock and recovers only what is still
//! under its keys.
//!
//! Watching: every renewal a separate task reads the registry and the other nodes' leases; a
//! node whose lease has been missing for `takeover_after_s` (timed here, from the first tick
//! that found it missing) and whose watermarks show a non-empty queue or dead letters is taken
//! over through [`super::takeover::run`], whose lock lets exactly one peer do it.
//!
//! Renewal, the fence check and watching are three tasks: a renewal stuck on a memcached that
//! accepts connections but never answers does not delay the fence check (and is never cancelled
//! half-way, which would desynchronise its connection), and a long takeover does not delay
//! renewals.
//!
//! Fencing only happens when `takeover_after_s` > 0: with takeovers off (on every server of the
//! namespace, as they should agree) nobody can run a cut-off server's jobs, and holding them
//! back would only stop work. Leases are written either way, so a peer with takeovers on never
//! mistakes this server for a dead one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::kv::Kv;
use super::on_request::{Attempt, TakeoverRequest};
use super::recovery::Cluster;
use super::takeover::{self, Mover, Outcome};
use super::{lock, record, Settings};
use crate::engine::Engine;
use crate::http::Health;

/// Node ids kept in the registry: past it new ids are not registered (and a warning says so),
/// so a client cannot grow it, and a tick stays a bounded number of reads.
pub const MAX_NODES: usize = 256;

/// TTL of the registry's claim: long enough for a get and a set, short enough that a server
/// that died holding it delays others only briefly.
const REGISTRY_LOCK_TTL_S: u32 = 5;

/// Takeovers remembered for `/api/v1/status`.
const MAX_TAKEOVERS_SHOWN: usize = 32;

/// The `result` label values of `gearhouse_takeovers_total`.
pub const RESULTS: [&str; 4] = ["moved", "requested", "lost_claim", "failed"];

/// Timing of leases, derived from `persistence.takeover_after_s` and `lease_renew_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often the lease is rewritten (and the peers' leases read).
    pub renew: Duration,
    /// The lease's TTL in memcached.
    pub ttl_s: u32,
    /// Without a successful renewal for this long, the server fences itself.
    pub fence_after: Duration,
    /// A peer's lease missing this long makes it dead; `None` = automatic takeover off.
    pub takeover_after: Option<Duration>,
}

impl Timing {
    /// `takeover_after_s` 0 = off; `renew_ms` 0 = a fifth of `takeover_after_s` (3 s when off).
    pub fn new(takeover_after_s: u64, renew_ms: u64) -> Timing {
        let renew_ms = match (renew_ms, takeover_after_s) {
            (0, 0) => 3_000,
            (0, t) => t * 1000 / 5,
            (r, _) => r,
        }
        .max(100);
        let ttl_s = (renew_ms * 3).div_ceil(1000).max(2) as u32;
        Timing {
            renew: Duration::from_millis(renew_ms),
            ttl_s,
            fence_after: Duration::from_millis(ttl_s as u64 * 1000 * 2 / 3),
            takeover_after: (takeover_after_s > 0).then(|| Duration::from_secs(takeover_after_s)),
        }
    }
}

/// The lease and takeover metrics.
pub struct LeaseMetrics {
    pub fenced: IntGauge,
    pub takeovers: IntCounterVec,
    pub jobs_taken_over: IntCounter,
    pub renew_failures: IntCounter,
}

impl LeaseMetrics {
    /// Creates and registers the metrics (a second registration on the same registry keeps the
    /// first one's series, as for the other persistence metrics).
    pub fn new(registry: &Registry) -> LeaseMetrics {
        let m = LeaseMetrics {
            fenced: IntGauge::new(
                "gearhouse_fenced",
                "1 while this server holds its durable jobs back because it could not renew its lease in memcached",
            )
            .expect("gauge"),
            takeovers: IntCounterVec::new(
                Opts::new(
                    "gearhouse_takeovers_total",
                    "Takeovers of a dead node's queue started by this server, by result (moved: automatic, after its lease lapsed; requested: asked by the admin command takeover; lost_claim: another server holds the lock; failed)",
                ),
                &["result"],
            )
            .expect("counter"),
            jobs_taken_over: IntCounter::new(
                "gearhouse_takeover_jobs_total",
                "Jobs moved into this server by takeovers (automatic or requested)",
            )
            .expect("counter"),
            renew_failures: IntCounter::new(
                "gearhouse_lease_renew_failures_total",
                "Lease renewals that no memcached node stored in time",
            )
            .expect("counter"),
        };
        for r in RESULTS {
            m.takeovers.with_label_values(&[r]);
        }
        let _ = registry.register(Box::new(m.fenced.clone()));
        let _ = registry.register(Box::new(m.takeovers.clone()));
        let _ = registry.register(Box::new(m.jobs_taken_over.clone()));
        let _ = registry.register(Box::new(m.renew_failures.clone()));
        m
    }
}

/// One completed automatic takeover, for `/api/v1/status`.
#[derive(Debug, Clone)]
struct Taken {
    node: String,
    at_unix_s: u64,
    jobs: u64,
}

/// What the two tasks share. Plain data behind a `std::sync::Mutex`: never held across an
/// `.await`, taken with [`lock`].
#[derive(Debug, Default)]
struct State {
    /// When the last renewal that memcached stored was sent.
    renewed_at: Option<Instant>,
    fenced: bool,
    /// The peer that took this server's queue over while it was cut off.
    taken_over_by: Option<String>,
    /// Peers whose lease is missing, since when (this server's clock).
    lapsed: HashMap<String, Instant>,
    /// Peers last seen: live or not.
    peers: BTreeMap<String, bool>,
    /// Lapsed peers found with an empty queue (not looked at again until their lease is back).
    empty: HashSet<String>,
    /// Locks held by others, already logged.
    logged_owner: HashSet<String>,
    takeovers: Vec<Taken>,
}

/// The leases of one server: renewal and fencing, the registry, and the watcher.
pub struct Liveness {
    kv: Arc<Kv>,
    namespace: String,
    node_id: String,
    timing: Timing,
    metrics: LeaseMetrics,
    state: Mutex<State>,
}

/// `<ns>:lease:<node_id>`.
pub fn lease_key(ns: &str, node: &str) -> bytes::Bytes {
    Kv::key(ns, &["lease", node])
}

/// `<ns>:nodes`.
pub fn registry_key(ns: &str) -> bytes::Bytes {
    Kv::key(ns, &["nodes"])
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The node ids in a registry value.
pub fn parse_registry(v: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(v)
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect()
}

impl Liveness {
    /// The leases of the server `s` describes; metrics registered on `registry`. No I/O yet.
    pub fn new(s: &Settings, kv: Arc<Kv>, registry: &Registry) -> Arc<Liveness> {
        let timing = Timing::new(s.takeover_after_s, s.lease_renew_ms);
        // Copies are written one node after the other: a node that hangs costs a full timeout.
        let slowest = s.write_timeout * s.replicas as u32;
        if timing.takeover_after.is_some() && slowest >= timing.fence_after {
            tracing::warn!(
                "a renewal can take {} ms when a memcached node hangs (persistence.write_timeout_ms x replicas), longer than the {} ms after which this server fences itself: one hung node would fence a healthy server; raise persistence.takeover_after_s or lease_renew_ms, or lower write_timeout_ms",
                slowest.as_millis(),
                timing.fence_after.as_millis()
            );
        }
        Arc::new(Liveness {
            kv,
            namespace: s.namespace.clone(),
            node_id: s.node_id.clone(),
            timing,
            metrics: LeaseMetrics::new(registry),
            state: Mutex::new(State {
                // Recovery runs before the first renewal: count from start-up.
                renewed_at: Some(Instant::now()),
                ..State::default()
            }),
        })
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The node ids in the registry (empty when it cannot be read).
    pub async fn registry(&self) -> Result<Vec<String>, super::kv::KvError> {
        Ok(self
            .kv
            .get(&registry_key(&self.namespace))
            .await?
            .map(|v| parse_registry(&v))
            .unwrap_or_default())
    }

    /// Whether `node`'s lease exists right now.
    pub async fn is_live(&self, node: &str) -> Result<bool, super::kv::KvError> {
        Ok(self
            .kv
            .get(&lease_key(&self.namespace, node))
            .await?
            .is_some())
    }

    /// Adds this node to the registry if it is missing; false when it could not (yet).
    async fn register(&self, known: &[String]) -> bool {
        if known.contains(&self.node_id) {
            return true;
        }
        let lock_key = Kv::key(&self.namespace, &["nodes", "lock"]);
        match self
            .kv
            .claim(&lock_key, self.node_id.as_bytes(), REGISTRY_LOCK_TTL_S)
            .await
        {
            Ok(true) => {}
            // Someone else is registering: next tick.
            Ok(false) | Err(_) => return false,
        }
        let key = registry_key(&self.namespace);
        let ok = match self.kv.get(&key).await {
            Ok(v) => {
                let mut ids = v.map(|v| parse_registry(&v)).unwrap_or_default();
                if ids.len() >= MAX_NODES {
                    tracing::warn!(
                        "the node registry {} holds {MAX_NODES} node ids: node {} is not added and cannot be taken over automatically; delete the key to rebuild it",
                        String::from_utf8_lossy(&key),
                        self.node_id
                    );
                    true
                } else {
                    if !ids.contains(&self.node_id) {
                        ids.push(self.node_id.clone());
                    }
                    self.kv.set(&key, ids.join(" ").as_bytes(), 0).await.is_ok()
                }
            }
            Err(_) => false,
        };
        let _ = self.kv.delete(&lock_key).await;
        ok
    }

    /// One renewal, awaited to its end (the store's own timeout bounds it): cancelling a
    /// memcached exchange half-way would leave its reply to be read as the next one's.
    async fn renew_once(&self) -> bool {
        let sent = Instant::now();
        let value = unix_now().as_millis().to_string();
        let key = lease_key(&self.namespace, &self.node_id);
        match self.kv.set(&key, value.as_bytes(), self.timing.ttl_s).await {
            Ok(_) => {
                lock(&self.state).renewed_at = Some(sent);
                true
            }
            Err(e) => {
                self.metrics.renew_failures.inc();
                tracing::debug!("lease renewal failed: {e}");
                false
            }
        }
    }

    /// Renews the lease every `renew` interval until `shutdown` (a renewal that outlasts the
    /// interval delays the next one).
    async fn renew_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.timing.renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.renew_once() => {}
            }
        }
    }

    /// Fences after `fence_after` without a renewal; unfences once renewals succeed again,
    /// unless a peer took this server's queue over. Returns whether the lease is fresh.
    async fn fence_or_unfence(&self, engine: &Engine) -> bool {
        let (fenced, since) = {
            let st = lock(&self.state);
            (st.fenced, st.renewed_at.map(|t| t.elapsed()))
        };
        let fresh = since.is_some_and(|s| s < self.timing.fence_after);
        if self.timing.takeover_after.is_none() {
            return fresh;
        }
        if !fenced && !fresh {
            engine.set_fenced(true);
            self.metrics.fenced.set(1);
            lock(&self.state).fenced = true;
            tracing::warn!(
                node_id = %self.node_id,
                "fenced: no lease renewal reached memcached for {:.1} s; durable jobs are held back so that a peer taking this queue over does not run them twice (memory-only jobs still run)",
                since.unwrap_or_default().as_secs_f64()
            );
            return false;
        }
        if !(fenced && fresh) {
            return fresh;
        }
        let lock_key = record::takeover_key(&self.namespace, &self.node_id);
        match self.kv.get(&lock_key).await {
            Ok(None) => {
                engine.set_fenced(false);
                self.metrics.fenced.set(0);
                lock(&self.state).fenced = false;
                tracing::info!(
                    node_id = %self.node_id,
                    "unfenced: the lease is renewed again and no peer took this server's queue over"
                );
            }
            Ok(Some(v)) => {
                let (owner, _) = takeover::parse_lock(&v);
                let first = lock(&self.state)
                    .taken_over_by
                    .replace(owner.clone())
                    .is_none();
                if first {
                    tracing::error!(
                        node_id = %self.node_id,
                        peer = %owner,
                        "staying fenced: node {owner} took this server's queue over while it could not reach memcached; the durable jobs held here are {owner}'s now. Restart this server: it then recovers only what is still its own (memory-only jobs still run until then)"
                    );
                }
            }
            // Cannot tell yet: stay fenced until it can be read.
            Err(_) => {}
        }
        fresh
    }

    /// Renews the lease (in its own task) and checks fencing every `renew` interval until
    /// `shutdown`; registers this node once the lease is fresh. The check never waits on a
    /// renewal, so a memcached that stops answering fences the server on time.
    pub async fn renew_forever(
        self: Arc<Self>,
        engine: Engine,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) {
        tokio::spawn(self.clone().renew_loop(shutdown.clone()));
        let mut tick = tokio::time::interval(self.timing.renew / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut registered = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let fresh = self.fence_or_unfence(&engine).await;
            if fresh && !registered {
                if let Ok(ids) = self.registry().await {
                    registered = self.register(&ids).await;
                }
            }
            self.publish(&health);
        }
    }

    /// Watches the peers every `renew` interval until `shutdown` and takes over the dead ones
    /// (with `takeover_after_s` > 0), and answers operators' `takeover` requests.
    pub async fn watch_forever(
        self: Arc<Self>,
        mover: Mover,
        engine: Engine,
        origins: HashMap<String, HashSet<u64>>,
        health: Arc<Health>,
        mut requests: tokio::sync::mpsc::Receiver<TakeoverRequest>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.timing.renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(req) = requests.recv() => {
                    // One at a time, here: a requested and an automatic takeover of the same
                    // node never run at once in this server.
                    self.answer(req, &mover, &engine, &origins).await;
                    self.publish(&health);
                    continue;
                }
                _ = tick.tick() => {}
            }
            // With takeovers off this task only answers requests.
            let Some(after) = self.timing.takeover_after else {
                continue;
            };
            let Ok(ids) = self.registry().await else {
                continue;
            };
            if !ids.contains(&self.node_id) {
                // Lost with a memcached restart: register again.
                self.register(&ids).await;
            }
            for id in ids.iter().filter(|n| **n != self.node_id) {
                if self.peer_is_dead(id, after).await {
                    let none = HashSet::new();
                    let already = origins.get(id).unwrap_or(&none);
                    self.take_over(&mover, &engine, id, already, true).await;
                }
            }
            self.publish(&health);
        }
    }

    /// Reads `node`'s lease and says whether it has been missing for `after`.
    async fn peer_is_dead(&self, node: &str, after: Duration) -> bool {
        // A read error says nothing about the peer: leave its timer as it is.
        let Ok(live) = self.is_live(node).await else {
            return false;
        };
        let mut st = lock(&self.state);
        st.peers.insert(node.to_string(), live);
        if live {
            st.lapsed.remove(node);
            st.empty.remove(node);
            st.logged_owner.remove(node);
            return false;
        }
        let since = *st
            .lapsed
            .entry(node.to_string())
            .or_insert_with(Instant::now);
        since.elapsed() >= after && !st.empty.contains(node)
    }

    /// Takes `node`'s queue over if it holds jobs and no one else has its lock (`automatic`:
    /// its lease lapsed; else an operator asked, see [`super::on_request`]).
    async fn take_over(
        &self,
        mover: &Mover,
        engine: &Engine,
        node: &str,
        already: &HashSet<u64>,
        automatic: bool,
    ) -> Attempt {
        let lock_key = record::takeover_key(&self.namespace, node);
        let again = match self.kv.get(&lock_key).await {
            Ok(Some(v)) => {
                let (owner, done) = takeover::parse_lock(&v);
                if owner != self.node_id {
                    // Only the lock's owner acts on it: two servers deleting and re-claiming
                    // a lock could both win. (An owner that died half-way resumes when it
                    // restarts; README: the operator's way out if it never does.)
                    if automatic && lock(&self.state).logged_owner.insert(node.to_string()) && !done
                    {
                        tracing::info!(
                            "node {node}'s lease lapsed; node {owner} is taking its queue over"
                        );
                    }
                    return Attempt::LockedBy { owner, done };
                }
                // Ours: unfinished (this server restarted half-way: resume it), or done and
                // the node has queued jobs again since (it came back fenced and died).
                done
            }
            Ok(None) => false,
            Err(e) => return Attempt::Unreadable(e.to_string()),
        };
        let mut cl = Cluster::open(&mover.settings).await;
        let range = match cl.watermarks(&self.namespace, node).await {
            Ok(r) => r,
            Err(e) => return Attempt::Unreadable(e.to_string()),
        };
        drop(cl);
        if range.is_none_or(|(lo, hi)| lo > hi) {
            // No queue; its dead letters still move (a read failure: try again next round).
            match crate::dead_letters::node_has_letters(&self.kv, &self.namespace, node).await {
                Ok(true) => {}
                Ok(false) => {
                    lock(&self.state).empty.insert(node.to_string());
                    return Attempt::Nothing;
                }
                Err(e) => return Attempt::Unreadable(e.to_string()),
            }
        }
        if again {
            if let Err(e) = self.kv.set(&lock_key, self.node_id.as_bytes(), 0).await {
                return Attempt::Unreadable(e.to_string());
            }
        }
        let span = tracing::info_span!(
            "gearhouse.takeover",
            from_node = %node,
            into_node = %self.node_id,
            automatic,
            jobs = tracing::field::Empty,
        );
        let lapsed = lock(&self.state)
            .lapsed
            .get(node)
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or_default();
        let result = async {
            if automatic {
                tracing::warn!(
                    from_node = %node,
                    "node {node}'s lease has been missing for {lapsed:.1} s: taking its queue over"
                );
            } else {
                tracing::warn!(
                    from_node = %node,
                    "taking node {node}'s queue over, as the admin command takeover asked"
                );
            }
            let r = takeover::run(mover, engine, node, already).await;
            if let Ok(Outcome::Moved { moved, .. }) = &r {
                tracing::Span::current().record("jobs", moved);
            }
            r
        }
        .instrument(span)
        .await;
        let how = if automatic { "moved" } else { "requested" };
        match result {
            Ok(Outcome::Moved { moved, skipped }) => {
                self.metrics.takeovers.with_label_values(&[how]).inc();
                self.metrics.jobs_taken_over.inc_by(moved);
                tracing::warn!(
                    from_node = %node,
                    moved,
                    skipped,
                    "took over node {node}: {moved} jobs now run here"
                );
                let mut st = lock(&self.state);
                st.empty.insert(node.to_string());
                st.takeovers.push(Taken {
                    node: node.to_string(),
                    at_unix_s: unix_now().as_secs(),
                    jobs: moved,
                });
                let excess = st.takeovers.len().saturating_sub(MAX_TAKEOVERS_SHOWN);
                st.takeovers.drain(..excess);
                Attempt::Moved { moved, skipped }
            }
            Ok(Outcome::OwnedBy(owner)) => {
                self.metrics
                    .takeovers
                    .with_label_values(&["lost_claim"])
                    .inc();
                tracing::info!("node {node}'s queue is taken over by {owner}, not by this server");
                lock(&self.state).logged_owner.insert(node.to_string());
                Attempt::LockedBy { owner, done: false }
            }
            Err(e) => {
                self.metrics.takeovers.with_label_values(&["failed"]).inc();
                tracing::error!("taking over node {node} failed (retried next tick): {e}");
                Attempt::Failed(e.to_string())
            }
        }
    }

    /// Answers an operator's `takeover` request (see [`super::on_request`]): the node must not
    /// be this server, must be of this server's cluster, and must not renew its lease.
    pub(super) async fn answer(
        &self,
        req: TakeoverRequest,
        mover: &Mover,
        engine: &Engine,
        origins: &HashMap<String, HashSet<u64>>,
    ) {
        let text = match req.check(&self.node_id, &mover.settings) {
            Err(refusal) => refusal,
            Ok(()) => match self.is_live(&req.ask.node).await {
                Ok(true) => req.refuse_live(),
                Err(e) => req.unreadable(&e.to_string()),
                Ok(false) => {
                    let none = HashSet::new();
                    let already = origins.get(&req.ask.node).unwrap_or(&none);
                    let attempt = self
                        .take_over(mover, engine, &req.ask.node, already, false)
                        .await;
                    req.reply_text(&attempt)
                }
            },
        };
        let _ = req.reply.send(text);
    }

    /// Copies the state into `/api/v1/status` (`lease` and `takeovers`).
    fn publish(&self, health: &Health) {
        let st = lock(&self.state);
        let t = &self.timing;
        let peers: Vec<serde_json::Value> = st
            .peers
            .iter()
            .map(|(node, live)| {
                serde_json::json!({
                    "node": node,
                    "live": live,
                    "lapsed_s": st.lapsed.get(node).map(|i| i.elapsed().as_secs()),
                })
            })
            .collect();
        let lease = serde_json::json!({
            "node_id": self.node_id,
            "renew_ms": t.renew.as_millis() as u64,
            "ttl_s": t.ttl_s,
            "fence_after_ms": t.fence_after.as_millis() as u64,
            "takeover_after_s": t.takeover_after.map_or(0, |d| d.as_secs()),
            "renewed_ms_ago": st.renewed_at.map(|i| i.elapsed().as_millis() as u64),
            "fenced": st.fenced,
            "taken_over_by": st.taken_over_by,
            "peers": peers,
        });
        let takeovers: Vec<serde_json::Value> = st
            .takeovers
            .iter()
            .map(|t| serde_json::json!({ "node": t.node, "at": t.at_unix_s, "jobs": t.jobs }))
            .collect();
        drop(st);
        health.set_takeover_status(lease, serde_json::Value::Array(takeovers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_fences_before_the_lease_lapses() {
        let t = Timing::new(15, 0);
        assert_eq!(t.renew, Duration::from_secs(3));
        assert_eq!(t.ttl_s, 9);
        assert_eq!(t.fence_after, Duration::from_secs(6));
        assert_eq!(t.takeover_after, Some(Duration::from_secs(15)));
        // memcached's TTL has whole seconds: the floor is 2 s, fencing still comes first.
        let t = Timing::new(3, 0);
        assert_eq!((t.renew, t.ttl_s), (Duration::from_millis(600), 2));
        assert!(t.fence_after < Duration::from_secs(2));
        let off = Timing::new(0, 0);
        assert_eq!(
            (off.renew, off.takeover_after),
            (Duration::from_secs(3), None)
        );
        assert_eq!(Timing::new(15, 20).renew, Duration::from_millis(100));
    }

    #[test]
    fn registry_values_and_lock_values_parse() {
        assert_eq!(parse_registry(b"a b  c"), vec!["a", "b", "c"]);
        assert!(parse_registry(b"").is_empty());
        assert_eq!(takeover::parse_lock(b"n-2"), ("n-2".to_string(), false));
        assert_eq!(takeover::parse_lock(b"n-2 done"), ("n-2".to_string(), true));
        assert_eq!(&lease_key("gh", "n-1")[..], b"gh:lease:n-1");
        assert_eq!(&registry_key("gh")[..], b"gh:nodes");
    }
}
