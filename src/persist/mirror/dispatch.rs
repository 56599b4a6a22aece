//! Dispatch: picking nodes for a record write and queueing its ops on the writers' channels,
//! deletes, moving an op off a failed node, and finishing a write once every op answered.
//!
//! `dispatch_write` and `dispatch_delete` run under the engine's lock and the state lock:
//! they only reserve channel room, mark the window and count; they never wait and never log
//! (dropped deletes are logged by the prober, jobs accepted in memory only by the completion
//! task).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use super::error::{NodeFailure, Shortfall, WriteError};
use super::window::{LIVE, PENDING};
use super::{Completion, Inner, JobWrite, Op, State, TakeoverDone, WriteKind};
use crate::persist::{lock, record, ring};

impl Inner {
    /// Why a job cannot get `replicas` copies right now, with `have` nodes usable.
    pub(super) fn shortfall(&self, have: usize) -> Shortfall {
        let down: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.up.load(Ordering::SeqCst))
            .map(|n| format!("{} ({})", n.addr, lock(&n.reason)))
            .collect();
        Shortfall {
            have,
            need: self.s.replicas,
            total: self.nodes.len(),
            down: down.join(", "),
        }
    }

    /// Picks nodes and queues the ops of one record write. On refusal returns why (and the
    /// takeover's completion sender back).
    pub(super) fn dispatch_write(
        &self,
        st: &mut State,
        seq: u64,
        value: Bytes,
        kind: WriteKind,
        done: Option<TakeoverDone>,
    ) -> Result<(), (WriteError, Option<TakeoverDone>)> {
        let key = record::job_key(&self.s.namespace, &self.s.node_id, seq);
        let h = ring::hash(&key);
        let targets = self.ring.pick(h, self.s.replicas, |n| self.is_up(n));
        let best_effort = kind == WriteKind::BestEffort;
        if targets.len() < self.s.replicas && !best_effort {
            return Err((
                WriteError::NotEnoughNodes(self.shortfall(targets.len())),
                done,
            ));
        }
        let conn = (seq % self.s.connections_per_node as u64) as usize;
        // Reserve room on every target first, so a job is never half-queued.
        let mut permits = Vec::with_capacity(targets.len());
        for &t in &targets {
            match self.nodes[t].conns[conn].try_reserve() {
                Ok(p) => permits.push(p),
                Err(_) => {
                    let n = &self.nodes[t];
                    n.failures[NodeFailure::QueueFull as usize].inc();
                    if best_effort {
                        continue;
                    }
                    return Err((
                        WriteError::QueueFull {
                            node: n.addr.clone(),
                        },
                        done,
                    ));
                }
            }
        }
        let mask = targets.iter().fold(0u32, |m, &t| m | 1 << t);
        let job = Arc::new(JobWrite {
            seq,
            key,
            value,
            kind,
            remaining: AtomicU32::new(permits.len() as u32),
            tried: AtomicU32::new(mask),
            copies: AtomicU32::new(0),
            error: Mutex::new(None),
            done_slot: Mutex::new(done),
        });
        let slot = st.window.entry(seq);
        slot.flags |= LIVE | PENDING;
        slot.may |= mask as u16;
        if permits.is_empty() {
            slot.flags &= !PENDING;
        }
        if seq > st.high {
            st.high = seq;
        }
        self.publish_watermarks(st);
        if kind != WriteKind::Repair {
            self.pending.fetch_add(1, Ordering::SeqCst);
        }
        if permits.is_empty() {
            // Best effort with no node reachable: accepted in memory only (counted, logged and
            // reported by the completion task).
            let _ = self.in_memory_tx.send(seq);
            return Ok(());
        }
        let now = Instant::now();
        for p in permits {
            p.send(Op::Set {
                job: job.clone(),
                queued: now,
            });
        }
        Ok(())
    }

    /// Logs a job accepted in memory only, at most once a second (`None`: no node took it).
    pub(super) fn log_not_durable(&self, why: Option<&WriteError>) {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.not_durable_logged.swap(secs, Ordering::Relaxed) == secs {
            return;
        }
        match why {
            Some(why) => tracing::error!("accepting a background job in memory only (persistence.on_failure = accept_in_memory): {why}"),
            None => tracing::error!(
                "accepting a background job in memory only (persistence.on_failure = accept_in_memory): {}",
                self.shortfall(self.up_count())
            ),
        }
    }

    /// Keeps a delete node `i` could not take, for the repairer to replay. The list is bounded
    /// by `persistence.max_pending_deletes`: past it the oldest half is dropped, counted and
    /// logged (those finished jobs may run again after a recovery from that node, which
    /// at-least-once allows; memory would otherwise grow for as long as the node is away).
    pub(super) fn keep_delete(&self, st: &mut State, i: usize, seq: u64) {
        let list = &mut st.pending_deletes[i];
        if list.len() >= self.s.max_pending_deletes {
            let dropped = list.len() / 2;
            list.drain(..dropped);
            let n = &self.nodes[i];
            n.dropped_deletes
                .fetch_add(dropped as u64, Ordering::Relaxed);
            n.deletes_dropped.inc_by(dropped as u64);
        }
        list.push(seq);
    }

    /// Sends deletes of `seq` to every node in `nodes`; unreachable ones keep it for later.
    pub(super) fn dispatch_delete(&self, st: &mut State, seq: u64, nodes: u16) {
        let conn = (seq % self.s.connections_per_node as u64) as usize;
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            if nodes & (1 << i) == 0 {
                continue;
            }
            let sent = self.is_up(i)
                && self.nodes[i].conns[conn]
                    .try_send(Op::Delete { seq, queued: now })
                    .is_ok();
            if !sent {
                self.keep_delete(st, i, seq);
            }
        }
    }

    /// A job write finished on every node it was sent to.
    pub(super) fn finish(&self, job: &JobWrite, completions: &mut Vec<Completion>) {
        let error = lock(&job.error).take();
        let copies = job.copies.load(Ordering::SeqCst) as usize;
        match job.kind {
            WriteKind::Submit => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                completions.push((job.seq, error.map_or(Ok(()), Err)));
            }
            WriteKind::BestEffort => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                if copies < self.s.replicas {
                    self.metrics.not_durable.inc();
                    self.log_not_durable(error.as_ref());
                }
                completions.push((job.seq, Ok(())));
            }
            WriteKind::Takeover => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                let done = lock(&job.done_slot).take();
                if let Some(tx) = done {
                    let _ = tx.send(error.map_or(Ok(()), Err));
                }
            }
            WriteKind::Repair => {}
        }
    }

    /// Moves a set whose node failed to the next usable node; false if there is none.
    pub(super) fn reroute(&self, st: &mut State, job: &Arc<JobWrite>, failed: usize) -> bool {
        let live = st.window.get(job.seq).is_some_and(|s| s.flags & LIVE != 0);
        if !live {
            return false;
        }
        let tried = job.tried.fetch_or(1 << failed, Ordering::SeqCst) | 1 << failed;
        let h = ring::hash(&job.key);
        let Some(&next) = self
            .ring
            .pick(h, 1, |n| self.is_up(n) && tried & (1 << n) == 0)
            .first()
        else {
            return false;
        };
        let conn = (job.seq % self.s.connections_per_node as u64) as usize;
        let op = Op::Set {
            job: job.clone(),
            queued: Instant::now(),
        };
        if self.nodes[next].conns[conn].try_send(op).is_err() {
            return false;
        }
        job.tried.fetch_or(1 << next, Ordering::SeqCst);
        if let Some(s) = st.window.get_mut(job.seq) {
            s.may |= 1 << next;
        }
        true
    }
}
