//! Kept handles: the wire handles of jobs that are not `H:<this node>:<seq>`. A job taken over
//! from a dead node keeps the handle its client got there (`H:<dead node>:<n>`, and through a
//! chain of takeovers the first one), while it gets a local sequence number here like any job
//! (its place in the queues, its key in memcached under this node).
//!
//! Shaped for the common path: almost every server never holds such a job, and `handle_of` /
//! `seq_of` are called for every packet that names a job, some of them without the engine
//! lock (log lines written after it is released). So the two maps (sequence number → handle and
//! handle → sequence number) sit behind their own small mutex beside the engine state, and an
//! atomic count of entries lets the common path skip them with one load. Lock order: the engine
//! lock, then this one; nothing is locked while this one is held.
//!
//! Overflow policy: one entry per live taken-over job, removed when the job ends (by
//! [`Engine::alias_ended`], once the lock's log lines naming it are written), so the maps never
//! outgrow the queue. A handle already in use here (a node that restarted reuses its numbers)
//! is not kept twice: the second job answers to its local handle, with a warning.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use hashbrown::HashMap;

use super::{Deferred, Engine, State};

/// Both directions of the kept handles, and their count for the lock-free check.
#[derive(Default)]
pub(super) struct Aliases {
    maps: Mutex<Maps>,
    /// Entries in `maps`, written while its mutex is held.
    count: AtomicUsize,
}

#[derive(Default)]
struct Maps {
    by_seq: HashMap<u64, Bytes>,
    by_handle: HashMap<Bytes, u64>,
}

/// Why a kept handle was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotKept {
    /// Another live job here answers to it.
    InUse,
}

impl Aliases {
    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, m: &Maps) {
        self.count.store(m.by_seq.len(), Ordering::Release);
    }

    /// True when no job here has a kept handle (the common case: no lock taken).
    pub(super) fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Entries held (for tests and the no-growth check).
    pub(super) fn len(&self) -> usize {
        self.maps().by_seq.len()
    }

    /// The kept handle of `seq`, if it has one.
    pub(super) fn handle(&self, seq: u64) -> Option<Bytes> {
        if self.is_empty() {
            return None;
        }
        self.maps().by_seq.get(&seq).cloned()
    }

    /// The job a wire handle names: the one that kept it, else `local` (the handle read as one
    /// of this node's, `H:<node_id>:<seq>`) unless that job answers to a kept handle instead.
    pub(super) fn resolve(&self, handle: &[u8], local: Option<u64>) -> Option<u64> {
        if self.is_empty() {
            return local;
        }
        let m = self.maps();
        if let Some(&seq) = m.by_handle.get(handle) {
            return Some(seq);
        }
        local.filter(|seq| !m.by_seq.contains_key(seq))
    }

    /// Keeps `handle` for `seq`, unless another job holds it.
    pub(super) fn insert(&self, seq: u64, handle: Bytes) -> Result<(), NotKept> {
        let mut m = self.maps();
        match m.by_handle.entry(handle.clone()) {
            hashbrown::hash_map::Entry::Occupied(_) => return Err(NotKept::InUse),
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(seq);
            }
        }
        if let Some(old) = m.by_seq.insert(seq, handle) {
            m.by_handle.remove(&old);
        }
        self.publish(&m);
        Ok(())
    }

    /// Makes room for `n` more kept handles at once (a takeover's wave), so the maps do not
    /// grow, and rehash, step by step under the engine lock.
    pub(super) fn reserve(&self, n: usize) {
        if n > 0 {
            let mut m = self.maps();
            m.by_seq.reserve(n);
            m.by_handle.reserve(n);
        }
    }

    /// Whether `seq` has a kept handle.
    pub(super) fn contains(&self, seq: u64) -> bool {
        !self.is_empty() && self.maps().by_seq.contains_key(&seq)
    }

    /// Forgets the kept handles of `seqs` (jobs that ended).
    pub(super) fn remove(&self, seqs: &[u64]) {
        let mut m = self.maps();
        for seq in seqs {
            if let Some(h) = m.by_seq.remove(seq) {
                if m.by_handle.get(&h) == Some(seq) {
                    m.by_handle.remove(&h);
                }
            }
        }
        self.publish(&m);
    }
}

impl Engine {
    /// Gives the job `seq` (just restored) the handle its client knows, when that is not
    /// its local one. A handle another live job here answers to stays with that job: this one
    /// keeps its local handle and the collision is logged.
    pub(super) fn keep_handle(&self, st: &mut State, seq: u64, handle: Bytes) {
        // A handle of this node's own form (its queue came back to it through a peer) must not
        // be handed out again to a new job: later numbers start after it.
        let own = self.parse_local(&handle);
        if own == Some(seq) && handle == self.shared.local_handle(seq) {
            return;
        }
        if let Some(n) = own {
            st.next_seq = st.next_seq.max(n + 1);
        }
        let in_use = own.is_some_and(|n| st.by_seq.contains(n) && !self.shared.aliases.contains(n));
        let kept = if in_use {
            Err(NotKept::InUse)
        } else {
            self.shared.aliases.insert(seq, handle.clone())
        };
        if let Err(NotKept::InUse) = kept {
            st.deferred.push(Deferred::HandleInUse { seq, handle });
        }
    }

