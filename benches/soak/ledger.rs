//! The soak's accounting of background jobs: one byte per job id, written by producers (the
//! server acknowledged it) and workers (it ran), read at the end to count the lost and the
//! duplicated.
//!
//! Ids are dense (a counter hands them out), so a growing array of atomic bytes is the whole
//! ledger: no lock on the hot path beyond a read lock on the chunk list, no hashing, and a
//! 30-minute run at 1,000 jobs/s costs 2 MB. The top bit of a byte is "acknowledged", the low
//! seven bits count runs (saturating at 127). A worker may run a job before its producer has read
//! the JOB_CREATED (the server queues the job when it acknowledges it), so the two marks are
//! independent bits rather than a state machine.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::RwLock;

/// Ids per chunk (1 MiB of counters).
const CHUNK: u64 = 1 << 20;
const ACKED: u8 = 0x80;
const RUNS: u8 = 0x7f;

/// Acknowledged and run marks per background job id (see the module doc).
#[derive(Default)]
pub struct Ledger {
    next: AtomicU64,
    /// Grown under the write lock when an id past the end is handed out; read-locked by every
    /// mark, which only touches atomics.
    chunks: RwLock<Vec<Box<[AtomicU8]>>>,
}

/// What the ledger says at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Ids handed to producers (submitted or about to be).
    pub issued: u64,
    /// Ids the server acknowledged with JOB_CREATED.
    pub acked: u64,
    /// Acknowledged ids that never ran: must be 0.
    pub lost: u64,
    /// Ids that ran more than once (at-least-once after worker crashes).
    pub duplicated: u64,
    /// Runs beyond the first, summed over the duplicated ids.
    pub extra_runs: u64,
    /// Ids that ran but were never acknowledged (their submit's answer was lost with a
    /// connection or refused after the job was queued): not a loss, reported for completeness.
    pub ran_unacked: u64,
}

impl Ledger {
    /// A fresh id with its counter allocated.
    pub fn issue(&self) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let chunk = (id / CHUNK) as usize;
        if self.chunks.read().expect("ledger lock").len() <= chunk {
            let mut w = self.chunks.write().expect("ledger lock");
            while w.len() <= chunk {
                w.push((0..CHUNK).map(|_| AtomicU8::new(0)).collect());
            }
        }
        id
    }

    /// Applies `f` to the byte of `id`; false for an id never issued (a corrupt payload).
    fn update(&self, id: u64, f: impl Fn(u8) -> u8) -> bool {
        if id >= self.next.load(Ordering::Relaxed) {
            return false;
        }
        let chunks = self.chunks.read().expect("ledger lock");
        let Some(chunk) = chunks.get((id / CHUNK) as usize) else {
            return false;
        };
        let slot = &chunk[(id % CHUNK) as usize];
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(f(b)));
        true
    }

    /// The server acknowledged `id`.
    pub fn acked(&self, id: u64) {
        self.update(id, |b| b | ACKED);
    }

    /// A worker received `id`; false when the id was never issued.
    pub fn ran(&self, id: u64) -> bool {
        self.update(id, |b| if b & RUNS == RUNS { b } else { b + 1 })
    }

    /// Acknowledged ids that have not run yet (a scan: call it now and then, not per job).
    pub fn pending(&self) -> u64 {
        self.tally().lost
    }

    /// Counts every class of id (a scan of the whole ledger).
    pub fn tally(&self) -> Tally {
        let issued = self.next.load(Ordering::Relaxed);
        let chunks = self.chunks.read().expect("ledger lock");
        let mut t = Tally {
            issued,
            ..Tally::default()
        };
        for id in 0..issued {
            // An id whose chunk is still being allocated has not been submitted yet.
            let Some(chunk) = chunks.get((id / CHUNK) as usize) else {
                break;
            };
            let b = chunk[(id % CHUNK) as usize].load(Ordering::Relaxed);
            let runs = u64::from(b & RUNS);
            let acked = b & ACKED != 0;
            t.acked += u64::from(acked);
            if acked && runs == 0 {
                t.lost += 1;
            }
            if !acked && runs > 0 {
                t.ran_unacked += 1;
            }
            if runs > 1 {
                t.duplicated += 1;
                t.extra_runs += runs - 1;
            }
        }
        t
    }

    /// Up to `n` acknowledged ids that never ran (for the report when something was lost).
    pub fn lost_sample(&self, n: usize) -> Vec<u64> {
        let issued = self.next.load(Ordering::Relaxed);
        let chunks = self.chunks.read().expect("ledger lock");
        (0..issued)
            .filter(|&id| {
                chunks
                    .get((id / CHUNK) as usize)
                    .is_some_and(|c| c[(id % CHUNK) as usize].load(Ordering::Relaxed) == ACKED)
            })
            .take(n)
            .collect()
    }
}
