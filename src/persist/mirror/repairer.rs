//! The repairer: rewrites copies that were lost (a node down past its grace, a memcached that
//! restarted empty) so every live job has `persistence.replicas` again, and replays deletes
//! to nodes that came back.
//!
//! A round is three steps: [`replay_deletes`] and [`find_missing`] under one state lock, then
//! [`rewrite`] of at most [`MAX_PER_ROUND`] jobs (records read from the engine, ops queued like
//! a submit's). A round with work runs in a `gearhouse.repair` span with how many jobs and
//! copies it rewrote and on which nodes. After a full round the next one follows shortly (a
//! node that came back empty may need a million copies: 600k were rewritten in under 5 s);
//! otherwise once per `persistence.repair_interval_ms` or when a node comes up. Nothing is
//! rewritten while the server is fenced (its lease lapsed: a peer may own those jobs now).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::window::{LIVE, PENDING};
use super::{Inner, JobWrite, Op, State, WriteKind};
use crate::engine::Engine;
use crate::persist::{lock, record, ring};

/// Jobs rewritten per round at most.
const MAX_PER_ROUND: usize = 20_000;

/// Restores missing copies and replays deletes for nodes that came back.
pub(super) async fn repairer(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut more = false;
    loop {
        let pause = if more {
            Duration::from_millis(100)
        } else {
            inner.s.repair_interval
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = inner.repair_wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        let up = inner.up_mask();
        let grace = grace_mask(&inner);
        let (replayed, todo) = {
            let mut st = inner.state();
            let replayed = replay_deletes(&inner, &mut st, up);
            (replayed, find_missing(&inner, &st, up, grace))
        };
        more = todo.len() == MAX_PER_ROUND;
        if todo.is_empty() || up == 0 {
            if replayed > 0 {
                tracing::info!(
                    deletes = replayed,
                    "replayed deletes to memcached nodes that came back"
                );
            }
            continue;
        }
        let Some(engine) = inner.engine() else {
            continue;
        };
        if engine.is_fenced() {
            // A fenced server's jobs may be a peer's by now (persist::lease): writing their
            // copies back under this node's keys would bring them back after a restart.
            more = false;
            continue;
        }
        let span = tracing::info_span!(
            "gearhouse.repair",
            jobs = tracing::field::Empty,
            copies = tracing::field::Empty,
            nodes = tracing::field::Empty,
            deletes = replayed,
        );
        span.in_scope(|| {
            let done = rewrite(&inner, &engine, &todo, up);
            let nodes: Vec<&str> = (0..inner.nodes.len())
                .filter(|&i| done.nodes & (1 << i) != 0)
                .map(|i| &*inner.nodes[i].addr)
                .collect();
            let nodes = nodes.join(",");
            let span = tracing::Span::current();
            span.record("jobs", done.jobs);
            span.record("copies", done.copies);
            span.record("nodes", nodes.as_str());
            if done.jobs == 0 {
                return;
            }
            tracing::info!(
                jobs = done.jobs,
                copies = done.copies,
                nodes = %nodes,
                "rewriting job records to restore persistence.replicas copies"
            );
        });
    }
}

/// Nodes down for less than one repair interval: given time to come back before their
/// copies are rewritten elsewhere.
fn grace_mask(inner: &Inner) -> u16 {
    inner
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| lock(&n.down_since).is_some_and(|t| t.elapsed() < inner.s.repair_interval))
        .fold(0, |m, (i, _)| m | 1 << i)
}

/// Queues the deletes kept for nodes that are up again; returns how many went out.
fn replay_deletes(inner: &Inner, st: &mut State, up: u16) -> usize {
    let conn_n = inner.s.connections_per_node as u64;
    let mut sent = 0;
    for i in 0..inner.nodes.len() {
        if up & (1 << i) == 0 || st.pending_deletes[i].is_empty() {
            continue;
        }
        let list = std::mem::take(&mut st.pending_deletes[i]);
        let now = Instant::now();
        let mut rest = Vec::new();
        for seq in list {
            let c = (seq % conn_n) as usize;
            if inner.nodes[i].conns[c]
                .try_send(Op::Delete { seq, queued: now })
                .is_err()
            {
                rest.push(seq);
            } else {
                sent += 1;
            }
        }
        st.pending_deletes[i] = rest;
    }
    sent
}

/// Live jobs with fewer confirmed copies than `replicas` on nodes that are up (or in their
/// grace period), at most [`MAX_PER_ROUND`]; also sets `replicas_below_target`.
fn find_missing(inner: &Inner, st: &State, up: u16, grace: u16) -> Vec<u64> {
    let mut todo = Vec::new();
    let mut below = 0i64;
    let base = st.window.base;
    for (k, s) in st.window.slots.iter().enumerate() {
        if s.flags & LIVE == 0 || s.flags & PENDING != 0 {
            continue;
        }
        let have = (s.ok & up).count_ones() as usize;
        if have < inner.s.replicas {
            below += 1;
            let with_grace = (s.ok & (up | grace)).count_ones() as usize;
            if with_grace < inner.s.replicas && todo.len() < MAX_PER_ROUND {
                todo.push(base + k as u64);
            }
        }
    }
    inner.metrics.replicas_below_target.set(below);
    todo
}

/// What a rewrite round queued.
#[derive(Default)]
struct Rewritten {
    jobs: usize,
    copies: usize,
    /// Nodes that got copies.
    nodes: u16,
}

/// Queues new copies of the jobs `todo` on up nodes that have none.
fn rewrite(inner: &Inner, engine: &Engine, todo: &[u64], up: u16) -> Rewritten {
    let records = engine.persisted_records(todo);
    let mut done = Rewritten::default();
    let mut st = inner.state();
    for r in records {
        let Some(s) = st.window.get(r.seq).copied() else {
            continue;
        };
        if s.flags & LIVE == 0 || s.flags & PENDING != 0 {
            continue;
        }
        let key = record::job_key(&inner.s.namespace, &inner.s.node_id, r.seq);
        let have = s.ok & up;
        let need = inner.s.replicas.saturating_sub(have.count_ones() as usize);
        let targets = inner.ring.pick(ring::hash(&key), need, |n| {
            inner.is_up(n) && have & (1 << n) == 0
        });
        if targets.is_empty() {
            continue;
        }
        let conn = (r.seq % inner.s.connections_per_node as u64) as usize;
        let mask = targets.iter().fold(0u32, |m, &t| m | 1 << t) | have as u32;
        let job = Arc::new(JobWrite {
            seq: r.seq,
            key,
            value: record::encode(&r, None),
            kind: WriteKind::Repair,
            remaining: AtomicU32::new(0),
            tried: AtomicU32::new(mask),
            copies: AtomicU32::new(0),
            error: Mutex::new(None),
            done_slot: Mutex::new(None),
        });
        let now = Instant::now();
        let mut queued = 0;
        for &t in &targets {
            job.remaining.fetch_add(1, Ordering::SeqCst);
            let op = Op::Set {
                job: job.clone(),
                queued: now,
            };
            if inner.nodes[t].conns[conn].try_send(op).is_ok() {
                queued += 1;
                done.nodes |= 1 << t;
            } else {
                job.remaining.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if queued > 0 {
            let slot = st.window.entry(r.seq);
            slot.flags |= PENDING;
            slot.may |= mask as u16;
            done.jobs += 1;
            done.copies += queued;
        }
    }
    done
}
