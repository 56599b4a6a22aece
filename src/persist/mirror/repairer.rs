//! The repairer: rewrites copies that were lost and replays deletes to nodes that came back.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::window::{LIVE, PENDING};
use super::{Inner, JobWrite, Op, WriteKind};
use crate::persist::{record, ring};

/// Restores missing copies and replays deletes for nodes that came back.
pub(super) async fn repairer(inner: Arc<Inner>, shutdown: CancellationToken) {
    const MAX_PER_ROUND: usize = 20_000;
    // After a full round, the next one follows shortly (a node that came back empty may need
    // a million copies); otherwise once per interval or when woken.
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
        // A node down for less than one interval is given time to come back.
        let grace_mask: u16 = inner
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.down_since
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() < inner.s.repair_interval)
            })
            .fold(0, |m, (i, _)| m | 1 << i);
        let up = inner.up_mask();
        let mut todo = Vec::new();
        {
            let mut st = inner.lock();
            let st = &mut *st;
            // Replay deletes to nodes that are back.
            for i in 0..inner.nodes.len() {
                if up & (1 << i) == 0 || st.pending_deletes[i].is_empty() {
                    continue;
                }
                let list = std::mem::take(&mut st.pending_deletes[i]);
                let conn_n = inner.s.connections_per_node as u64;
                let now = Instant::now();
                let mut rest = Vec::new();
                for seq in list {
                    let c = (seq % conn_n) as usize;
                    if inner.nodes[i].conns[c]
                        .try_send(Op::Delete { seq, queued: now })
                        .is_err()
                    {
                        rest.push(seq);
                    }
                }
                st.pending_deletes[i] = rest;
            }
            let mut below = 0i64;
            let base = st.window.base;
            for (k, s) in st.window.slots.iter().enumerate() {
                if s.flags & LIVE == 0 || s.flags & PENDING != 0 {
                    continue;
                }
                let have = (s.ok & up).count_ones() as usize;
                if have < inner.s.replicas {
                    below += 1;
                    let with_grace = (s.ok & (up | grace_mask)).count_ones() as usize;
                    if with_grace < inner.s.replicas && todo.len() < MAX_PER_ROUND {
                        todo.push(base + k as u64);
                    }
                }
            }
            inner.metrics.replicas_below_target.set(below);
        }
        more = todo.len() == MAX_PER_ROUND;
        if todo.is_empty() || up == 0 {
            continue;
        }
        let Some(engine) = inner.engine() else {
            continue;
        };
        let records = engine.persisted_records(&todo);
        let mut st = inner.lock();
        let mut sent = 0usize;
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
                } else {
                    job.remaining.fetch_sub(1, Ordering::SeqCst);
                }
            }
            if queued > 0 {
                let slot = st.window.entry(r.seq);
                slot.flags |= PENDING;
                slot.may |= mask as u16;
                sent += 1;
            }
        }
        drop(st);
        if sent > 0 {
            tracing::info!(
                jobs = sent,
                "rewriting job records to restore persistence.replicas copies"
            );
        }
    }
}
