//! A place among a bounded number (a tokio semaphore permit) with a gauge that follows the
//! places taken: the HTTP listener's open connections (`http.max_connections`) and the kept
//! engine connections (`http.max_kept_connections`).

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `max` places (capped at what a semaphore can count).
pub(super) fn places(max: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)))
}

/// A taken place; dropping it gives it back and lowers the gauge.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Slot {
    /// A place, if one is free.
    pub(super) fn take(places: &Arc<Semaphore>, gauge: &IntGauge) -> Option<Slot> {
        let permit = places.clone().try_acquire_owned().ok()?;
        gauge.inc();
        Some(Slot {
            _permit: permit,
            gauge: gauge.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
