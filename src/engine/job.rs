//! What the engine stores per job and per function, and the unique-id key jobs coalesce on.
//!
//! Memory per queued job is kept small on purpose (the target is 1,000,000 queued 64-byte jobs in
//! well under 250 MB): jobs live in a slab, queues hold 8-byte slab references ([`QueueRef`]),
//! the unique index holds 4-byte slab keys, the unique id and payload share one allocation, and
//! everything most jobs never need (reducer, epoch, waiting clients, status) sits behind one
//! optional box ([`JobExtra`]). `job_struct_stays_small` in the tests guards the budget.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};

use bytes::Bytes;

use super::limits::Limits;
use super::ConnId;
use crate::metrics::FunctionMetrics;
use crate::protocol::Priority;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobState {
    /// Waiting for the mirror to confirm its write; not visible to workers yet.
    Persisting,
    /// An epoch job whose time has not come.
    Scheduled,
    Queued,
    Running(ConnId),
}

pub(super) struct Job {
    pub(super) seq: u64,
    pub(super) func: u32,
    pub(super) priority: Priority,
    pub(super) background: bool,
    /// A record of this job exists (or is being written) in the mirror.
    pub(super) persisted: bool,
    pub(super) state: JobState,
    pub(super) attempts: u32,
    unique_len: u32,
    /// Unique id followed by the data: one allocation.
    payload: Box<[u8]>,
    /// Nanoseconds on the engine clock at which the job entered its current state.
    pub(super) since_ns: u64,
    pub(super) extra: Option<Box<JobExtra>>,
}

/// The parts of a job that most jobs do not need, boxed to keep [`Job`] small.
#[derive(Default)]
pub(super) struct JobExtra {
    pub(super) reducer: Option<Bytes>,
    pub(super) epoch: Option<u64>,
    /// Foreground clients that receive the job's WORK_* packets.
    pub(super) waiters: Vec<ConnId>,
    /// Connections whose JOB_CREATED waits for the mirror's confirmation.
    pub(super) pending_acks: Vec<ConnId>,
    /// The last WORK_STATUS numerator and denominator.
    pub(super) status: Option<(Bytes, Bytes)>,
}

impl JobExtra {
    /// True when nothing but (already taken) pending acks needed this box.
    pub(super) fn is_empty(&self) -> bool {
        self.reducer.is_none()
            && self.epoch.is_none()
            && self.waiters.is_empty()
            && self.pending_acks.is_empty()
            && self.status.is_none()
    }
}

impl Job {
    /// A job in state Queued with no extra state; the unique id and data share one allocation.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        seq: u64,
        func: u32,
        priority: Priority,
        background: bool,
        attempts: u32,
        unique: &[u8],
        data: &[u8],
        since_ns: u64,
    ) -> Job {
        let mut payload = Vec::with_capacity(unique.len() + data.len());
        payload.extend_from_slice(unique);
        payload.extend_from_slice(data);
        Job {
            seq,
            func,
            priority,
            background,
            persisted: false,
            state: JobState::Queued,
            attempts,
            unique_len: unique.len() as u32,
            payload: payload.into_boxed_slice(),
            since_ns,
            extra: None,
        }
    }

    pub(super) fn unique(&self) -> &[u8] {
        &self.payload[..self.unique_len as usize]
    }
    pub(super) fn has_unique(&self) -> bool {
        self.unique_len > 0
    }
    pub(super) fn data(&self) -> &[u8] {
        &self.payload[self.unique_len as usize..]
    }
    /// What this job coalesces on (see [`coalesce_key`]).
    pub(super) fn coalesce_key(&self) -> &[u8] {
        coalesce_key(self.unique(), self.data())
    }
    pub(super) fn extra(&mut self) -> &mut JobExtra {
        self.extra.get_or_insert_with(Default::default)
    }
    pub(super) fn waiters(&self) -> &[ConnId] {
        self.extra
            .as_ref()
            .map(|e| e.waiters.as_slice())
            .unwrap_or(&[])
    }
    pub(super) fn reducer(&self) -> Option<&Bytes> {
        self.extra.as_ref().and_then(|e| e.reducer.as_ref())
    }
    pub(super) fn epoch(&self) -> Option<u64> {
        self.extra.as_ref().and_then(|e| e.epoch)
    }
    pub(super) fn is_running(&self) -> bool {
        matches!(self.state, JobState::Running(_))
    }
}

/// Stale queue entries a priority queue may hold before [`Function::compact_queue`] walks it.
const COMPACT_MIN: usize = 64;

