//! Metrics of job submission over HTTP, registered on the server's registry: requests by route
//! and status, requests in progress, and request latency.
//!
//! Both labels have fixed value sets (three routes, the statuses the handlers answer with), and
//! every pair is created at 0 at start-up so `rate()` and alerts see a series from the first
//! scrape. The children of those pairs are resolved once, there, and kept: a label lookup hashes
//! the values and takes the vector's lock, four times a request on the submission path. A request whose client hangs up before the answer is counted with status `499` (as
//! nginx logs it): the handler's future is dropped and [`Timer`]'s `Drop` records it.

use std::time::Instant;

use axum::http::StatusCode;
use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::metrics::LATENCY_BUCKETS;

/// Which job route a request took: the `route` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /jobs/{function}`.
    Submit,
    /// `GET /jobs/{handle}`.
    Status,
    /// gearmand's `/{function}` paths.
    Gearmand,
}

impl Route {
    const ALL: [Route; 3] = [Route::Submit, Route::Status, Route::Gearmand];

    /// Its place in [`Route::ALL`] (and in the resolved children).
    fn index(self) -> usize {
        self as usize
    }

    fn as_str(self) -> &'static str {
        match self {
            Route::Submit => "submit",
            Route::Status => "status",
            Route::Gearmand => "gearmand",
        }
    }

    /// The statuses this route answers with (the README's table), created at 0.
    fn statuses(self) -> &'static [u16] {
        match self {
            Route::Submit => &[200, 202, 400, 401, 413, 429, 499, 500, 502, 503, 504, 507],
            Route::Status => &[200, 401, 499],
            Route::Gearmand => &[200, 400, 401, 404, 413, 429, 499, 500, 503, 504, 507],
        }
    }
}

/// The HTTP job-submission metrics.
#[derive(Clone)]
pub struct JobMetrics {
    /// Kept for statuses outside a route's list.
    requests: IntCounterVec,
    /// The children of every route, by [`Route::index`].
    routes: Arc<[RouteMetrics; 3]>,
    /// Kept-alive HTTP connections holding an engine connection between requests.
    pub kept: IntGauge,
}

/// One route's resolved children.
struct RouteMetrics {
    in_flight: IntGauge,
    seconds: Histogram,
    /// `requests{route, status}` for each status of [`Route::statuses`].
    by_status: Vec<(u16, IntCounter)>,
}

impl JobMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<JobMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "gearhouse_http_job_requests_total",
                "Job requests over HTTP (submit, status, gearmand's paths), by answer status; 499 = the client hung up first",
            ),
            &["route", "status"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "gearhouse_http_job_requests_in_flight",
                "Job requests over HTTP being answered (foreground requests wait for their job)",
            ),
            &["route"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "gearhouse_http_job_request_duration_seconds",
                "Time from an HTTP job request's arrival to its answer (a foreground job's whole run)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        let kept = IntGauge::new(
            "gearhouse_http_kept_connections",
            "Kept-alive HTTP connections holding their engine connection between job requests (at most http.max_kept_connections)",
        )?;
        registry.register(Box::new(kept.clone()))?;
        let routes = Arc::new(Route::ALL.map(|r| {
            RouteMetrics {
                in_flight: in_flight.with_label_values(&[r.as_str()]),
                seconds: seconds.with_label_values(&[r.as_str()]),
                by_status: r
                    .statuses()
                    .iter()
                    .map(|&s| (s, requests.with_label_values(&[r.as_str(), &s.to_string()])))
                    .collect(),
            }
        }));
        Ok(JobMetrics {
            requests,
            routes,
            kept,
        })
    }

    /// Starts timing one request on `route`; it counts as in flight until finished or dropped.
    pub fn start(&self, route: Route) -> Timer {
        self.routes[route.index()].in_flight.inc();
        Timer {
            metrics: self.clone(),
            route,
            t0: Instant::now(),
            done: false,
        }
    }
}

/// One request being answered; [`Timer::finish`] records its status, dropping it unfinished
/// records 499 (the client went away and the handler was cancelled).
pub struct Timer {
    metrics: JobMetrics,
    route: Route,
    t0: Instant,
    done: bool,
}

impl Timer {
    /// Records the answer's status and latency.
    pub fn finish(mut self, status: StatusCode) {
        self.record(status.as_u16());
    }

    fn record(&mut self, status: u16) {
        self.done = true;
        let m = &self.metrics;
        let r = &m.routes[self.route.index()];
        r.in_flight.dec();
        r.seconds.observe(self.t0.elapsed().as_secs_f64());
        match r.by_status.iter().find(|(s, _)| *s == status) {
            Some((_, c)) => c.inc(),
            // Not in the route's list (a status added to a handler but not to `statuses`):
            // still counted, through the lookup.
            None => m
                .requests
                .with_label_values(&[self.route.as_str(), itoa::Buffer::new().format(status)])
                .inc(),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if !self.done {
            self.record(499);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_and_abandoned_requests_are_counted() {
        let r = Registry::new();
        let m = JobMetrics::new(&r).unwrap();
        m.start(Route::Submit).finish(StatusCode::OK);
        drop(m.start(Route::Gearmand));
        m.start(Route::Status).finish(StatusCode::IM_A_TEAPOT);
        let c = |route, status| m.requests.with_label_values(&[route, status]).get();
        assert_eq!(c("submit", "200"), 1);
        assert_eq!(
            c("status", "418"),
            1,
            "a status outside the list is still counted"
        );
        assert_eq!(c("gearmand", "499"), 1);
        assert_eq!(c("status", "200"), 0);
        let gathered = r.gather();
        let family = |name: &str| {
            gathered
                .iter()
                .find(|f| f.name() == name)
                .expect("registered")
                .get_metric()
                .iter()
                .find(|m| m.get_label()[0].value() == "submit")
                .expect("the submit series")
                .clone()
        };
        assert_eq!(
            family("gearhouse_http_job_requests_in_flight")
                .get_gauge()
                .value(),
            0.0
        );
        assert_eq!(
            family("gearhouse_http_job_request_duration_seconds")
                .get_histogram()
                .get_sample_count(),
            1
        );
        assert!(JobMetrics::new(&r).is_err(), "names are registered once");
    }
}
