//! Wires configuration, engine, HTTP and the Gearman listener together. The binary and the
//! integration tests both start the server through [`run`], with listeners they bound.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;
use crate::http::{self, Health};
use crate::metrics::Metrics;
use crate::server::{self, Shutdown};

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Persist(#[from] crate::persist::PersistError),
    #[error("tracing: {0}")]
    Telemetry(#[from] crate::telemetry::TelemetryError),
}

/// Runs the server until `shutdown` is cancelled, which starts a graceful stop (see
/// [`run_with`]). Returns once connections are closed.
pub async fn run(
    cfg: Config,
    gearman: TcpListener,
    http_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let stop = Shutdown::on(shutdown);
    run_with(cfg, gearman, http_listener, stop).await
}

/// Runs the server until `stop` drains: recovery (when persistence is on), then the HTTP
/// listener and the Gearman listener; on a drain, running jobs finish (up to
/// `server.shutdown_timeout_ms`) before connections close; `stop.now` skips the wait.
pub async fn run_with(
    cfg: Config,
    gearman: TcpListener,
    http_listener: TcpListener,
    stop: Shutdown,
) -> Result<(), AppError> {
    let shutdown = stop.drain.clone();
    let metrics = Arc::new(Metrics::new(cfg.metrics.max_function_labels));
    let health = Arc::new(Health::default());
    let tracer = crate::telemetry::start(&cfg, &metrics)?;
    // A short operation span: with an endpoint set, the collector learns that this node started
    // (and with which settings) even before any job runs.
    if let Some(t) = &tracer {
        let s = t.settings();
        tracing::info_span!("gearhouse.startup", node_id = %cfg.engine_config().node_id).in_scope(
            || {
                tracing::info!(
                    endpoint = %s.endpoint,
                    sampling = ?s.sampling,
                    "job traces and operation spans go to the collector"
                )
            },
        );
    }
    let observer = tracer
        .clone()
        .map(|t| t as Arc<dyn crate::engine::JobObserver>);
    let persistence = crate::persist::Settings::from_config(&cfg)?
        .map(|s| crate::persist::Persistence::new(s, &metrics.registry));
    let mirror = persistence.as_ref().map(|p| p.mirror());
    let mirror = crate::telemetry::traced_mirror(mirror, &tracer);
    let engine = Engine::new(cfg.engine_config(), metrics, mirror, observer);
    if persistence.is_none() {
        tracing::info!(
            listen = %gearman.local_addr()?,
            http = %http_listener.local_addr()?,
            node_id = %engine.config().node_id,
            "queue is in memory only (no persistence.memcached configured): jobs do not survive a restart"
        );
    }
    let http_task = tokio::spawn(http::serve(
        http_listener,
        engine.clone(),
        health.clone(),
        // Metrics and health stay up while a graceful stop drains.
        stop.now.clone(),
    ));
    if let Some(p) = &persistence {
        // Recovery completes before the Gearman listener accepts anyone.
        // Until it does, clients are refused at once rather than left waiting.
        let started = tokio::select! {
            r = p.start(&engine, health.clone(), shutdown.clone()) => r,
            never = server::refuse_while_recovering(&gearman, &engine) => match never {},
            _ = shutdown.cancelled() => Err(crate::persist::PersistError::Shutdown),
        };
        if let Err(e) = started {
            stop.now();
            p.stop(Duration::ZERO).await;
            let _ = http_task.await;
            return match e {
                crate::persist::PersistError::Shutdown => Ok(()),
                e => Err(e.into()),
            };
        }
        tracing::info!(
            listen = %gearman.local_addr()?,
            node_id = %engine.config().node_id,
            "recovery done: accepting clients"
        );
    }
    health.set_ready(true);
    let server_cfg = Arc::new(cfg.server_config());
    let not_ready = {
        let (health, drain) = (health.clone(), stop.drain.clone());
        tokio::spawn(async move {
            drain.cancelled().await;
            health.set_ready(false);
        })
    };
    server::run(gearman, engine.clone(), server_cfg, stop).await?;
    not_ready.abort();
    if persistence.is_none() {
        let queued = engine.totals().jobs;
        if queued > 0 {
            tracing::warn!(
                jobs = queued,
                "exiting with {queued} jobs in the in-memory queue: they are lost (set persistence.memcached to keep them)"
            );
        }
    }
    let grace = Duration::from_millis(cfg.server.shutdown_timeout_ms);
    if let Some(p) = &persistence {
        p.stop(grace).await;
    }
    let _ = tokio::time::timeout(grace, http_task).await;
    if let Some(t) = tracer {
        let _ = tokio::task::spawn_blocking(move || t.shutdown(grace)).await;
    }
    Ok(())
}
