//! Cached job results: a WORK_COMPLETE of a function with `cache_ttl_s` is kept under
//! (function, unique) for that long, and a later foreground submit of the same function and
//! unique is answered from it at once (JOB_CREATED, then WORK_COMPLETE), without the engine or a
//! worker. Failures, exceptions and jobs with an empty unique are never cached.
//!
//! Shape:
//! - memcached (through [`Kv`]) is where results live, so they survive restarts and are shared
//!   by the servers of a cluster. Keys are `<namespace>:c:<128-bit hash of function and unique>`
//!   (any function and unique become a valid memcached key); the value carries the function and
//!   unique themselves, so a hash collision is a miss, never a wrong answer.
//! - An in-memory [`front::Front`] (bounded in bytes, entries expiring with their TTL) answers
//!   repeated hits in microseconds and this server's own results before their memcached write.
//! - [`Cache::ended`] runs under the engine lock: it fills the front and hands the memcached
//!   write to one task through a bounded queue; a full queue skips the result (counted).
//! - A result memcached refuses (over its `-I` item limit) is removed from the front again and
//!   counted as skipped, so what is answered is what memcached holds; one memcached did not
//!   answer for stays in the front (counted as skipped, `unreachable`).
//! - Which functions are cached is read from `[functions."<name>"]` at start-up; runtime
//!   changes come through [`Cache::set_ttl`], which refuses a TTL when no memcached is
//!   configured, as start-up does.

mod front;
pub mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::codec::{put_response, PacketType};
use crate::config::Config;
use crate::engine::{EndedJob, JobOutcome};
use crate::persist::kv::{Kv, KvError};
use crate::protocol::Submit;
use front::Front;
use metrics::{CacheMetrics, SkipReason};

/// Why the cache cannot be set up or changed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// A function asks for cached results, but there is no memcached to keep them in.
    #[error(
        "functions.\"{function}\".cache_ttl_s = {ttl} needs persistence.memcached: cached results \
         live in memcached. Set persistence.memcached (or --memcached), or remove cache_ttl_s"
    )]
    NoMemcached { function: String, ttl: u32 },
}

/// One result on its way to memcached.
struct Store {
    function: Bytes,
    key: Bytes,
    front_key: Bytes,
    value: Bytes,
    ttl_s: u32,
}

/// What the cache and its store task share.
struct Shared {
    front: Front,
    metrics: CacheMetrics,
}

