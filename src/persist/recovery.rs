//! Start-up recovery: read a node id's queue back from every reachable memcached node without
//! listing keys. The watermark keys give the sequence range; the range is read with pipelined
//! `mg` in chunks from all nodes at once, copies are de-duplicated by sequence number, and each
//! chunk is handed on in sequence order (so FIFO order within a priority survives).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::join_all;

use super::client::{self, Connection, Reply};
use super::mirror::probe;
use super::record::{self, Origin};
use super::ring::Ring;
use super::{PersistError, Settings};
use crate::engine::JobRecord;

/// Watermark keys read per node: more than any sane `connections_per_node`.
pub const MAX_META_KEYS: usize = 64;

/// Sequence numbers read per chunk (per node, pipelined in one exchange).
const CHUNK: u64 = 16_384;

/// A job found in memcached.
pub struct Found {
    pub record: JobRecord,
    pub origin: Option<Origin>,
    /// Nodes where a copy was read.
    pub ok: u16,
    /// Nodes that were not read for this job (they may hold a copy).
    pub may: u16,
}

/// Connections to the cluster for a scan, one per node (`None` = unreachable, with why).
pub struct Cluster {
    pub conns: Vec<Option<Connection>>,
    pub why: Vec<String>,
    pub identities: Vec<Option<(u64, u64)>>,
    pub addrs: Vec<String>,
    timeout: Duration,
}

impl Cluster {
    /// Connects to every node (probing its identity).
    pub async fn open(s: &Settings) -> Cluster {
        let timeout = s.write_timeout.max(Duration::from_secs(2));
        let results = join_all(s.nodes.iter().map(|a| async move {
            let id = probe(a, timeout).await.map(|p| p.identity);
            let c = Connection::connect(a, timeout).await;
            (id, c)
        }))
        .await;
        let mut cl = Cluster {
            conns: Vec::new(),
            why: Vec::new(),
            identities: Vec::new(),
            addrs: s.nodes.clone(),
            timeout: Duration::from_secs(30).max(timeout),
        };
        for (id, c) in results {
            match (id, c) {
                (Ok(id), Ok(c)) => {
                    cl.conns.push(Some(c));
                    cl.why.push(String::new());
                    cl.identities.push(Some(id));
                }
                (Err(e), _) | (_, Err(e)) => {
                    cl.conns.push(None);
                    cl.why.push(e.to_string());
                    cl.identities.push(None);
                }
            }
        }
        cl
    }

