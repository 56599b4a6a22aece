//! Per-function settings: the `[functions."<name>"]` tables of the config file (queue limit, rate
//! limit, concurrency limit, result cache, dead letters), in one place so that every feature that
//! looks a function up reads the same values. A setting left out of a table keeps the server's
//! behaviour for functions without one (no limit, no cache, no dead letters).

use serde::{Deserialize, Serialize};

/// The settings of one function; `None` = not set (the default behaviour).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSettings {
    /// Queued jobs allowed per priority (as the `maxqueue` admin command sets); 0 = no limit.
    pub max_queue: Option<u32>,
    /// Jobs started per second across all workers; 0 = unlimited.
    pub rate: Option<f64>,
    /// Jobs that may start at once after an idle spell under `rate`.
    pub burst: Option<u32>,
    /// Jobs running at once across all workers; 0 = unlimited.
    pub max_running: Option<u32>,
    /// Seconds a WORK_COMPLETE result is cached under (function, unique); 0 = not cached.
    pub cache_ttl_s: Option<u32>,
    /// Failed and excepted background jobs go to the dead-letter store.
    pub dead_letter: Option<bool>,
}
