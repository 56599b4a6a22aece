//! The writer task of one memcached connection: batches, watermark keys, replies, outcomes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::mpsc;

use super::window::{LIVE, PENDING};
use super::{Completion, Inner, JobWrite, Op, WriteKind};
use crate::engine::MirrorRefused;
use crate::persist::client::{self, ClientError, Connection, Reply};
use crate::persist::record;

/// What happened to one op of a batch.
enum Outcome {
    Ok,
    /// The node answered with an error for this item.
    Refused(String),
    /// The node failed (connection, timeout): the op may move elsewhere.
    NodeFailed(String),
}

/// Turns memcached's item errors into advice.
fn explain(addr: &str, reply: &Reply, value_len: usize) -> String {
    match reply {
        Reply::ServerError(m) if m.contains("out of memory") => format!(
            "memcached {addr} refused the write: out of memory ({m}); start it with more -m (memory in MB), and keep -M so it never evicts queued jobs"
        ),
        Reply::ServerError(m) if m.contains("too large") => format!(
            "memcached {addr} refused the write: the job record ({value_len} bytes) is larger than its item size limit ({m}); start memcached with a larger -I (e.g. -I 16m) or send smaller payloads"
        ),
        Reply::ServerError(m) => format!("memcached {addr} refused the write: SERVER_ERROR {m}"),
        Reply::ClientError(m) => format!("memcached {addr} refused the write: CLIENT_ERROR {m}"),
        other => format!("memcached {addr} refused the write: unexpected reply {other:?}"),
    }
}

/// Deletes wait this long for company: a batch of deletes costs memcached one wake-up instead
/// of one per job. (A crash inside this window can run a just-finished job again.)
const DELETE_DELAY: Duration = Duration::from_millis(5);

/// Sequence numbers a watermark key covers beyond the highest written, so most batches need
/// no watermark write. (Handles after a restart skip at most this many numbers.)
const HIGH_RESERVE: u64 = 4096;