    /// Mask of nodes that could not be read.
    pub fn unreachable_mask(&self) -> u16 {
        self.conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_none())
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    pub fn unreachable(&self) -> Vec<String> {
        self.conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_none())
            .map(|(i, _)| format!("{} ({})", self.addrs[i], self.why[i]))
            .collect()
    }

    /// Checks that every job still has a readable copy: fewer than `replicas` nodes unreachable.
    pub fn check_readable(&self, replicas: usize) -> Result<(), PersistError> {
        let down = self.unreachable();
        if down.len() >= replicas.max(1) {
            return Err(PersistError::Unreachable(format!(
                "cannot recover the queue: {} of {} memcached nodes are unreachable ({}); with persistence.replicas = {replicas} at most {} may be down. Start them; gearhouse retries",
                down.len(),
                self.addrs.len(),
                down.join(", "),
                replicas.max(1) - 1
            )));
        }
        Ok(())
    }

    /// Runs one pipelined exchange on every reachable node; a node that fails is dropped
    /// from the scan (and the caller re-checks that enough remain).
    async fn each(&mut self, request: &[u8], replies: usize) -> Vec<Option<Vec<Reply>>> {
        let reqs = (0..self.conns.len())
            .map(|_| Some((request, replies)))
            .collect();
        self.each_with(reqs).await
    }

    /// Runs node `i`'s own request `reqs[i]` (request, replies), on all nodes at once.
    async fn each_with(&mut self, reqs: Vec<Option<(&[u8], usize)>>) -> Vec<Option<Vec<Reply>>> {
        let timeout = self.timeout;
        let futs = self.conns.iter_mut().zip(reqs).map(|(c, req)| async move {
            let conn = c.as_mut()?;
            let (request, replies) = req?;
            let mut out = Vec::with_capacity(replies);
            if replies == 0 {
                return Some(Ok(out));
            }
            match conn
                .exchange(request, replies, timeout, |_, r| out.push(r))
                .await
            {
                Ok(()) => Some(Ok(out)),
                Err(e) => Some(Err(e.to_string())),
            }
        });
        let results = join_all(futs).await;
        let mut out = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(v)) => out.push(Some(v)),
                Some(Err(e)) => {
                    tracing::error!(node = %self.addrs[i], "memcached failed during recovery: {e}");
                    self.conns[i] = None;
                    self.why[i] = e;
                    out.push(None);
                }
                None => out.push(None),
            }
        }
        out
    }

    /// The sequence range `(low, high)` of `node_id`'s records, from its watermark keys on
    /// every reachable node; `None` when no node has any (an empty or never used queue).
    pub async fn watermarks(
        &mut self,
        ns: &str,
        node_id: &str,
    ) -> Result<Option<(u64, u64)>, PersistError> {
        let mut req = BytesMut::new();
        for i in 0..MAX_META_KEYS {
            client::put_get(&mut req, &record::meta_key(ns, node_id, i));
        }
        let mut range: Option<(u64, u64)> = None;
        for (i, replies) in self.each(&req, MAX_META_KEYS).await.into_iter().enumerate() {
            for r in replies.into_iter().flatten() {
                match r {
                    Reply::Value(v) => match record::decode_meta(&v) {
                        Some((lo, hi)) => {
                            range = Some(match range {
                                None => (lo, hi),
                                Some((a, b)) => (a.min(lo), b.max(hi)),
                            })
                        }
                        None => {
                            tracing::error!(node = %self.addrs[i], "unreadable watermark key {:?}", String::from_utf8_lossy(&v))
                        }
                    },
                    Reply::Miss => {}
                    other => {
                        return Err(PersistError::Recovery(format!(
                            "memcached {} answered {other:?} to a watermark read",
                            self.addrs[i]
                        )))
                    }
                }
            }
        }
        Ok(range)
    }

    /// Reads `node_id`'s records with sequence numbers in `from..to`. First pass: each job from
    /// the `replicas` nodes the ring places it on; second pass: the jobs not found yet (moved
    /// to another node while one was down, or finished) from every other reachable node.
    #[allow(clippy::too_many_arguments)]
    pub async fn read_range(
        &mut self,
        ring: &Ring,
        replicas: usize,
        ns: &str,
        node_id: &str,
        from: u64,
        to: u64,
        errors: &mut u64,
    ) -> Vec<Found> {
        let n = (to - from) as usize;
        let nodes = self.conns.len();
        let mut found: Vec<Option<Found>> = (0..n).map(|_| None).collect();
        // Nodes already asked, per job.
        let mut asked: Vec<u16> = vec![0; n];
        for pass in 0..2 {
            let mut reqs: Vec<BytesMut> = (0..nodes).map(|_| BytesMut::new()).collect();
            let mut which: Vec<Vec<u32>> = vec![Vec::new(); nodes];
            for k in 0..n {
                if found[k].is_some() {
                    continue;
                }
                let key = record::job_key(ns, node_id, from + k as u64);
                let targets: u16 = if pass == 0 {
                    ring.pick(super::ring::hash(&key), replicas, |_| true)
                        .into_iter()
                        .fold(0, |m, i| m | 1 << i)
                } else {
                    !asked[k] & ((1u16 << nodes) - 1)
                };
                for (i, req) in reqs.iter_mut().enumerate() {
                    if targets & (1 << i) != 0 && self.conns[i].is_some() {
                        client::put_get(req, &key);
                        which[i].push(k as u32);
                        asked[k] |= 1 << i;
                    }
                }
            }
            let per_node = self
                .each_with(
                    reqs.iter()
                        .zip(&which)
                        .map(|(r, w)| Some((&r[..], w.len())))
                        .collect(),
                )
                .await;
            for (node, replies) in per_node.into_iter().enumerate() {
                let Some(replies) = replies else { continue };
                for (r, &k) in replies.into_iter().zip(&which[node]) {
                    let k = k as usize;
                    let seq = from + k as u64;
                    let v: Bytes = match r {
                        Reply::Value(v) => v,
                        Reply::Miss => continue,
                        other => {
                            *errors += 1;
                            tracing::error!(node = %self.addrs[node], seq, "unexpected reply {other:?}");
                            continue;
                        }
                    };
                    match &mut found[k] {
                        Some(f) => f.ok |= 1 << node,
                        slot @ None => match record::decode(&v) {
                            Ok((record, origin)) if record.seq == seq => {
                                *slot = Some(Found {
                                    record,
                                    origin,
                                    ok: 1 << node,
                                    may: 0,
                                })
                            }
                            Ok((record, _)) => {
                                *errors += 1;
                                tracing::error!(node = %self.addrs[node], seq, "record claims sequence number {}; skipped", record.seq);
                            }
                            Err(e) => {
                                *errors += 1;
                                tracing::error!(node = %self.addrs[node], seq, "unreadable job record: {e}; skipped (another copy is used if there is one)");
                            }
                        },
                    }
                }
            }
        }
        found
            .into_iter()
            .zip(asked)
            .filter_map(|(f, asked)| {
                f.map(|mut f| {
                    // Nodes not read may hold a copy too.
                    f.may = !asked & ((1u16 << nodes) - 1);
                    f
                })
            })
            .collect()
    }

    /// Rewrites the watermark keys of `node_id` on every reachable node after a recovery:
    /// `low..=high` for writer connections `0..conns`, and deletes the keys of connections
    /// an older configuration had, so a stale low watermark never lengthens the next recovery.
    pub async fn reset_watermarks(
        &mut self,
        ns: &str,
        node_id: &str,
        conns: usize,
        low: u64,
        high: u64,
    ) -> Result<(), PersistError> {
        let mut req = BytesMut::new();
        for i in 0..MAX_META_KEYS {
            let key = record::meta_key(ns, node_id, i);
            if i < conns {
                client::put_set(&mut req, &key, &record::encode_meta(low, high));
            } else {
                client::put_delete(&mut req, &key);
            }
        }
        for (i, replies) in self.each(&req, MAX_META_KEYS).await.into_iter().enumerate() {
            let Some(replies) = replies else { continue };
            if let Some(bad) = replies
                .iter()
                .find(|r| !matches!(r, Reply::Stored | Reply::NotFound))
            {
                return Err(PersistError::Recovery(format!(
                    "memcached {} refused a watermark write: {bad:?}",
                    self.addrs[i]
                )));
            }
        }
        Ok(())
    }

    /// Deletes keys on every reachable node (pipelined).
    pub async fn delete_keys(&mut self, keys: &[Bytes]) {
        if keys.is_empty() {
            return;
        }
        let mut req = BytesMut::new();
        for k in keys {
            client::put_delete(&mut req, k);
        }
        self.each(&req, keys.len()).await;
    }

    /// `add`s `key` = `value` on the first reachable node in ring order of the key; returns the
    /// current owner if the key already existed with another value.
    pub async fn try_lock(
        &mut self,
        ring: &super::ring::Ring,
        key: &Bytes,
        value: &[u8],
    ) -> Result<Option<String>, PersistError> {
        let h = super::ring::hash(key);
        let order = ring.pick(h, self.conns.len(), |_| true);
        for i in order {
            let timeout = self.timeout;
            let Some(c) = self.conns[i].as_mut() else {
                continue;
            };
            let mut req = BytesMut::new();
            client::put_add(&mut req, key, value);
            client::put_get(&mut req, key);
            let mut replies = Vec::new();
            c.exchange(&req, 2, timeout, |_, r| replies.push(r))
                .await
                .map_err(|e| PersistError::Recovery(format!("memcached {}: {e}", self.addrs[i])))?;
            return match replies.get(1) {
                Some(Reply::Value(v)) if &v[..] == value => Ok(None),
                Some(Reply::Value(v)) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
                other => Err(PersistError::Recovery(format!(
                    "memcached {} could not store the takeover lock: {:?}",
                    self.addrs[i],
                    replies.first().or(other)
                ))),
            };
        }
        Err(PersistError::Unreachable(
            "no memcached node is reachable for the takeover lock".into(),
        ))
    }
}

