//! gearmand 1.1.20's HTTP protocol (its `-r http --http-port P` plugin,
//! `libgearman-server/plugins/protocol/http/protocol.cc`), on gearhouse's HTTP listener, so
//! scripts written for it keep working after the switch.
//!
//! What gearmand accepts, and what is served here:
//! - `GET`, `POST`, `PUT` (and `HEAD`, answered without a body) of `/FUNCTION` run a job of
//!   FUNCTION; the body (POST/PUT) is the payload. Leading slashes are dropped, the rest of
//!   the path is the name. Here the path is percent-decoded and the query string is not part of
//!   the name (gearmand keeps both raw).
//! - Headers `X-Gearman-Unique` (default `-`: coalesce on the payload, as gearmand does),
//!   `X-Gearman-Background: true`, `X-Gearman-Priority: high|low`.
//! - The answer is `200 OK` whatever the job did, with `X-Gearman-Job-Handle` and
//!   `X-Gearman-Command` (JOB_CREATED for a background job, else WORK_COMPLETE, WORK_FAIL or,
//!   with `engine.exceptions` on, WORK_EXCEPTION), and the result as the body.
//!
//! Differences, on purpose: connections are kept alive (gearmand closes each after one
//! answer); refusals (queue full, not durable, too large, no token, timeout) get gearhouse's
//! statuses (README "Submitting work over HTTP"), where gearmand has no answer at all; a
//! foreground job waits at most `http.job_timeout_ms` (or `X-Gearman-Timeout`), not forever;
//! gearmand's `TRACE` echo is not served. Paths whose first segment is one of gearhouse's own
//! (`metrics`, `healthz`, `readyz`, `api`, `jobs`) are not job paths: a function with such a
//! name is reachable at `POST /jobs/{function}`.

use std::net::SocketAddr;

use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;

use super::job_metrics::Route;
use super::jobs::{function_from, put_handle, Jobs, Outcome, COMMAND};
use crate::local::JobResult;

/// First path segments that belong to gearhouse's own routes.
const RESERVED: &[&str] = &["metrics", "healthz", "readyz", "api", "jobs"];

/// `/{function}` for GET, POST, PUT (and HEAD through GET). Static routes win over it.
pub(super) fn routes() -> Router<Jobs> {
    Router::new().route("/{*function}", get(submit).post(submit).put(submit))
}

async fn submit(
    State(jobs): State<Jobs>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    function: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    let timer = jobs.metrics().start(Route::Gearmand);
    let function = function_from(function).map(|f| f.trim_start_matches('/').to_string());
    let r = match function.as_deref().ok().and_then(reserved) {
        Some(first) => not_a_job_path(first),
        None => match jobs
            .submit_request(peer, function, req, b"-", false, None)
            .await
        {
            Ok(outcome) => answer(outcome),
            Err(refusal) => refusal.into_response(),
        },
    };
    timer.finish(r.status());
    r
}

/// The reserved first segment of `path`, if it has one.
fn reserved(path: &str) -> Option<&'static str> {
    let first = path.split('/').next().unwrap_or("");
    RESERVED.iter().copied().find(|r| *r == first)
}

fn not_a_job_path(first: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "no such path; /{first}/... is gearhouse's own, not a gearmand-style job path: \
             submit to such a function with POST /jobs/{{function}}\n"
        ),
    )
        .into_response()
}

/// gearmand's answer: 200 with the packet that ended the request named, the result as the body.
fn answer(outcome: Outcome) -> Response {
    let (command, body, handle) = match outcome {
        Outcome::Created { handle } => ("JOB_CREATED", Bytes::new(), handle),
        Outcome::Finished { handle, result } => match result {
            JobResult::Complete(data) => ("WORK_COMPLETE", data, handle),
            JobResult::Fail => ("WORK_FAIL", Bytes::new(), handle),
            JobResult::Exception(data) => ("WORK_EXCEPTION", data, handle),
        },
    };
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    put_handle(h, &handle);
    h.insert(COMMAND, HeaderValue::from_static(command));
    h.insert(
        header::SERVER,
        HeaderValue::from_static(concat!("gearhouse/", env!("CARGO_PKG_VERSION"))),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gearhouse_paths_are_not_job_paths() {
        assert_eq!(reserved("api/v1/x"), Some("api"));
        assert_eq!(reserved("jobs/a/b"), Some("jobs"));
        assert_eq!(reserved("metrics"), Some("metrics"));
        assert_eq!(reserved("reverse"), None);
        assert_eq!(reserved("apiary/x"), None);
    }
}
