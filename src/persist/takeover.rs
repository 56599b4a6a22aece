//! Taking over a dead node's queue, once and without duplicates: at start-up
//! (`persistence.recover_from_node`) or automatically, when the node's lease lapsed
//! ([`super::lease`]).
//!
//! 1. A lock key (`<ns>:<dead>:takeover`, stored with memcached's add) names the server doing
//!    it; another server finding someone else's name leaves the queue alone. When the move is
//!    complete the value becomes `<owner> done`: the dead node, restarting, deletes it (its
//!    queue starts again from what is left) and a node cut off from memcached that comes back
//!    learns from it that its queue is no longer its own.
//! 2. The dead node's records are read like a recovery. Each becomes a job of this server: it
//!    is written under this node's keys with `replicas` copies (the copy remembers its origin:
//!    dead node id and sequence number), put in the engine, and only then is the dead node's
//!    record deleted.
//! 3. If this server dies half-way, its own recovery finds the copies with their origins, and
//!    the next takeover run skips those records (deleting them): no job is moved twice.
//! 4. The dead node's dead letters follow ([`crate::dead_letters::DeadLetters::take_over`]):
//!    copied into this server's store (new ids), then deleted under the dead node's keys. Only
//!    then are its watermarks deleted and the lock marked done, so an interrupted move is
//!    resumed by the next run (a letter copied but not deleted yet is moved twice: a duplicate,
//!    never a loss).
//!
//! What a moved job keeps: its handle (`H:<dead node>:<n>`, or through a chain of takeovers
//! the first node's, carried in its record; the engine answers to it, see
//! `engine::aliases`), function, unique, priority, epoch, reducer and attempts. So a client's
//! GET_STATUS, coalescing on the unique and `GET_STATUS_UNIQUE` work against the moved jobs,
//! and workers echo the old handle. What it does not keep: its sequence number (it gets one of
//! this server's, its key in memcached), its running state (a job running on the dead node runs
//! again), and a foreground client's wait (foreground jobs are never in memcached). A handle
//! already in use here (the dead node reused a number after a restart) is not duplicated: that
//! job gets a new handle, with a warning.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tracing::Instrument;

use super::kv::Kv;
use super::metrics::PersistMetrics;
use super::record;
use super::recovery::{Cluster, RangeScan};
use super::ring::Ring;
use super::{MemcachedMirror, PersistError, Settings};
use crate::client::{with_timeout, ClientError, Connection, Job};
use crate::engine::Engine;

/// Takeover copies in flight at once.
const WAVE: usize = 2_000;

/// The suffix of a takeover lock's value once the move is complete.
pub const DONE: &str = " done";

/// Sequence numbers skipped before a wave's range: submits that take a number between
/// reading the next one and reserving the range land in this gap, never in the range.
const RESERVE_GAP: u64 = 4096;

/// Reserves `n` sequence numbers for moved jobs while the server takes submits: later submits
/// get numbers above the range (the engine raises its next number to the range's end).
fn reserve_seqs(engine: &Engine, n: usize) -> u64 {
    let first = engine.next_seq() + RESERVE_GAP;
    engine.restore(Vec::new(), first + n as u64);
    first
}

/// Where a takeover puts the dead node's dead letters: this server's store, set once the app
/// has built it (persistence exists first).
pub type LetterStore = Arc<OnceLock<Arc<crate::dead_letters::DeadLetters>>>;

/// What a takeover inside this server needs (cheap to clone into a background task).
#[derive(Clone)]
pub struct Mover {
    pub(super) settings: Settings,
    pub(super) mirror: MemcachedMirror,
    pub(super) metrics: Arc<PersistMetrics>,
    pub(super) kv: Arc<Kv>,
    pub(super) letters: LetterStore,
}

/// How a takeover run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This server holds the lock and moved the queue (`moved` new jobs; `skipped` records had
    /// been moved by an earlier, interrupted run).
    Moved { moved: u64, skipped: u64 },
    /// Another server holds (or completed) the lock: its value.
    OwnedBy(String),
}

/// Whether a takeover lock value says the move is complete, and by whom.
pub fn parse_lock(v: &[u8]) -> (String, bool) {
    let s = String::from_utf8_lossy(v);
    match s.strip_suffix(DONE) {
        Some(owner) => (owner.to_string(), true),
        None => (s.into_owned(), false),
    }
}

