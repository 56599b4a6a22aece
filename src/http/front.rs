//! The front of the HTTP listener: `POST /jobs/{function}`, the request that submission load
//! consists of, is answered here before axum's router sees it; everything else goes on to the
//! router unchanged.
//!
//! Why: a profile of foreground submission (issue 8) put the router at ~5% of the server's CPU
//! per request (the route match over every route, the URL parameters map, the method router,
//! the `Path` extractor's percent-decoding through serde, a boxed route clone). Here the match
//! is a prefix test on the path.
//!
//! Only requests whose answer cannot differ from the router's are taken: a one-segment name
//! without `%` (a percent-encoded name is decoded, and refused with axum's own text, by the
//! router), a `Content-Length` within [`DIRECT_BODY_MAX`] (the body limit, `DefaultBodyLimit`
//! on the job routes, is an extension only the router's layer can set; a body this small is
//! under both it and axum's default, so the limit cannot decide the answer). The handler behind
//! both ways is [`Jobs::post_job`]. The front is the connection's service itself ([`Front`],
//! made per connection by [`MakeFront`] with the peer's address), not a layer on the router;
//! it holds what the connection keeps between its job requests ([`Kept`]: the engine connection
//! and the foreground wait's timer), dropped with the connection.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, Method};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use futures::future::BoxFuture;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::jobs::Jobs;
use super::slot::Slot;
use crate::local::LocalClient;

/// The largest declared body answered directly: below axum's default body limit (2 MiB), so
/// the limit the router would apply decides nothing for it.
pub const DIRECT_BODY_MAX: usize = 1 << 20;

/// What `axum::serve` asks for each accepted connection: a [`Front`] for its peer.
#[derive(Clone)]
pub struct MakeFront {
    app: Router,
    jobs: Jobs,
}

impl MakeFront {
    /// `app` behind the front: `POST /jobs/{function}` is answered by `jobs` directly, the
    /// rest by `app`, which sees the peer as `ConnectInfo<SocketAddr>`.
    pub fn new(app: Router, jobs: Jobs) -> MakeFront {
        MakeFront {
            app: app.with_state(()),
            jobs,
        }
    }
}

impl<L> Service<IncomingStream<'_, L>> for MakeFront
where
    L: Listener<Addr = SocketAddr>,
{
    type Response = Front;
    type Error = Infallible;
    type Future = Ready<Result<Front, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: IncomingStream<'_, L>) -> Self::Future {
        ready(Ok(Front {
            app: self.app.clone(),
            jobs: self.jobs.clone(),
            peer: *conn.remote_addr(),
            kept: Arc::default(),
        }))
    }
}

/// One connection's service (hyper clones it for each request). A plain `Service` rather
/// than an axum middleware in front of the router: the middleware's own layering (an outer
/// router, `Next`, the response mapping) cost as much per request as the route match it
/// saved.
#[derive(Clone)]
pub struct Front {
    app: Router,
    jobs: Jobs,
    peer: SocketAddr,
    /// The connection's engine connection between its job requests; it disconnects when hyper
    /// drops the service, that is when the HTTP connection ends.
    kept: Arc<Kept>,
}

impl Service<Request> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        match direct(&req).map(str::to_owned) {
            Some(function) => {
                let (jobs, peer, kept) = (self.jobs.clone(), self.peer, self.kept.clone());
                Box::pin(
                    async move { Ok(jobs.post_job(peer, Ok(function), req, Some(&kept)).await) },
                )
            }
            None => {
                req.extensions_mut().insert(ConnectInfo(self.peer));
                Box::pin(self.app.call(req))
            }
        }
    }
}

/// The engine connection of one HTTP connection, kept between its requests (see the module
/// documentation of `jobs.rs`); [`Front`] holds one per kept-alive connection. A
/// `std::sync::Mutex`: held for a take or a put, never across an await (hyper answers one
/// request of a connection at a time, so it is never contended).
#[derive(Default)]
pub struct Kept {
    pub(super) client: Mutex<Option<Held>>,
    /// The foreground wait's timer, reset for each request rather than registered anew: a
    /// later deadline on a registered timer is an atomic store in tokio, where a new timer
    /// takes the timer wheel's lock twice and, when it is the earliest, wakes the driver.
    timer: Mutex<Option<Pin<Box<Sleep>>>>,
}

impl Kept {
    /// `work`'s output, or `None` when `timeout` passed first.
    pub(super) async fn within<T>(
        &self,
        timeout: Duration,
        work: impl Future<Output = T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let kept = self.timer.lock().expect("kept timer").take();
        let mut timer = match kept {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let r = tokio::select! {
            biased;
            out = work => Some(out),
            () = timer.as_mut() => None,
        };
        *self.timer.lock().expect("kept timer") = Some(timer);
        r
    }
}

/// A kept engine connection between two requests of its HTTP connection.
pub struct Held {
    pub(super) client: LocalClient,
    /// Whether it asked for WORK_EXCEPTION: only a request asking the same reuses it.
    pub(super) exceptions: bool,
    /// Its place among the `http.max_kept_connections`.
    pub(super) _slot: Slot,
}

/// The function name of a request the front answers itself, `None` for the router's.
fn direct(req: &Request) -> Option<&str> {
    if req.method() != Method::POST {
        return None;
    }
    let function = function_of(req.uri().path())?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse::<usize>()
        .ok()?;
    if declared > DIRECT_BODY_MAX {
        return None;
    }
    Some(function)
}

/// The `{function}` of `/jobs/{function}` when the router would give the same name: one
/// non-empty segment with nothing to percent-decode.
fn function_of(path: &str) -> Option<&str> {
    let name = path.strip_prefix("/jobs/")?;
    if name.is_empty() || name.contains(['/', '%']) {
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_one_segment_names_are_taken() {
        assert_eq!(function_of("/jobs/upper"), Some("upper"));
        assert_eq!(function_of("/jobs/H:x:1"), Some("H:x:1"));
        assert_eq!(function_of("/jobs/"), None);
        assert_eq!(function_of("/jobs/a/b"), None);
        assert_eq!(function_of("/jobs/a%00b"), None, "the router decodes");
        assert_eq!(function_of("/jobsx/a"), None);
        assert_eq!(function_of("/upper"), None, "gearmand's paths");
    }

    fn request(method: Method, path: &str, len: Option<usize>) -> Request {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(l) = len {
            b = b.header(header::CONTENT_LENGTH, l);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn the_router_keeps_what_it_could_answer_differently() {
        let r = request(Method::POST, "/jobs/f", Some(3));
        assert_eq!(direct(&r), Some("f"));
        let r = request(Method::GET, "/jobs/f", Some(3));
        assert_eq!(direct(&r), None, "GET is the status route");
        let r = request(Method::POST, "/jobs/f", None);
        assert_eq!(
            direct(&r),
            None,
            "no Content-Length: the body limit may decide"
        );
        let r = request(Method::POST, "/jobs/f", Some(DIRECT_BODY_MAX + 1));
        assert_eq!(direct(&r), None, "a large body: the body limit may decide");
    }
}
