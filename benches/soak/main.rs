//! The soak benchmark: hours-long behaviour in half an hour. A mixed workload (background and
//! foreground jobs over several functions, workers that crash holding a job and reconnect,
//! clients that open a connection per few jobs, memcached nodes restarted empty one at a time)
//! against the release binary with three memcached and two replicas; it reports jobs lost (must
//! be 0), duplicates, the server's resident memory and open descriptors over time, and the
//! foreground p99 per minute.
//!
//! Run: `benches/soak.sh --minutes 32` (builds release, keeps the binaries and the log), or
//! `cargo bench --bench soak -- --minutes 2`. Exit status 1 when a job was lost, the run did not
//! drain, the server died or grew past the bounds (`report.rs` states them), 2 when the soak
//! could not start.
//!
//! Files: this one parses the command line; `scenario.rs` is the workload (shared with
//! `tests/soak_short.rs`), `cluster.rs` the processes and `/proc` readings, `ledger.rs` the
//! per-id accounting, `report.rs` the table, the summary and the pass/fail rules.

mod cluster;
mod ledger;
// Ports below the kernel's ephemeral range: a memcached node restarted on its port cannot find
// it taken by a churning client's outgoing connection.
#[path = "../../tests/common/ports.rs"]
mod ports;
mod report;
mod scenario;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

// The command line: benches/README.md ("Soak") explains every flag (a doc comment here would
// become clap's long help).
#[derive(Parser, Debug)]
#[command(name = "soak", about = "Gearman soak test (gearhouse benchmark)")]
struct Args {
    /// Load time in minutes (the drain follows).
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Drive a running server instead of starting one (no memcached restarts then).
    #[arg(long)]
    server: Option<SocketAddr>,
    /// With --server: its process id, for the RSS and descriptor samples.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The gearhouse binary to start (default: the one cargo built with this bench).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Where the server's log goes.
    #[arg(long, default_value = "/tmp")]
    log_dir: PathBuf,
    #[arg(long, default_value_t = 256)]
    memcached_mb: u32,
    /// Background submits per second, all producers together.
    #[arg(long, default_value_t = 600.0)]
    bg_rate: f64,
    #[arg(long, default_value_t = 6)]
    producers: usize,
    #[arg(long, default_value_t = 4)]
    fg_clients: usize,
    /// Foreground submits per second per client.
    #[arg(long, default_value_t = 50.0)]
    fg_rate: f64,
    #[arg(long, default_value_t = 2)]
    churners: usize,
    #[arg(long, default_value_t = 3)]
    churn_jobs: u32,
    #[arg(long, default_value_t = 6)]
    workers: usize,
    /// Seconds between worker crashes (0: none).
    #[arg(long, default_value_t = 20.0)]
    crash_every: f64,
    /// Seconds between memcached restarts (0: none).
    #[arg(long, default_value_t = 180.0)]
    restart_every: f64,
    #[arg(long, default_value_t = 10.0)]
    sample_every: f64,
    /// Seconds per table row.
    #[arg(long, default_value_t = 60.0)]
    window: f64,
    #[arg(long, default_value_t = 300.0)]
    drain_timeout: f64,
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Seconds until the first producer's epoch jobs are due (0: no epoch jobs).
    #[arg(long, default_value_t = 45.0)]
    epoch_delay: f64,
    /// Growth bound: last window's RSS at most this times the second window's.
    #[arg(long, default_value_t = 1.5)]
    rss_factor: f64,
    /// Growth bound: last window's open descriptors at most this many above the second's.
    #[arg(long, default_value_t = 20)]
    fd_slack: u64,
    /// Threads of the soak's own runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let a = Args::parse();
    let target = match a.server {
        Some(addr) => scenario::Target::External {
            addr,
            pid: a.server_pid,
        },
        None => scenario::Target::Spawn {
            binary: a
                .binary
                .clone()
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gearhouse"))),
            config: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"),
            log_dir: a.log_dir.clone(),
            mem_mb: a.memcached_mb,
        },
    };
    let secs = Duration::from_secs_f64;
    let settings = scenario::Settings {
        target,
        duration: secs(a.minutes * 60.0),
        bg_rate: a.bg_rate,
        producers: a.producers.max(1),
        fg_clients: a.fg_clients,
        fg_rate: a.fg_rate,
        churners: a.churners,
        churn_jobs: a.churn_jobs.max(1),
        workers: a.workers.max(1),
        crash_every: secs(a.crash_every),
        restart_every: secs(a.restart_every),
        sample_every: secs(a.sample_every),
        window: secs(a.window),
        drain_timeout: secs(a.drain_timeout),
        payload: a.payload,
        epoch_delay: secs(a.epoch_delay),
    };
    let bounds = report::Bounds {
        rss_factor: a.rss_factor,
        fd_slack: a.fd_slack,
    };
    println!(
        "soak: {:.1} min, {} bg/s over {} producers, {} foreground clients at {}/s, {} churners, {} workers, a crash every {} s, a memcached restart every {} s",
        a.minutes, a.bg_rate, a.producers, a.fg_clients, a.fg_rate, a.churners, a.workers,
        a.crash_every, a.restart_every
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(scenario::run(settings)) {
        Ok(report) => {
            print!("{}", report.summary(bounds));
            if !report.failures(bounds).is_empty() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    }
}
