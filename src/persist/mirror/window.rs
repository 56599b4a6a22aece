//! The live window: one slot per sequence number from the low watermark to the highest
//! written, saying whether the job is live, which nodes may hold a copy (deletes go to all of
//! them) and which confirmed one.
//!
//! Sequence numbers are dense and finish roughly in order, so a `VecDeque` indexed by
//! `seq - base` beats a map: 6 bytes a job (a million queued jobs cost 6 MB, checked by
//! `a_slot_stays_six_bytes`), no hashing under the engine's lock, and the low watermark is
//! the front of the deque. A job finishing out of order leaves a dead slot until the jobs
//! before it finish.

use std::collections::VecDeque;

/// The job is queued or running (its record must exist).
pub(super) const LIVE: u8 = 1;
/// A write (submit or repair) for this job is in flight.
pub(super) const PENDING: u8 = 2;

/// One job's entry.
#[derive(Clone, Copy, Default)]
pub(super) struct Slot {
    /// [`LIVE`] and [`PENDING`].
    pub(super) flags: u8,
    /// Nodes that may hold a copy (a write was sent there).
    pub(super) may: u16,
    /// Nodes that confirmed a copy.
    pub(super) ok: u16,
}

/// Live jobs by sequence number, from `base` (the low watermark) on.
#[derive(Default)]
pub(super) struct Window {
    pub(super) base: u64,
    pub(super) slots: VecDeque<Slot>,
}

impl Window {
    pub(super) fn get(&self, seq: u64) -> Option<&Slot> {
        seq.checked_sub(self.base)
            .and_then(|i| self.slots.get(i as usize))
    }

    pub(super) fn get_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        seq.checked_sub(self.base)
            .and_then(|i| self.slots.get_mut(i as usize))
    }

    /// The slot of `seq`, growing the window either way.
    pub(super) fn entry(&mut self, seq: u64) -> &mut Slot {
        if self.slots.is_empty() {
            self.base = seq;
        }
        while seq < self.base {
            self.slots.push_front(Slot::default());
            self.base -= 1;
        }
        let i = (seq - self.base) as usize;
        if i >= self.slots.len() {
            self.slots.resize(i + 1, Slot::default());
        }
        &mut self.slots[i]
    }

    /// Drops finished jobs from the front: the low watermark moves up.
    pub(super) fn trim(&mut self) {
        while let Some(s) = self.slots.front() {
            if s.flags & LIVE != 0 {
                break;
            }
            self.slots.pop_front();
            self.base += 1;
        }
        if self.slots.capacity() > 4096 && self.slots.capacity() > 4 * self.slots.len() {
            self.slots.shrink_to(self.slots.len() * 2);
        }
    }

    pub(super) fn low(&self) -> u64 {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_stays_six_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 6);
    }

    #[test]
    fn the_window_tracks_live_jobs_and_the_low_watermark() {
        let mut w = Window::default();
        for seq in 10..20 {
            w.entry(seq).flags = LIVE;
        }
        assert_eq!(w.low(), 10);
        // An older job rewritten later (a foreground job joined by a background submit).
        w.entry(5).flags = LIVE;
        assert_eq!(w.low(), 5);
        w.get_mut(5).unwrap().flags = 0;
        w.trim();
        assert_eq!(w.low(), 10);
        // Finishing out of order moves the watermark only past the oldest live job.
        w.get_mut(12).unwrap().flags = 0;
        w.trim();
        assert_eq!(w.low(), 10);
        for seq in [10, 11] {
            w.get_mut(seq).unwrap().flags = 0;
        }
        w.trim();
        assert_eq!(w.low(), 13);
        assert!(w.get(12).is_none() && w.get(13).is_some());
        for seq in 13..20 {
            w.get_mut(seq).unwrap().flags = 0;
        }
        w.trim();
        assert_eq!((w.low(), w.slots.len()), (20, 0));
        // An empty window restarts at the next job.
        w.entry(30).flags = LIVE;
        assert_eq!(w.low(), 30);
    }
}
