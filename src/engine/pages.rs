//! Large admin listings (`show jobs`, `show unique jobs`) one page at a time: each page takes
//! the engine lock for a bounded walk of job slots and returns, so a million queued jobs are
//! listed in many short critical sections with other clients served in between, and the
//! caller writes each page out before asking for the next (its unsent output stays bounded).
//!
//! Pages walk slab slots, not sequence numbers: the walk is bounded whatever the handles, and
//! within a page jobs are in submission order. A job submitted or finished during a listing
//! may or may not appear, as in any live listing.

use bytes::Bytes;

use super::job::JobState;
use super::snapshots::JobInfo;
use super::Engine;

/// Job slots visited per page: about 100 µs under the lock.
pub const PAGE_SLOTS: usize = 4096;

/// One page of a listing, and where the next starts (`None` = that was the last).
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<usize>,
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
}
