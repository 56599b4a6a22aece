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
    #[error("result cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
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
    let parts = build(&cfg)?;
    if parts.persistence.is_none() {
        tracing::info!(
            listen = %gearman.local_addr()?,
            http = %http_listener.local_addr()?,
            node_id = %parts.engine.config().node_id,
            "queue is in memory only (no persistence.memcached configured): jobs do not survive a restart"
        );
    }
    let http_task = tokio::spawn(http::serve(
        http_listener,
        parts.engine.clone(),
        parts.health.clone(),
        parts.services.clone(),
        // Metrics and health stay up while a graceful stop drains.
        stop.now.clone(),
    ));
    if let Some(p) = &parts.persistence {
        if let Err(e) = recover(p, &parts, &gearman, &stop).await {
            stop.now();
            p.stop(Duration::ZERO).await;
            let _ = http_task.await;
            return match e {
                crate::persist::PersistError::Shutdown => Ok(()),
                e => Err(e.into()),
            };
        }
    }
    if let Some(d) = &parts.services.dead_letters {
        d.restore_until_done(&stop.drain).await;
    }
    serve(&cfg, &parts, gearman, stop).await?;
    finish(&cfg, parts, http_task).await;
    Ok(())
}

/// What one server is made of.
struct Parts {
    engine: Engine,
    health: Arc<Health>,
    persistence: Option<crate::persist::Persistence>,
    tracer: Option<Arc<crate::telemetry::JobTracer>>,
    services: server::Services,
}

/// The engine's one outcome sink: each ended job goes to the result cache and the dead-letter
/// store, which each keep what concerns them.
struct Outcomes {
    cache: Arc<crate::cache::Cache>,
    dead_letters: Arc<crate::dead_letters::DeadLetters>,
}

impl crate::engine::OutcomeSink for Outcomes {
    fn ended(&self, job: &crate::engine::EndedJob<'_>) {
        self.cache.ended(job);
        self.dead_letters.ended(job);
    }
}

/// Metrics, job tracing, the durable mirror and the engine, wired together.
fn build(cfg: &Config) -> Result<Parts, AppError> {
    let metrics = Arc::new(Metrics::new(cfg.metrics.max_function_labels));
    let tracer = crate::telemetry::start(cfg, &metrics)?;
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
    let persistence = crate::persist::Settings::from_config(cfg)?
        .map(|s| crate::persist::Persistence::new(s, &metrics.registry));
    let mirror = persistence.as_ref().map(|p| p.mirror());
    let mirror = crate::telemetry::traced_mirror(mirror, &tracer);
    // The server's own state beside the queue (cached results, dead letters) lives in the
    // same memcached cluster, through the plain key-value store.
    let kv = crate::persist::Settings::from_config(cfg)?
        .map(|s| Arc::new(crate::persist::kv::Kv::from_settings(&s)));
    let cache = crate::cache::Cache::start(cfg, kv.clone(), &metrics.registry)?;
    let dead_letters = crate::dead_letters::DeadLetters::start(cfg, kv, &metrics.registry);
    let engine = Engine::new(cfg.engine_config(), metrics, mirror, observer);
    engine.set_outcome_sink(Arc::new(Outcomes {
        cache: cache.clone(),
        dead_letters: dead_letters.clone(),
    }));
    Ok(Parts {
        engine,
        health: Arc::new(Health::default()),
        persistence,
        tracer,
        services: server::Services {
            cache: Some(cache),
            dead_letters: Some(dead_letters),
        },
    })
}

/// Reads the durable queue back before the Gearman listener accepts anyone; until then,
/// clients are refused at once rather than left waiting.
async fn recover(
    p: &crate::persist::Persistence,
    parts: &Parts,
    gearman: &TcpListener,
    stop: &Shutdown,
) -> Result<(), crate::persist::PersistError> {
    let drain = &stop.drain;
    tokio::select! {
        r = p.start(&parts.engine, parts.health.clone(), drain.clone()) => r?,
        never = server::refuse_while_recovering(gearman, &parts.engine) => match never {},
        _ = drain.cancelled() => return Err(crate::persist::PersistError::Shutdown),
    };
    let listen = gearman
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(
        %listen,
        node_id = %parts.engine.config().node_id,
        "recovery done: accepting clients"
    );
    Ok(())
}

/// Serves Gearman until the stop is over; `/readyz` says 503 from the moment a drain begins.
async fn serve(
    cfg: &Config,
    parts: &Parts,
    gearman: TcpListener,
    stop: Shutdown,
) -> std::io::Result<()> {
    parts.health.set_ready(true);
    let not_ready = {
        let (health, drain) = (parts.health.clone(), stop.drain.clone());
        tokio::spawn(async move {
            drain.cancelled().await;
            health.set_ready(false);
        })
    };
    let server_cfg = Arc::new(cfg.server_config());
    let served = server::run(
        gearman,
        parts.engine.clone(),
        server_cfg,
        parts.services.clone(),
        stop,
    )
    .await;
    not_ready.abort();
    served
}

/// After the last connection closed: says what an in-memory queue loses, flushes the mirror,
/// the HTTP listener and the job traces, each within `server.shutdown_timeout_ms`.
async fn finish(
    cfg: &Config,
    parts: Parts,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
) {
    if parts.persistence.is_none() {
        let queued = parts.engine.totals().jobs;
        if queued > 0 {
            tracing::warn!(
                jobs = queued,
                "exiting with {queued} jobs in the in-memory queue: they are lost (set persistence.memcached to keep them)"
            );
        }
    }
    let grace = Duration::from_millis(cfg.server.shutdown_timeout_ms);
    if let Some(p) = &parts.persistence {
        p.stop(grace).await;
    }
    let _ = tokio::time::timeout(grace, http_task).await;
    if let Some(t) = parts.tracer {
        let _ = tokio::task::spawn_blocking(move || t.shutdown(grace)).await;
    }
}
