//! Dead letters: jobs the server gave up on, kept instead of dropped silently. gearmand forgets
//! a job after `--job-retries` attempts; here it becomes a letter (function, handle, unique,
//! payload, attempts, last worker, reason, time) that can be listed, retried or deleted
//! (`/api/v1/dead-letters`, admin `show dead`). Background jobs of a function with
//! `dead_letter = true` that end in WORK_FAIL, WORK_EXCEPTION or a CAN_DO_TIMEOUT become
//! letters too (a foreground job's client got the failure itself).
//!
//! Shape:
//! - [`DeadLetters::ended`] runs under the engine lock, so it only copies the job and hands it
//!   to the store's task through a bounded queue (`dead_letters.queue`); a full queue loses the
//!   letter, counted and logged.
//! - The task numbers letters, keeps them in memory (bounded by `dead_letters.max_count` and
//!   `.max_bytes`, the oldest dropped first and counted) and mirrors them to memcached through
//!   [`Kv`] (replicated like the queue): `<ns>:<node_id>:dl:<id>` per letter and a watermark pair
//!   `dl:lo` (oldest live id) / `dl:hi` (next id), so start-up reads them back with plain gets,
//!   without listing keys. The watermarks are written after the letter, so a crash between the
//!   two loses at most the letter being written. Without memcached letters live in memory only.
//! - One task applies every change (new letters, evictions, deletes) in order, so memcached sees
//!   them in the order memory did.
//! - A takeover of a dead node's queue moves its letters too ([`DeadLetters::take_over`]): read
//!   from its keys, numbered and mirrored here by the same task, and only then deleted from its
//!   keys. A crash between the two leaves a letter in both stores, so the next takeover run
//!   moves it again: a duplicate letter, never a lost one.

pub mod letter;
pub mod metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::engine::{EndedJob, Engine};
use crate::local::LocalClient;
use crate::persist::kv::{Kv, KvError};
use crate::protocol::Submit;
pub use letter::{Letter, Reason};
use metrics::DeadLetterMetrics;

/// Why a dead-letter operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeadLetterError {
    #[error("no dead letter {0}")]
    NotFound(u64),
    /// The engine refused the retried job (queue full, not durable...); the letter is kept.
    #[error("the retried job was refused: {0}; the letter is kept")]
    Refused(String),
    /// Reading the letters back from memcached at start-up failed.
    #[error("reading dead letters back from memcached: {0} (check persistence.memcached)")]
    Restore(#[from] KvError),
    /// Moving a dead node's letters failed part-way; what was not moved stays under its keys.
    #[error("moving the dead letters of node {node}: {error}; the letters not moved yet stay under its memcached keys and the takeover tries again")]
    TakeOver { node: String, error: KvError },
    /// The store's task has ended (the server is stopping).
    #[error("the dead-letter store has stopped (the server is shutting down)")]
    Stopped,
}

/// A change for the store's task.
enum Op {
    /// A job just died: number it, keep it, mirror it.
    New(Box<Letter>),
    /// Forget a letter (deleted or retried through the API).
    Delete(u64),
    /// Letters of a dead node taken over: number them, keep them, mirror them, and say whether
    /// memcached took them all.
    Adopt(Vec<Letter>, oneshot::Sender<Result<(), KvError>>),
}

struct Inner {
    letters: BTreeMap<u64, Stored>,
    bytes: usize,
    next_id: u64,
}

struct Stored {
    letter: Arc<Letter>,
    /// memcached acknowledged it (always false without memcached).
    persisted: bool,
}

/// A letter as listed: the letter and whether memcached holds it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub letter: Arc<Letter>,
    pub persisted: bool,
}

