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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let file = args.config.clone().or_else(|| {
                let d = PathBuf::from("config/default.toml");
                d.exists().then_some(d)
            });
            let cfg = Config::load(file.as_deref(), &overrides(&args))?;
            gearhouse::telemetry::init_logging(&cfg.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
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
