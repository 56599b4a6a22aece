//! Metrics of job submission over HTTP, registered on the server's registry: requests by route
//! and status, requests in progress, and request latency.
//!
//! Both labels have fixed value sets (three routes, the statuses the handlers answer with), and
//! every pair is created at 0 at start-up so `rate()` and alerts see a series from the first
//! scrape. A request whose client hangs up before the answer is counted with status `499` (as
//! nginx logs it): the handler's future is dropped and [`Timer`]'s `Drop` records it.

use std::time::Instant;

use axum::http::StatusCode;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

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
    requests: IntCounterVec,
    in_flight: IntGaugeVec,
    seconds: HistogramVec,
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
        for r in Route::ALL {
            in_flight.with_label_values(&[r.as_str()]);
            seconds.with_label_values(&[r.as_str()]);
            for s in r.statuses() {
                requests.with_label_values(&[r.as_str(), &s.to_string()]);
            }
        }
        Ok(JobMetrics {
            requests,
            in_flight,
            seconds,
        })
    }

    /// Starts timing one request on `route`; it counts as in flight until finished or dropped.
    pub fn start(&self, route: Route) -> Timer {
        self.in_flight.with_label_values(&[route.as_str()]).inc();
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
        let route = self.route.as_str();
        m.in_flight.with_label_values(&[route]).dec();
        m.seconds
            .with_label_values(&[route])
            .observe(self.t0.elapsed().as_secs_f64());
        // Statuses come from the handlers' fixed set; itoa avoids a String per request.
        let mut b = itoa::Buffer::new();
        m.requests
            .with_label_values(&[route, b.format(status)])
            .inc();
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
        let c = |route, status| m.requests.with_label_values(&[route, status]).get();
        assert_eq!(c("submit", "200"), 1);
        assert_eq!(c("gearmand", "499"), 1);
        assert_eq!(c("status", "200"), 0);
        assert_eq!(m.in_flight.with_label_values(&["submit"]).get(), 0);
        assert_eq!(
            m.seconds.with_label_values(&["submit"]).get_sample_count(),
            1
        );
        assert!(JobMetrics::new(&r).is_err(), "names are registered once");
    }
}
