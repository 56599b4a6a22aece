//! The HTTP listener (axum): `/metrics` for Prometheus, `/healthz` and `/readyz` for
//! orchestrators, and `/api/v1/status` as JSON for people who would rather not parse the admin
//! protocol, which also feeds the status page at `/` ([`page`]). [`functions`]: per-function
//! settings (`/api/v1/functions/{name}`). Job submission (`/jobs/...`, gearmand's
//! `/{function}` paths) lives in `jobs.rs` and `gearmand.rs`; `POST /jobs/{function}` is
//! answered in front of the router ([`front`]).

pub mod access;
pub mod front;
pub mod functions;
pub mod gearmand;
pub mod job_metrics;
pub mod jobs;
mod listener;
mod page;
mod slot;

mod dead_letters;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

pub mod schedules;
use crate::protocol::Priority;

/// Liveness and readiness, shared by the server, the persistence layer and the HTTP handlers.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once recovery has completed and the Gearman port accepts clients.
    ready: AtomicBool,
    /// Why the server cannot take durable writes right now, if it cannot.
    not_durable: Mutex<Option<String>>,
    /// Extra JSON (memcached nodes and their state) provided by the persistence layer.
    persistence: Mutex<Option<serde_json::Value>>,
    /// This node's lease and the takeovers it did (`lease`, `takeovers`), from persist::lease.
    takeover: Mutex<Option<(serde_json::Value, serde_json::Value)>>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Records whether persistence can take writes (`None` = it can).
    pub fn set_not_durable(&self, why: Option<String>) {
        *self.not_durable.lock().expect("health lock") = why;
    }

    pub fn set_persistence_status(&self, v: serde_json::Value) {
        *self.persistence.lock().expect("health lock") = Some(v);
    }

    pub fn set_takeover_status(&self, lease: serde_json::Value, takeovers: serde_json::Value) {
        *self.takeover.lock().expect("health lock") = Some((lease, takeovers));
    }
}

#[derive(Clone)]
struct AppState {
    engine: Engine,
    health: Arc<Health>,
    services: crate::server::Services,
}

/// The HTTP routes, and the job submission that [`front`] answers before them.
fn router(
    engine: Engine,
    health: Arc<Health>,
    jobs: jobs::Settings,
    services: crate::server::Services,
) -> (Router, jobs::Jobs) {
    let submission = jobs::Jobs::new(engine.clone(), health.clone(), jobs, services.cache.clone());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .merge(page::routes())
        .merge(dead_letters::routes())
        .with_state(AppState {
            engine: engine.clone(),
            health,
            services,
        })
        .merge(schedules::routes(engine))
        .merge(jobs::routes(submission.clone()));
    (app, submission)
}

/// Serves the HTTP routes and `more` (the functions API) on an already-bound listener until
/// `shutdown`. Handlers see the peer's address (`ConnectInfo`): job submission and changes are
/// allowed by network (or, for jobs, by token).
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    health: Arc<Health>,
    jobs: jobs::Settings,
    services: crate::server::Services,
    more: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener =
        listener::Bounded::new(listener, jobs.max_connections, &engine.metrics().registry);
    let (app, submission) = router(engine, health, jobs, services);
    let app = app.merge(more);
    axum::serve(listener, front::MakeFront::new(app, submission))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Copies the engine's current state into the scrape-time gauges.
pub fn refresh_gauges(engine: &Engine) {
    let m = engine.metrics();
    let stats = engine.function_stats();
    // Functions folded into `__other__` share a label: sum them.
    let mut by_label: BTreeMap<&str, ([i64; 3], i64, i64)> = BTreeMap::new();
    for f in &stats {
        let e = by_label.entry(f.label.as_str()).or_default();
        for p in 0..3 {
            e.0[p] += f.queued[p] as i64;
        }
        e.1 += f.running as i64;
        e.2 += f.workers as i64;
    }
    m.fn_jobs.reset();
    m.fn_running.reset();
    m.fn_waiting.reset();
    m.fn_workers.reset();
    m.queue_depth.reset();
    for (label, (q, running, workers)) in by_label {
        let waiting: i64 = q.iter().sum();
        m.fn_jobs.with_label_values(&[label]).set(waiting + running);
        m.fn_running.with_label_values(&[label]).set(running);
        m.fn_waiting.with_label_values(&[label]).set(waiting);
        m.fn_workers.with_label_values(&[label]).set(workers);
        for p in Priority::ALL {
            m.queue_depth
                .with_label_values(&[label, p.as_str()])
                .set(q[p as usize]);
        }
    }
    let t = engine.totals();
    m.epoch_jobs_waiting.set(t.epoch_waiting as i64);
    m.queue_entries.set(t.queue_entries as i64);
    m.clients_connected.set(t.clients as i64);
    m.workers_connected.set(t.workers as i64);
}

async fn metrics(State(s): State<AppState>) -> Response {
    refresh_gauges(&s.engine);
    let body = s.engine.metrics().render();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    if !s.health.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: recovery has not completed\n",
        )
            .into_response();
    }
    if let Some(why) = s.health.not_durable.lock().expect("health lock").clone() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn status(State(s): State<AppState>) -> Response {
    Json(status_json(&s)).into_response()
}

/// The body of `/api/v1/status`; the status page renders its first view from it too.
fn status_json(s: &AppState) -> serde_json::Value {
    // Totals since start from the engine's counters, so clients can derive throughput.
    let counts = page::Counts::gather(s.engine.metrics());
    let functions: Vec<serde_json::Value> = s
        .engine
        .function_stats()
        .into_iter()
        .map(|f| {
            serde_json::json!({
                "name": f.name,
                "queued": { "high": f.queued[0], "normal": f.queued[1], "low": f.queued[2] },
                "running": f.running,
                "scheduled": f.scheduled,
                "workers": f.workers,
                "counts": counts.of(&f.label),
                "settings": f.settings,
            })
        })
        .collect();
    let t = s.engine.totals();
    let persistence = s.health.persistence.lock().expect("health lock").clone();
    let (lease, takeovers) = s
        .health
        .takeover
        .lock()
        .expect("health lock")
        .clone()
        .unzip();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node_id": s.engine.config().node_id,
        "ready": s.health.is_ready(),
        "jobs": t.jobs,
        "connections": t.connections,
        "clients": t.clients,
        "workers": t.workers,
        "counts": counts.total(),
        "functions": functions,
        "persistence": persistence.unwrap_or(serde_json::json!({ "enabled": false })),
        "lease": lease,
        "takeovers": takeovers.unwrap_or(serde_json::json!([])),
    })
}
