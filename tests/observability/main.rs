//! Observability with real parts: a real OTLP/HTTP receiver (axum, decoding with
//! opentelemetry-proto) gets the trace of a job that was requeued once and then completed; a
//! real Prometheus (Debian's 2.42, on loopback) scrapes the real binary while jobs flow, and
//! every query of `dashboards/gearhouse.json` returns data; `promtool` checks `/metrics` and
//! tests the alert rules.
//!
//! One test binary: this file holds the shared harness (the OTLP receiver, workers, metric
//! reads) and the metric tests that need no Prometheus; `traces.rs` the trace tests;
//! `scrape.rs` the real Prometheus, the dashboard queries and the alert rules.

#[path = "../common/mod.rs"]
mod common;

mod scrape;
mod traces;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use common::otlp::{attr, int_attr, spans_with_service, str_attr};
use common::{free_port, http_get, BinServer, Conn};
use gearhouse::codec::PacketType::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};
use prost::Message;

// ---------------------------------------------------------------------------------------------
// A real OTLP/HTTP receiver.

/// Spans received, with the `service.name` of the resource they came with.
#[derive(Default)]
struct Received {
    spans: Vec<(String, Span)>,
    requests: usize,
}

struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Received>>,
    _task: tokio::task::JoinHandle<()>,
}

/// How the receiver answers.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Accept,
    /// Never answers (a hung collector).
    Hang,
}