/// The result cache. Shared behind an `Arc` by the Gearman connections, the HTTP API and the
/// engine's outcome sink.
pub struct Cache {
    namespace: String,
    node_id: String,
    kv: Option<Arc<Kv>>,
    /// Function name -> TTL in seconds, for the lookup before a submit reaches the engine.
    /// Read on every submit, written on a runtime change: a read-mostly lock.
    ttls: RwLock<HashMap<Bytes, u32>>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Store>,
    /// Counter of the handles minted for cache hits (`H:<node>:c<n>`).
    hits_minted: AtomicU64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("namespace", &self.namespace)
            .field("memcached", &self.kv.is_some())
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// The cache for `cfg`'s functions over `kv` (the memcached cluster, if configured), with
    /// its store task spawned; refused when a function has `cache_ttl_s` and there is no `kv`.
    pub fn start(
        cfg: &Config,
        kv: Option<Arc<Kv>>,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Cache>, CacheError> {
        let mut ttls = HashMap::new();
        for (name, f) in &cfg.functions {
            let ttl = f.cache_ttl_s.unwrap_or(0);
            if ttl == 0 {
                continue;
            }
            if kv.is_none() {
                return Err(CacheError::NoMemcached {
                    function: name.clone(),
                    ttl,
                });
            }
            ttls.insert(Bytes::copy_from_slice(name.as_bytes()), ttl);
        }
        let shared = Arc::new(Shared {
            front: Front::new(cfg.cache.front_bytes),
            metrics: CacheMetrics::new(registry, cfg.metrics.max_function_labels),
        });
        let (tx, rx) = mpsc::channel(cfg.cache.store_queue.max(1));
        if let Some(kv) = &kv {
            tokio::spawn(store_task(rx, kv.clone(), shared.clone()));
        }
        Ok(Arc::new(Cache {
            namespace: cfg.persistence.namespace.clone(),
            node_id: cfg.node_id(),
            kv,
            ttls: RwLock::new(ttls),
            shared,
            tx,
            hits_minted: AtomicU64::new(0),
        }))
    }

    /// Sets `function`'s cache TTL at run time (0 = stop caching it; results already stored
    /// expire with their own TTL). Refused without memcached, as at start-up.
    pub fn set_ttl(&self, function: &[u8], ttl_s: u32) -> Result<(), CacheError> {
        let mut t = self.ttls.write().unwrap_or_else(PoisonError::into_inner);
        if ttl_s == 0 {
            t.remove(function);
            return Ok(());
        }
        if self.kv.is_none() {
            return Err(CacheError::NoMemcached {
                function: String::from_utf8_lossy(function).into_owned(),
                ttl: ttl_s,
            });
        }
        t.insert(Bytes::copy_from_slice(function), ttl_s);
        Ok(())
    }

    /// `function`'s cache TTL in seconds (0 = not cached).
    pub fn ttl(&self, function: &[u8]) -> u32 {
        self.ttls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(function)
            .copied()
            .unwrap_or(0)
    }

    /// Whether `s` may be answered from the cache: a plain foreground submit (any priority; not
    /// background, epoch or reduce) of a cached function with a non-empty unique.
    pub fn is_cacheable(&self, s: &Submit) -> bool {
        !s.background
            && s.epoch.is_none()
            && s.reducer.is_none()
            && !s.unique.is_empty()
            && self.ttl(&s.function) > 0
    }

    /// The cached result of `function` with `unique`, from the front or memcached; `None` for
    /// a miss, a function that is not cached, an empty unique, or memcached not answering.
    /// Counts the hit or miss; a hit from memcached is copied into the front.
    pub async fn lookup(&self, function: &[u8], unique: &[u8]) -> Option<Bytes> {
        if unique.is_empty() || self.ttl(function) == 0 {
            return None;
        }
        let m = &self.shared.metrics;
        let fkey = front_key(function, unique);
        if let Some(r) = self.shared.front.get(&fkey, Instant::now()) {
            m.hit(function);
            return Some(r);
        }
        let found = match &self.kv {
            Some(kv) => match kv.get(&self.key(function, unique)).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(error = %e, "result cache lookup failed: treated as a miss");
                    None
                }
            },
            None => None,
        };
        match found.and_then(|v| decode(&v, function, unique)) {
            Some((result, expires_unix)) => {
                let left = expires_unix.saturating_sub(unix_now());
                if left > 0 {
                    self.shared.front.insert(
                        fkey,
                        result.clone(),
                        Instant::now() + Duration::from_secs(left),
                    );
                }
                m.hit(function);
                Some(result)
            }
            None => {
                m.miss(function);
                None
            }
        }
    }

    /// Writes a hit's answer for a Gearman client: JOB_CREATED with a handle minted here (the
    /// job never exists in the engine), then WORK_COMPLETE. Runs in a short
    /// `gearhouse.cache_hit` span: the job has no trace of its own to carry an event.
    pub fn put_hit(
        &self,
        out: &mut BytesMut,
        s: &Submit,
        client: SocketAddr,
        result: &[u8],
    ) -> Bytes {
        let handle = self.mint_handle();
        let span = tracing::info_span!(
            "gearhouse.cache_hit",
            function = %String::from_utf8_lossy(&s.function),
            unique = %String::from_utf8_lossy(&s.unique),
            client = %client,
            handle = %String::from_utf8_lossy(&handle),
        );
        let _g = span.enter();
        put_response(out, PacketType::JOB_CREATED, &[&handle]);
        put_response(out, PacketType::WORK_COMPLETE, &[&handle, result]);
        handle
    }

    /// A job handle for a cache hit, `H:<node_id>:c<n>`: distinct from the engine's
    /// `H:<node_id>:<n>`, so a GET_STATUS on it is answered "unknown", as for a finished job.
    pub fn mint_handle(&self) -> Bytes {
        let n = self.hits_minted.fetch_add(1, Ordering::Relaxed) + 1;
        Bytes::from(format!("H:{}:c{n}", self.node_id))
    }

    /// Keeps a completed job's result, if its function is cached and it has a unique. Called
    /// under the engine lock: fills the front and queues the memcached write.
    pub fn ended(&self, job: &EndedJob<'_>) {
        if job.outcome != JobOutcome::Complete || job.unique.is_empty() || job.cache_ttl_s == 0 {
            return;
        }
        if self.kv.is_none() {
            return;
        }
        let ttl = job.cache_ttl_s;
        let fkey = front_key(job.function, job.unique);
        let value = encode(
            job.function,
            job.unique,
            job.result,
            unix_now() + ttl as u64,
        );
        // The result is the value's tail: one copy serves the front and memcached.
        let result = value.slice(value.len() - job.result.len()..);
        let store = Store {
            function: Bytes::copy_from_slice(job.function),
            key: self.key(job.function, job.unique),
            front_key: fkey.clone(),
            value,
            ttl_s: ttl,
        };
        match self.tx.try_send(store) {
            Ok(()) => {
                self.shared.front.insert(
                    fkey,
                    result,
                    Instant::now() + Duration::from_secs(ttl as u64),
                );
                self.shared
                    .metrics
                    .front_bytes
                    .set(self.shared.front.bytes() as i64);
            }
            Err(_) => {
                self.shared
                    .metrics
                    .skipped(job.function, SkipReason::QueueFull);
                tracing::warn!(
                    function = %String::from_utf8_lossy(job.function),
                    "result not cached: the store queue is full (cache.store_queue)"
                );
            }
        }
    }

    /// The memcached key of (function, unique).
    fn key(&self, function: &[u8], unique: &[u8]) -> Bytes {
        let (a, b) = hash128(function, unique);
        crate::persist::kv::Kv::key(&self.namespace, &["c", &format!("{a:016x}{b:016x}")])
    }
}

