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
    assert_eq!(
        v["span_id"],
        hex(&attempts[0].span_id).as_str(),
        "the span id of the lost attempt: {line}"
    );

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

/// A collector that never answers costs traces, not jobs: with a tiny export queue, jobs keep
/// completing at once and the jobs that did not fit are counted as not traced.
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
            // Every job is exported, so the first batch already meets the hung collector.
            ("OTEL_TRACES_SAMPLER", "always_on"),
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
    let untraced = metric(
        server.http_addr(),
        "gearhouse_trace_jobs_untraced_total{reason=\"queue_full\"}",
    )
    .await;
    // Each job is 4 events (submitted, queued, assigned, finished); at most 16 wait for the
    // stuck export thread, and it holds at most a few jobs: the rest are not traced.
    assert!(untraced >= (JOBS - 16) as f64, "untraced {untraced}");
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

// ---------------------------------------------------------------------------------------------
// A real Prometheus.

fn dashboards_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// Prometheus (Debian's package) on loopback with a temporary store; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus with `dashboards/prometheus.yml`, its target pointed at `target`, the
    /// scrape and evaluation interval at 1 s, and the rule file by absolute path.
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let example = std::fs::read_to_string(dashboards_dir().join("prometheus.yml")).unwrap();
        let rules = dashboards_dir().join("alerts.yml");
        let cfg = example
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
            .replace("\"127.0.0.1:4731\"", &format!("\"{target}\""))
            .replace("  - alerts.yml", &format!("  - {}", rules.display()));
        assert!(
            cfg.contains(&target.to_string()),
            "the example scrapes 127.0.0.1:4731"
        );
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus must be installed (scripts/install-test-deps.sh)");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http10_get(addr, "/-/ready").await.map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    /// Runs an instant query; returns the result vector.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (code, body) = http10_get(self.addr, &path)
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer {expr}"));
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{expr}: {e}: HTTP {code} {body}"));
        assert_eq!(v["status"], "success", "{expr}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    async fn get_json(&self, path: &str) -> serde_json::Value {
        let (_, body) = http10_get(self.addr, path)
            .await
            .expect("prometheus answers");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

/// HTTP/1.0 GET (no chunked encoding to undo): (status, body).
async fn http10_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query expression of the dashboard: (panel title, expr).
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Runs `promtool` with `args` (and `stdin`), returns its output; panics with it on failure.
fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/install-test-deps.sh)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// A worker that completes most jobs, fails every 5th and raises an exception on every 7th
/// (by the number in the payload), until `stop`.
async fn busy_worker(
    addr: SocketAddr,
    func: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut w = worker(addr, "dash-worker", func).await;
    while !stop.load(Ordering::Relaxed) {
        w.send(GRAB_JOB_UNIQ, &[]).await;
        let r = w.recv().await;
        match r.kind {
            JOB_ASSIGN_UNIQ => {
                let h = r.arg(0);
                let n: u64 = r.arg(3).parse().unwrap_or(0);
                w.send(WORK_STATUS, &[h.as_bytes(), b"1", b"2"]).await;
                if n % 7 == 3 {
                    w.send(WORK_EXCEPTION, &[h.as_bytes(), b"boom"]).await;
                } else if n % 5 == 4 {
                    w.send(WORK_FAIL, &[h.as_bytes()]).await;
                } else {
                    w.send(WORK_COMPLETE, &[h.as_bytes(), r.arg(3).as_bytes()])
                        .await;
                }
            }
            NO_JOB => {
                w.send(PRE_SLEEP, &[]).await;
                let _ = w.recv_timeout(Duration::from_millis(100)).await;
            }
            NOOP => {}
            other => panic!("worker got {other:?}"),
        }
    }
}

async fn finished_jobs(http: SocketAddr, func: &str) -> f64 {
    let mut n = 0.0;
    for m in [
        "gearhouse_jobs_completed_total",
        "gearhouse_jobs_failed_total",
        "gearhouse_jobs_exceptions_total",
    ] {
        n += metric_where(http, m, &[("function", func)]).await;
    }
    n
}