/// The dead-letter store, shared behind an `Arc` by the outcome sink, the HTTP API and admin.
pub struct DeadLetters {
    /// Letters by id (ids increase, so the first is the oldest). Guards plain data, never held
    /// across an await: a `std::sync::Mutex`.
    inner: Mutex<Inner>,
    max_count: usize,
    max_bytes: usize,
    tx: mpsc::Sender<Op>,
    kv: Option<Arc<Kv>>,
    namespace: String,
    node_id: String,
    /// Who may retry and delete letters over HTTP (`server.admin_networks`).
    pub admin_networks: Vec<IpNet>,
    metrics: DeadLetterMetrics,
    /// Set once this node's letters were read back: a takeover may need them read before the
    /// app's own call does (new letters are numbered after them). An async mutex: held across
    /// the reads, so two callers never read them back twice.
    restored: tokio::sync::Mutex<bool>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("count", &self.lock().letters.len())
            .field("memcached", &self.kv.is_some())
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// An empty store with its task spawned; [`DeadLetters::restore`] reads the letters back
    /// from memcached (when `kv` is set) before clients are accepted.
    pub fn start(
        cfg: &Config,
        kv: Option<Arc<Kv>>,
        registry: &prometheus::Registry,
    ) -> Arc<DeadLetters> {
        let (tx, rx) = mpsc::channel(cfg.dead_letters.queue.max(1));
        let d = Arc::new(DeadLetters {
            inner: Mutex::new(Inner {
                letters: BTreeMap::new(),
                bytes: 0,
                next_id: 1,
            }),
            max_count: cfg.dead_letters.max_count.max(1),
            max_bytes: cfg.dead_letters.max_bytes,
            tx,
            kv,
            namespace: cfg.persistence.namespace.clone(),
            node_id: cfg.node_id(),
            admin_networks: cfg.server_config().admin_networks,
            metrics: DeadLetterMetrics::new(registry, cfg.metrics.max_function_labels),
            restored: tokio::sync::Mutex::new(false),
        });
        // The task holds a weak handle: the store (and so the task) ends with the server.
        tokio::spawn(run(Arc::downgrade(&d), rx));
        d
    }

