//! Recovery's side of the engine: putting jobs read back from the durable mirror into their
//! queues with their old handles, and handing the mirror the records of live jobs it asks to
//! rewrite. Restored jobs are background jobs already durable, so nothing is written again.
//! A record that carries a handle (a job taken over from another node) keeps it: see
//! [`super::aliases`].

use super::job::{coalesce_key, Job};
use super::{Deferred, Engine, JobRecord, State};

impl Engine {
    /// Puts recovered jobs back, in sequence order, keeping their handles; later handles
    /// continue after the highest recovered one. Returns how many were restored.
    pub fn restore(&self, mut records: Vec<JobRecord>, next_seq_floor: u64) -> usize {
        records.sort_by_key(|r| r.seq);
        let kept = records.iter().filter(|r| r.handle.is_some()).count();
        self.shared.aliases.reserve(kept);
        let mut st = self.lock();
        let st = &mut *st;
        let mut n = 0;
        for r in records {
            if self.restore_one(st, r) {
                n += 1;
            }
        }
        st.next_seq = st.next_seq.max(next_seq_floor);
        n
    }

    /// Restores one record; false when it is already live, a duplicate, or has no room.
    fn restore_one(&self, st: &mut State, r: JobRecord) -> bool {
        if st.by_seq.contains(r.seq) {
            return false;
        }
        let Ok(func) = self.function_id(st, &r.function) else {
            st.deferred.push(Deferred::NotRestored { seq: r.seq });
            return false;
        };
        let key = coalesce_key(&r.unique, &r.data);
        if !key.is_empty() && self.find_unique(st, func, key).is_some() {
            // The same (function, unique) twice: keep the older one, drop the duplicate record.
            if let Some(m) = &self.shared.mirror {
                m.delete(r.seq);
            }
            return false;
        }
        let mut job = Job::new(
            r.seq,
            func,
            r.priority,
            true,
            r.attempts,
            &r.unique,
            &r.data,
            self.now_ns(),
        );
        job.persisted = true;
        if r.epoch.is_some() || r.reducer.is_some() {
            let e = job.extra();
            e.epoch = r.epoch;
            e.reducer = r.reducer;
        }
        st.next_seq = st.next_seq.max(r.seq + 1);
        let slot = self.insert_job(st, job);
        if let Some(h) = r.handle {
            self.keep_handle(st, r.seq, h);
        }
        self.make_available(st, slot);
        true
    }

    /// The next sequence number a job will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Records of the live, mirrored jobs among `seqs` (the mirror rewrites lost copies).
    pub fn persisted_records(&self, seqs: &[u64]) -> Vec<JobRecord> {
        let st = self.lock();
        seqs.iter()
            .filter_map(|&seq| st.by_seq.get(seq))
            .filter(|&slot| st.jobs[slot as usize].persisted)
            .map(|slot| self.record_of(&st, slot))
            .collect()
    }
}
