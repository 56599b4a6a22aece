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
//! under both it and axum's default, so the limit cannot decide the answer), and a connection
//! with its peer address. The handler behind both ways is [`Jobs::post_job`].

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;

use super::jobs::Jobs;

/// The largest declared body answered directly: below axum's default body limit (2 MiB), so
/// the limit the router would apply decides nothing for it.
pub const DIRECT_BODY_MAX: usize = 1 << 20;

/// `app` behind the front: `POST /jobs/{function}` is answered by `jobs` directly, the rest by
/// `app`. Routes merged into the result later are matched before the front, as usual.
pub fn wrap(app: Router, jobs: Jobs) -> Router {
    Router::new()
        .fallback_service(app)
        .layer(axum::middleware::from_fn_with_state(jobs, front))
}

async fn front(State(jobs): State<Jobs>, req: Request, next: Next) -> Response {
    match direct(&req) {
        Some((peer, function)) => {
            let function = function.to_owned();
            jobs.post_job(peer, Ok(function), req).await
        }
        None => next.run(req).await,
    }
}

/// The peer and function name of a request the front answers itself, `None` for the router's.
fn direct(req: &Request) -> Option<(SocketAddr, &str)> {
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
    let ConnectInfo(peer) = req.extensions().get::<ConnectInfo<SocketAddr>>()?;
    Some((*peer, function))
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

    fn request(method: Method, path: &str, len: Option<usize>, peer: bool) -> Request {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(l) = len {
            b = b.header(header::CONTENT_LENGTH, l);
        }
        let mut r = b.body(axum::body::Body::empty()).unwrap();
        if peer {
            let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
            r.extensions_mut().insert(ConnectInfo(addr));
        }
        r
    }

    #[test]
    fn the_router_keeps_what_it_could_answer_differently() {
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let r = request(Method::POST, "/jobs/f", Some(3), true);
        assert_eq!(direct(&r), Some((peer, "f")));
        let r = request(Method::GET, "/jobs/f", Some(3), true);
        assert_eq!(direct(&r), None, "GET is the status route");
        let r = request(Method::POST, "/jobs/f", None, true);
        assert_eq!(
            direct(&r),
            None,
            "no Content-Length: the body limit may decide"
        );
        let r = request(Method::POST, "/jobs/f", Some(DIRECT_BODY_MAX + 1), true);
        assert_eq!(direct(&r), None, "a large body: the body limit may decide");
        let r = request(Method::POST, "/jobs/f", Some(3), false);
        assert_eq!(
            direct(&r),
            None,
            "no peer: the router's ConnectInfo answers"
        );
    }
}