    /// Reads the letters back from memcached, retrying every half second while no node answers
    /// (as the queue's recovery does) until `stop` is cancelled. Must finish before jobs run:
    /// new letters are numbered after the ones read back.
    pub async fn restore_until_done(&self, stop: &tokio_util::sync::CancellationToken) {
        let mut attempt = 0u32;
        loop {
            match self.restore().await {
                Ok(()) => return,
                Err(e) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        tracing::warn!(error = %e, attempt, "dead letters not read back yet: retrying");
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `job` as a letter if it is one: dropped after its retries (always), or a
    /// background job of a `dead_letter` function that failed, excepted or timed out. Called
    /// under the engine lock: copies and queues.
    pub fn ended(&self, job: &EndedJob<'_>) {
        let Some(reason) = Reason::of(job.outcome) else {
            return;
        };
        if reason != Reason::Dropped && !(job.background && job.dead_letter) {
            return;
        }
        let letter = Letter {
            id: 0,
            function: Bytes::copy_from_slice(job.function),
            handle: Bytes::copy_from_slice(job.handle),
            unique: Bytes::copy_from_slice(job.unique),
            payload: Bytes::copy_from_slice(job.data),
            priority: job.priority,
            background: job.background,
            attempts: job.attempts,
            worker: job
                .worker
                .map(|(addr, id)| format!("{addr} {}", String::from_utf8_lossy(id))),
            reason,
            exception: if reason == Reason::Exception {
                Bytes::copy_from_slice(job.result)
            } else {
                Bytes::new()
            },
            at_unix: unix_now(),
        };
        if self.tx.try_send(Op::New(Box::new(letter))).is_err() {
            self.metrics.lost.inc();
            tracing::warn!(
                function = %String::from_utf8_lossy(job.function),
                handle = %String::from_utf8_lossy(job.handle),
                reason = reason.as_str(),
                "dead letter lost: the store's queue is full (dead_letters.queue)"
            );
        }
    }

    /// The letters, oldest first, of `function` only when given.
    pub fn list(&self, function: Option<&[u8]>) -> Vec<Listed> {
        self.lock()
            .letters
            .values()
            .filter(|s| function.is_none_or(|f| s.letter.function == f))
            .map(|s| Listed {
                letter: s.letter.clone(),
                persisted: s.persisted,
            })
            .collect()
    }

    /// One letter.
    pub fn get(&self, id: u64) -> Option<Listed> {
        self.lock().letters.get(&id).map(|s| Listed {
            letter: s.letter.clone(),
            persisted: s.persisted,
        })
    }

    /// Deletes a letter (from memory now, from memcached by the task).
    pub async fn delete(&self, id: u64) -> Result<(), DeadLetterError> {
        if self.take(id).is_none() {
            return Err(DeadLetterError::NotFound(id));
        }
        let _ = self.tx.send(Op::Delete(id)).await;
        Ok(())
    }

    /// Submits the letter's job again, as a background job with its function, unique, payload
    /// and priority, through the engine like any client's (so durable before it is accepted),
    /// then deletes the letter. `peer` is who asked (shown as the job's client). Returns the
    /// new job's handle. The letter is taken out while its job is submitted, so two retries of
    /// one letter submit it once; a refused submit puts it back.
    pub async fn retry(
        &self,
        engine: &Engine,
        id: u64,
        peer: SocketAddr,
    ) -> Result<Bytes, DeadLetterError> {
        let taken = self.take(id).ok_or(DeadLetterError::NotFound(id))?;
        let l = taken.letter.clone();
        let mut client = LocalClient::connect(engine, peer, "dead-letter-retry", 16);
        let submitted = client
            .submit(Submit {
                function: l.function.clone(),
                unique: l.unique.clone(),
                data: l.payload.clone(),
                priority: l.priority,
                background: true,
                epoch: None,
                reducer: None,
            })
            .await;
        let handle = match submitted {
            Ok(h) => h,
            Err(e) => {
                self.put_back(taken);
                return Err(DeadLetterError::Refused(e.to_string()));
            }
        };
        tracing::info!(
            id,
            function = %String::from_utf8_lossy(&l.function),
            old_handle = %String::from_utf8_lossy(&l.handle),
            handle = %String::from_utf8_lossy(&handle),
            %peer,
            "dead letter retried"
        );
        self.metrics.retried.inc();
        let _ = self.tx.send(Op::Delete(id)).await;
        Ok(handle)
    }

    /// Admin `show dead`: `ID\tFUNCTION\tHANDLE\tUNIQUE\tATTEMPTS\tREASON\tWORKER\tTIME` per
    /// letter, oldest first, then `.` (tabs and newlines inside values become spaces so a line
    /// stays a line).
    pub fn show(&self, out: &mut BytesMut) {
        for s in self.list(None) {
            let l = &s.letter;
            let id = l.id.to_string();
            let attempts = l.attempts.to_string();
            let at = l.at_unix.to_string();
            let fields: [&[u8]; 8] = [
                id.as_bytes(),
                &l.function,
                &l.handle,
                &l.unique,
                attempts.as_bytes(),
                l.reason.as_str().as_bytes(),
                l.worker.as_deref().unwrap_or("-").as_bytes(),
                at.as_bytes(),
            ];
            for (i, f) in fields.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b'\t');
                }
                out.extend(f.iter().map(|&b| match b {
                    b'\t' | b'\n' | b'\r' => b' ',
                    b => b,
                }));
            }
            out.put_u8(b'\n');
        }
        out.put_slice(b".\n");
    }

    /// Takes a letter out of memory (its memcached copy stays until an `Op::Delete`).
    fn take(&self, id: u64) -> Option<Stored> {
        let mut g = self.lock();
        let s = g.letters.remove(&id)?;
        g.bytes -= s.letter.size();
        self.metrics.letters.set(g.letters.len() as i64);
        Some(s)
    }

    /// Puts back a letter taken out for a retry that was refused.
    fn put_back(&self, s: Stored) {
        let mut g = self.lock();
        g.bytes += s.letter.size();
        g.letters.insert(s.letter.id, s);
        self.metrics.letters.set(g.letters.len() as i64);
    }

    /// Numbers and keeps a new letter, evicting the oldest past the bounds; returns the kept
    /// letter and the ids evicted. `arrived`: a job just died (a letter moved from another
    /// node was counted there).
    fn admit(&self, mut letter: Letter, arrived: bool) -> (Arc<Letter>, Vec<u64>) {
        let mut g = self.lock();
        letter.id = g.next_id;
        g.next_id += 1;
        let letter = Arc::new(letter);
        g.bytes += letter.size();
        g.letters.insert(
            letter.id,
            Stored {
                letter: letter.clone(),
                persisted: false,
            },
        );
        let mut evicted = Vec::new();
        while g.letters.len() > self.max_count || (g.bytes > self.max_bytes && g.letters.len() > 1)
        {
            let Some((id, s)) = g.letters.pop_first() else {
                break;
            };
            g.bytes -= s.letter.size();
            evicted.push(id);
        }
        self.metrics.evicted.inc_by(evicted.len() as u64);
        self.metrics.letters.set(g.letters.len() as i64);
        if arrived {
            self.metrics.arrived(&letter.function, letter.reason);
        }
        (letter, evicted)
    }