/// A real Prometheus scrapes the real binary (with a real memcached mirror and a real OTLP
/// receiver) while jobs flow; every query of the Grafana dashboard returns data; the alert
/// rules load and evaluate on the live series; `promtool check metrics` accepts `/metrics`;
/// `promtool check rules` and `promtool test rules` pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_every_dashboard_query_returns_data() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const F: &str = "resize";
    let mc_a = common::Memcached::start(64, &["-M"]);
    let mc_b = common::Memcached::start(64, &[]);
    let nodes = format!("{},{}", mc_a.addr(), mc_b.addr());
    let rx = otlp_receiver(Behaviour::Accept).await;
    let endpoint = format!("http://{}", rx.addr);
    let server = BinServer::start(
        &["--memcached", &nodes],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // The persist span of an ordinary job is checked below: keep every trace.
            ("OTEL_TRACES_SAMPLER", "always_on"),
            // A limit that never holds anything, so the per-function limit panels have series.
            ("GEARHOUSE_FUNCTIONS__RESIZE__MAX_RUNNING", "1000"),
        ],
    );
    let (addr, http) = (server.addr(), server.http_addr());
    let prom = Prometheus::start(http).await;

    let mut client = Conn::connect(addr).await;
    client.send(SET_CLIENT_ID, &[b"dash-client"]).await;
    let mut admin = Conn::connect(addr).await;
    // A refused submit: the queue of `resize` is full.
    assert_eq!(admin.admin(&format!("maxqueue {F} 2")).await, "OK\r\n");
    client.submit(SUBMIT_JOB_BG, F, "", b"0").await;
    client.submit(SUBMIT_JOB_BG, F, "", b"0").await;
    client.send(SUBMIT_JOB_BG, &[F.as_bytes(), b"", b"0"]).await;
    let refused = client.expect(ERROR).await;
    assert_eq!(refused.arg(0), "QUEUE_ERROR");
    assert_eq!(admin.admin(&format!("maxqueue {F} 0")).await, "OK\r\n");
    // A coalesced submit.
    let h1 = client.submit(SUBMIT_JOB_BG, F, "same", b"0").await;
    let h2 = client.submit(SUBMIT_JOB_BG, F, "same", b"0").await;
    assert_eq!(h1, h2);
    // A retry: a worker takes a job and dies.
    let mut flaky = worker(addr, "flaky", F).await;
    grab(&mut flaky).await;
    drop(flaky);
    // An epoch job for tomorrow, and jobs of a function nobody works on.
    let tomorrow = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86_400)
        .to_string();
    client
        .send(
            SUBMIT_JOB_EPOCH,
            &[F.as_bytes(), b"", tomorrow.as_bytes(), b"0"],
        )
        .await;
    client.expect(JOB_CREATED).await;
    client.submit(SUBMIT_JOB_BG, "orphan", "", b"0").await;
    client.submit(SUBMIT_JOB_LOW_BG, "orphan", "", b"0").await;
    // A protocol error on its own connection, and admin commands.
    let mut bad = Conn::connect(addr).await;
    bad.send(JOB_CREATED, &[b"H:x:1"]).await;
    bad.expect(ERROR).await;
    admin.admin("status").await;
    admin.admin("workers").await;

    // Traffic: foreground and background jobs at every priority for about 3 s.
    let stop = Arc::new(AtomicBool::new(false));
    let worker_task = tokio::spawn(busy_worker(addr, F, stop.clone()));
    let mut fg = Conn::connect(addr).await;
    const JOBS: usize = 150;
    for i in 0..JOBS {
        let n = i.to_string();
        let bg = i % 2 == 1;
        let kind = match (i % 3, bg) {
            (0, false) => SUBMIT_JOB_HIGH,
            (1, false) => SUBMIT_JOB,
            (_, false) => SUBMIT_JOB_LOW,
            (0, true) => SUBMIT_JOB_HIGH_BG,
            (1, true) => SUBMIT_JOB_BG,
            (_, true) => SUBMIT_JOB_LOW_BG,
        };
        if bg {
            client.submit(kind, F, "", n.as_bytes()).await;
        } else {
            fg.submit(kind, F, "", n.as_bytes()).await;
            loop {
                let r = fg.recv().await;
                if matches!(r.kind, WORK_COMPLETE | WORK_FAIL) {
                    break;
                }
                assert_eq!(r.kind, WORK_STATUS);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 2 + 1 jobs before the loop (one of them retried once), JOBS in it; the epoch job waits.
    let total = (3 + JOBS) as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while finished_jobs(http, F).await < total {
        assert!(
            Instant::now() < deadline,
            "the worker did not finish the jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Prometheus has scraped the end of the traffic.
    let seen = format!(
        "sum(gearhouse_jobs_completed_total{{function=\"{F}\"}}) + sum(gearhouse_jobs_failed_total{{function=\"{F}\"}}) + sum(gearhouse_jobs_exceptions_total{{function=\"{F}\"}})"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = prom.query(&seen).await;
        let v: f64 = r
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if v >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the finished jobs ({v})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A durable job's trace has a span for its memcached write, before it was queued.
    let spans = trace_of(&rx, &h1, Duration::from_secs(10)).await;
    let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    let persist = spans
        .iter()
        .find(|s| s.name == format!("persist {F}"))
        .unwrap_or_else(|| panic!("no persist span: {spans:#?}"));
    assert_eq!(persist.parent_span_id, root.span_id);
    let first_wait = spans
        .iter()
        .filter(|s| s.name == format!("queue {F}"))
        .map(|s| s.start_time_unix_nano)
        .min()
        .unwrap();
    assert!(persist.start_time_unix_nano >= root.start_time_unix_nano);
    assert!(
        persist.end_time_unix_nano <= first_wait,
        "the job was queued once durable"
    );
    // Spans reached the collector, so the trace panels have data too.
    wait_metric(
        http,
        "gearhouse_trace_spans_exported_total",
        |v| v > 0.0,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // one more scrape for the rates

    // Every dashboard query returns at least one series.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dashboards_dir().join("gearhouse.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["schemaVersion"].as_i64().unwrap() >= 36);
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "function"]);
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 40, "{} queries", queries.len());
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        assert!(
            !expr.contains("$__interval") && !expr.contains("$__range"),
            "{title}: {expr}"
        );
        let q = expr
            .replace("$function", F)
            .replace("$__rate_interval", "1m");
        assert!(!q.contains('$'), "unsubstituted variable in {title}: {q}");
        if prom.query(&q).await.is_empty() {
            empty.push(format!("{title}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );
    // The function variable: label_values(gearman_jobs, function).
    let values = prom
        .get_json("/api/v1/label/function/values?match%5B%5D=gearman_jobs")
        .await;
    let values: Vec<&str> = values["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        values.contains(&F) && values.contains(&"orphan"),
        "{values:?}"
    );

    // The rules loaded, and evaluate on the live series: jobs of `orphan` wait with no worker.
    let rules = prom.get_json("/api/v1/rules").await;
    let loaded: BTreeSet<String> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        loaded,
        alert_names(),
        "Prometheus loaded every rule of alerts.yml"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alerts = prom.get_json("/api/v1/alerts").await;
        let pending: Vec<(String, String)> = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                    a["labels"]["function"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let want = (
            "GearhouseJobsQueuedWithoutWorkers".to_string(),
            "orphan".to_string(),
        );
        if pending.contains(&want) {
            assert!(
                !pending.iter().any(|(_, f)| f == F),
                "nothing fires for {F}, which has a worker: {pending:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alert for orphan not pending: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // promtool accepts the live /metrics.
    let (_, body) = http_get(http, "/metrics").await.unwrap();
    assert!(
        body.contains("gearhouse_memcached_node_up"),
        "persistence metrics are exported"
    );
    assert!(body.contains("process_resident_memory_bytes"));
    promtool(&["check", "metrics"], &dashboards_dir(), Some(&body));

    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), worker_task).await;
    drop((mc_a, mc_b));
}

/// Alert names defined in alerts.yml.
fn alert_names() -> BTreeSet<String> {
    std::fs::read_to_string(dashboards_dir().join("alerts.yml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|s| s.trim().to_string())
        .collect()
}

/// `promtool check rules` and `promtool test rules` pass, and every alert has a unit test
/// that fires it and one that shows it quiet.
#[test]
fn alert_rules_check_and_every_alert_has_firing_and_quiet_tests() {
    let dir = dashboards_dir();
    let out = promtool(&["check", "rules", "alerts.yml"], &dir, None);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "alerts.test.yml"], &dir, None);
    assert!(out.contains("SUCCESS"), "{out}");
    promtool(&["check", "config", "prometheus.yml"], &dir, None);

    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let mut firing: BTreeMap<String, usize> = BTreeMap::new();
    let mut quiet: BTreeMap<String, usize> = BTreeMap::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(name) = l.strip_prefix("alertname: ") {
            let next = lines.get(i + 1).copied().unwrap_or("");
            let which = if next == "exp_alerts: []" {
                &mut quiet
            } else {
                &mut firing
            };
            *which.entry(name.to_string()).or_default() += 1;
        }
    }
    for name in alert_names() {
        assert!(firing.contains_key(&name), "no test fires {name}");
        assert!(quiet.contains_key(&name), "no test shows {name} quiet");
    }
    assert_eq!(alert_names().len(), 15);
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