/// One writer task per connection of a node.
pub(super) async fn writer(
    inner: Arc<Inner>,
    node: usize,
    conn_idx: usize,
    mut rx: mpsc::Receiver<Op>,
) {
    let addr = inner.nodes[node].addr.clone();
    let meta_key = record::meta_key(&inner.s.namespace, &inner.s.node_id, conn_idx);
    let timeout = inner.s.write_timeout;
    let max_batch = inner.s.max_batch.max(1);
    let idle = inner.s.repair_interval.min(Duration::from_secs(1));
    let mut conn: Option<Connection> = None;
    let mut conn_gen = 0u64;
    // The range this connection's watermark key covers on the node (empty: none written).
    let mut covered = (u64::MAX, 0u64);
    let mut incoming: Vec<Op> = Vec::with_capacity(max_batch);
    let mut batch: Vec<Op> = Vec::with_capacity(max_batch);
    let mut deferred: Vec<Op> = Vec::new();
    let mut deferred_since: Option<Instant> = None;
    let mut last_refresh = Instant::now();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(max_batch);
    let mut completions = Vec::new();
    loop {
        incoming.clear();
        let wait = match deferred_since {
            Some(_) if inner.flushing.load(Ordering::SeqCst) => Duration::from_millis(1),
            Some(t) => (t + DELETE_DELAY).saturating_duration_since(Instant::now()),
            None => idle,
        };
        tokio::select! {
            n = rx.recv_many(&mut incoming, max_batch) => {
                if n == 0 {
                    return;
                }
                if n < max_batch {
                    // Let other tasks add to this batch before it goes out.
                    tokio::task::yield_now().await;
                    while incoming.len() < max_batch {
                        match rx.try_recv() {
                            Ok(op) => incoming.push(op),
                            Err(_) => break,
                        }
                    }
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
        batch.clear();
        for op in incoming.drain(..) {
            match op {
                Op::Set { .. } => batch.push(op),
                Op::Delete { .. } => {
                    deferred_since.get_or_insert_with(Instant::now);
                    inner.deferred.fetch_add(1, Ordering::SeqCst);
                    deferred.push(op);
                }
            }
        }
        let deletes_due = deferred.len() >= max_batch
            || deferred_since.is_some_and(|t| t.elapsed() >= DELETE_DELAY)
            || (!deferred.is_empty() && inner.flushing.load(Ordering::SeqCst));
        let (low, high) = (
            inner.low.load(Ordering::SeqCst),
            inner.high.load(Ordering::SeqCst),
        );
        // Advance the low watermark now and then, so recovery reads a short range.
        let refresh = covered.0 != u64::MAX
            && low > covered.0
            && last_refresh.elapsed() >= idle
            && inner.is_up(node);
        if batch.is_empty() && !deletes_due && !refresh {
            continue;
        }
        if !batch.is_empty() || deletes_due {
            inner.deferred.fetch_sub(deferred.len(), Ordering::SeqCst);
            batch.append(&mut deferred);
            deferred_since = None;
        }
        outcomes.clear();
        if !inner.is_up(node) {
            let why = format!(
                "memcached {addr} is down ({})",
                inner.nodes[node].reason.lock().unwrap()
            );
            conn = None;
            outcomes.extend(batch.iter().map(|_| Outcome::NodeFailed(why.clone())));
        } else {
            let gen = inner.nodes[node].gen.load(Ordering::SeqCst);
            if gen != conn_gen {
                conn = None;
            }
            if conn.is_none() {
                covered = (u64::MAX, 0);
                match Connection::connect(&addr, timeout).await {
                    Ok(c) => {
                        conn = Some(c);
                        conn_gen = gen;
                    }
                    Err(e) => {
                        inner
                            .metrics
                            .errors
                            .with_label_values(&[&addr, "connect"])
                            .inc();
                        inner.mark_down(node, &e.to_string());
                    }
                }
            }
            match conn.as_mut() {
                None => {
                    let why = format!("memcached {addr} is unreachable");
                    outcomes.extend(batch.iter().map(|_| Outcome::NodeFailed(why.clone())));
                }
                Some(c) => {
                    // A batch that needs it starts with this connection's watermark key
                    // (decided after connecting: a new connection covers nothing yet).
                    let needs_cover = batch.iter().any(|op| match op {
                        Op::Set { job, .. } => job.seq < covered.0 || job.seq > covered.1,
                        Op::Delete { .. } => false,
                    });
                    let meta =
                        (needs_cover || refresh).then(|| (low, high.max(covered.1) + HIGH_RESERVE));
                    // Sets first (each answered), then quiet deletes (answered only when
                    // they fail, or NF) and `mn`. Moving deletes after the sets keeps every
                    // job's delete after its write.
                    let sets = {
                        let (mut s, mut d): (Vec<Op>, Vec<Op>) =
                            batch.drain(..).partition(|op| matches!(op, Op::Set { .. }));
                        let n = s.len();
                        s.append(&mut d);
                        batch = s;
                        n
                    };
                    let deletes = batch.len() - sets;
                    buf.clear();
                    if let Some((lo, hi)) = meta {
                        client::put_set(&mut buf, &meta_key, &record::encode_meta(lo, hi));
                    }
                    for op in &batch {
                        match op {
                            Op::Set { job, .. } => client::put_set(&mut buf, &job.key, &job.value),
                            Op::Delete { seq, .. } => client::put_quiet_delete(
                                &mut buf,
                                &record::job_key(&inner.s.namespace, &inner.s.node_id, *seq),
                            ),
                        }
                    }
                    if deletes > 0 {
                        client::put_noop(&mut buf);
                    }
                    let skip = meta.is_some() as usize;
                    let mut meta_reply = None;
                    let mut replies: Vec<Reply> = Vec::with_capacity(sets);
                    let mut delete_error: Option<Reply> = None;
                    let r = c
                        .exchange_then_noop(&buf, sets + skip, deletes > 0, timeout, |i, reply| {
                            if i < skip {
                                meta_reply = Some(reply);
                            } else if i < skip + sets {
                                replies.push(reply);
                            } else if !matches!(
                                reply,
                                Reply::NoOp | Reply::NotFound | Reply::Stored
                            ) {
                                delete_error.get_or_insert(reply);
                            }
                        })
                        .await;
                    match r {
                        Ok(()) => {
                            let meta_ok = meta.is_none() || meta_reply == Some(Reply::Stored);
                            if let (Some(m), true) = (meta, meta_ok) {
                                covered = m;
                                last_refresh = Instant::now();
                            }
                            for (op, reply) in batch[..sets].iter().zip(replies.iter()) {
                                let Op::Set { job, .. } = op else {
                                    continue;
                                };
                                outcomes.push(match reply {
                                    Reply::Stored if meta_ok => Outcome::Ok,
                                    Reply::Stored => Outcome::Refused(explain(
                                        &addr,
                                        meta_reply.as_ref().unwrap_or(&Reply::Miss),
                                        job.value.len(),
                                    )),
                                    other => {
                                        Outcome::Refused(explain(&addr, other, job.value.len()))
                                    }
                                });
                            }
                            // A failed quiet delete does not say which: retry them all later.
                            outcomes.extend((0..deletes).map(|_| match &delete_error {
                                None => Outcome::Ok,
                                Some(e) => Outcome::NodeFailed(format!("{e:?}")),
                            }));
                        }
                        Err(e) => {
                            conn = None;
                            inner
                                .metrics
                                .errors
                                .with_label_values(&[&addr, "batch"])
                                .inc();
                            let why = match &e {
                                ClientError::Timeout(_) => format!(
                                    "memcached {addr} did not answer within {} ms (persistence.write_timeout_ms)",
                                    timeout.as_millis()
                                ),
                                e => format!("memcached {addr}: {e}"),
                            };
                            inner.mark_down(node, &why);
                            outcomes.extend(batch.iter().map(|_| Outcome::NodeFailed(why.clone())));
                        }
                    }
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        settle(&inner, node, &batch, &outcomes, &mut completions);
        if !completions.is_empty() {
            if let Some(e) = inner.engine() {
                for (seq, r) in completions.drain(..) {
                    e.persisted(seq, r.map_err(MirrorRefused));
                }
            }
            completions.clear();
        }
    }
}

/// Applies a batch's outcomes to the window and the jobs (one lock for the whole batch).
fn settle(
    inner: &Inner,
    node: usize,
    batch: &[Op],
    outcomes: &[Outcome],
    completions: &mut Vec<Completion>,
) {
    let now = Instant::now();
    let n = &inner.nodes[node];
    let mut st = inner.lock();
    let mut finished: Vec<&Arc<JobWrite>> = Vec::new();
    for (op, outcome) in batch.iter().zip(outcomes) {
        match op {
            Op::Set { job, queued } => {
                match outcome {
                    Outcome::Ok => {
                        n.write_s
                            .observe(now.saturating_duration_since(*queued).as_secs_f64());
                        job.copies.fetch_add(1, Ordering::SeqCst);
                        if let Some(s) = st.window.get_mut(job.seq) {
                            if s.flags & LIVE != 0 {
                                s.ok |= 1 << node;
                            }
                        }
                    }
                    Outcome::Refused(why) => {
                        n.write_errors.inc();
                        job.error.lock().unwrap().get_or_insert_with(|| why.clone());
                    }
                    Outcome::NodeFailed(why) => {
                        n.write_errors.inc();
                        if inner.reroute(&mut st, job, node) {
                            continue;
                        }
                        job.error.lock().unwrap().get_or_insert_with(|| {
                            if job.kind == WriteKind::Submit {
                                format!("{why}; {}", inner.not_enough_nodes(inner.up_count()))
                            } else {
                                why.clone()
                            }
                        });
                    }
                }
                if job.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                    if let Some(s) = st.window.get_mut(job.seq) {
                        s.flags &= !PENDING;
                    }
                    finished.push(job);
                }
            }
            Op::Delete { seq, queued } => match outcome {
                Outcome::Ok => n
                    .delete_s
                    .observe(now.saturating_duration_since(*queued).as_secs_f64()),
                _ => {
                    n.delete_errors.inc();
                    st.pending_deletes[node].push(*seq);
                }
            },
        }
    }
    drop(st);
    for job in finished {
        inner.finish(job, completions);
    }
    inner
        .metrics
        .pending_writes
        .set(inner.pending.load(Ordering::SeqCst) as i64);
}
