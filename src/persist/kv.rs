//! A replicated key-value store over the memcached cluster, for the server's own state beside
//! the queue: per-function settings changed at run time, schedules and their claimed due times,
//! dead letters, cached results, leases. The queue's mirror is tuned for throughput (batching
//! writer tasks, watermarks); this is the plain, awaited path for small amounts of state.
//!
//! - A key's copies live on the first `replicas` nodes of the key's ring order (the same
//!   consistent hashing as jobs), so losing `replicas - 1` nodes loses nothing.
//! - [`Kv::get`] asks those nodes in ring order and returns the first value found.
//! - [`Kv::claim`] (`add`) is decided by one node, the first *reachable* one in the key's ring
//!   order, so of several servers claiming the same key exactly one wins while that node is up.
//!   (If it fails between two claims, the next node decides the second: a claim is "once while
//!   the deciding node lives"; callers that must not repeat work keep a second guard.)
//! - One connection per node, behind an async mutex, reconnected on the next call after any
//!   error; a node that does not answer within the timeout is skipped for that call.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::Mutex;

use super::client::{self, ClientError, Connection, Reply};
use super::ring::{self, Ring};
use super::Settings;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    /// No node that holds (or would hold) the key answered.
    #[error("no memcached node answered: {0}")]
    Unreachable(String),
    /// memcached refused the value (`SERVER_ERROR`: out of memory with -M, or over the item
    /// size limit -I).
    #[error("memcached refused the value: {0}")]
    Refused(String),
    /// The key is not one memcached accepts (over 250 bytes, spaces, control characters).
    #[error("invalid memcached key {0:?}")]
    BadKey(String),
}

/// The store. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Kv {
    addrs: Vec<String>,
    ring: Ring,
    replicas: usize,
    timeout: Duration,
    conns: Vec<Mutex<Option<Connection>>>,
}

impl Kv {
    /// A store over `nodes` keeping `replicas` copies of each key (capped at the node count).
    pub fn new(nodes: &[String], replicas: usize, timeout: Duration) -> Kv {
        Kv {
            addrs: nodes.to_vec(),
            ring: Ring::new(nodes),
            replicas: replicas.clamp(1, nodes.len().max(1)),
            timeout,
            conns: nodes.iter().map(|_| Mutex::new(None)).collect(),
        }
    }

    /// A store over the persistence settings' cluster and replica count.
    pub fn from_settings(s: &Settings) -> Kv {
        Kv::new(&s.nodes, s.replicas, s.write_timeout)
    }

    /// The namespace-qualified key for `parts` (`<namespace>:<a>:<b>...`), as every key of the
    /// server's own state is spelled.
    pub fn key(namespace: &str, parts: &[&str]) -> Bytes {
        let mut k = String::with_capacity(64);
        k.push_str(namespace);
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        Bytes::from(k)
    }

    /// Stores `value` under `key` on each of its replica nodes, expiring after `ttl_s` seconds
    /// (0 = never). Returns the number of copies stored: at least one, else the error.
    pub async fn set(&self, key: &[u8], value: &[u8], ttl_s: u32) -> Result<usize, KvError> {
        check_key(key)?;
        let mut req = BytesMut::new();
        client::put_store(&mut req, key, value, ttl_s, false);
        let mut stored = 0;
        let mut last = None;
        for i in self.replica_nodes(key) {
            match self.one(i, &req).await {
                Ok(Reply::Stored) => stored += 1,
                Ok(Reply::ServerError(e)) | Ok(Reply::ClientError(e)) => {
                    last = Some(KvError::Refused(format!("{}: {e}", self.addrs[i])))
                }
                Ok(other) => last = Some(KvError::Refused(format!("{}: {other:?}", self.addrs[i]))),
                Err(e) => last = Some(KvError::Unreachable(format!("{}: {e}", self.addrs[i]))),
            }
        }
        match (stored, last) {
            (0, Some(e)) => Err(e),
            (0, None) => Err(KvError::Unreachable("no memcached nodes configured".into())),
            (n, _) => Ok(n),
        }
    }