    /// The watermarks to write now: the oldest live id and the next id.
    fn watermarks(&self) -> (u64, u64) {
        let g = self.lock();
        let lo = g.letters.keys().next().copied().unwrap_or(g.next_id);
        (lo, g.next_id)
    }

    fn key(&self, part: &str) -> Bytes {
        node_key(&self.namespace, &self.node_id, part)
    }

    /// Reads the letters of this node back from memcached: the ids between the watermarks.
    /// Once done, later calls do nothing.
    pub async fn restore(&self) -> Result<(), DeadLetterError> {
        let Some(kv) = &self.kv else { return Ok(()) };
        let mut restored = self.restored.lock().await;
        if *restored {
            return Ok(());
        }
        let (hi, found) = read_node(kv, &self.namespace, &self.node_id).await?;
        *restored = true;
        let mut g = self.lock();
        g.next_id = g.next_id.max(hi).max(1);
        for l in found {
            g.bytes += l.size();
            g.letters.insert(
                l.id,
                Stored {
                    letter: Arc::new(l),
                    persisted: true,
                },
            );
        }
        self.metrics.letters.set(g.letters.len() as i64);
        if !g.letters.is_empty() {
            tracing::info!(
                letters = g.letters.len(),
                "dead letters read back from memcached"
            );
        }
        Ok(())
    }

    fn mark_persisted(&self, id: u64) {
        if let Some(s) = self.lock().letters.get_mut(&id) {
            s.persisted = true;
        }
    }

    /// Mirrors a change to memcached: letters first, then the watermarks. On failure the
    /// letters live in memory only (counted and logged) and the error is returned.
    async fn mirror(&self, kv: &Kv, new: &[Arc<Letter>], gone: &[u64]) -> Result<(), KvError> {
        let mut failed = None;
        for l in new {
            if let Err(e) = kv.set(&self.key(&l.id.to_string()), &l.encode(), 0).await {
                failed = Some(e);
            }
        }
        for id in gone {
            if let Err(e) = kv.delete(&self.key(&id.to_string())).await {
                failed = Some(e);
            }
        }
        let (lo, hi) = self.watermarks();
        for (k, v) in [("hi", hi), ("lo", lo)] {
            if let Err(e) = kv.set(&self.key(k), v.to_string().as_bytes(), 0).await {
                failed = Some(e);
            }
        }
        match failed {
            None => {
                for l in new {
                    self.mark_persisted(l.id);
                }
                Ok(())
            }
            Some(e) => {
                self.metrics.mirror_errors.inc();
                tracing::warn!(error = %e, "dead letter not mirrored to memcached: it lives in memory only");
                Err(e)
            }
        }
    }

    /// Moves node `from`'s dead letters into this store, as part of a takeover of its queue:
    /// read from its keys (after this node's own letters were read back, so numbering goes on
    /// after them), numbered and mirrored here by the store's task (function, handle, unique,
    /// payload, attempts, last worker, reason and time kept; new ids), and only once memcached
    /// holds them here deleted under `from`'s keys. Returns how many moved. Run again after a
    /// failure or a crash, it moves what is left; a letter mirrored here but not yet deleted
    /// there is moved twice (a duplicate, never a loss). Without memcached there is nothing to
    /// move: a dead node's letters lived in its memory.
    pub async fn take_over(&self, from: &str) -> Result<u64, DeadLetterError> {
        let Some(kv) = self.kv.clone() else {
            return Ok(0);
        };
        let failed = |error| DeadLetterError::TakeOver {
            node: from.to_string(),
            error,
        };
        self.restore().await?;
        let (hi, letters) = read_node(&kv, &self.namespace, from)
            .await
            .map_err(failed)?;
        if hi == 0 {
            return Ok(0);
        }
        let old_ids: Vec<u64> = letters.iter().map(|l| l.id).collect();
        if !letters.is_empty() {
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Op::Adopt(letters, tx))
                .await
                .map_err(|_| DeadLetterError::Stopped)?;
            rx.await
                .map_err(|_| DeadLetterError::Stopped)?
                .map_err(failed)?;
        }
        for id in &old_ids {
            kv.delete(&node_key(&self.namespace, from, &id.to_string()))
                .await
                .map_err(failed)?;
        }
        // The watermarks last: until they go, a rerun finds whatever was not deleted yet.
        for part in ["lo", "hi"] {
            kv.delete(&node_key(&self.namespace, from, part))
                .await
                .map_err(failed)?;
        }
        let moved = old_ids.len() as u64;
        self.metrics.taken_over.inc_by(moved);
        Ok(moved)
    }
}