/// Writes queued results to memcached, one at a time (a cache write is never urgent), until
/// the cache is dropped.
async fn store_task(mut rx: mpsc::Receiver<Store>, kv: Arc<Kv>, shared: Arc<Shared>) {
    while let Some(s) = rx.recv().await {
        let m = &shared.metrics;
        match kv.set(&s.key, &s.value, s.ttl_s).await {
            Ok(_) => m.stored(&s.function),
            Err(e) => {
                let reason = match e {
                    KvError::Refused(_) | KvError::BadKey(_) => SkipReason::TooLarge,
                    KvError::Unreachable(_) => SkipReason::Unreachable,
                };
                // A result memcached refused must not be answered from here either (what is
                // answered is what memcached would hold); one it did not hear of is still
                // right, so this server keeps answering it until it expires.
                if reason == SkipReason::TooLarge {
                    shared.front.remove(&s.front_key);
                    m.front_bytes.set(shared.front.bytes() as i64);
                }
                m.skipped(&s.function, reason);
                tracing::info!(
                    function = %String::from_utf8_lossy(&s.function),
                    bytes = s.value.len(),
                    error = %e,
                    "result not cached (start memcached with a larger -I for large results)"
                );
            }
        }
    }
}

/// The front's key: function and unique joined by a NUL, which neither can contain (both are
/// NUL-separated arguments on the wire).
fn front_key(function: &[u8], unique: &[u8]) -> Bytes {
    let mut k = BytesMut::with_capacity(function.len() + 1 + unique.len());
    k.put_slice(function);
    k.put_u8(0);
    k.put_slice(unique);
    k.freeze()
}

