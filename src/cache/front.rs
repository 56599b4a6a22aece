//! The result cache's in-memory front: the most recently used results, bounded in bytes, each
//! expiring with the TTL memcached gives it. It exists for latency: a memcached round trip on
//! loopback costs a few hundred microseconds under load, a lookup here well under one, and it
//! answers hits for this server's own recent results before the memcached write has landed.
//!
//! `lru::LruCache` is unbounded by count here; the byte budget is enforced by evicting from the
//! cold end after each insert. One `std::sync::Mutex` guards it: every operation is a hash
//! lookup and a few pointer moves, never I/O, so the lock is held for well under a microsecond.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use lru::LruCache;

/// Bytes charged per entry on top of its key and result (the map's node, the `Bytes` headers).
const ENTRY_OVERHEAD: usize = 96;

struct Entry {
    result: Bytes,
    expires: Instant,
}

struct Inner {
    map: LruCache<Bytes, Entry>,
    bytes: usize,
}

/// The front: `(function, unique)` keys (joined by a NUL, which neither can contain) to results.
pub struct Front {
    budget: usize,
    inner: Mutex<Inner>,
}

fn cost(key: &Bytes, result: &Bytes) -> usize {
    key.len() + result.len() + ENTRY_OVERHEAD
}

impl Front {
    /// A front holding at most `budget` bytes; 0 keeps nothing.
    pub fn new(budget: usize) -> Front {
        Front {
            budget,
            inner: Mutex::new(Inner {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The result under `key` if it has not expired (an expired one is removed).
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Bytes> {
        let mut g = self.lock();
        let expired = match g.map.get(key) {
            Some(e) if e.expires > now => return Some(e.result.clone()),
            Some(_) => true,
            None => false,
        };
        if expired {
            remove(&mut g, key);
        }
        None
    }

    /// Keeps `result` under `key` until `expires`, evicting the least recently used entries
    /// past the budget. A result larger than a quarter of the budget is not kept: one huge
    /// result would otherwise flush everything else.
    pub fn insert(&self, key: Bytes, result: Bytes, expires: Instant) {
        let c = cost(&key, &result);
        if c > self.budget / 4 {
            return;
        }
        let mut g = self.lock();
        if let Some(old) = g.map.put(key.clone(), Entry { result, expires }) {
            g.bytes -= cost(&key, &old.result);
        }
        g.bytes += c;
        while g.bytes > self.budget {
            match g.map.pop_lru() {
                Some((k, e)) => g.bytes -= cost(&k, &e.result),
                None => break,
            }
        }
    }

    /// Forgets `key` (memcached refused the result, so it must not be answered from here).
    pub fn remove(&self, key: &[u8]) {
        remove(&mut self.lock(), key);
    }

    /// Bytes held (keys, results and per-entry overhead).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

fn remove(g: &mut Inner, key: &[u8]) {
    if let Some((k, e)) = g.map.pop_entry(key) {
        g.bytes -= cost(&k, &e.result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keeps_the_byte_budget_by_dropping_the_least_recently_used() {
        let f = Front::new(4 * (ENTRY_OVERHEAD + 2 + 100));
        let later = Instant::now() + Duration::from_secs(60);
        for k in ["k1", "k2", "k3", "k4"] {
            f.insert(Bytes::from(k), Bytes::from(vec![0u8; 100]), later);
        }
        // k1 used last, so k2 is the coldest when k5 arrives.
        assert!(f.get(b"k1", Instant::now()).is_some());
        f.insert(Bytes::from("k5"), Bytes::from(vec![0u8; 100]), later);
        assert!(f.get(b"k2", Instant::now()).is_none());
        assert!(f.get(b"k1", Instant::now()).is_some());
        assert!(f.get(b"k5", Instant::now()).is_some());
        assert!(f.bytes() <= 4 * (ENTRY_OVERHEAD + 2 + 100));
    }

    #[test]
    fn expired_entries_are_not_answered_and_are_removed() {
        let f = Front::new(1 << 20);
        let now = Instant::now();
        f.insert(
            Bytes::from("k"),
            Bytes::from("v"),
            now + Duration::from_secs(1),
        );
        assert_eq!(f.get(b"k", now).as_deref(), Some(&b"v"[..]));
        assert!(f.get(b"k", now + Duration::from_secs(2)).is_none());
        assert_eq!(f.bytes(), 0);
    }

    #[test]
    fn results_over_a_quarter_of_the_budget_and_a_zero_budget_keep_nothing() {
        let later = Instant::now() + Duration::from_secs(60);
        let f = Front::new(1000);
        f.insert(Bytes::from("big"), Bytes::from(vec![0u8; 300]), later);
        assert!(f.get(b"big", Instant::now()).is_none());
        let none = Front::new(0);
        none.insert(Bytes::from("k"), Bytes::from("v"), later);
        assert!(none.get(b"k", Instant::now()).is_none());
    }

    #[test]
    fn replacing_and_removing_keep_the_byte_count_right() {
        let f = Front::new(1 << 20);
        let later = Instant::now() + Duration::from_secs(60);
        f.insert(Bytes::from("k"), Bytes::from(vec![0u8; 10]), later);
        f.insert(Bytes::from("k"), Bytes::from(vec![0u8; 20]), later);
        assert_eq!(f.bytes(), 1 + 20 + ENTRY_OVERHEAD);
        f.remove(b"k");
        assert_eq!(f.bytes(), 0);
    }
}