    /// The value under `key` from the first of its replica nodes that has it; `None` when every
    /// reachable replica misses. An error only when none of them answered.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, KvError> {
        check_key(key)?;
        let mut req = BytesMut::new();
        client::put_get(&mut req, key);
        let mut answered = false;
        let mut last = String::new();
        for i in self.replica_nodes(key) {
            match self.one(i, &req).await {
                Ok(Reply::Value(v)) => return Ok(Some(v)),
                Ok(Reply::Miss) => answered = true,
                // Not an answer to a get: say so rather than report a miss.
                Ok(other) => last = format!("{}: unexpected reply {other:?}", self.addrs[i]),
                Err(e) => last = format!("{}: {e}", self.addrs[i]),
            }
        }
        if answered {
            Ok(None)
        } else {
            Err(KvError::Unreachable(last))
        }
    }

    /// Stores `value` under `key` only if it does not exist yet, decided by the first reachable
    /// node in the key's ring order. `true` = this caller won the claim.
    pub async fn claim(&self, key: &[u8], value: &[u8], ttl_s: u32) -> Result<bool, KvError> {
        check_key(key)?;
        let mut req = BytesMut::new();
        client::put_store(&mut req, key, value, ttl_s, true);
        let mut last = String::new();
        for i in self.ring.pick(ring::hash(key), self.addrs.len(), |_| true) {
            match self.one(i, &req).await {
                Ok(Reply::Stored) => return Ok(true),
                Ok(Reply::NotStored) | Ok(Reply::Exists) => return Ok(false),
                Ok(Reply::ServerError(e)) => return Err(KvError::Refused(e)),
                Ok(other) => return Err(KvError::Refused(format!("{other:?}"))),
                Err(e) => last = format!("{}: {e}", self.addrs[i]),
            }
        }
        Err(KvError::Unreachable(last))
    }

    /// Deletes `key` from each of its replica nodes (a missing key is not an error).
    pub async fn delete(&self, key: &[u8]) -> Result<(), KvError> {
        check_key(key)?;
        let mut req = BytesMut::new();
        client::put_delete(&mut req, key);
        let mut last = None;
        let mut answered = false;
        for i in self.replica_nodes(key) {
            match self.one(i, &req).await {
                Ok(_) => answered = true,
                Err(e) => last = Some(format!("{}: {e}", self.addrs[i])),
            }
        }
        match (answered, last) {
            (false, Some(e)) => Err(KvError::Unreachable(e)),
            _ => Ok(()),
        }
    }

    /// The nodes holding `key`'s copies, in ring order.
    fn replica_nodes(&self, key: &[u8]) -> Vec<usize> {
        self.ring.pick(ring::hash(key), self.replicas, |_| true)
    }

    /// One request with one reply on node `i`, connecting first if needed; the connection is
    /// dropped after any error so the next call starts clean.
    ///
    /// The connection is taken out of its slot for the exchange and put back only once the
    /// reply is read: a caller dropped in between (an HTTP handler whose client went away, a
    /// task stopped at shutdown) drops the connection with it. Left in the slot, it would hand
    /// that request's reply to the next caller (a `get` of the schedule index reading another
    /// request's `HD` as a miss would forget every schedule).
    async fn one(&self, i: usize, req: &[u8]) -> Result<Reply, ClientError> {
        let mut slot = self.conns[i].lock().await;
        let mut conn = match slot.take() {
            Some(c) => c,
            None => Connection::connect(&self.addrs[i], self.timeout).await?,
        };
        let mut reply = None;
        conn.exchange(req, 1, self.timeout, |_, r| reply = Some(r))
            .await?;
        *slot = Some(conn);
        Ok(reply.expect("one reply read"))
    }
}

fn check_key(key: &[u8]) -> Result<(), KvError> {
    if client::is_valid_key(key) {
        Ok(())
    } else {
        Err(KvError::BadKey(String::from_utf8_lossy(key).into_owned()))
    }
}
