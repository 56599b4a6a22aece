//! Load generator for gearhouse and gearmand: pipelined client and worker connections built on
//! the crate's own client pieces (`gearhouse::client::PacketReader` and the codec's encoder:
//! requests queued with `put`, written by one `flush`), speaking raw Gearman packets, so both
//! servers are driven by exactly the same code.
//!
//! Run: `cargo bench --bench loadgen -- --mode background --port 4730 --jobs 100000`.
//! Modes:
//! - `background`: clients submit SUBMIT_JOB_BG (pipelined), workers drain with GRAB_JOB_UNIQ /
//!   WORK_COMPLETE (PRE_SLEEP + NOOP when empty). End-to-end rate from the first submit to the
//!   last WORK_COMPLETE acknowledged by the server (an ECHO_REQ sent after it on the same
//!   connection came back), plus the submit rate.
//! - `foreground`: clients send SUBMIT_JOB and wait for WORK_COMPLETE (`--pipeline 1`, the
//!   default, is one round trip at a time); round trips/s and p50/p99/p999 latency.
//! - `submit-only`: queue background jobs with no worker; submit rate per `--segment` jobs.
//! - `drain`: workers drain what is queued for `--function`; jobs/s.
//! - `http-foreground`, `http-submit-only`: the foreground and submit-only scenarios over HTTP
//!   job submission (`POST /jobs/{function}` on `--http-port`), see `http.rs`.
//! - `otlp-sink`: an HTTP server answering 200 to every POST (an OTLP/HTTP trace receiver that
//!   throws the spans away), counting requests and bytes; `GET /stats` returns the counts.
//!
//! With `--tls-ca FILE` every Gearman connection (clients and workers) speaks TLS (rustls), so
//! the same scenarios measure a TLS listener; see `conn.rs`.
//!
//! Every run ends with one machine-readable line `RESULT key=value ...` (benches/compare.sh
//! reads it). Workers hold one job at a time unless `--worker-pipeline` says otherwise.
//!
//! Files: this one parses the command line and dispatches; `conn.rs` is the Gearman connection
//! (TCP or TLS), `clients.rs` and `workers.rs` the connections' loops, `scenarios.rs` the
//! modes, `stats.rs` rates and CPU accounting, `report.rs` the fields of the RESULT line,
//! `sink.rs` the OTLP sink, `http.rs` the HTTP modes.

mod clients;
mod conn;
mod http;
mod report;
mod scenarios;
mod sink;
mod stats;
mod workers;

use std::io;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::conn::{Conn, Tls};

/// Which scenario to run (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Background,
    Foreground,
    SubmitOnly,
    Drain,
    HttpForeground,
    HttpSubmitOnly,
    OtlpSink,
}

/// The unique ids clients submit with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UniqueMode {
    /// Empty unique ids: no coalescing, no unique index.
    None,
    /// A distinct unique id per job (exercises the unique index).
    Random,
}

// The command line: benches/README.md explains every flag and compare.sh relies on them (a doc
// comment here would become clap's long help).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "Gearman load generator (gearhouse benchmark)"
)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 4730)]
    pub port: u16,
    /// The server's HTTP listener (HTTP modes).
    #[arg(long)]
    pub http_port: Option<u16>,
    #[arg(long, value_enum, default_value = "background")]
    pub mode: Mode,
    /// Jobs in total (split over the clients). Defaults: background 100000, foreground and
    /// http-foreground 20000, submit-only 1000000, http-submit-only 200000, drain: the queue
    /// depth `status` reports for --function.
    #[arg(long)]
    pub jobs: Option<u64>,
    /// Payload bytes per job.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Bytes of the WORK_COMPLETE result (default: the job's payload echoed back).
    #[arg(long)]
    pub result: Option<usize>,
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Outstanding submits per client (default: 100 for background/submit-only, 1 for
    /// foreground and the HTTP modes, i.e. one round trip at a time).
    #[arg(long)]
    pub pipeline: Option<usize>,
    /// GRAB_JOB_UNIQ requests a worker keeps outstanding (1 = a real one-job-at-a-time worker).
    #[arg(long, default_value_t = 1)]
    pub worker_pipeline: usize,
    #[arg(long, default_value = "bench")]
    pub function: String,
    #[arg(long, value_enum, default_value = "none")]
    pub unique: UniqueMode,
    /// Jobs per segment of the submit-only report.
    #[arg(long, default_value_t = 100_000)]
    pub segment: u64,
    /// Foreground only: run for this many seconds instead of a job count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Server process id: report its VmRSS/VmHWM (from /proc) at the end of the run.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Threads of the load generator's runtime (0 = a single-threaded runtime).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Free text copied into the RESULT line (e.g. the server's name).
    #[arg(long, default_value = "-")]
    pub label: String,
    /// TLS: the PEM CA certificate(s) the server's certificate must chain to. Set = every
    /// Gearman connection speaks TLS.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// TLS: a PEM client certificate to present (with --tls-key).
    #[arg(long)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS: the PEM private key of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<std::path::PathBuf>,
    /// TLS: the name the server's certificate must carry (default: --host).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Built from the --tls-* flags once, before the run.
    #[arg(skip)]
    pub tls: Option<Tls>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

fn main() {
    let mut args = Args::parse();
    args.tls = match Tls::from_args(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let rt = if args.threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let timeout = Duration::from_secs(args.timeout);
    let res = rt.block_on(async move {
        match tokio::time::timeout(timeout, run(args)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "run did not finish within --timeout",
            )),
        }
    });
    if let Err(e) = res {
        eprintln!("loadgen: {e}");
        println!("RESULT error={}", e.to_string().replace(' ', "_"));
        std::process::exit(1);
    }
}

async fn run(args: Args) -> io::Result<()> {
    if args.mode != Mode::OtlpSink {
        // One connection first, so a refused connect or a failed TLS handshake ends the run at
        // once with its reason, instead of a worker task failing while the others wait for it.
        drop(connect(&args).await?);
    }
    match args.mode {
        Mode::Background => scenarios::background(&args).await,
        Mode::Foreground => scenarios::foreground(&args).await,
        Mode::SubmitOnly => scenarios::submit_only(&args).await,
        Mode::Drain => scenarios::drain(&args).await,
        Mode::HttpForeground => http::foreground(&args).await,
        Mode::HttpSubmitOnly => http::submit_only(&args).await,
        Mode::OtlpSink => sink::otlp_sink(&args).await,
    }
}

/// One Gearman connection to the server under test (TLS with `--tls-ca`).
async fn connect(args: &Args) -> io::Result<Conn> {
    Conn::connect(args).await
}

/// Queue depth (TOTAL, running included) of `function` from the admin `status` command.
async fn queue_depth(args: &Args, function: &str) -> io::Result<u64> {
    connect(args).await?.queue_depth(function).await
}
