//! Observability with real parts: a real OTLP/HTTP receiver (axum, decoding with
//! opentelemetry-proto) gets the trace of a job that was requeued once and then completed; a
//! real Prometheus (Debian's 2.42, on loopback) scrapes the real binary while jobs flow, and
//! every query of `dashboards/gearhouse.json` returns data; `promtool` checks `/metrics` and
//! tests the alert rules.

mod common;

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
use common::{free_port, http_get, BinServer, Conn};
use gearhouse::codec::PacketType::{self, *};
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
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| str_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    g.spans.push((service.clone(), s));
                }
            }
        }
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

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
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
// Traces.

/// One job, requeued once (its first worker disconnects mid-job) and then completed, arrives at
/// a real OTLP receiver as one trace: a root span, a queue span per wait, an attempt span per
/// worker; with the messaging and gearman attributes; log lines about the job carry its trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_job_is_one_trace_with_two_attempts() {
    let rx = otlp_receiver(Behaviour::Accept).await;
    let endpoint = format!("http://{}", rx.addr);
    let server = BinServer::start(
        &["--log-level", "info"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "gearhouse-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("GEARHOUSE_LOG__FORMAT", "json"),
        ],
    );
    let addr = server.addr();

    let mut client = Conn::connect(addr).await;
    client.send(SET_CLIENT_ID, &[b"client-7"]).await;
    let handle = client
        .submit(SUBMIT_JOB_HIGH, "traced", "u-1", b"payload")
        .await;

    let mut first = worker(addr, "worker-a", "traced").await;
    let a = grab(&mut first).await;
    assert_eq!(a.arg(0), handle);
    drop(first); // the worker dies holding the job: it goes back to the queue

    let mut second = worker(addr, "worker-b", "traced").await;
    let a = grab(&mut second).await;
    assert_eq!(a.arg(0), handle);
    second
        .send(WORK_COMPLETE, &[handle.as_bytes(), b"done"])
        .await;
    let done = client.expect(WORK_COMPLETE).await;
    assert_eq!(done.arg(1), "done");

    let spans = trace_of(&rx, &handle, Duration::from_secs(20)).await;
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root span: {spans:#?}");
    let root = roots[0];
    assert_eq!(root.name, "job traced");
    for s in &spans {
        if !std::ptr::eq(s, root) {
            assert_eq!(
                s.parent_span_id, root.span_id,
                "{} is a child of the root",
                s.name
            );
            assert!(
                s.start_time_unix_nano >= root.start_time_unix_nano,
                "{} starts inside the root",
                s.name
            );
            assert!(
                s.end_time_unix_nano <= root.end_time_unix_nano,
                "{} ends inside the root",
                s.name
            );
        }
    }
    let a = &root.attributes;
    assert_eq!(str_attr(a, "messaging.system").as_deref(), Some("gearman"));
    assert_eq!(
        str_attr(a, "messaging.destination.name").as_deref(),
        Some("traced")
    );
    assert_eq!(
        str_attr(a, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        str_attr(a, "gearman.handle").as_deref(),
        Some(handle.as_str())
    );
    assert_eq!(str_attr(a, "gearman.unique").as_deref(), Some("u-1"));
    assert_eq!(str_attr(a, "gearman.priority").as_deref(), Some("high"));
    assert_eq!(bool_attr(a, "gearman.background"), Some(false));
    assert_eq!(
        str_attr(a, "gearman.client_id").as_deref(),
        Some("client-7")
    );
    assert_eq!(
        str_attr(a, "gearman.worker_id").as_deref(),
        Some("worker-b")
    );
    assert_eq!(str_attr(a, "gearman.outcome").as_deref(), Some("complete"));
    assert_eq!(int_attr(a, "gearman.attempts"), Some(2));
    assert_ne!(status_code(root), StatusCode::Error as i32);

    let mut queues: Vec<&Span> = spans.iter().filter(|s| s.name == "queue traced").collect();
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "attempt traced")
        .collect();
    queues.sort_by_key(|s| s.start_time_unix_nano);
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(queues.len(), 2, "a wait before each attempt: {spans:#?}");
    assert_eq!(attempts.len(), 2, "two attempts: {spans:#?}");
    assert_eq!(spans.len(), 5, "root + 2 waits + 2 attempts");
    // queue 1 → attempt 1 → queue 2 → attempt 2, in time order.
    assert!(queues[0].end_time_unix_nano <= attempts[0].start_time_unix_nano);
    assert!(attempts[0].end_time_unix_nano <= queues[1].start_time_unix_nano);
    assert!(queues[1].end_time_unix_nano <= attempts[1].start_time_unix_nano);
    let (a1, a2) = (&attempts[0].attributes, &attempts[1].attributes);
    assert_eq!(int_attr(a1, "gearman.attempt"), Some(1));
    assert_eq!(
        str_attr(a1, "gearman.worker_id").as_deref(),
        Some("worker-a")
    );
    assert_eq!(
        str_attr(a1, "gearman.requeue_reason").as_deref(),
        Some("worker disconnected")
    );
    assert_eq!(
        status_code(attempts[0]),
        StatusCode::Error as i32,
        "a lost attempt is an error"
    );
    assert_eq!(int_attr(a2, "gearman.attempt"), Some(2));
    assert_eq!(
        str_attr(a2, "gearman.worker_id").as_deref(),
        Some("worker-b")
    );
    assert_eq!(
        str_attr(a2, "messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_ne!(status_code(attempts[1]), StatusCode::Error as i32);
    for s in queues.iter().chain(&attempts) {
        assert_eq!(
            str_attr(&s.attributes, "messaging.system").as_deref(),
            Some("gearman")
        );
        assert_eq!(
            str_attr(&s.attributes, "gearman.handle").as_deref(),
            Some(handle.as_str())
        );
    }
    let service = rx.got.lock().unwrap().spans[0].0.clone();
    assert_eq!(
        service, "gearhouse-under-test",
        "OTEL_SERVICE_NAME is the resource's service.name"
    );

    // A failing job ends with an error status on its root and on its attempt.
    let failing = client.submit(SUBMIT_JOB_BG, "traced", "", b"x").await;
    let a = grab(&mut second).await;
    assert_eq!(a.arg(0), failing);
    second.send(WORK_FAIL, &[failing.as_bytes()]).await;
    let spans = trace_of(&rx, &failing, Duration::from_secs(20)).await;
    let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    assert_eq!(status_code(root), StatusCode::Error as i32);
    assert_eq!(
        bool_attr(&root.attributes, "gearman.background"),
        Some(true)
    );
    assert_eq!(
        str_attr(&root.attributes, "gearman.priority").as_deref(),
        Some("normal")
    );
    let attempt = spans.iter().find(|s| s.name == "attempt traced").unwrap();
    assert_eq!(status_code(attempt), StatusCode::Error as i32);

    // The log line about the lost attempt carries the job's trace id.
    let trace_id = hex(&roots_trace_id(&rx, &handle));
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("job attempt ended without a result"))
        .unwrap_or_else(|| panic!("no requeue log line in:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("json log line");
    assert_eq!(v["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(v["handle"], handle.as_str(), "{line}");
    assert_eq!(v["reason"], "worker disconnected", "{line}");

    let exported = wait_metric(
        server.http_addr(),
        "gearhouse_trace_spans_exported_total",
        |v| v >= 8.0,
        Duration::from_secs(10),
    )
    .await;
    assert!(exported >= 8.0);
}

fn roots_trace_id(rx: &Receiver, handle: &str) -> Vec<u8> {
    let g = rx.got.lock().unwrap();
    g.spans
        .iter()
        .find(|(_, s)| {
            s.parent_span_id.is_empty()
                && str_attr(&s.attributes, "gearman.handle").as_deref() == Some(handle)
        })
        .map(|(_, s)| s.trace_id.clone())
        .expect("root span")
}

/// A collector that never answers costs spans, not jobs: with a tiny export queue, jobs keep
/// completing at once and the spans that did not fit are counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_collector_drops_spans_and_never_slows_jobs() {
    let rx = otlp_receiver(Behaviour::Hang).await;
    let endpoint = format!("http://{}", rx.addr);
    let server = BinServer::start(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "30000"),
            ("GEARHOUSE_TRACING__MAX_QUEUE", "16"),
        ],
    );
    let addr = server.addr();
    let mut client = Conn::connect(addr).await;
    let mut w = worker(addr, "w", "hung").await;
    let started = Instant::now();
    const JOBS: usize = 200;
    for i in 0..JOBS {
        let h = client
            .submit(SUBMIT_JOB_BG, "hung", "", i.to_string().as_bytes())
            .await;
        w.send(GRAB_JOB, &[]).await;
        let a = w.expect(JOB_ASSIGN).await;
        assert_eq!(a.arg(0), h);
        w.send(WORK_COMPLETE, &[h.as_bytes(), b""]).await;
    }
    // The worker's last completion is processed before its next grab is answered.
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    let status = client.admin("status").await;
    assert_eq!(status, "hung\t0\t0\t1\n.\n");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{JOBS} jobs took {took:?}");
    let dropped = metric(
        server.http_addr(),
        "gearhouse_trace_spans_dropped_total{reason=\"queue_full\"}",
    )
    .await;
    // Each job is a root, a wait and an attempt: 600 spans, at most 16 queued (and at most a
    // batch in the hung request).
    assert!(
        dropped >= (3 * JOBS - 16 - 3 * 16) as f64,
        "dropped {dropped}"
    );
    assert_eq!(rx.got.lock().unwrap().requests, 0);
    assert_eq!(
        metric(server.http_addr(), "gearhouse_trace_spans_exported_total").await,
        0.0
    );
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
