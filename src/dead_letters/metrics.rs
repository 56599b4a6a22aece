//! The dead-letter store's metrics, on the server's registry.

use std::sync::{Mutex, PoisonError};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::Reason;
use crate::metrics::FunctionLabels;

/// Counters and the gauge of letters kept.
pub struct DeadLetterMetrics {
    arrived: IntCounterVec,
    /// Letters kept now.
    pub letters: IntGauge,
    /// Oldest letters dropped past `dead_letters.max_count` / `.max_bytes`.
    pub evicted: IntCounter,
    /// Letters lost because the store's queue was full.
    pub lost: IntCounter,
    /// Letters retried through the API.
    pub retried: IntCounter,
    /// Changes that memcached did not take (the letter lives in memory only).
    pub mirror_errors: IntCounter,
    /// Letters moved here from a dead node's store by a takeover of its queue.
    pub taken_over: IntCounter,
    labels: Mutex<FunctionLabels>,
}

impl DeadLetterMetrics {
    /// Registers the metrics on `r`; `label_cap` bounds distinct function labels.
    pub fn new(r: &Registry, label_cap: usize) -> DeadLetterMetrics {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        }
        let counter =
            |name: &str, help: &str| reg(r, IntCounter::new(name, help).expect("valid metric"));
        DeadLetterMetrics {
            arrived: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "gearhouse_dead_letters_total",
                        "Jobs that became dead letters, by function and reason",
                    ),
                    &["function", "reason"],
                )
                .expect("valid metric"),
            ),
            letters: reg(
                r,
                IntGauge::new("gearhouse_dead_letters", "Dead letters kept now")
                    .expect("valid metric"),
            ),
            evicted: counter(
                "gearhouse_dead_letters_evicted_total",
                "Oldest dead letters dropped past dead_letters.max_count or max_bytes",
            ),
            lost: counter(
                "gearhouse_dead_letters_lost_total",
                "Dead letters lost because the store's queue was full (dead_letters.queue)",
            ),
            retried: counter(
                "gearhouse_dead_letters_retried_total",
                "Dead letters submitted again through the API",
            ),
            mirror_errors: counter(
                "gearhouse_dead_letters_mirror_errors_total",
                "Dead-letter changes memcached did not take (kept in memory only)",
            ),
            taken_over: counter(
                "gearhouse_dead_letters_taken_over_total",
                "Dead letters moved here from a dead node's store by a takeover of its queue",
            ),
            labels: Mutex::new(FunctionLabels::new(label_cap)),
        }
    }

    /// Counts a new letter.
    pub fn arrived(&self, function: &[u8], reason: Reason) {
        let label = self
            .labels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .label_for(function);
        self.arrived
            .with_label_values(&[&label, reason.as_str()])
            .inc();
    }
}
