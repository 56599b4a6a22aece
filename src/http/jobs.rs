//! Job submission over HTTP: `POST /jobs/{function}` runs a job (foreground: the answer is the
//! worker's result; `X-Gearman-Background: true`: 202 once the job is queued, durably when
//! persistence is on), `GET /jobs/{handle}` is GET_STATUS as JSON. gearmand's own HTTP paths
//! (`/{function}`, see `gearmand.rs`) go through the same functions and differ only in how the
//! outcome is answered.
//!
//! Every job goes through [`LocalClient`], the engine's in-process connection: coalescing,
//! queue limits, the durable write before JOB_CREATED, traces (the HTTP client's address as the
//! peer, client id `http`) and metrics are exactly those of a job from a Gearman socket. A
//! `LocalClient` is a registration in the engine and a channel, no I/O. A kept-alive HTTP
//! connection on `POST /jobs/{function}` keeps one between its requests ([`Kept`]), as a
//! Gearman client keeps its socket: it shows in `workers` and the connection count while the
//! HTTP connection lasts, and registering it once rather than per request saved two engine
//! lock turns a request. It is kept only when its exchange ended (the result or JOB_CREATED
//! read, nothing more on its way); a foreground request that times out or whose client hangs
//! up drops it, which makes the engine cancel a job nobody else waits for and that has not
//! started, as for a socket that closes, and the connection's next request registers anew.
//! Requests without a kept connection (gearmand's paths, the router's way) register per
//! request; the channel and buffers of those registrations ([`Line`]) are kept in a small pool
//! (at most [`IDLE_LINES`]): an idle line is registered nowhere and holds no job.
//!
//! Refusals are a [`Refusal`] each with its own status (the table in README "Submitting work
//! over HTTP"), decided before anything is buffered where possible: access, readiness and the
//! in-flight bound come before the body is read. The foreground path is the one function
//! [`Jobs::submit_foreground`], so a result cache can be put in front of it in one place.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio_util::codec::Decoder;

use super::access::{Access, Denied};
use super::front::{Held, Kept};
use super::job_metrics::{JobMetrics, Route};
use super::slot::{self, Slot};
use super::Health;
use crate::codec::{split_args, Frame, GearmanCodec};
use crate::config::Config;
use crate::engine::Engine;
use crate::local::{JobResult, Line, LocalClient, LocalError};
use crate::protocol::{ErrorCode, Priority, ProtocolError, Submit};

/// `X-Gearman-Job-Handle`: the job's handle, on every answer that has one.
pub const JOB_HANDLE: HeaderName = HeaderName::from_static("x-gearman-job-handle");
/// `X-Gearman-Command`: the packet that ended the request (JOB_CREATED, WORK_COMPLETE, ...).
pub const COMMAND: HeaderName = HeaderName::from_static("x-gearman-command");
/// `X-Gearman-Unique`: the job's unique id (coalescing key).
pub const UNIQUE: HeaderName = HeaderName::from_static("x-gearman-unique");
/// `X-Gearman-Background: true`: answer once the job is queued.
pub const BACKGROUND: HeaderName = HeaderName::from_static("x-gearman-background");
/// `X-Gearman-Priority: high|normal|low`.
pub const PRIORITY: HeaderName = HeaderName::from_static("x-gearman-priority");
/// `X-Gearman-Timeout: MS`: how long a foreground request waits for the result.
pub const TIMEOUT: HeaderName = HeaderName::from_static("x-gearman-timeout");

/// The settings of HTTP job submission, from `[http]` and `[server]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub access: Access,
    /// Default foreground wait (`http.job_timeout_ms`).
    pub job_timeout: Duration,
    /// `http.max_concurrent_jobs`.
    pub max_concurrent_jobs: usize,
    /// `http.max_kept_connections`.
    pub max_kept: usize,
    /// `http.max_connections`: the listener's bound (`listener.rs`).
    pub max_connections: usize,
    /// `server.max_packet_size`: function, unique id and body together, as in a SUBMIT_JOB.
    pub max_packet_size: usize,
    pub max_function_len: usize,
    pub max_unique_len: usize,
    /// `server.outbound_queue`: packets the engine may queue for one request's connection.
    pub outbound_queue: usize,
}

