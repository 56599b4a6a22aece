//! `/api/v1/schedules`: recurring schedules over HTTP. `GET` lists them as a JSON array (with
//! the next due time and the last run, RFC 3339 and Unix seconds; the status page reads it); `POST` (a JSON [`ScheduleSpec`]) adds one and `DELETE /{id}` removes one,
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

/// A refusal: the status and a JSON `{"error": why}` body.
struct ApiError {
    code: StatusCode,
    why: String,
}

impl ApiError {
    fn new(code: StatusCode, why: impl std::fmt::Display) -> ApiError {
        ApiError {
            code,
            why: why.to_string(),
        }
    }
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> ApiError {
        let code = match e {
            ScheduleError::Invalid(_) => StatusCode::BAD_REQUEST,
            ScheduleError::Duplicate(_) => StatusCode::CONFLICT,
            ScheduleError::NotFound(_) => StatusCode::NOT_FOUND,
            ScheduleError::TooMany { .. } => StatusCode::INSUFFICIENT_STORAGE,
            ScheduleError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(code, e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.why }));
        (self.code, body).into_response()
    }
}

fn scheduler(engine: &Engine) -> Result<Scheduler, ApiError> {
    Scheduler::for_engine(engine).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler starts once recovery has completed",
        )
    })
}

/// Refuses a change from outside `server.admin_networks` (or from an unknown peer).
fn admin_only(s: &Scheduler, ext: &Extensions) -> Result<(), ApiError> {
    let peer = ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    match peer {
        Some(p) if crate::admin::is_admin(p.ip(), s.admin_networks()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "schedules are changed only from server.admin_networks",
        )),
    }
}

async fn list(State(engine): State<Engine>) -> Result<Response, ApiError> {
    let s = scheduler(&engine)?;
    Ok(Json(s.list()).into_response())
}

async fn create(
    State(engine): State<Engine>,
    ext: Extensions,
    body: Bytes,
) -> Result<Response, ApiError> {
    let s = scheduler(&engine)?;
    admin_only(&s, &ext)?;
    // Parsed here rather than by axum's Json so the 400 says which field is wrong.
    let spec: ScheduleSpec = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("body must be JSON {{\"id\", \"cron\", \"function\", \"payload\", \"priority\", \"unique\"}}: {e}"),
        )
    })?;
    let view = s.add(spec).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn remove(
    State(engine): State<Engine>,
    ext: Extensions,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = scheduler(&engine)?;
    admin_only(&s, &ext)?;
    s.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
