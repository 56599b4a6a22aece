//! The engine's handle index: job sequence number → slab key.
//!
//! Sequence numbers are handed out in order, so live jobs occupy a dense window of them. The
//! index is that window (`VecDeque<u32>`, 4 bytes a sequence number, indexed by `seq - base`)
//! plus a small overflow map for stragglers: jobs that stay alive long after everything around
//! them finished, and would otherwise pin the window open. Compared with a hash map this needs
//! no hashing, costs about 4 bytes a job instead of about 36, and never rehashes every entry at
//! once under the engine lock (a hash map growing past 1,000,000 entries stalls for tens of
//! milliseconds; the window grows by a `memcpy` of 4-byte entries).

use std::collections::VecDeque;

use hashbrown::HashMap;

const NONE: u32 = u32::MAX;
/// Windows smaller than this are never compacted.
const MIN_COMPACT: usize = 4096;
/// A window this many times larger than its live entries moves its front half to the overflow.
const SPARSENESS: usize = 8;

/// Maps sequence numbers to slab keys.
#[derive(Debug, Default)]
pub struct SeqIndex {
    /// Sequence number of `window[0]`.
    base: u64,
    window: VecDeque<u32>,
    live_in_window: usize,
    overflow: HashMap<u64, u32>,
}

impl SeqIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.live_in_window + self.overflow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `seq → slot`. Sequence numbers are expected in increasing order (recovery inserts
    /// them sorted); one below the window goes to the overflow map.
    pub fn insert(&mut self, seq: u64, slot: u32) {
        debug_assert_ne!(slot, NONE);
        if self.window.is_empty() {
            self.base = seq;
        }
        if seq < self.base {
            self.overflow.insert(seq, slot);
            return;
        }
        let idx = seq - self.base;
        // A jump far past the window (a raised sequence floor) starts a new window rather than
        // filling the gap with empty entries.
        if idx > (self.window.len() as u64).saturating_mul(2) + MIN_COMPACT as u64 {
            self.spill(self.window.len());
            self.base = seq;
            self.window.clear();
            return self.insert(seq, slot);
        }
        let idx = idx as usize;
        if idx >= self.window.len() {
            self.window.resize(idx + 1, NONE);
        }
        if self.window[idx] == NONE {
            self.live_in_window += 1;
        }
        self.window[idx] = slot;
        if self.window.len() > MIN_COMPACT && self.window.len() > SPARSENESS * self.live_in_window {
            self.spill(self.window.len() / 2);
        }
    }

    /// The slab key of `seq`.
    pub fn get(&self, seq: u64) -> Option<u32> {
        if seq >= self.base {
            if let Some(&s) = self.window.get((seq - self.base) as usize) {
                return (s != NONE).then_some(s);
            }
        }
        self.overflow.get(&seq).copied()
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.get(seq).is_some()
    }

    /// Removes `seq`, returning its slab key.
    pub fn remove(&mut self, seq: u64) -> Option<u32> {
        if seq >= self.base {
            let idx = (seq - self.base) as usize;
            if let Some(s) = self.window.get_mut(idx) {
                if *s == NONE {
                    return self.overflow.remove(&seq);
                }
                let slot = std::mem::replace(s, NONE);
                self.live_in_window -= 1;
                self.trim_front();
                return Some(slot);
            }
        }
        self.overflow.remove(&seq)
    }

    fn trim_front(&mut self) {
        while self.window.front() == Some(&NONE) {
            self.window.pop_front();
            self.base += 1;
        }
    }

    /// Moves the first `n` window entries into the overflow map.
    fn spill(&mut self, n: usize) {
        for (i, s) in self.window.drain(..n).enumerate() {
            if s != NONE {
                self.overflow.insert(self.base + i as u64, s);
                self.live_in_window -= 1;
            }
        }
        self.base += n as u64;
        self.trim_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_map_under_random_operations() {
        // A small deterministic generator keeps the test reproducible without a dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut idx = SeqIndex::new();
        let mut model = std::collections::HashMap::new();
        let mut next = 1u64;
        for step in 0..200_000u32 {
            match rnd() % 10 {
                0..=4 => {
                    idx.insert(next, step);
                    model.insert(next, step);
                    next += 1 + (rnd() % 3 == 0) as u64;
                }
                5..=8 => {
                    // Remove mostly recent entries, leaving long-lived stragglers behind.
                    let back = rnd() % 64;
                    let seq = next.saturating_sub(back + 1);
                    assert_eq!(idx.remove(seq), model.remove(&seq), "remove {seq}");
                }
                _ => {
                    let seq = rnd() % (next + 10);
                    assert_eq!(idx.get(seq), model.get(&seq).copied(), "get {seq}");
                }
            }
            assert_eq!(idx.len(), model.len());
        }
        for (seq, slot) in &model {
            assert_eq!(idx.get(*seq), Some(*slot));
        }
        // Stragglers did not keep the whole history in the window.
        assert!(idx.window.len() <= SPARSENESS * idx.live_in_window.max(1) + MIN_COMPACT);
    }

    #[test]
    fn a_jump_in_sequence_numbers_does_not_fill_the_gap() {
        let mut idx = SeqIndex::new();
        idx.insert(5, 1);
        idx.insert(10_000_000, 2);
        assert!(idx.window.len() < 10);
        assert_eq!(idx.get(5), Some(1));
        assert_eq!(idx.get(10_000_000), Some(2));
        assert_eq!(idx.remove(5), Some(1));
        assert_eq!(idx.get(5), None);
    }

    #[test]
    fn removing_the_front_shrinks_the_window() {
        let mut idx = SeqIndex::new();
        for s in 1..=1000 {
            idx.insert(s, s as u32);
        }
        for s in 1..=999 {
            idx.remove(s);
        }
        assert_eq!(idx.window.len(), 1);
        assert_eq!(idx.get(1000), Some(1000));
    }
}
