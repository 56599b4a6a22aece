//! The `gearhouse` binary: parses the command line (gearhouse's, or gearmand's when started
//! as `gearmand`), sets up logging, binds the listeners and runs the server until SIGTERM or
//! Ctrl-C. Errors print once as `gearhouse: <message>`; configuration errors exit 2, failures
//! while running exit 1.

use std::process::ExitCode;
use std::time::Duration;

use tokio::net::TcpListener;

use gearhouse::cli::process::{self, PidFile, ProcessError};
use gearhouse::cli::{self as cli, Command, RecoverArgs, ServeArgs};
use gearhouse::config::Config;
use gearhouse::server::Shutdown;

/// Exit status of a configuration error (as clap's usage errors).
const CONFIG_ERROR: u8 = 2;
/// Exit status of a failure while starting or running.
const RUNTIME_ERROR: u8 = 1;

/// Prints `err` once: its message, then each cause whose text the message does not already
/// carry (thiserror's `{0}` wrappers repeat their source).
fn fail(code: u8, err: &(dyn std::error::Error + 'static)) -> ExitCode {
    let mut msg = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg = format!("{msg}: {text}");
        }
        cause = c.source();
    }
    eprintln!("gearhouse: {msg}");
    ExitCode::from(code)
}

/// The first SIGTERM or Ctrl-C starts a graceful stop (running jobs finish, up to
/// `server.shutdown_timeout_ms`); a second one stops at once.
async fn shutdown_signal(stop: Shutdown) {
    let mut signals = Signals::new();
    tokio::select! {
        s = signals.next() => tracing::info!("{s}: shutting down gracefully (send it again to stop at once)"),
        _ = stop.drain.cancelled() => {}
    }
    process::sd_notify("STOPPING=1");
    stop.drain();
    tokio::select! {
        s = signals.next() => tracing::warn!("{s} again: stopping at once"),
        _ = stop.now.cancelled() => {}
    }
    stop.now();
}

/// SIGTERM and Ctrl-C, as one stream.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Signals {
        Signals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler"),
        }
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        let term = self.term.recv();
        #[cfg(not(unix))]
        let term = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
            _ = term => "SIGTERM",
        }
    }
}

fn recover(a: RecoverArgs) -> anyhow::Result<()> {
    let mut log = gearhouse::config::Config::default().log;
    if let Ok(l) = std::env::var("GEARHOUSE_LOG__LEVEL") {
        log.level = gearhouse::config::normalize_level(&l)?;
    }
    gearhouse::telemetry::init_logging(&log);
    let replicas = if a.replicas == 0 {
        if a.memcached.len() >= 2 {
            2
        } else {
            1
        }
    } else {
        a.replicas
    };
    let t = gearhouse::persist::takeover::RemoteTakeover {
        memcached: a.memcached,
        namespace: a.namespace,
        from_node: a.from_node.clone(),
        server: a.server,
        owner: a.owner,
        replicas,
        parallel: a.parallel,
        timeout: std::time::Duration::from_secs(30),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // First ask the server to take the node over itself (jobs keep their handles, dead letters
    // move); only a server that cannot gets the jobs through the protocol.
    use gearhouse::persist::on_request::{ask_server, Answer, TakeoverAsk};
    let ask = TakeoverAsk {
        node: a.from_node.clone(),
        namespace: Some(t.namespace.clone()),
        memcached: Some(t.memcached.clone()),
    };
    let asked = rt.block_on(ask_server(
        &t.server,
        &ask,
        std::time::Duration::from_secs(a.takeover_timeout_s),
    ));
    match asked {
        Ok(Answer::Done(text)) => {
            println!("{text} (into {}, by the server itself)", t.server);
            return Ok(());
        }
        Ok(Answer::Refused(line)) => anyhow::bail!("the server at {} refused: {line}", t.server),
        Ok(Answer::Fallback(line)) => tracing::warn!(
            "the server at {} cannot take node {} over itself ({line}): moving the jobs through the Gearman protocol (they get new handles; dead letters stay in memcached)",
            t.server,
            a.from_node
        ),
        Err(e) => anyhow::bail!("cannot ask the gearhouse server at {}: {e}", t.server),
    }
    let sum = rt.block_on(gearhouse::persist::takeover::recover_into_server(&t))?;
    println!(
        "moved {} jobs of node {} into {} ({} refused)",
        sum.moved, a.from_node, t.server, sum.refused
    );
    if sum.refused > 0 {
        anyhow::bail!(
            "{} jobs were refused and stay in memcached: run the command again",
            sum.refused
        );
    }
    Ok(())
}

/// `gearhouse config`: the effective configuration and where each value came from.
fn show_config(args: ServeArgs) -> ExitCode {
    let loaded = match cli::load(&args) {
        Ok(l) => l,
        Err(e) => return fail(CONFIG_ERROR, &e),
    };
    let env = std::env::vars().collect();
    match cli::show::entries(&loaded, &env) {
        Ok(e) => {
            print!("{}", cli::show::render(&loaded, &e));
            ExitCode::SUCCESS
        }
        Err(e) => fail(CONFIG_ERROR, &e),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let loaded = match cli::load(&args) {
        Ok(l) => l,
        Err(e) => return fail(CONFIG_ERROR, &e),
    };
    let cfg = loaded.config;
    // Before logging starts, so the log file gets every line (and panics).
    if let Err(e) = process::redirect_stderr(&cfg.log.file) {
        return fail(CONFIG_ERROR, &e);
    }
    // Logging, plus the export of the server's own `gearhouse.*` spans; an unusable OTEL_*
    // setting stops the server here, naming the variable. The span exporter runs threads, and
    // threads do not survive the fork of `-d`: a daemon checks the settings but exports no
    // operation spans (job traces start after the fork and are unaffected).
    let _operation_spans = if args.daemon {
        let checked =
            gearhouse::telemetry::TraceSettings::resolve(&cfg.tracing, |k| std::env::var(k).ok());
        if let Err(e) = checked {
            return fail(CONFIG_ERROR, &e);
        }
        gearhouse::telemetry::init_logging(&cfg.log);
        tracing::info!("-d: operation spans are not exported (run under systemd to keep them)");
        None
    } else {
        match gearhouse::telemetry::init_logging_and_tracing(&cfg) {
            Ok(t) => Some(t),
            Err(e) => return fail(CONFIG_ERROR, &e),
        }
    };
    match &loaded.file {
        Some(f) => tracing::info!(file = %f.display(), "configuration file read"),
        None => tracing::info!(
            "no configuration file ({} does not exist, no --config): built-in defaults",
            cli::SYSTEM_CONFIG
        ),
    }
    for note in &loaded.notes {
        tracing::info!("{note}");
    }
    match run(cfg, args.daemon) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Process(e @ ProcessError::User { .. })) => fail(CONFIG_ERROR, &e),
        Err(Failure::Process(e)) => fail(RUNTIME_ERROR, &e),
        Err(Failure::Run(e)) => fail(RUNTIME_ERROR, e.as_ref()),
    }
}

