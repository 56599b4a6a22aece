//! The result cache's metrics, on the server's registry: hits, misses, stores and skips by
//! function (the `function` label capped like the engine's, `metrics.max_function_labels`), and
//! the front's size.

use std::sync::{Mutex, PoisonError};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::metrics::FunctionLabels;

/// Why a result was not stored: the `reason` label of `gearhouse_cache_skips_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// memcached refused it: over its item size limit (`-I`) or out of memory.
    TooLarge,
    /// The store queue (`cache.store_queue`) was full.
    QueueFull,
    /// No memcached node answered.
    Unreachable,
}

impl SkipReason {
    pub const ALL: [SkipReason; 3] = [
        SkipReason::TooLarge,
        SkipReason::QueueFull,
        SkipReason::Unreachable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::TooLarge => "too_large",
            SkipReason::QueueFull => "queue_full",
            SkipReason::Unreachable => "unreachable",
        }
    }
}

/// The cache's counters; cheap to share (prometheus handles are reference-counted).
pub struct CacheMetrics {
    hits: IntCounterVec,
    misses: IntCounterVec,
    stores: IntCounterVec,
    skips: IntCounterVec,
    /// Bytes held by the in-memory front.
    pub front_bytes: IntGauge,
    labels: Mutex<FunctionLabels>,
}

impl CacheMetrics {
    /// Registers the cache's metrics on `registry`; `label_cap` bounds distinct functions.
    pub fn new(registry: &Registry, label_cap: usize) -> CacheMetrics {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(v.clone()))
                .expect("metric registered once");
            v
        };
        let front_bytes = IntGauge::new(
            "gearhouse_cache_front_bytes",
            "Bytes of results held by the result cache's in-memory front (cache.front_bytes)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(front_bytes.clone()))
            .expect("metric registered once");
        CacheMetrics {
            hits: vec(
                "gearhouse_cache_hits_total",
                "Foreground submits answered from the result cache, without a worker",
                &["function"],
            ),
            misses: vec(
                "gearhouse_cache_misses_total",
                "Foreground submits of cached functions that found no cached result",
                &["function"],
            ),
            stores: vec(
                "gearhouse_cache_stores_total",
                "Results written to the result cache in memcached",
                &["function"],
            ),
            skips: vec(
                "gearhouse_cache_skips_total",
                "Results of cached functions that were not stored, by reason",
                &["function", "reason"],
            ),
            front_bytes,
            labels: Mutex::new(FunctionLabels::new(label_cap)),
        }
    }

    fn label(&self, function: &[u8]) -> String {
        self.labels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .label_for(function)
    }

    pub fn hit(&self, function: &[u8]) {
        self.hits.with_label_values(&[&self.label(function)]).inc();
    }

    pub fn miss(&self, function: &[u8]) {
        self.misses
            .with_label_values(&[&self.label(function)])
            .inc();
    }

    pub fn stored(&self, function: &[u8]) {
        self.stores
            .with_label_values(&[&self.label(function)])
            .inc();
    }

    pub fn skipped(&self, function: &[u8], reason: SkipReason) {
        self.skips
            .with_label_values(&[&self.label(function), reason.as_str()])
            .inc();
    }
}
