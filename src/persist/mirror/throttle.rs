//! A lock-free limit of one log line per period, with a count of the lines held back.
//!
//! memcached refusing writes (out of memory, too large) fails every job of a busy server:
//! thousands a second. The counters see each one; the log gets the first line with the fix,
//! then at most one line per node and reason per period saying how many more there were.
//! Writers of the same node share one [`Throttle`] per reason, so the limit holds however
//! many connections a node has. Time is passed in (milliseconds on the mirror's clock), so
//! the tests below need no sleeping.

use std::sync::atomic::{AtomicU64, Ordering};

/// One line per period; lines in between are counted.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    /// The earliest time of the next line.
    next_ms: AtomicU64,
    /// Lines held back since the last one written.
    suppressed: AtomicU64,
}

impl Throttle {
    /// Whether a line may be written at `now_ms`: `Some(lines held back since the last
    /// one)`, or `None` (this one is counted as held back).
    pub(super) fn allow(&self, now_ms: u64, period_ms: u64) -> Option<u64> {
        if self.claim(now_ms, period_ms) {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// For a periodic summary: `Some(lines held back)` when some were and the period since
    /// the last line is over (the summary then counts as that period's line).
    pub(super) fn take_due(&self, now_ms: u64, period_ms: u64) -> Option<u64> {
        if self.suppressed.load(Ordering::Relaxed) == 0 || !self.claim(now_ms, period_ms) {
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }

    /// Takes the period starting at `now_ms` if the previous one is over.
    fn claim(&self, now_ms: u64, period_ms: u64) -> bool {
        let next = self.next_ms.load(Ordering::Relaxed);
        now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + period_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_and_the_rest_counted() {
        let t = Throttle::default();
        assert_eq!(t.allow(0, 10_000), Some(0));
        for ms in [1, 500, 9_999] {
            assert_eq!(t.allow(ms, 10_000), None, "at {ms} ms");
        }
        // The next line says how many were held back.
        assert_eq!(t.allow(10_000, 10_000), Some(3));
        assert_eq!(t.allow(10_001, 10_000), None);
        // A summary only after the period, and only if something was held back.
        assert_eq!(t.take_due(15_000, 10_000), None);
        assert_eq!(t.take_due(20_000, 10_000), Some(1));
        assert_eq!(t.take_due(40_000, 10_000), None);
        assert_eq!(t.allow(40_000, 10_000), Some(0));
    }

    #[test]
    fn writers_racing_for_a_line_get_one() {
        let t = std::sync::Arc::new(Throttle::default());
        let allowed: usize = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| t.allow(5, 10_000).is_some()).count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(allowed, 1);
        assert_eq!(t.suppressed.load(Ordering::Relaxed), 3999);
    }
}