/// Progress logging at most every second.
pub struct Progress {
    started: Instant,
    last: Instant,
    what: &'static str,
}

impl Progress {
    pub fn new(what: &'static str) -> Progress {
        let now = Instant::now();
        Progress {
            started: now,
            last: now,
            what,
        }
    }

    pub fn tick(&mut self, scanned: u64, total: u64, jobs: u64) {
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            tracing::info!(
                scanned,
                total,
                jobs,
                elapsed_s = self.started.elapsed().as_secs_f64(),
                "{}: {scanned} of {total} sequence numbers read, {jobs} jobs so far",
                self.what
            );
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A walk over one node id's sequence range, chunk by chunk, in sequence order.
pub struct RangeScan {
    node_id: String,
    what: &'static str,
    low: u64,
    /// The high watermark (0 when the node id has no records).
    pub high: u64,
    from: u64,
    jobs: u64,
    errors: u64,
    progress: Progress,
    ring: Ring,
}

impl RangeScan {
    /// Reads the watermarks of `node_id` (after checking enough nodes are reachable).
    pub async fn begin(
        cl: &mut Cluster,
        s: &Settings,
        node_id: &str,
        what: &'static str,
    ) -> Result<RangeScan, PersistError> {
        cl.check_readable(s.replicas)?;
        let (low, high) = cl
            .watermarks(&s.namespace, node_id)
            .await?
            .unwrap_or((1, 0));
        cl.check_readable(s.replicas)?;
        if low <= high {
            tracing::info!(
                node_id,
                low,
                high,
                "{what}: reading sequence numbers {low}..={high} from {} memcached nodes",
                cl.addrs.len() - cl.unreachable().len()
            );
        } else {
            tracing::info!(node_id, "{what}: no queued jobs in memcached");
        }
        Ok(RangeScan {
            node_id: node_id.to_string(),
            what,
            low,
            high,
            from: low,
            jobs: 0,
            errors: 0,
            progress: Progress::new(what),
            ring: Ring::new(&s.nodes),
        })
    }

    /// The next chunk's jobs, `None` at the end.
    pub async fn next(
        &mut self,
        cl: &mut Cluster,
        s: &Settings,
    ) -> Result<Option<Vec<Found>>, PersistError> {
        if self.from > self.high {
            if self.errors > 0 {
                tracing::error!(
                    errors = self.errors,
                    "{}: {} records could not be read (see the errors above)",
                    self.what,
                    self.errors
                );
                self.errors = 0;
            }
            return Ok(None);
        }
        let to = (self.from + CHUNK).min(self.high + 1);
        let found = cl
            .read_range(
                &self.ring,
                s.replicas,
                &s.namespace,
                &self.node_id,
                self.from,
                to,
                &mut self.errors,
            )
            .await;
        cl.check_readable(s.replicas)?;
        self.jobs += found.len() as u64;
        self.from = to;
        self.progress
            .tick(self.from - self.low, self.high + 1 - self.low, self.jobs);
        Ok(Some(found))
    }
}