impl Settings {
    /// The settings a configuration gives.
    pub fn from_config(cfg: &Config) -> Settings {
        let s = cfg.server_config();
        Settings {
            access: Access::new(s.admin_networks, &cfg.http.submit_tokens),
            job_timeout: Duration::from_millis(cfg.http.job_timeout_ms),
            max_concurrent_jobs: cfg.http.max_concurrent_jobs,
            max_kept: cfg.http.max_kept_connections,
            max_connections: cfg.http.max_connections,
            max_packet_size: s.max_packet_size,
            max_function_len: s.limits.max_function,
            max_unique_len: s.limits.max_unique,
            outbound_queue: s.outbound_queue,
        }
    }
}

impl Default for Settings {
    /// `config/default.toml`'s.
    fn default() -> Self {
        Settings::from_config(&Config::default())
    }
}

/// HTTP job submission: the engine, readiness, settings, the in-flight bound and metrics.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    health: Arc<Health>,
    settings: Settings,
    /// One permit per request in progress (`http.max_concurrent_jobs`); a request that finds
    /// none is answered 503 rather than queued: every peer is a stranger.
    slots: Semaphore,
    metrics: JobMetrics,
    /// The result cache: a foreground job of a cached function with a unique id is answered
    /// from it when it holds the result, as on the Gearman port.
    cache: Option<Arc<crate::cache::Cache>>,
    /// Idle lines for the next requests' connections, at most [`IDLE_LINES`]. A
    /// `std::sync::Mutex`: held for a push or a pop, never across an await.
    idle: Mutex<Vec<Line>>,
    /// Kept engine connections now ([`Kept`]), at most `http.max_kept_connections`.
    kept: Arc<Semaphore>,
}

/// The most idle [`Line`]s kept: enough for the requests one server answers at once in the
/// benchmarks many times over; a burst beyond it allocates and frees lines as before.
pub const IDLE_LINES: usize = 64;

/// A job as an HTTP request describes it.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub function: Bytes,
    pub unique: Bytes,
    pub data: Bytes,
    pub priority: Priority,
    pub background: bool,
    /// How long a foreground request waits for the result.
    pub timeout: Duration,
}

impl JobRequest {
    fn into_submit(self) -> Submit {
        Submit {
            function: self.function,
            unique: self.unique,
            data: self.data,
            priority: self.priority,
            background: self.background,
            epoch: None,
            reducer: None,
        }
    }
}

/// How a submission ended, before it is put into an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A background job was queued (durably, with persistence on).
    Created { handle: Bytes },
    /// A foreground job ended.
    Finished { handle: Bytes, result: JobResult },
}

/// Why a request got no job outcome; each has its own status (README's table).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("job submission over HTTP from outside server.admin_networks needs \"Authorization: Bearer <token>\" with a token from http.submit_tokens")]
    NoToken,
    #[error("the bearer token is not one of http.submit_tokens")]
    BadToken,
    #[error("bad function name: {0}")]
    BadFunction(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}; retry later, or raise the limit with the maxqueue admin command (engine.max_queue_per_function)")]
    QueueFull(String),
    #[error("{0}")]
    TooManyFunctions(String),
    #[error("the job cannot be made durable, so it was not accepted: {0}")]
    NotDurable(String),
    #[error(
        "{0} HTTP job requests are already in progress (http.max_concurrent_jobs); retry later"
    )]
    Busy(usize),
    #[error("not ready: recovery has not completed, or the server is stopping")]
    NotReady,
    #[error("the server is stopping")]
    Closed,
    #[error("no result within {ms} ms (X-Gearman-Timeout, else http.job_timeout_ms); a job that had not started was cancelled")]
    Timeout { handle: Option<Bytes>, ms: u64 },
    #[error("{0}")]
    Engine(ProtocolError),
}

