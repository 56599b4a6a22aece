//! Persistence metrics, registered on the server's registry. The names are fixed: the
//! dashboard queries them.
//!
//! Series labelled by node are created at 0 for every configured node when the mirror is
//! built ([`PersistMetrics::init_node`]): a counter that appears only with its first event
//! hides that event from `increase()`, and a dashboard panel has no series on a healthy
//! server.

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Buckets for memcached round trips: 25 µs to 5 s.
const MEMCACHED_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
];

/// The `op` label values of `gearhouse_memcached_errors_total`.
pub const ERROR_OPS: [&str; 5] = ["write", "delete", "connect", "batch", "probe"];

pub struct PersistMetrics {
    pub write_seconds: HistogramVec,
    pub delete_seconds: HistogramVec,
    pub errors: IntCounterVec,
    /// Copies a node did not store, by node and reason (the mirror's `NodeFailure` labels).
    pub write_failures: IntCounterVec,
    /// Deletes dropped because `persistence.max_pending_deletes` waited for a node.
    pub deletes_dropped: IntCounterVec,
    pub node_up: IntGaugeVec,
    pub replicas_below_target: IntGauge,
    pub evictions: IntGaugeVec,
    pub eviction_enabled: IntGaugeVec,
    pub pending_writes: IntGauge,
    pub not_durable: IntCounter,
    pub recovered: IntCounter,
    pub recovery_duration: Gauge,
    pub recovery_failed: IntGauge,
}

impl PersistMetrics {
    /// Creates and registers the metrics (a second registration on the same registry, as in
    /// tests that start two mirrors, keeps the first one's series).
    pub fn new(registry: &Registry) -> PersistMetrics {
        let h = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(MEMCACHED_BUCKETS.to_vec()),
                &["node"],
            )
            .expect("histogram")
        };
        let m = PersistMetrics {
            write_seconds: h(
                "gearhouse_memcached_write_seconds",
                "Time from queuing a job record write to memcached's acknowledgement, per node",
            ),
            delete_seconds: h(
                "gearhouse_memcached_delete_seconds",
                "Time from queuing a job record delete to memcached's answer, per node",
            ),
            errors: IntCounterVec::new(
                Opts::new(
                    "gearhouse_memcached_errors_total",
                    "memcached operations that failed, per node and operation",
                ),
                &["node", "op"],
            )
            .expect("counter"),
            write_failures: IntCounterVec::new(
                Opts::new(
                    "gearhouse_memcached_write_failures_total",
                    "Job record copies a memcached node did not store, per node and reason: out_of_memory (start it with more -m, keep -M), too_large (a larger -I), rejected (another error), timeout (persistence.write_timeout_ms), connection and node_down (the node is unreachable), queue_full (the node is slower than the submit rate)",
                ),
                &["node", "reason"],
            )
            .expect("counter"),
            deletes_dropped: IntCounterVec::new(
                Opts::new(
                    "gearhouse_memcached_deletes_dropped_total",
                    "Deletes of finished jobs dropped because persistence.max_pending_deletes already waited for the node (those jobs may run again after a recovery from it)",
                ),
                &["node"],
            )
            .expect("counter"),
            node_up: IntGaugeVec::new(
                Opts::new(
                    "gearhouse_memcached_node_up",
                    "1 when the memcached node answers, else 0",
                ),
                &["node"],
            )
            .expect("gauge"),
            replicas_below_target: IntGauge::new(
                "gearhouse_memcached_replicas_below_target",
                "Live jobs with fewer confirmed copies on reachable nodes than persistence.replicas",
            )
            .expect("gauge"),
            evictions: IntGaugeVec::new(
                Opts::new(
                    "gearhouse_memcached_evictions",
                    "Items memcached evicted (its `evictions` stat); above 0 means jobs may be lost",
                ),
                &["node"],
            )
            .expect("gauge"),
            eviction_enabled: IntGaugeVec::new(
                Opts::new(
                    "gearhouse_memcached_eviction_enabled",
                    "1 if the memcached node can evict items (started without -M)",
                ),
                &["node"],
            )
            .expect("gauge"),
            pending_writes: IntGauge::new(
                "gearhouse_persistence_pending_writes",
                "Job record writes waiting for memcached's acknowledgement",
            )
            .expect("gauge"),
            not_durable: IntCounter::new(
                "gearhouse_jobs_not_durable_total",
                "Background jobs accepted in memory only (persistence.on_failure = accept_in_memory)",
            )
            .expect("counter"),
            recovered: IntCounter::new(
                "gearhouse_jobs_recovered_total",
                "Jobs restored from memcached at start-up (own queue and taken-over queues)",
            )
            .expect("counter"),
            recovery_duration: Gauge::new(
                "gearhouse_recovery_duration_seconds",
                "How long the start-up recovery took",
            )
            .expect("gauge"),
            recovery_failed: IntGauge::new(
                "gearhouse_recovery_failed",
                "1 while start-up recovery cannot complete (memcached unreachable), else 0",
            )
            .expect("gauge"),
        };
        let _ = registry.register(Box::new(m.write_seconds.clone()));
        let _ = registry.register(Box::new(m.delete_seconds.clone()));
        let _ = registry.register(Box::new(m.errors.clone()));
        let _ = registry.register(Box::new(m.write_failures.clone()));
        let _ = registry.register(Box::new(m.deletes_dropped.clone()));
        let _ = registry.register(Box::new(m.node_up.clone()));
        let _ = registry.register(Box::new(m.replicas_below_target.clone()));
        let _ = registry.register(Box::new(m.evictions.clone()));
        let _ = registry.register(Box::new(m.eviction_enabled.clone()));
        let _ = registry.register(Box::new(m.pending_writes.clone()));
        let _ = registry.register(Box::new(m.not_durable.clone()));
        let _ = registry.register(Box::new(m.recovered.clone()));
        let _ = registry.register(Box::new(m.recovery_duration.clone()));
        let _ = registry.register(Box::new(m.recovery_failed.clone()));
        m
    }

    /// Creates node `addr`'s series at 0: errors for every op, node up, evictions and
    /// eviction settings. (Histograms and write failures get theirs when the mirror takes
    /// its per-node handles: every reason, at 0.)
    pub fn init_node(&self, addr: &str) {
        for op in ERROR_OPS {
            self.errors.with_label_values(&[addr, op]);
        }
        self.deletes_dropped.with_label_values(&[addr]);
        self.node_up.with_label_values(&[addr]).set(0);
        self.evictions.with_label_values(&[addr]).set(0);
        self.eviction_enabled.with_label_values(&[addr]).set(0);
    }
}
