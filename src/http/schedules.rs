//! `/api/v1/schedules`: recurring schedules over HTTP. `GET` lists them (with the next due time
//! and the last run); `POST` (a JSON [`ScheduleSpec`]) adds one and `DELETE /{id}` removes one,
//! both only from `server.admin_networks` (else 403), like the admin commands that change state.
//! The scheduler starts after recovery: until then these answer 503.

use std::net::SocketAddr;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use bytes::Bytes;

use crate::engine::Engine;
use crate::schedule::{ScheduleError, ScheduleSpec, Scheduler};

/// The schedule routes, with the engine as state (its scheduler is looked up per request).
pub fn routes(engine: Engine) -> Router {
    Router::new()
        .route("/api/v1/schedules", get(list).post(create))
        .route("/api/v1/schedules/{id}", delete(remove))
        .with_state(engine)
}

fn error(code: StatusCode, why: impl std::fmt::Display) -> Response {
    (code, Json(serde_json::json!({ "error": why.to_string() }))).into_response()
}

fn scheduler(engine: &Engine) -> Result<Scheduler, Response> {
    Scheduler::for_engine(engine).ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler starts once recovery has completed",
        )
    })
}

/// Refuses a change from outside `server.admin_networks` (or from an unknown peer).
fn admin_only(s: &Scheduler, ext: &Extensions) -> Result<(), Response> {
    let peer = ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    match peer {
        Some(p) if crate::admin::is_admin(p.ip(), s.admin_networks()) => Ok(()),
        _ => Err(error(
            StatusCode::FORBIDDEN,
            "schedules are changed only from server.admin_networks",
        )),
    }
}

fn status_of(e: &ScheduleError) -> StatusCode {
    match e {
        ScheduleError::Invalid(_) => StatusCode::BAD_REQUEST,
        ScheduleError::Duplicate(_) => StatusCode::CONFLICT,
        ScheduleError::NotFound(_) => StatusCode::NOT_FOUND,
        ScheduleError::TooMany { .. } => StatusCode::INSUFFICIENT_STORAGE,
        ScheduleError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn list(State(engine): State<Engine>) -> Response {
    match scheduler(&engine) {
        Ok(s) => Json(serde_json::json!({ "schedules": s.list() })).into_response(),
        Err(r) => r,
    }
}

async fn create(State(engine): State<Engine>, ext: Extensions, body: Bytes) -> Response {
    let s = match scheduler(&engine) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = admin_only(&s, &ext) {
        return r;
    }
    // Parsed here rather than by axum's Json so the 400 says which field is wrong.
    let spec: ScheduleSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be JSON {{\"id\", \"cron\", \"function\", \"payload\", \"priority\", \"unique\"}}: {e}"),
            )
        }
    };
    match s.add(spec).await {
        Ok(view) => (StatusCode::CREATED, Json(view)).into_response(),
        Err(e) => error(status_of(&e), e),
    }
}

async fn remove(State(engine): State<Engine>, ext: Extensions, Path(id): Path<String>) -> Response {
    let s = match scheduler(&engine) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = admin_only(&s, &ext) {
        return r;
    }
    match s.remove(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(status_of(&e), e),
    }
}
