//! The soak benchmark's code path, short: ~20 s of the mixed workload against the real binary
//! with three real memcached, one memcached node restarted empty, worker crashes holding a job,
//! churning clients; then the drain and the ledger. The benchmark (`benches/soak/`, run for
//! 30 minutes with `benches/soak.sh`) measures; this guards that the soak still runs and that
//! the server loses nothing under it.
//!
//! The soak's files are included as they are (`#[path]`), so this is the benchmark's code, not a
//! copy of it.

#[path = "../benches/soak/cluster.rs"]
mod cluster;
#[path = "../benches/soak/ledger.rs"]
mod ledger;
#[path = "common/ports.rs"]
mod ports;
#[path = "../benches/soak/report.rs"]
mod report;
// The benchmark's `--server` mode (`Target::External`) is not used here.
#[allow(dead_code)]
#[path = "../benches/soak/scenario.rs"]
mod scenario;

use std::path::PathBuf;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_loses_no_acknowledged_job() {
    let settings = scenario::Settings {
        target: scenario::Target::Spawn {
            binary: PathBuf::from(env!("CARGO_BIN_EXE_gearhouse")),
            config: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"),
            log_dir: std::env::temp_dir(),
            mem_mb: 64,
        },
        duration: Duration::from_secs(20),
        bg_rate: 300.0,
        producers: 3,
        fg_clients: 2,
        fg_rate: 20.0,
        churners: 1,
        churn_jobs: 3,
        workers: 3,
        // Crashes at 8 s and 16 s; one restart at 12 s, repaired before the load stops.
        crash_every: Duration::from_secs(8),
        restart_every: Duration::from_secs(12),
        sample_every: Duration::from_secs(1),
        window: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(60),
        payload: 64,
        // A standing queue of ~300 epoch jobs, so the restart loses copies to rewrite.
        epoch_delay: Duration::from_secs(3),
    };
    let report = scenario::run(settings).await.expect("the soak starts");
    let bounds = report::Bounds::default();
    let summary = report.summary(bounds);
    println!("{summary}");

    assert_eq!(report.tally.lost, 0, "{summary}");
    assert!(report.drained, "{summary}");
    assert!(report.server_alive, "{summary}");
    assert_eq!(report.totals.foreign, 0, "{summary}");
    // The load really ran, through every kind of client, with the failures injected.
    assert!(report.tally.acked > 3000, "{summary}");
    assert!(report.totals.fg_done > 300, "{summary}");
    assert!(report.totals.churn_connections > 10, "{summary}");
    assert!(report.totals.crashes >= 1, "{summary}");
    assert_eq!(report.restarts.len(), 1, "{summary}");
    assert!(
        report.restarts[0].repaired_after_s.is_some(),
        "the restarted node was never repaired: {summary}"
    );
    // A background job a worker crashed with was handed out again (at-least-once): each such
    // crash is a run followed by another run of the same id.
    assert!(
        report.tally.extra_runs >= report.totals.crashes_bg,
        "{summary}"
    );
    // The samples and the table cover the run: a row per 5 s window (the last one the drain).
    assert!(report.samples.len() >= 18, "{summary}");
    assert!(report.rows.len() >= 4, "{summary}");
    assert!(report.rows.iter().all(|r| r.footprint.is_some()));
    assert!(report.rows.iter().any(|r| r.p99_ms.is_some()));
    assert!(report.failures(bounds).is_empty(), "{summary}");
}