/// Moves node `from`'s queue into `engine` unless another server holds its lock. `already`:
/// sequence numbers on `from` of jobs this server moved before (found by its recovery).
pub(super) async fn run(
    p: &Mover,
    engine: &Engine,
    from: &str,
    already: &HashSet<u64>,
) -> Result<Outcome, PersistError> {
    let s = &p.settings;
    let mut cl = Cluster::open(s).await;
    let lock = record::takeover_key(&s.namespace, from);
    let ring = Ring::new(&s.nodes);
    if let Some(owner) = cl.try_lock(&ring, &lock, s.node_id.as_bytes()).await? {
        tracing::warn!(
            "not taking over node {from}: its queue is being or was taken over by {owner} (memcached key {})",
            String::from_utf8_lossy(&lock)
        );
        return Ok(Outcome::OwnedBy(owner));
    }
    let mut done: HashSet<u64> = already.clone();
    let mut scan = RangeScan::begin(&mut cl, s, from, "takeover").await?;
    let (mut moved, mut skipped) = (0u64, 0u64);
    while let Some(found) = scan.next(&mut cl, s).await? {
        let mut next = reserve_seqs(engine, found.len());
        for wave in found.chunks(WAVE) {
            let mut old_keys: Vec<Bytes> = Vec::with_capacity(wave.len());
            let mut waiting = Vec::with_capacity(wave.len());
            for f in wave {
                let old = f.record.seq;
                if done.contains(&old) {
                    skipped += 1;
                    old_keys.push(record::job_key(&s.namespace, from, old));
                    continue;
                }
                let mut r = f.record.clone();
                r.seq = next;
                next += 1;
                // Clients know the job by the handle they got: the one it already kept from an
                // earlier takeover, else the dead node's.
                r.handle
                    .get_or_insert_with(|| crate::engine::node_handle(from, old));
                let rx = p.mirror.write_takeover(&r, &(from.to_string(), old));
                waiting.push((old, r, rx));
            }
            let mut records = Vec::with_capacity(waiting.len());
            let mut failure = None;
            for (old, r, rx) in waiting {
                match rx.await {
                    Ok(Ok(())) => {
                        done.insert(old);
                        old_keys.push(record::job_key(&s.namespace, from, old));
                        records.push(r);
                    }
                    Ok(Err(e)) => {
                        // Remove whatever copies were made; the record stays on the dead node.
                        crate::engine::Mirror::delete(&p.mirror, r.seq);
                        failure = Some(e.to_string());
                    }
                    Err(_) => failure = Some("the mirror stopped".to_string()),
                }
            }
            moved += engine.restore(records, next) as u64;
            cl.delete_keys(&old_keys).await;
            if let Some(e) = failure {
                return Err(PersistError::Recovery(format!(
                    "could not copy a job of node {from}: {e}"
                )));
            }
        }
    }
    // Before the watermarks go: a failure here is retried while they still mark the node as
    // holding something.
    let letters = match p.letters.get() {
        Some(d) => d
            .take_over(from)
            .await
            .map_err(|e| PersistError::Recovery(e.to_string()))?,
        None => 0,
    };
    let metas: Vec<Bytes> = (0..super::recovery::MAX_META_KEYS)
        .map(|i| record::meta_key(&s.namespace, from, i))
        .collect();
    cl.delete_keys(&metas).await;
    p.metrics.recovered.inc_by(moved);
    let done_value = format!("{}{DONE}", s.node_id);
    if let Err(e) = p.kv.set(&lock, done_value.as_bytes(), 0).await {
        // The queue is moved; only the marker is missing (the lock still names this server).
        tracing::warn!("could not mark the takeover of node {from} complete: {e}");
    }
    tracing::info!(
        from,
        moved,
        skipped,
        letters,
        "takeover complete: {moved} jobs of node {from} moved into this server ({skipped} had been moved before), with their handles; {letters} dead letters moved"
    );
    Ok(Outcome::Moved { moved, skipped })
}

/// What `gearhouse recover --from-node` needs: the dead node's cluster and the running
/// server that receives its jobs.
#[derive(Debug, Clone)]
pub struct RemoteTakeover {
    pub memcached: Vec<String>,
    pub namespace: String,
    pub from_node: String,
    /// Gearman address of the running server.
    pub server: String,
    /// Name stored in the lock key.
    pub owner: String,
    /// Copies the dead node kept (how many memcached nodes may be unreachable: replicas - 1).
    pub replicas: usize,
    /// Submits in flight at once (one per connection).
    pub parallel: usize,
    pub timeout: std::time::Duration,
}

/// Counts of a remote takeover.
#[derive(Debug, Clone, Copy, Default)]
pub struct TakeoverSummary {
    pub moved: u64,
    pub refused: u64,
}