/// Whether node `node` left dead letters in memcached (its watermarks say ids remain): a
/// lapsed node with an empty queue is still taken over for them.
pub async fn node_has_letters(kv: &Kv, ns: &str, node: &str) -> Result<bool, KvError> {
    let (lo, hi) = node_watermarks(kv, ns, node).await?;
    Ok(hi > lo)
}

/// Node `node`'s watermarks `(lo, hi)`: its letters have the ids `lo..hi` (`hi` is 0 when it
/// never had one).
async fn node_watermarks(kv: &Kv, ns: &str, node: &str) -> Result<(u64, u64), KvError> {
    let read = |v: Option<Bytes>| -> u64 {
        v.and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse().ok())
            .unwrap_or(0)
    };
    let hi = read(kv.get(&node_key(ns, node, "hi")).await?);
    let lo = read(kv.get(&node_key(ns, node, "lo")).await?).max(1);
    Ok((lo, hi))
}

/// Key `part` (a letter id, `lo` or `hi`) of node `node`'s letters.
fn node_key(ns: &str, node: &str, part: &str) -> Bytes {
    Kv::key(ns, &[node, "dl", part])
}

/// Reads node `node`'s letters from memcached: the ids between its watermarks. Returns its
/// `hi` watermark (the next id it would give; 0 when it never had a letter) and the letters,
/// oldest first; an unreadable letter is logged and skipped.
async fn read_node(kv: &Kv, ns: &str, node: &str) -> Result<(u64, Vec<Letter>), KvError> {
    let (lo, hi) = node_watermarks(kv, ns, node).await?;
    let mut found = Vec::new();
    for id in lo..hi {
        if let Some(v) = kv.get(&node_key(ns, node, &id.to_string())).await? {
            match Letter::decode(v) {
                Some(l) if l.id == id => found.push(l),
                _ => tracing::warn!(node, id, "dead letter in memcached is unreadable: skipped"),
            }
        }
    }
    Ok((hi, found))
}

/// The store's task: applies changes in order until the store is gone.
async fn run(store: std::sync::Weak<DeadLetters>, mut rx: mpsc::Receiver<Op>) {
    while let Some(op) = rx.recv().await {
        let Some(d) = store.upgrade() else { return };
        let (new, gone) = match op {
            Op::New(l) => {
                let (l, evicted) = d.admit(*l, true);
                tracing::info!(
                    id = l.id,
                    function = %String::from_utf8_lossy(&l.function),
                    handle = %String::from_utf8_lossy(&l.handle),
                    attempts = l.attempts,
                    reason = l.reason.as_str(),
                    "job became a dead letter"
                );
                (vec![l], evicted)
            }
            Op::Delete(id) => (Vec::new(), vec![id]),
            Op::Adopt(letters, reply) => {
                let mut new = Vec::with_capacity(letters.len());
                let mut gone = Vec::new();
                for l in letters {
                    let (l, evicted) = d.admit(l, false);
                    new.push(l);
                    gone.extend(evicted);
                }
                let r = match d.kv.clone() {
                    Some(kv) => d.mirror(&kv, &new, &gone).await,
                    None => Ok(()),
                };
                let _ = reply.send(r);
                continue;
            }
        };
        if let Some(kv) = d.kv.clone() {
            // A failure is counted and logged by `mirror`: the letter lives in memory.
            let _ = d.mirror(&kv, &new, &gone).await;
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