/// A queue entry: slab key plus the low bits of the job's sequence number, so an entry whose
/// job was cancelled (and whose slot was reused) is recognised and skipped.
#[derive(Clone, Copy)]
pub(super) struct QueueRef {
    pub(super) slot: u32,
    pub(super) tag: u32,
}

/// One function: its three priority queues, counts for `status`, and its limits and sleepers.
pub(super) struct Function {
    pub(super) name: Bytes,
    pub(super) queues: [VecDeque<QueueRef>; 3],
    /// Live entries per priority (queues may hold stale entries of cancelled jobs).
    pub(super) queued: [u32; 3],
    pub(super) running: u32,
    pub(super) scheduled: u32,
    pub(super) workers: u32,
    /// Per-priority limits set by the `maxqueue` admin command (None = the configured default).
    pub(super) max_queue: Option<[u32; 3]>,
    /// Seconds a WORK_COMPLETE result is cached under (function, unique); 0 = not cached.
    pub(super) cache_ttl_s: u32,
    /// Failed and excepted background jobs go to the dead-letter store.
    pub(super) dead_letter: bool,
    /// Workers that said PRE_SLEEP, with the sleep generation they said it in.
    pub(super) sleepers: Vec<(ConnId, u32)>,
    pub(super) metrics: FunctionMetrics,
    /// Rate and concurrency limits; `None` (the common case) costs the grab path one check.
    pub(super) limits: Option<Box<Limits>>,
}

impl Function {
    pub(super) fn new(name: Bytes, metrics: FunctionMetrics) -> Function {
        Function {
            name,
            queues: Default::default(),
            queued: [0; 3],
            running: 0,
            scheduled: 0,
            workers: 0,
            max_queue: None,
            cache_ttl_s: 0,
            dead_letter: false,
            sleepers: Vec::new(),
            metrics,
            limits: None,
        }
    }

    /// Takes the queue limit, cache and dead-letter settings (the limits are installed by
    /// `limits::update`).
    pub(super) fn apply(&mut self, s: &crate::functions::FunctionSettings) {
        if let Some(n) = s.max_queue {
            self.max_queue = Some([n; 3]);
        }
        if let Some(t) = s.cache_ttl_s {
            self.cache_ttl_s = t;
        }
        if let Some(d) = s.dead_letter {
            self.dead_letter = d;
        }
    }

    /// Drops the queue entries of jobs that ended while queued (a foreground client that left
    /// before any worker came), once they outnumber the live entries of that priority: the
    /// walk is paid for by the cancellations that made the entries stale (amortised O(1) each),
    /// so a loop of abandoned jobs for a function nobody works on leaves no memory behind.
    pub(super) fn compact_queue(&mut self, p: usize, jobs: &slab::Slab<Job>, func: u32) {
        let q = &mut self.queues[p];
        let live = self.queued[p] as usize;
        if q.len() <= COMPACT_MIN || q.len() <= 2 * live {
            return;
        }
        q.retain(|r| {
            jobs.get(r.slot as usize).is_some_and(|j| {
                j.seq as u32 == r.tag && j.state == JobState::Queued && j.func == func
            })
        });
        if q.capacity() > 4 * q.len().max(COMPACT_MIN) {
            q.shrink_to(2 * q.len().max(COMPACT_MIN));
        }
    }

    /// Queue entries held, live or stale (for the `gearhouse_engine_queue_entries` gauge).
    pub(super) fn queue_entries(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    pub(super) fn total_queued(&self) -> u64 {
        self.queued.iter().map(|&n| n as u64).sum()
    }

    /// True while jobs or workers still refer to the function.
    pub(super) fn is_in_use(&self) -> bool {
        self.total_queued() > 0 || self.running > 0 || self.scheduled > 0 || self.workers > 0
    }
}

/// The key a job coalesces on within its function: its unique id, except that the unique "-"
/// means "the payload" (gearmand 1.1.20 and Perl Gearman::Client's documented `uniq => '-'`).
/// Empty = never coalesces.
pub(super) fn coalesce_key<'a>(unique: &'a [u8], data: &'a [u8]) -> &'a [u8] {
    if unique == b"-" {
        data
    } else {
        unique
    }
}

pub(super) fn hash_unique(h: &hashbrown::DefaultHashBuilder, func: u32, unique: &[u8]) -> u64 {
    let mut s = h.build_hasher();
    func.hash(&mut s);
    unique.hash(&mut s);
    s.finish()
}
