//! `/api/v1/dead-letters`: list the dead letters (`?function=` to filter), retry one (it is
//! submitted again as a background job and removed) or delete one. Listing is open like the
//! rest of the status API; retry and delete change state, so like the admin commands that do,
//! they are accepted only from `server.admin_networks` (403 otherwise).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::AppState;
use crate::dead_letters::{DeadLetterError, DeadLetters, Listed};

/// The dead-letter routes, merged into the server's router.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/dead-letters", get(list))
        .route("/api/v1/dead-letters/{id}/retry", post(retry))
        .route("/api/v1/dead-letters/{id}", delete(remove))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    function: Option<String>,
}

fn error(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": why.into() }))).into_response()
}

/// Why a request is refused before it reaches the store: a status and a message.
type Refusal = (StatusCode, String);

fn refused((status, why): Refusal) -> Response {
    error(status, why)
}

fn store(s: &AppState) -> Result<&Arc<DeadLetters>, Refusal> {
    s.services.dead_letters.as_ref().ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            "this server keeps no dead letters".to_string(),
        )
    })
}

/// The store, for a caller in `server.admin_networks` only.
fn store_for_admin<'a>(
    s: &'a AppState,
    peer: SocketAddr,
    what: &str,
) -> Result<&'a Arc<DeadLetters>, Refusal> {
    let d = store(s)?;
    if crate::admin::is_admin(peer.ip(), &d.admin_networks) {
        Ok(d)
    } else {
        Err((
            StatusCode::FORBIDDEN,
            format!("{what} is accepted only from server.admin_networks"),
        ))
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(l: &Listed) -> serde_json::Value {
    let d = &l.letter;
    serde_json::json!({
        "id": d.id,
        "function": text(&d.function),
        "handle": text(&d.handle),
        "unique": text(&d.unique),
        // Payloads are bytes; shown as text (invalid UTF-8 replaced), with their exact length.
        "payload": text(&d.payload),
        "payload_bytes": d.payload.len(),
        "priority": d.priority.as_str(),
        "background": d.background,
        "attempts": d.attempts,
        "worker": d.worker,
        "reason": d.reason.as_str(),
        "exception": text(&d.exception),
        "time": d.at_unix,
        "persisted": l.persisted,
    })
}

async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let d = match store(&s) {
        Ok(d) => d,
        Err(r) => return refused(r),
    };
    let letters: Vec<serde_json::Value> = d
        .list(q.function.as_deref().map(str::as_bytes))
        .iter()
        .map(json)
        .collect();
    Json(serde_json::json!({ "dead_letters": letters })).into_response()
}

async fn retry(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<u64>,
) -> Response {
    let d = match store_for_admin(&s, peer, "retrying a dead letter") {
        Ok(d) => d,
        Err(r) => return refused(r),
    };
    match d.retry(&s.engine, id, peer).await {
        Ok(handle) => {
            Json(serde_json::json!({ "id": id, "handle": text(&handle) })).into_response()
        }
        Err(e @ DeadLetterError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn remove(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<u64>,
) -> Response {
    let d = match store_for_admin(&s, peer, "deleting a dead letter") {
        Ok(d) => d,
        Err(r) => return refused(r),
    };
    match d.delete(id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}