impl Refusal {
    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NoToken | Refusal::BadToken => StatusCode::UNAUTHORIZED,
            Refusal::BadFunction(_) | Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::QueueFull(_) | Refusal::TooManyFunctions(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::NotDurable(_) => StatusCode::INSUFFICIENT_STORAGE,
            Refusal::Busy(_) | Refusal::NotReady | Refusal::Closed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<Denied> for Refusal {
    fn from(d: Denied) -> Refusal {
        match d {
            Denied::NoToken => Refusal::NoToken,
            Denied::BadToken => Refusal::BadToken,
        }
    }
}

/// What the engine's refusal means for an HTTP client. The queue's refusals share the code
/// QUEUE_ERROR; their texts are the engine's own (`submit.rs`) and name the cause.
impl From<LocalError> for Refusal {
    fn from(e: LocalError) -> Refusal {
        match e {
            LocalError::Closed => Refusal::Closed,
            LocalError::Refused(p) => match p.code {
                ErrorCode::QueueError if p.text.contains("engine.max_functions") => {
                    Refusal::TooManyFunctions(p.text)
                }
                ErrorCode::QueueError if p.text.starts_with("queue of ") => {
                    Refusal::QueueFull(p.text)
                }
                ErrorCode::QueueError => Refusal::NotDurable(p.text),
                ErrorCode::ArgumentTooLarge => Refusal::TooLarge(p.text),
                _ => Refusal::Engine(p),
            },
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut r = (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{self}\n"),
        )
            .into_response();
        let h = r.headers_mut();
        match &self {
            Refusal::NoToken | Refusal::BadToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"gearhouse\""),
                );
            }
            Refusal::QueueFull(_) | Refusal::TooManyFunctions(_) | Refusal::Busy(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Refusal::Timeout {
                handle: Some(handle),
                ..
            } => put_handle(h, handle),
            _ => {}
        }
        r
    }
}

/// Adds `X-Gearman-Job-Handle` (handles are `H:<node_id>:<n>`, always a valid header value
/// unless the node id is not; then it is left out rather than failing the answer).
pub(super) fn put_handle(h: &mut HeaderMap, handle: &Bytes) {
    if let Ok(v) = HeaderValue::from_maybe_shared(handle.clone()) {
        h.insert(JOB_HANDLE, v);
    }
}

/// The routes: `/jobs/{function}` (POST) and `/jobs/{handle}` (GET) here, gearmand's paths from
/// `gearmand.rs`. Bodies are limited to `server.max_packet_size`.
pub fn routes(jobs: Jobs) -> Router {
    let limit = jobs.inner.settings.max_packet_size;
    Router::new()
        .route("/jobs/{id}", post(post_job).get(get_job))
        .merge(super::gearmand::routes())
        .layer(DefaultBodyLimit::max(limit))
        .with_state(jobs)
}

impl Jobs {
    /// Registers the metrics on the engine's registry.
    pub fn new(
        engine: Engine,
        health: Arc<Health>,
        settings: Settings,
        cache: Option<Arc<crate::cache::Cache>>,
    ) -> Jobs {
        let metrics = JobMetrics::new(&engine.metrics().registry).unwrap_or_else(|e| {
            // Only a second set of routes on the same server gets here (tests): count on a
            // registry of its own rather than fail.
            tracing::warn!(error = %e, "HTTP job metrics already registered; this router's are not exported");
            JobMetrics::new(&prometheus::Registry::new()).expect("fresh registry")
        });
        Jobs {
            inner: Arc::new(Inner {
                slots: Semaphore::new(settings.max_concurrent_jobs.min(Semaphore::MAX_PERMITS)),
                kept: slot::places(settings.max_kept),
                engine,
                health,
                settings,
                cache,
                metrics,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub(super) fn metrics(&self) -> &JobMetrics {
        &self.inner.metrics
    }

    /// Runs a foreground job for `peer` and waits (up to `job.timeout`) for its result. The
    /// one place a foreground job is submitted over HTTP: put a result cache in front of it.
    pub async fn submit_foreground(
        &self,
        peer: SocketAddr,
        job: JobRequest,
        exceptions: bool,
        kept: Option<&Kept>,
    ) -> Result<Outcome, Refusal> {
        let timeout = job.timeout;
        let submit = job.into_submit();
        if let Some(cache) = &self.inner.cache {
            if cache.is_cacheable(&submit) {
                if let Some(result) = cache.lookup(&submit.function, &submit.unique).await {
                    return Ok(Outcome::Finished {
                        handle: cache.mint_handle(),
                        result: JobResult::Complete(result),
                    });
                }
            }
        }
        let mut c = self.connect(peer, exceptions, kept);
        // One timer for both waits (the kept connection's, else one registered for the request):
        // JOB_CREATED can wait for a durable write when the job joins a background one, then
        // the result.
        let mut created = None;
        let work = async {
            let handle = c.submit(submit).await?;
            created = Some(handle.clone());
            let result = c.result().await?;
            Ok::<_, LocalError>(Outcome::Finished { handle, result })
        };
        let waited = match kept {
            Some(k) => k.within(timeout, work).await,
            None => tokio::time::timeout(timeout, work).await.ok(),
        };
        match waited {
            Some(Ok(outcome)) => {
                self.release(c, exceptions, kept);
                Ok(outcome)
            }
            Some(Err(e)) => Err(e.into()),
            // Dropping `c` disconnects: the engine cancels the job if nobody else waits for it
            // and it has not started.
            None => Err(Refusal::Timeout {
                handle: created,
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// Queues a background job for `peer`; returns once it is queued (after the durable write
    /// when persistence is on), exactly as JOB_CREATED on a socket.
    pub async fn submit_background(
        &self,
        peer: SocketAddr,
        job: JobRequest,
        exceptions: bool,
        kept: Option<&Kept>,
    ) -> Result<Outcome, Refusal> {
        let mut c = self.connect(peer, exceptions, kept);
        let handle = c.submit(job.into_submit()).await?;
        self.release(c, exceptions, kept);
        Ok(Outcome::Created { handle })
    }

    /// A connection for one request: the HTTP connection's kept one when it has one that
    /// asked for the same `exceptions`, else a new registration on an idle line when there
    /// is one.
    fn connect(&self, peer: SocketAddr, exceptions: bool, kept: Option<&Kept>) -> LocalClient {
        if let Some(k) = kept {
            let was = k.client.lock().expect("kept connection").take();
            match was {
                Some(h) if h.exceptions == exceptions && h.client.is_idle() => return h.client,
                Some(h) => self.release(h.client, exceptions, None),
                None => {}
            }
        }
        let s = &self.inner;
        let idle = s.idle.lock().expect("idle lines").pop();
        let line = idle.unwrap_or_else(|| Line::new(s.settings.outbound_queue));
        LocalClient::connect_with(&s.engine, peer, "http", line, exceptions)
    }

    /// Ends a request's exchange: the connection stays registered for the HTTP connection's
    /// next request when there is one to keep it for; otherwise it disconnects, keeping its
    /// line for the next request's connection.
    fn release(&self, c: LocalClient, exceptions: bool, kept: Option<&Kept>) {
        let s = &self.inner;
        if let Some(k) = kept {
            if c.is_idle() {
                if let Some(slot) = Slot::take(&s.kept, &s.metrics.kept) {
                    *k.client.lock().expect("kept connection") = Some(Held {
                        client: c,
                        exceptions,
                        _slot: slot,
                    });
                    return;
                }
            }
        }
        if let Some(line) = c.release() {
            let mut idle = self.inner.idle.lock().expect("idle lines");
            if idle.len() < IDLE_LINES {
                idle.push(line);
            }
        }
    }

    /// One submission request, whatever path it came by: access, readiness, the in-flight
    /// bound, the request's headers and body, then the job. `default_unique` is the unique id
    /// without `X-Gearman-Unique` (gearmand's paths use `-`: coalesce on the payload).
    pub(super) async fn submit_request(
        &self,
        peer: SocketAddr,
        function: Result<String, Refusal>,
        req: Request,
        default_unique: &'static [u8],
        exceptions: bool,
        kept: Option<&Kept>,
    ) -> Result<Outcome, Refusal> {
        let s = &self.inner;
        s.settings.access.check(peer.ip(), req.headers())?;
        if !s.health.is_ready() {
            return Err(Refusal::NotReady);
        }
        let _slot = s
            .slots
            .try_acquire()
            .map_err(|_| Refusal::Busy(s.settings.max_concurrent_jobs))?;
        let function = self.check_function(function?)?;
        let mut job = self.job_request(function, req.headers(), default_unique)?;
        job.data = self.read_body(&job, req).await?;
        if job.background {
            self.submit_background(peer, job, exceptions, kept).await
        } else {
            self.submit_foreground(peer, job, exceptions, kept).await
        }
    }

    /// A function name as the Gearman protocol would accept it.
    fn check_function(&self, name: String) -> Result<Bytes, Refusal> {
        let max = self.inner.settings.max_function_len;
        if name.is_empty() {
            return Err(Refusal::BadFunction("it is empty".into()));
        }
        if name.len() > max {
            return Err(Refusal::BadFunction(format!(
                "it is {} bytes, the limit is {max} (server.max_function_len)",
                name.len()
            )));
        }
        if name.contains('\0') {
            return Err(Refusal::BadFunction("it contains a NUL byte".into()));
        }
        Ok(Bytes::from(name))
    }

    /// The job the headers describe (without its payload).
    fn job_request(
        &self,
        function: Bytes,
        headers: &HeaderMap,
        default_unique: &'static [u8],
    ) -> Result<JobRequest, Refusal> {
        let st = &self.inner.settings;
        let x = Gearman::of(headers);
        let unique = match x.unique {
            Some(v) => Bytes::copy_from_slice(v.as_bytes()),
            None => Bytes::from_static(default_unique),
        };
        if unique.len() > st.max_unique_len {
            return Err(Refusal::BadRequest(format!(
                "X-Gearman-Unique is {} bytes, the limit is {} (server.max_unique_len)",
                unique.len(),
                st.max_unique_len
            )));
        }
        if unique.contains(&0) {
            return Err(Refusal::BadRequest(
                "X-Gearman-Unique contains a NUL byte".into(),
            ));
        }
        let background = match header_word(x.background, &BACKGROUND)? {
            None => false,
            Some(w) if w.eq_ignore_ascii_case("true") => true,
            Some(w) if w.eq_ignore_ascii_case("false") => false,
            Some(w) => {
                return Err(Refusal::BadRequest(format!(
                    "X-Gearman-Background is {w:?}; use true or false"
                )))
            }
        };
        let priority = match header_word(x.priority, &PRIORITY)? {
            None => Priority::Normal,
            Some(w) => Priority::ALL
                .into_iter()
                .find(|p| w.eq_ignore_ascii_case(p.as_str()))
                .ok_or_else(|| {
                    Refusal::BadRequest(format!(
                        "X-Gearman-Priority is {w:?}; use high, normal or low"
                    ))
                })?,
        };
        let timeout = match header_word(x.timeout, &TIMEOUT)? {
            None => st.job_timeout,
            Some(w) => match w.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(Refusal::BadRequest(format!(
                        "X-Gearman-Timeout is {w:?}; give milliseconds, at least 1"
                    )))
                }
            },
        };
        Ok(JobRequest {
            function,
            unique,
            data: Bytes::new(),
            priority,
            background,
            timeout,
        })
    }

    /// The payload: the body, within `server.max_packet_size` together with the function name
    /// and the unique id (as the SUBMIT_JOB packet it stands for would be).
    async fn read_body(&self, job: &JobRequest, req: Request) -> Result<Bytes, Refusal> {
        let max = self.inner.settings.max_packet_size;
        let room = max.saturating_sub(job.function.len() + job.unique.len() + 2);
        let too_large = |len: Option<usize>| {
            let len = len.map_or_else(|| "more than that".into(), |l| format!("{l} bytes"));
            Refusal::TooLarge(format!(
                "the body is {len}; with the function name and unique id it must fit \
                 server.max_packet_size ({max} bytes), which leaves {room} bytes"
            ))
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|l| l > room) {
            return Err(too_large(declared));
        }
        // Frame by frame rather than through a collector: a body that arrives in one frame
        // (any small request) is that frame's bytes, without a copy or the collector's list.
        let mut body = req.into_body();
        let mut whole = Bytes::new();
        let mut more = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| Refusal::BadRequest(format!("the body could not be read: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if whole.len() + more.len() + data.len() > room {
                return Err(too_large(None));
            }
            if whole.is_empty() && more.is_empty() {
                whole = data;
            } else {
                if more.is_empty() {
                    more.extend_from_slice(&std::mem::take(&mut whole));
                }
                more.extend_from_slice(&data);
            }
        }
        Ok(if more.is_empty() {
            whole
        } else {
            more.freeze()
        })
    }

    /// GET_STATUS of `handle` as JSON.
    fn status_of(&self, handle: &str) -> serde_json::Value {
        let handle = Bytes::copy_from_slice(handle.as_bytes());
        let mut out = BytesMut::new();
        self.inner.engine.get_status(&handle, &mut out);
        let fields = match GearmanCodec::new(usize::MAX, 0).decode(&mut out) {
            Ok(Some(Frame::Packet(p))) => split_args(&p.body, 5).unwrap_or_default(),
            _ => Vec::new(),
        };
        let flag = |i: usize| fields.get(i).is_some_and(|f| f.as_ref() == b"1");
        let number = |i: usize| {
            fields
                .get(i)
                .and_then(|f| std::str::from_utf8(f).ok())
                .and_then(|f| f.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        serde_json::json!({
            "handle": String::from_utf8_lossy(&handle),
            "known": flag(1),
            "running": flag(2),
            "numerator": number(3),
            "denominator": number(4),
        })
    }
}

/// A header's value as text, `None` when absent; not text is a bad request.
fn header_word<'a>(
    value: Option<&'a HeaderValue>,
    name: &HeaderName,
) -> Result<Option<&'a str>, Refusal> {
    match value {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| Refusal::BadRequest(format!("{name} is not text"))),
    }
}

/// The `X-Gearman-*` request headers, the first value of each as `HeaderMap::get` would give,
/// found in one pass over the request's few headers: a `get` hashes the name, which for
/// these custom names cost more than the walk.
#[derive(Default)]
struct Gearman<'a> {
    unique: Option<&'a HeaderValue>,
    background: Option<&'a HeaderValue>,
    priority: Option<&'a HeaderValue>,
    timeout: Option<&'a HeaderValue>,
}

impl<'a> Gearman<'a> {
    fn of(headers: &'a HeaderMap) -> Gearman<'a> {
        let mut x = Gearman::default();
        for (name, value) in headers {
            let slot = if name == UNIQUE {
                &mut x.unique
            } else if name == BACKGROUND {
                &mut x.background
            } else if name == PRIORITY {
                &mut x.priority
            } else if name == TIMEOUT {
                &mut x.timeout
            } else {
                continue;
            };
            slot.get_or_insert(value);
        }
        x
    }
}

/// The function name from the path, percent-decoded; one that does not decode is a bad name.
pub(super) fn function_from(p: Result<Path<String>, PathRejection>) -> Result<String, Refusal> {
    p.map(|Path(f)| f)
        .map_err(|e| Refusal::BadFunction(e.body_text()))
}

/// `POST /jobs/{function}` through the router: the requests the front (`front.rs`) leaves to it.
async fn post_job(
    State(jobs): State<Jobs>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    function: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    jobs.post_job(peer, function_from(function), req, None)
        .await
}

impl Jobs {
    /// `POST /jobs/{function}`, whichever way the request came: the router's handler or the
    /// front's direct call, which brings its connection's [`Kept`].
    pub(super) async fn post_job(
        &self,
        peer: SocketAddr,
        function: Result<String, Refusal>,
        req: Request,
        kept: Option<&Kept>,
    ) -> Response {
        let timer = self.metrics().start(Route::Submit);
        let r = match self
            .submit_request(peer, function, req, b"", true, kept)
            .await
        {
            Ok(outcome) => answer(outcome),
            Err(refusal) => refusal.into_response(),
        };
        timer.finish(r.status());
        r
    }
}

/// The native answer to a finished submission: 202 for a queued background job, 200 with the
/// result, 502 for WORK_FAIL / WORK_EXCEPTION (the exception's data as the body).
fn answer(outcome: Outcome) -> Response {
    let (status, command, body, handle) = match outcome {
        Outcome::Created { handle } => {
            (StatusCode::ACCEPTED, "JOB_CREATED", handle.clone(), handle)
        }
        Outcome::Finished { handle, result } => match result {
            JobResult::Complete(data) => (StatusCode::OK, "WORK_COMPLETE", data, handle),
            JobResult::Fail => (
                StatusCode::BAD_GATEWAY,
                "WORK_FAIL",
                Bytes::from_static(b"the worker failed the job (WORK_FAIL)\n"),
                handle,
            ),
            JobResult::Exception(data) => (StatusCode::BAD_GATEWAY, "WORK_EXCEPTION", data, handle),
        },
    };
    let content_type = if status == StatusCode::OK {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    };
    // Built directly (the tuple's `IntoResponse` validates the static content type and grows
    // the header map one insert at a time): this is every submission's answer.
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.reserve(3);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    put_handle(h, &handle);
    h.insert(COMMAND, HeaderValue::from_static(command));
    r
}

/// `GET /jobs/{handle}`: the job's status, as GET_STATUS (an unknown handle is `known: false`).
async fn get_job(
    State(jobs): State<Jobs>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(handle): Path<String>,
    headers: HeaderMap,
) -> Response {
    let timer = jobs.metrics().start(Route::Status);
    let r = match jobs.settings().access.check(peer.ip(), &headers) {
        Ok(()) => Json(jobs.status_of(&handle)).into_response(),
        Err(d) => Refusal::from(d).into_response(),
    };
    timer.finish(r.status());
    r
}