    /// The handle a job keeps from another node (for its durable record), if any.
    pub(super) fn kept_handle(&self, seq: u64) -> Option<Bytes> {
        self.shared.aliases.handle(seq)
    }

    /// Called for every job that leaves the engine: its kept handle, if it has one, is
    /// released when the lock is (after the log lines that name it are written). While any
    /// handle is kept, every ended job is noted without a look-up: the release looks once.
    pub(super) fn alias_ended(&self, st: &mut State, seq: u64) {
        if !self.shared.aliases.is_empty() {
            st.ended_aliases.push(seq);
        }
    }

    /// Jobs with a kept handle right now.
    pub fn kept_handles(&self) -> usize {
        self.shared.aliases.len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::tests::{can_do, connect, engine_with, grab, work};
    use super::super::{EngineConfig, JobRecord};
    use crate::protocol::{Priority, WorkKind};

    fn moved(seq: u64, handle: Option<&str>, unique: &str) -> JobRecord {
        JobRecord {
            seq,
            function: Bytes::from("f"),
            unique: Bytes::copy_from_slice(unique.as_bytes()),
            data: Bytes::from(format!("d{seq}")),
            priority: Priority::Normal,
            epoch: None,
            reducer: None,
            attempts: 0,
            handle: handle.map(|h| Bytes::copy_from_slice(h.as_bytes())),
        }
    }

    fn engine() -> super::super::Engine {
        let cfg = EngineConfig {
            node_id: "b".into(),
            ..Default::default()
        };
        engine_with(cfg, None)
    }

    #[test]
    fn a_taken_over_job_answers_to_its_old_handle_only_and_keeps_it_in_its_record() {
        let e = engine();
        assert_eq!(e.restore(vec![moved(5, Some("H:a:17"), "")], 6), 1);
        assert_eq!(&e.handle_of(5)[..], b"H:a:17");
        assert_eq!(e.kept_handles(), 1);
        let records = e.persisted_records(&[5]);
        assert_eq!(records[0].handle.as_deref(), Some(&b"H:a:17"[..]));

        let mut out = bytes::BytesMut::new();
        e.get_status(&Bytes::from("H:a:17"), &mut out);
        assert!(out.windows(3).any(|w| w == b"\x001\x00"), "known: {out:?}");
        out.clear();
        e.get_status(&Bytes::from("H:b:5"), &mut out);
        assert!(!out.windows(3).any(|w| w == b"\x001\x00"), "{out:?}");

        let w = connect(&e);
        can_do(&e, &w, "f", None);
        let a = grab(&e, &w).unwrap();
        assert_eq!(a.arg(0), b"H:a:17");
        // The local handle is not the job's: a result sent with it is refused.
        let refused = work(&e, &w, WorkKind::Complete, b"H:b:5", b"x");
        assert_eq!(refused[0].kind, crate::codec::PacketType::ERROR);
        assert!(work(&e, &w, WorkKind::Complete, b"H:a:17", b"x").is_empty());
        assert_eq!(e.kept_handles(), 0, "the alias went with the job");
        assert_eq!(&e.handle_of(5)[..], b"H:b:5");
    }

    #[test]
    fn twenty_thousand_taken_over_jobs_that_all_run_leave_no_alias_behind() {
        let e = engine();
        let n = 20_000u64;
        let records = (1..=n)
            .map(|i| moved(100 + i, Some(&format!("H:a:{i}")), ""))
            .collect();
        assert_eq!(e.restore(records, 100 + n + 1), n as usize);
        assert_eq!(e.kept_handles(), n as usize);
        let w = connect(&e);
        can_do(&e, &w, "f", None);
        let mut seen = std::collections::HashSet::new();
        while let Some(a) = grab(&e, &w) {
            let h = a.arg(0).to_vec();
            assert!(h.starts_with(b"H:a:"), "{:?}", String::from_utf8_lossy(&h));
            assert!(work(&e, &w, WorkKind::Complete, &h, b"").is_empty());
            seen.insert(h);
        }
        assert_eq!(seen.len(), n as usize);
        assert_eq!(e.kept_handles(), 0);
        // New jobs get this node's handles again.
        assert!(e.handle_of(e.next_seq()).starts_with(b"H:b:"));
    }

    #[test]
    fn a_handle_already_in_use_is_not_kept_twice() {
        let e = engine();
        e.restore(vec![moved(3, Some("H:a:1"), "")], 0);
        e.restore(vec![moved(4, Some("H:a:1"), "")], 0);
        assert_eq!(&e.handle_of(3)[..], b"H:a:1");
        assert_eq!(&e.handle_of(4)[..], b"H:b:4");
        // This node's own handle coming back through a peer: kept, and new numbers skip it.
        e.restore(vec![moved(6, Some("H:b:40"), "")], 0);
        assert_eq!(&e.handle_of(6)[..], b"H:b:40");
        assert!(e.next_seq() > 40);
        // ... unless a live job of this node already has that number.
        e.restore(vec![moved(7, Some("H:b:4"), "")], 0);
        assert_eq!(&e.handle_of(7)[..], b"H:b:7");
    }
}
