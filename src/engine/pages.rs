//! Large admin listings one page at a time: each page takes the engine lock for a bounded
//! walk and returns, so a million queued jobs (or `server.max_connections` workers, or
//! `engine.max_functions` functions) are listed in many short critical sections with other
//! clients served in between, and the caller writes each page out before asking for the next
//! (its unsent output stays bounded).
//!
//! - `show jobs`, `show unique jobs`: pages walk slab slots, not sequence numbers: the walk is
//!   bounded whatever the handles, and within a page jobs are in submission order.
//! - `status`, `prioritystatus`: functions in name order, a page being the next
//!   [`PAGE_FUNCTIONS`] names after the last one listed (one pass over the function table's
//!   names, no per-function work beyond the page).
//! - `workers`: connections in id order, likewise [`PAGE_CONNECTIONS`] ids at a time.
//!
//! Anything created or ended during a listing may or may not appear, as in any live listing.

use bytes::Bytes;

use super::job::JobState;
use super::snapshots::{ConnInfo, FunctionStat, JobInfo};
use super::{ConnId, Engine};

/// Job slots visited per page: about 100 µs under the lock.
pub const PAGE_SLOTS: usize = 4096;

/// Functions per page of `status` / `prioritystatus`.
pub const PAGE_FUNCTIONS: usize = 512;

/// Connections per page of `workers`.
pub const PAGE_CONNECTIONS: usize = 512;

/// One page of a listing, and where the next starts (`None` = that was the last).
pub struct Page<T, K = usize> {
    pub items: Vec<T>,
    pub next: Option<K>,
}

impl Engine {
    /// Live jobs in slots `from..from + PAGE_SLOTS` (for `show jobs`), in submission order.
    pub fn jobs_page(&self, from: usize) -> Page<JobInfo> {
        let st = self.lock();
        let end = (from + PAGE_SLOTS).min(st.jobs.capacity());
        let mut v: Vec<(u64, JobInfo)> = (from..end)
            .filter_map(|slot| st.jobs.get(slot))
            .map(|j| {
                (
                    j.seq,
                    JobInfo {
                        handle: self.handle_of(j.seq),
                        attempts: j.attempts,
                        queued: j.state == JobState::Queued,
                    },
                )
            })
            .collect();
        let next = (end < st.jobs.capacity()).then_some(end);
        drop(st);
        v.sort_unstable_by_key(|(s, _)| *s);
        Page {
            items: v.into_iter().map(|(_, j)| j).collect(),
            next,
        }
    }

    /// Unique ids of live jobs in slots `from..from + PAGE_SLOTS` (for `show unique jobs`).
    pub fn uniques_page(&self, from: usize) -> Page<Bytes> {
        let st = self.lock();
        let end = (from + PAGE_SLOTS).min(st.jobs.capacity());
        let items = (from..end)
            .filter_map(|slot| st.jobs.get(slot))
            .filter(|j| j.has_unique())
            .map(|j| Bytes::copy_from_slice(j.unique()))
            .collect();
        Page {
            items,
            next: (end < st.jobs.capacity()).then_some(end),
        }
    }

    /// The functions named after `after` (all, when `None`), [`PAGE_FUNCTIONS`] of them in name
    /// order (for `status` and `prioritystatus`).
    pub fn functions_page(&self, after: Option<&Bytes>) -> Page<FunctionStat, Bytes> {
        let st = self.lock();
        let mut page: Vec<&super::job::Function> = st
            .functions
            .iter()
            .map(|(_, f)| f)
            .filter(|f| after.is_none_or(|a| f.name > *a))
            .collect();
        let more = first_sorted(&mut page, PAGE_FUNCTIONS, |f| &f.name);
        let items: Vec<FunctionStat> = page.iter().map(|f| self.stat_of(f)).collect();
        let next = more
            .then(|| items.last().map(|f| f.name_bytes.clone()))
            .flatten();
        Page { items, next }
    }

    /// The connections with ids above `after` (all, when `None`), [`PAGE_CONNECTIONS`] of them
    /// in id order (for `workers`).
    pub fn connections_page(&self, after: Option<ConnId>) -> Page<ConnInfo, ConnId> {
        let st = self.lock();
        let mut ids: Vec<ConnId> = st
            .conns
            .keys()
            .copied()
            .filter(|&id| after.is_none_or(|a| id > a))
            .collect();
        let more = first_sorted(&mut ids, PAGE_CONNECTIONS, |&id| id);
        let items: Vec<ConnInfo> = ids.iter().map(|&id| self.conn_info(&st, id)).collect();
        let next = more.then(|| items.last().map(|c| c.id)).flatten();
        Page { items, next }
    }
}

/// Keeps the `n` smallest of `v` by `key`, sorted; true when some were left out (another page).
fn first_sorted<T, K: Ord>(v: &mut Vec<T>, n: usize, key: impl Fn(&T) -> K) -> bool {
    let more = v.len() > n;
    if more {
        v.select_nth_unstable_by(n - 1, |a, b| key(a).cmp(&key(b)));
        v.truncate(n);
    }
    v.sort_unstable_by_key(&key);
    more
}
