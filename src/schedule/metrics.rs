//! The scheduler's Prometheus metrics, registered on the server's registry. The `schedule`
//! label is bounded by `scheduler.max_schedules` (ids past it are refused), and a removed
//! schedule's series are removed with it.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every scheduler metric.
pub struct ScheduleMetrics {
    /// `gearhouse_schedules`: schedules in this server's table.
    pub schedules: IntGauge,
    /// `gearhouse_schedule_fired_total{schedule}`: due times this server submitted a job for.
    pub fired: IntCounterVec,
    /// `gearhouse_schedule_missed_fired_total`: of those, runs that fell due while no server
    /// was running and were fired once after recovery.
    pub missed_fired: IntCounter,
    /// `gearhouse_schedule_claims_lost_total`: due times another server claimed first.
    pub claims_lost: IntCounter,
    /// `gearhouse_schedule_errors_total{reason}`: due times not fired because of an error
    /// (`claim`: memcached did not answer the claim; `submit`: the engine refused the job).
    pub errors: IntCounterVec,
    /// `gearhouse_schedule_lateness_seconds`: from the due time to the job's JOB_CREATED (after
    /// its durable write).
    pub lateness: Histogram,
}

impl ScheduleMetrics {
    /// Creates and registers the metrics; a registry that already has them (a second scheduler
    /// on one engine, only in tests) keeps the first ones.
    pub fn new(registry: &Registry) -> ScheduleMetrics {
        let m = ScheduleMetrics {
            schedules: IntGauge::new(
                "gearhouse_schedules",
                "Recurring schedules in this server's table",
            )
            .expect("metric"),
            fired: IntCounterVec::new(
                Opts::new(
                    "gearhouse_schedule_fired_total",
                    "Due times of a schedule this server submitted a background job for",
                ),
                &["schedule"],
            )
            .expect("metric"),
            missed_fired: IntCounter::new(
                "gearhouse_schedule_missed_fired_total",
                "Runs that fell due while no server was running, fired once after recovery",
            )
            .expect("metric"),
            claims_lost: IntCounter::new(
                "gearhouse_schedule_claims_lost_total",
                "Due times another gearhouse server claimed first (it fired them)",
            )
            .expect("metric"),
            errors: IntCounterVec::new(
                Opts::new(
                    "gearhouse_schedule_errors_total",
                    "Due times not fired because of an error, by reason (claim, submit)",
                ),
                &["reason"],
            )
            .expect("metric"),
            // Firing should take a few milliseconds: fine buckets below 100 ms, coarse above.
            lateness: Histogram::with_opts(
                HistogramOpts::new(
                    "gearhouse_schedule_lateness_seconds",
                    "From a schedule's due time to its job's JOB_CREATED (after the durable write)",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0,
                ]),
            )
            .expect("metric"),
        };
        for reason in ["claim", "submit"] {
            m.errors.with_label_values(&[reason]);
        }
        let _ = registry.register(Box::new(m.schedules.clone()));
        let _ = registry.register(Box::new(m.fired.clone()));
        let _ = registry.register(Box::new(m.missed_fired.clone()));
        let _ = registry.register(Box::new(m.claims_lost.clone()));
        let _ = registry.register(Box::new(m.errors.clone()));
        let _ = registry.register(Box::new(m.lateness.clone()));
        m
    }
}