/// Two independent 64-bit FNV-1a hashes of (function, unique): stable across versions and
/// machines (unlike std's `DefaultHasher`), so servers and restarts agree on keys.
fn hash128(function: &[u8], unique: &[u8]) -> (u64, u64) {
    fn fnv(seed: u64, parts: [&[u8]; 3]) -> u64 {
        let mut h = seed;
        for p in parts {
            for &b in p {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
    let sep: &[u8] = &[0];
    (
        fnv(0xcbf2_9ce4_8422_2325, [function, sep, unique]),
        fnv(0x84222325_cbf29ce4, [unique, sep, function]),
    )
}

/// The stored value: expiry (unix seconds, u64 BE), function and unique (each u32 BE length,
/// then bytes), then the result.
fn encode(function: &[u8], unique: &[u8], result: &[u8], expires_unix: u64) -> Bytes {
    let mut v = BytesMut::with_capacity(16 + function.len() + unique.len() + result.len());
    v.put_u64(expires_unix);
    v.put_u32(function.len() as u32);
    v.put_slice(function);
    v.put_u32(unique.len() as u32);
    v.put_slice(unique);
    v.put_slice(result);
    v.freeze()
}

/// The result and expiry in `v` if it is the entry of (function, unique); `None` for a
/// collision or a value that is not a cache entry.
fn decode(v: &Bytes, function: &[u8], unique: &[u8]) -> Option<(Bytes, u64)> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let end = at.checked_add(n)?;
        let s = v.get(*at..end)?;
        *at = end;
        Some(s)
    };
    let expires = u64::from_be_bytes(take(&mut at, 8)?.try_into().ok()?);
    let flen = u32::from_be_bytes(take(&mut at, 4)?.try_into().ok()?) as usize;
    if take(&mut at, flen)? != function {
        return None;
    }
    let ulen = u32::from_be_bytes(take(&mut at, 4)?.try_into().ok()?) as usize;
    if take(&mut at, ulen)? != unique {
        return None;
    }
    Some((v.slice(at..), expires))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_collisions_are_misses() {
        let v = encode(b"resize", b"img-1", b"result\0bytes", 1234);
        assert_eq!(
            decode(&v, b"resize", b"img-1"),
            Some((Bytes::from_static(b"result\0bytes"), 1234))
        );
        assert_eq!(decode(&v, b"resize", b"img-2"), None);
        assert_eq!(decode(&v, b"other", b"img-1"), None);
        assert_eq!(decode(&v.slice(..10), b"resize", b"img-1"), None);
        assert_eq!(decode(&Bytes::new(), b"resize", b"img-1"), None);
    }

    #[test]
    fn keys_are_valid_memcached_keys_for_any_function_and_unique() {
        let cfg = Config::default();
        let registry = prometheus::Registry::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _g = rt.enter();
        let c = Cache::start(&cfg, None, &registry).unwrap();
        let k1 = c.key(b"with space", &[0xff; 1024]);
        let k2 = c.key(b"with space", &[0xfe; 1024]);
        assert!(crate::persist::client::is_valid_key(&k1));
        assert_ne!(k1, k2);
        // The split between function and unique matters.
        assert_ne!(c.key(b"ab", b"c"), c.key(b"a", b"bc"));
    }

    #[test]
    fn a_ttl_without_memcached_is_refused_at_start_and_at_run_time() {
        let mut cfg = Config::default();
        cfg.functions.insert(
            "resize".into(),
            crate::functions::FunctionSettings {
                cache_ttl_s: Some(60),
                ..Default::default()
            },
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _g = rt.enter();
        let e = Cache::start(&cfg, None, &prometheus::Registry::new()).unwrap_err();
        assert!(e.to_string().contains("persistence.memcached"), "{e}");
        cfg.functions.clear();
        let c = Cache::start(&cfg, None, &prometheus::Registry::new()).unwrap();
        assert!(c.set_ttl(b"resize", 60).is_err());
        assert!(c.set_ttl(b"resize", 0).is_ok());
        assert_eq!(c.ttl(b"resize"), 0);
    }
}
