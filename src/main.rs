//! The `gearhouse` binary: parses the command line, sets up logging, binds the listeners and
//! runs the server until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use gearhouse::config::Config;

#[derive(Parser)]
#[command(
    name = "gearhouse",
    version,
    about = "A Gearman job server: drop-in for gearmand, durable and observable"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Move a dead node's durable queue from memcached into a running server, once.
    Recover(RecoverArgs),
}

#[derive(clap::Args)]
struct RecoverArgs {
    /// Node id of the dead server whose queue is moved.
    #[arg(long)]
    from_node: String,
    /// memcached nodes holding the queue, host:port[,host:port...].
    #[arg(long, value_delimiter = ',', required = true)]
    memcached: Vec<String>,
    /// Key namespace the dead server used [persistence.namespace].
    #[arg(long, default_value = "gearhouse")]
    namespace: String,
    /// Gearman address of the running server that receives the jobs.
    #[arg(long, default_value = "127.0.0.1:4730")]
    server: String,
    /// Copies the dead server kept (persistence.replicas); 0 = 2 with two or more nodes, else 1.
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// Submits in flight at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Name recorded in the takeover lock key.
    #[arg(long, default_value = "gearhouse-recover")]
    owner: String,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (default: config/default.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Gearman listen address [config: server.listen, default 0.0.0.0:4730].
    #[arg(long)]
    listen: Option<String>,
    /// HTTP listen address for /metrics, /healthz, /readyz, /api/v1/status [config: http.listen, default 127.0.0.1:4731].
    #[arg(long)]
    http: Option<String>,
    /// Log level: error, warn, info, debug, trace, or a tracing filter [config: log.level].
    #[arg(long)]
    log_level: Option<String>,
    /// Node id used in job handles and memcached keys [config: engine.node_id, default: host name].
    #[arg(long)]
    node_id: Option<String>,
    /// Attempts after which a job is dropped with WORK_FAIL, 0 = never [config: engine.job_retries].
    #[arg(long)]
    job_retries: Option<u32>,
    /// memcached nodes for the durable queue, host:port[,host:port...] [config: persistence.memcached].
    #[arg(long)]
    memcached: Option<String>,
}

fn overrides(a: &ServeArgs) -> Vec<(&'static str, String)> {
    let mut o = Vec::new();
    let mut put = |k: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            o.push((k, v.clone()));
        }
    };
    put("server.listen", &a.listen);
    put("http.listen", &a.http);
    put("log.level", &a.log_level);
    put("engine.node_id", &a.node_id);
    put("engine.job_retries", &a.job_retries.map(|v| v.to_string()));
    put("persistence.memcached", &a.memcached);
    o
}

async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        let mut s = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        s.recv().await;
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
        _ = token.cancelled() => {}
    }
    token.cancel();
}

fn recover(a: RecoverArgs) -> anyhow::Result<()> {
    let mut log = gearhouse::config::Config::default().log;
    if let Ok(l) = std::env::var("GEARHOUSE_LOG__LEVEL") {
        log.level = l;
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Recover(a) => recover(a),
        Command::Serve(args) => {
            let file = args.config.clone().or_else(|| {
                let d = PathBuf::from("config/default.toml");
                d.exists().then_some(d)
            });
            let cfg = Config::load(file.as_deref(), &overrides(&args))?;
            // Logging plus the export of the server's own `gearhouse.*` spans; an unusable
            // OTEL_* setting stops the server here, naming the variable.
            let _operation_spans = gearhouse::telemetry::init_logging_and_tracing(&cfg)?;
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if cfg.server.worker_threads > 0 {
                rt.worker_threads(cfg.server.worker_threads);
            }
            let rt = rt.enable_all().build()?;
            rt.block_on(async move {
                let gearman = TcpListener::bind(&cfg.server.listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {} (server.listen / --listen)",
                            cfg.server.listen
                        )
                    })?;
                let http = TcpListener::bind(&cfg.http.listen).await.with_context(|| {
                    format!(
                        "cannot listen on {} (http.listen / --http)",
                        cfg.http.listen
                    )
                })?;
                let token = CancellationToken::new();
                tokio::spawn(shutdown_signal(token.clone()));
                gearhouse::app::run(cfg, gearman, http, token).await?;
                tracing::info!("stopped");
                anyhow::Ok(())
            })
        }
    }
}