enum Failure {
    Process(ProcessError),
    Run(anyhow::Error),
}

impl From<ProcessError> for Failure {
    fn from(e: ProcessError) -> Self {
        Failure::Process(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Run(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Run(e.into())
    }
}

/// Binds, detaches, writes the pid file and drops root while the process has one thread, then
/// starts the runtime and serves until stopped.
fn run(cfg: Config, daemon: bool) -> Result<(), Failure> {
    let retry = Duration::from_millis(cfg.server.bind_retry_ms);
    let gearman = process::bind(
        &cfg.server.listen,
        "server.listen / -L / -p",
        retry,
        Some(cfg.server.backlog),
    )?;
    let http = process::bind(&cfg.http.listen, "http.listen / --http", retry, None)?;
    let plain = match cfg.server.plain_listen.as_str() {
        "" => None,
        addr => Some(process::bind(
            addr,
            "server.plain_listen / --plain-listen",
            retry,
            Some(cfg.server.backlog),
        )?),
    };
    if daemon {
        process::daemonize()?;
    }
    let pid_file = match cfg.server.pid_file.as_str() {
        "" => None,
        p => Some(PidFile::create(p)?),
    };
    if !cfg.server.user.is_empty() {
        process::switch_user(&cfg.server.user)?;
        tracing::info!(user = %cfg.server.user, "switched user");
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.server.worker_threads > 0 {
        rt.worker_threads(cfg.server.worker_threads);
    }
    let rt = rt.enable_all().build()?;
    let r = rt.block_on(async move {
        let gearman = TcpListener::from_std(gearman)?;
        let http = TcpListener::from_std(http)?;
        let plain = plain.map(TcpListener::from_std).transpose()?;
        let ready = tokio::spawn(process::notify_when_ready(http.local_addr()?));
        let stop = Shutdown::default();
        tokio::spawn(shutdown_signal(stop.clone()));
        let r = gearhouse::app::run_listeners(cfg, gearman, plain, http, stop).await;
        ready.abort();
        r?;
        tracing::info!("stopped");
        anyhow::Ok(())
    });
    drop(rt);
    drop(pid_file);
    Ok(r?)
}

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => return fail(CONFIG_ERROR, &e),
    };
    match cli.command {
        Command::Recover(a) => match recover(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(RUNTIME_ERROR, e.as_ref()),
        },
        Command::Import(a) => match gearhouse::import::run(&a) {
            Ok(sum) if sum.complete() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(RUNTIME_ERROR),
            Err(e) => fail(RUNTIME_ERROR, &e),
        },
        Command::Config(args) => show_config(args),
        Command::Serve(args) => serve(args),
    }
}