async fn otlp_receiver(behaviour: Behaviour) -> Receiver {
    async fn traces(
        State((got, behaviour)): State<(Arc<Mutex<Received>>, Behaviour)>,
        body: Bytes,
    ) -> ([(axum::http::HeaderName, &'static str); 1], Vec<u8>) {
        if behaviour == Behaviour::Hang {
            std::future::pending::<()>().await;
        }
        let req = ExportTraceServiceRequest::decode(body).expect("a valid OTLP protobuf body");
        let mut g = got.lock().unwrap();
        g.requests += 1;
        g.spans.extend(spans_with_service(req));
        (
            [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
            Vec::new(),
        )
    }
    let got = Arc::new(Mutex::new(Received::default()));
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .with_state((got.clone(), behaviour));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Receiver {
        addr,
        got,
        _task: task,
    }
}

fn bool_attr(attrs: &[KeyValue], key: &str) -> Option<bool> {
    match attr(attrs, key)? {
        any_value::Value::BoolValue(b) => Some(*b),
        _ => None,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn status_code(s: &Span) -> i32 {
    s.status.as_ref().map(|s| s.code).unwrap_or(0)
}

/// Waits until the receiver holds the root span of the job with `handle`; returns every span of
/// its trace.
async fn trace_of(r: &Receiver, handle: &str, t: Duration) -> Vec<Span> {
    let deadline = Instant::now() + t;
    loop {
        {
            let g = r.got.lock().unwrap();
            let root = g.spans.iter().find(|(_, s)| {
                s.parent_span_id.is_empty()
                    && str_attr(&s.attributes, "gearman.handle").as_deref() == Some(handle)
            });
            if let Some((_, root)) = root {
                let tid = root.trace_id.clone();
                return g
                    .spans
                    .iter()
                    .filter(|(_, s)| s.trace_id == tid)
                    .map(|(_, s)| s.clone())
                    .collect();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no root span for {handle} within {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Raw-protocol helpers.

/// A worker connection that registered `func` (and a client id).
async fn worker(addr: SocketAddr, id: &str, func: &str) -> Conn {
    let mut w = Conn::connect(addr).await;
    w.send(SET_CLIENT_ID, &[id.as_bytes()]).await;
    w.send(CAN_DO, &[func.as_bytes()]).await;
    w
}

/// Grabs until a job is assigned (sleeping with PRE_SLEEP in between); returns the assignment.
async fn grab(w: &mut Conn) -> common::Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        w.send(GRAB_JOB_UNIQ, &[]).await;
        let r = w.recv().await;
        match r.kind {
            JOB_ASSIGN_UNIQ => return r,
            NO_JOB => {
                w.send(PRE_SLEEP, &[]).await;
                let _ = w.recv_timeout(Duration::from_millis(500)).await;
            }
            NOOP => {}
            other => panic!("unexpected {other:?} while grabbing"),
        }
        assert!(Instant::now() < deadline, "no job assigned within 10 s");
    }
}

/// Reads `/metrics` and returns the value of the series whose line starts with `series`
/// (name plus labels, exactly as rendered), or 0 when absent.
async fn metric(http: SocketAddr, series: &str) -> f64 {
    let (code, body) = http_get(http, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200);
    body.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

/// Sum of the series of `name` whose labels include every pair of `labels` (in any order).
async fn metric_where(http: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, body) = http_get(http, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200);
    body.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| rest.split_once("} "))
        .filter(|(set, _)| {
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

async fn wait_metric(
    http: SocketAddr,
    series: &str,
    pred: impl Fn(f64) -> bool,
    t: Duration,
) -> f64 {
    let deadline = Instant::now() + t;
    loop {
        let v = metric(http, series).await;
        if pred(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {v} did not reach the expected value within {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics without Prometheus.

/// Every packet a client receives is counted in `gearhouse_packets_sent_total`, including the
/// direct answers (JOB_CREATED, ECHO_RES, JOB_ASSIGN, NO_JOB, ERROR), and bytes match.
#[tokio::test]
async fn packets_and_bytes_sent_count_every_answer() {
    let server = common::TestServer::start(&[]).await;
    let mut c = server.connect().await;
    c.submit(SUBMIT_JOB_BG, "count", "", b"data").await; // JOB_CREATED
    c.send(ECHO_REQ, &[b"echo"]).await;
    c.expect(ECHO_RES).await;
    let mut w = server.connect().await;
    w.send(CAN_DO, &[b"count"]).await;
    w.send(GRAB_JOB, &[]).await;
    let a = w.expect(JOB_ASSIGN).await;
    w.send(WORK_COMPLETE, &[a.arg(0).as_bytes(), b""]).await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    w.send(WORK_COMPLETE, &[b"H:test:999", b""]).await;
    w.expect(ERROR).await;
    let sent = metric(server.http, "gearhouse_packets_sent_total").await;
    assert_eq!(
        sent, 5.0,
        "JOB_CREATED, ECHO_RES, JOB_ASSIGN, NO_JOB, ERROR"
    );
    server.stop().await;
}

/// The function label cap: a client that invents function names gets at most
/// `metrics.max_function_labels` distinct `function` label values; the rest share `__other__`,
/// whose gauges add up the folded functions.
#[tokio::test]
async fn invented_function_names_fold_into_other() {
    const CAP: usize = 5;
    const FUNCTIONS: usize = 60;
    let cap = CAP.to_string();
    let server =
        common::TestServer::start(&[("GEARHOUSE_METRICS__MAX_FUNCTION_LABELS", cap.as_str())])
            .await;
    let mut c = server.connect().await;
    for i in 0..FUNCTIONS {
        c.submit(SUBMIT_JOB_BG, &format!("invented-{i}"), "", b"x")
            .await;
    }
    let mut w = server.connect().await;
    for i in 0..FUNCTIONS {
        w.send(CAN_DO, &[format!("worker-fn-{i}").as_bytes()]).await;
    }
    w.send(ECHO_REQ, &[b"sync"]).await;
    w.expect(ECHO_RES).await;
    let (_, body) = http_get(server.http, "/metrics").await.unwrap();
    let mut labels = BTreeSet::new();
    let mut series = 0;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        if let Some(rest) = line.split("function=\"").nth(1) {
            labels.insert(rest.split('"').next().unwrap().to_string());
            series += 1;
        }
    }
    let expected: BTreeSet<String> = (0..CAP)
        .map(|i| format!("invented-{i}"))
        .chain([gearhouse::metrics::OTHER_FUNCTION.to_string()])
        .collect();
    assert_eq!(
        labels, expected,
        "the first {CAP} functions keep their name"
    );
    // Per label: 6 series (3 priorities x 2 modes) for each of the submit, complete, fail,
    // exception, retry and coalesce counters, 6 each for the two refusal reasons a function
    // can meet (queue_full, not_durable; created at 0), 2 histograms of 23 series, 4 exporter
    // gauges, 3 queue depths and 1 CAN_DO_TIMEOUT counter; plus, under `__other__` only,
    // 6 series for refusals of a new function past engine.max_functions.
    assert_eq!(
        series,
        (CAP + 1) * (6 * 6 + 2 * 6 + 2 * 23 + 4 + 3 + 1) + 6,
        "series are bounded by the cap"
    );
    let other = |m: &str| format!("{m}{{function=\"__other__\"}}");
    assert_eq!(
        metric(server.http, &other("gearman_jobs_waiting")).await,
        (FUNCTIONS - CAP) as f64,
        "__other__ adds up the folded functions' queues"
    );
    assert_eq!(
        metric(server.http, &other("gearman_workers")).await,
        FUNCTIONS as f64,
        "the worker's 60 functions were all folded"
    );
    assert_eq!(
        metric(server.http, "gearhouse_function_labels_folded").await,
        (2 * FUNCTIONS - CAP) as f64
    );
    server.stop().await;
}

/// Outcome counters carry the job's priority and mode, like the submit counter; coalesced and
/// refused submits carry the submit's.
#[tokio::test]
async fn outcome_counters_by_priority_and_mode() {
    let server = common::TestServer::start(&[]).await;
    let mut c = server.connect().await;
    let mut w = server.connect().await;
    w.send(CAN_DO, &[b"modes"]).await;
    // A high-priority foreground job completes; a low-priority background job fails.
    c.submit(SUBMIT_JOB_HIGH, "modes", "", b"a").await;
    w.send(GRAB_JOB, &[]).await;
    let a = w.expect(JOB_ASSIGN).await;
    w.send(WORK_COMPLETE, &[a.arg(0).as_bytes(), b""]).await;
    c.expect(WORK_COMPLETE).await;
    c.submit(SUBMIT_JOB_LOW_BG, "modes", "u", b"b").await;
    c.submit(SUBMIT_JOB_BG, "modes", "u", b"b").await; // coalesced
    w.send(GRAB_JOB, &[]).await;
    let a = w.expect(JOB_ASSIGN).await;
    w.send(WORK_FAIL, &[a.arg(0).as_bytes()]).await;
    // A refused submit: the high queue of `modes` is full.
    assert_eq!(c.admin("maxqueue modes 0 0 0").await, "OK\r\n");
    assert_eq!(c.admin("maxqueue modes 1 0 0").await, "OK\r\n");
    c.submit(SUBMIT_JOB_HIGH_BG, "modes", "", b"c").await;
    c.send(SUBMIT_JOB_HIGH_BG, &[b"modes", b"", b"d"]).await;
    c.expect(ERROR).await;
    w.send(ECHO_REQ, &[b"sync"]).await;
    w.expect(ECHO_RES).await;
    let h = server.http;
    let m = |name: &'static str, p: &'static str, mode: &'static str| async move {
        metric_where(
            h,
            name,
            &[("function", "modes"), ("priority", p), ("mode", mode)],
        )
        .await
    };
    assert_eq!(
        m("gearhouse_jobs_completed_total", "high", "foreground").await,
        1.0
    );
    assert_eq!(
        m("gearhouse_jobs_completed_total", "low", "background").await,
        0.0
    );
    assert_eq!(
        m("gearhouse_jobs_failed_total", "low", "background").await,
        1.0
    );
    assert_eq!(
        m("gearhouse_jobs_failed_total", "high", "foreground").await,
        0.0
    );
    assert_eq!(
        m("gearhouse_jobs_coalesced_total", "normal", "background").await,
        1.0
    );
    assert_eq!(
        metric_where(
            h,
            "gearhouse_jobs_refused_total",
            &[
                ("function", "modes"),
                ("reason", "queue_full"),
                ("priority", "high"),
                ("mode", "background")
            ]
        )
        .await,
        1.0
    );
    server.stop().await;
}
