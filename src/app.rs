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
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
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
    let plain = match cfg.server.plain_listen.as_str() {
        "" => None,
        addr => Some(TcpListener::bind(addr).await?),
    };
    run_listeners(cfg, gearman, plain, http_listener, stop).await
}

/// As [`run_with`], with `server.plain_listen`'s listener (beside a TLS `gearman` one) bound
/// by the caller, as the binary does before it drops privileges.
pub async fn run_listeners(
    cfg: Config,
    gearman: TcpListener,
    plain: Option<TcpListener>,
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
    let functions_api = http::functions::FunctionsApi::new(
        parts.engine.clone(),
        parts.settings.clone(),
        cfg.server_config().admin_networks.clone(),
    );
    let http_task = tokio::spawn(http::serve(
        http_listener,
        parts.engine.clone(),
        parts.health.clone(),
        http::jobs::Settings::from_config(&cfg),
        parts.services.clone(),
        http::functions::routes(functions_api),
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
    if let Some(s) = &parts.settings {
        // Run-time settings over the config file's, once the queue (and its functions) is back.
        s.restore(&parts.engine).await;
        s.start(&parts.engine, stop.now.clone());
    }
    // After recovery, so its first submits (runs missed while down) find the queue restored.
    let _scheduler =
        crate::schedule::Scheduler::start(&cfg, &parts.engine, stop.drain.clone()).await;
    if let Some(d) = &parts.services.dead_letters {
        d.restore_until_done(&stop.drain).await;
    }
    serve(&cfg, &parts, gearman, plain, stop).await?;
    finish(&cfg, parts, http_task).await;
    Ok(())
}

/// What one server is made of.
struct Parts {
    engine: Engine,
    health: Arc<Health>,
    persistence: Option<crate::persist::Persistence>,
    /// Run-time per-function settings kept in memcached (with persistence only).
    settings: Option<crate::functions::persist::SettingsMirror>,
    tracer: Option<Arc<crate::telemetry::JobTracer>>,
    /// TLS of the Gearman listener, when `server.tls_cert` is set.
    tls: Option<Arc<crate::tls::Tls>>,
    services: server::Services,
}

/// The engine's one outcome sink: each ended job goes to the result cache and the dead-letter
/// store, which each keep what concerns them.
struct Outcomes {
    cache: Arc<crate::cache::Cache>,
    dead_letters: Arc<crate::dead_letters::DeadLetters>,
}

/// Keeps the result cache's TTLs in step with run-time changes of `cache_ttl_s` (admin `limit`
/// does not set it; `PUT /api/v1/functions/{name}` does).
struct CacheTtls {
    engine: Engine,
    cache: Arc<crate::cache::Cache>,
}

impl crate::engine::SettingsSink for CacheTtls {
    fn changed(&self, function: &str) {
        let ttl = self
            .engine
            .function_settings(function)
            .map_or(0, |f| f.settings.cache_ttl_s);
        if let Err(e) = self.cache.set_ttl(function.as_bytes(), ttl) {
            tracing::error!(function, error = %e, "cache_ttl_s changed at run time but not applied");
        }
    }
}

impl crate::engine::OutcomeSink for Outcomes {
    fn ended(&self, job: &crate::engine::EndedJob<'_>) {
        self.cache.ended(job);
        self.dead_letters.ended(job);
    }
}

/// Metrics, job tracing, the durable mirror and the engine, wired together.
fn build(cfg: &Config) -> Result<Parts, AppError> {
    // Certificates first: a bad file stops the server before anything else starts.
    let tls = match cfg.tls_files() {
        Some(f) => Some(Arc::new(crate::tls::Tls::load(f)?)),
        None => None,
    };
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
    if let Some(p) = &persistence {
        p.set_dead_letters(dead_letters.clone());
    }
    let engine = Engine::new(cfg.engine_config(), metrics, mirror, observer);
    let settings = persistence
        .as_ref()
        .map(|p| crate::functions::persist::SettingsMirror::new(&p.settings));
    engine.set_settings_sink(Arc::new(CacheTtls {
        engine: engine.clone(),
        cache: cache.clone(),
    }));
    engine.set_outcome_sink(Arc::new(Outcomes {
        cache: cache.clone(),
        dead_letters: dead_letters.clone(),
    }));
    let takeover = persistence.as_ref().map(|p| p.takeover_requests());
    Ok(Parts {
        engine,
        health: Arc::new(Health::default()),
        persistence,
        settings,
        tracer,
        tls,
        services: server::Services {
            cache: Some(cache),
            dead_letters: Some(dead_letters),
            takeover,
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
    plain: Option<TcpListener>,
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
    let mut listeners = vec![server::Listener {
        socket: gearman,
        tls: parts.tls.clone(),
    }];
    listeners.extend(plain.map(server::Listener::plain));
    let reload = tokio::spawn(reload_on_sighup(
        parts.tls.clone(),
        parts.engine.metrics().clone(),
    ));
    let served = server::run_listeners(
        listeners,
        parts.engine.clone(),
        server_cfg,
        parts.services.clone(),
        stop,
    )
    .await;
    reload.abort();
    not_ready.abort();
    served
}

/// Reads the TLS certificate and key again on each SIGHUP; a reload that fails keeps the
/// previous ones (logged and counted).
async fn reload_on_sighup(tls: Option<Arc<crate::tls::Tls>>, metrics: Arc<Metrics>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::info!("SIGHUP: nothing to reload (no server.tls_cert)");
            continue;
        };
        match tls.reload() {
            Ok(()) => {
                metrics.tls_reloads.with_label_values(&["ok"]).inc();
                tracing::info!("SIGHUP: TLS certificate and key reloaded");
            }
            Err(e) => {
                metrics.tls_reloads.with_label_values(&["failed"]).inc();
                tracing::error!(error = %e, "SIGHUP: TLS reload failed; the previous certificate stays in use");
            }
        }
    }
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
