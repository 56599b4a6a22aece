//! The engine's one clock. Every monotonic reading (queue wait and run times, timer deadlines,
//! CAN_DO_TIMEOUT) is nanoseconds since the engine started on `tokio::time::Instant`, the same
//! clock its timer task sleeps on, so a test that calls `tokio::time::pause()` and `advance()`
//! moves all of them together. Epoch jobs need unix seconds: they are derived from a unix time
//! captured once at start plus that elapsed time, so they advance with a paused clock too. The
//! price is that a wall-clock step (an operator setting the date) is not seen until restart;
//! NTP slewing is, since it also slews the monotonic clock.
//!
//! Reading it costs one `Instant::now()` (a vDSO call), as the `std::time::Instant` it replaces.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Monotonic nanoseconds since start, and the unix time they correspond to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    started: Instant,
    /// Unix time at `started`, in nanoseconds.
    unix_at_start_ns: u64,
}

impl Clock {
    /// Starts the clock now.
    pub(super) fn start() -> Clock {
        let unix_at_start_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Clock {
            started: Instant::now(),
            unix_at_start_ns,
        }
    }

    /// Nanoseconds since start.
    pub(super) fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Whole unix seconds now.
    pub(super) fn unix_secs(&self) -> u64 {
        self.unix_at_start_ns.saturating_add(self.now_ns()) / NANOS_PER_SEC
    }

    /// The clock reading (nanoseconds since start) at which unix second `epoch` begins;
    /// saturating, so a far-future epoch never wraps around into "due now".
    pub(super) fn ns_at_unix(&self, epoch: u64) -> u64 {
        epoch
            .saturating_mul(NANOS_PER_SEC)
            .saturating_sub(self.unix_at_start_ns)
    }

    /// The instant of a clock reading, for `tokio::time::sleep_until`.
    pub(super) fn instant_at(&self, ns: u64) -> Instant {
        self.started + Duration::from_nanos(ns)
    }
}

/// Seconds between two clock readings, for latency histograms.
pub(super) fn secs_between(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn readings_follow_a_paused_clock() {
        let c = Clock::start();
        let unix = c.unix_secs();
        assert_eq!(c.now_ns(), 0);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(c.now_ns(), 90 * NANOS_PER_SEC);
        assert_eq!(c.unix_secs(), unix + 90);
        // Second `unix + 91` begins within the next second, not at once and not later.
        let next = c.ns_at_unix(unix + 91);
        assert!(next > c.now_ns() && next <= c.now_ns() + NANOS_PER_SEC);
        assert_eq!(c.ns_at_unix(u64::MAX), u64::MAX - c.unix_at_start_ns);
        assert_eq!(c.ns_at_unix(0), 0);
    }
}
