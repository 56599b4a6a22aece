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
use crate::server;

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

/// Runs the server until `shutdown` is cancelled: recovery (when persistence is on), then the
/// HTTP listener and the Gearman listener. Returns once connections are closed.
pub async fn run(
    cfg: Config,
    gearman: TcpListener,
    http_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
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
        shutdown.clone(),
    ));
    if let Some(p) = &persistence {
        // Recovery completes before the Gearman listener accepts anyone.
        let started = tokio::select! {
            r = p.start(&engine, health.clone(), shutdown.clone()) => r,
            _ = shutdown.cancelled() => Err(crate::persist::PersistError::Shutdown),
        };
        if let Err(e) = started {
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
    server::run(gearman, engine, server_cfg, shutdown.clone()).await?;
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