/// Submits one record as a background job through `c`, keeping its priority, unique, epoch and
/// reducer; Ok(handle) once the server answered JOB_CREATED.
async fn submit(
    c: &mut Connection,
    r: &crate::engine::JobRecord,
    timeout: std::time::Duration,
) -> Result<Bytes, ClientError> {
    let mut job = Job::new(&r.function, &r.data)
        .unique(&r.unique)
        .priority(r.priority);
    if let Some(e) = r.epoch {
        job = job.epoch(e);
    } else if let Some(red) = &r.reducer {
        job = job.reducer(red);
    }
    with_timeout(timeout, c.submit_background(&job)).await
}

/// Moves `from_node`'s queue into a running server through the Gearman protocol: each record
/// is submitted as a background job, and deleted from memcached once JOB_CREATED arrived.
/// Jobs the server refuses stay in memcached (run it again). If this command itself dies
/// between a JOB_CREATED and the delete, that job can be submitted twice.
pub async fn recover_into_server(t: &RemoteTakeover) -> Result<TakeoverSummary, PersistError> {
    let span = tracing::info_span!(
        "gearhouse.takeover",
        from_node = %t.from_node,
        into_server = %t.server,
    );
    recover_into_server_steps(t).instrument(span).await
}

async fn recover_into_server_steps(t: &RemoteTakeover) -> Result<TakeoverSummary, PersistError> {
    let cfg = crate::config::Config::default();
    let mut s = super::Settings::build(&cfg, &t.memcached)?;
    s.namespace = t.namespace.clone();
    s.node_id = t.owner.clone();
    s.replicas = t.replicas.clamp(1, t.memcached.len());
    s.write_timeout = t.timeout;
    let from = t.from_node.as_str();
    let mut cl = Cluster::open(&s).await;
    let lock = record::takeover_key(&s.namespace, from);
    let ring = Ring::new(&s.nodes);
    if let Some(owner) = cl.try_lock(&ring, &lock, t.owner.as_bytes()).await? {
        return Err(PersistError::Recovery(format!(
            "node {from}'s queue is being or was taken over by {owner:?}; to take it over anyway, delete memcached key {}",
            String::from_utf8_lossy(&lock)
        )));
    }
    let mut conns = Vec::new();
    for _ in 0..t.parallel.max(1) {
        conns.push(Connection::connect(t.server.as_str()).await.map_err(|e| {
            PersistError::Recovery(format!(
                "cannot connect to the gearhouse server at {}: {e}",
                t.server
            ))
        })?);
    }
    let mut scan = RangeScan::begin(&mut cl, &s, from, "takeover").await?;
    let mut sum = TakeoverSummary::default();
    let mut first_error: Option<String> = None;
    while let Some(found) = scan.next(&mut cl, &s).await? {
        let per = found.len().div_ceil(conns.len()).max(1);
        let results = futures::future::join_all(conns.iter_mut().zip(found.chunks(per)).map(
            |(c, part)| async move {
                let mut done = Vec::new();
                for f in part {
                    let r = submit(c, &f.record, t.timeout).await;
                    // A refusal leaves the connection usable; anything else ends this part.
                    let broken = matches!(&r, Err(e) if !e.is_refusal());
                    done.push((f.record.seq, r));
                    if broken {
                        break;
                    }
                }
                done
            },
        ))
        .await;
        let mut old_keys = Vec::new();
        let mut broken = None;
        for (seq, r) in results.into_iter().flatten() {
            match r {
                Ok(_) => {
                    sum.moved += 1;
                    old_keys.push(record::job_key(&s.namespace, from, seq));
                }
                Err(e) if e.is_refusal() => {
                    sum.refused += 1;
                    first_error.get_or_insert(e.to_string());
                }
                Err(e) => broken = Some(e),
            }
        }
        cl.delete_keys(&old_keys).await;
        if let Some(e) = broken {
            return Err(PersistError::Recovery(format!(
                "{e} ({} jobs moved so far; run the command again to move the rest)",
                sum.moved
            )));
        }
    }
    if sum.refused == 0 {
        let metas: Vec<Bytes> = (0..super::recovery::MAX_META_KEYS)
            .map(|i| record::meta_key(&s.namespace, from, i))
            .collect();
        cl.delete_keys(&metas).await;
    } else {
        tracing::error!(
            refused = sum.refused,
            "the server refused some jobs (first: {}); they stay in memcached: run the command again",
            first_error.unwrap_or_default()
        );
    }
    Ok(sum)
}
