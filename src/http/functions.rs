//! `GET /api/v1/functions/{name}` and `PUT /api/v1/functions/{name}`: one function's settings
//! over HTTP, for tools that would rather not speak the admin protocol.
//!
//! GET answers the settings in force, the keys changed at run time and what the limits held
//! back so far (404 for a function the server does not know). PUT takes JSON with any subset of
//! `max_queue`, `rate`, `burst`, `max_running`, `cache_ttl_s`, `dead_letter` (unknown keys are
//! refused), applies it at run time (creating the function if needed) and answers as GET does,
//! plus `persisted`: the answer comes once memcached has the change, or says why it does not
//! (the change is in force and retried). PUT changes state, so it is accepted only from
//! `server.admin_networks` (403 otherwise) and runs in a `gearhouse.admin` span like the admin
//! commands.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ipnet::IpNet;
use serde_json::json;

use crate::engine::Engine;
use crate::functions::persist::SettingsMirror;
use crate::functions::FunctionSettings;

/// What the handlers need: the engine, the settings mirror (if persistence is on) and who may
/// change settings.
#[derive(Clone)]
pub struct FunctionsApi {
    engine: Engine,
    mirror: Option<SettingsMirror>,
    admin_networks: Arc<Vec<IpNet>>,
}

impl FunctionsApi {
    /// The API over `engine`; `mirror` keeps run-time changes (None = memory only).
    pub fn new(
        engine: Engine,
        mirror: Option<SettingsMirror>,
        admin_networks: Vec<IpNet>,
    ) -> FunctionsApi {
        FunctionsApi {
            engine,
            mirror,
            admin_networks: Arc::new(admin_networks),
        }
    }
}

/// The routes, to merge into the HTTP router. PUT needs the peer address: serve the router
/// with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn routes<S>(api: FunctionsApi) -> Router<S> {
    Router::new()
        .route(
            "/api/v1/functions/{name}",
            get(get_function).put(put_function),
        )
        .with_state(api)
}

fn error(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(json!({ "error": why.into() }))).into_response()
}

async fn get_function(State(api): State<FunctionsApi>, Path(name): Path<String>) -> Response {
    match api.engine.function_settings(&name) {
        Some(info) => Json(info).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no function {name:?}: it has no jobs, workers or settings"),
        ),
    }
}

async fn put_function(
    State(api): State<FunctionsApi>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if !crate::admin::is_admin(peer.ip(), &api.admin_networks) {
        return error(
            StatusCode::FORBIDDEN,
            "PUT /api/v1/functions is accepted only from server.admin_networks",
        );
    }
    let change: FunctionSettings = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be a JSON object of max_queue, rate, burst, max_running, cache_ttl_s, dead_letter: {e}"),
            )
        }
    };
    let span =
        tracing::info_span!("gearhouse.admin", command = "PUT /api/v1/functions", peer = %peer);
    let applied = span.in_scope(|| {
        let r = api.engine.set_function_settings(&name, &change);
        if r.is_ok() {
            tracing::info!(function = %name, change = ?change, "settings of {name} changed");
        }
        r
    });
    if let Err(e) = applied {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let persisted = match &api.mirror {
        None => Err(
            "persistence is off (no persistence.memcached): the change lives in memory only"
                .to_string(),
        ),
        Some(m) => m
            .flush()
            .await
            .map_err(|e| format!("{e}; the change is in force and its write is retried")),
    };
    let info = api.engine.function_settings(&name);
    let mut v = serde_json::to_value(info).expect("settings serialize");
    if let Some(o) = v.as_object_mut() {
        o.insert("persisted".into(), json!(persisted.is_ok()));
        if let Err(why) = persisted {
            o.insert("persist_error".into(), json!(why));
        }
    }
    Json(v).into_response()
}
