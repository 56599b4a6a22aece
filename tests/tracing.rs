//! Trace export with real receivers: an OTLP/gRPC collector built from opentelemetry-proto's
//! generated `TraceServiceServer` (tonic, TLS with a client certificate, gzip) and an OTLP/HTTP
//! receiver (axum), both decoding what the real binary sends. Certificates are made by the
//! `openssl` command for each test. Covered: TLS with a custom CA (`OTEL_EXPORTER_OTLP_CERTIFICATE`)
//! and mTLS, gzip, a URL-encoded header arriving decoded, tail sampling at ratio 0 (a failed job
//! is kept, an ordinary one is not), operation spans with `service.name`, and an unsupported
//! value stopping the server with its name.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use common::otlp::{spans_with_service, str_attr};
use common::pki::Pki;
use common::{http_get, BinServer, Conn};
use gearhouse::codec::PacketType::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

// ---------------------------------------------------------------------------------------------
// What a receiver saw.

#[derive(Default)]
struct Received {
    /// (service.name of the resource, span)
    spans: Vec<(String, Span)>,
    /// The `authorization` header (HTTP) or metadata (gRPC) of each request.
    authorization: Vec<String>,
    /// The content encoding of each request (`gzip`, or empty).
    encodings: Vec<String>,
}

impl Received {
    fn record(&mut self, req: ExportTraceServiceRequest, auth: String, encoding: String) {
        self.authorization.push(auth);
        self.encodings.push(encoding);
        self.spans.extend(spans_with_service(req));
    }
}

type Got = Arc<Mutex<Received>>;

/// Waits until `pred` holds for what the receiver got; panics with `what` after `t`.
async fn wait_for(got: &Got, what: &str, t: Duration, pred: impl Fn(&Received) -> bool) {
    let deadline = Instant::now() + t;
    loop {
        if pred(&got.lock().unwrap()) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn root_of<'a>(r: &'a Received, handle: &str) -> Option<&'a Span> {
    r.spans.iter().map(|(_, s)| s).find(|s| {
        s.parent_span_id.is_empty()
            && str_attr(&s.attributes, "gearman.handle").as_deref() == Some(handle)
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn has_handle(r: &Received, handle: &str) -> bool {
    r.spans
        .iter()
        .any(|(_, s)| str_attr(&s.attributes, "gearman.handle").as_deref() == Some(handle))
}

// ---------------------------------------------------------------------------------------------
// Certificates (tests/common/pki.rs): a CA, a server certificate for localhost, a client one.

fn make_certs() -> Pki {
    let pki = Pki::new();
    pki.issue("server", "localhost", true, false);
    pki.issue("client", "gearhouse", false, false);
    pki
}

fn read(pki: &Pki, name: &str) -> Vec<u8> {
    std::fs::read(pki.path(name)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Receivers.

struct Collector {
    got: Got,
}

#[async_trait::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let md = req.metadata();
        let text = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (auth, enc) = (text("authorization"), text("grpc-encoding"));
        self.got.lock().unwrap().record(req.into_inner(), auth, enc);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC collector on TLS that requires a client certificate signed by the test CA.
async fn grpc_collector(certs: &Pki) -> (SocketAddr, Got) {
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
    let got = Got::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(certs, "server.pem"),
            read(certs, "server.key"),
        ))
        .client_ca_root(Certificate::from_pem(read(certs, "ca.pem")));
    let svc = TraceServiceServer::new(Collector { got: got.clone() })
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(svc)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(async move { server.await.unwrap() });
    (addr, got)
}

/// An OTLP/HTTP receiver (plain HTTP) that accepts gzip bodies.
async fn http_collector() -> (SocketAddr, Got) {
    async fn traces(State(got): State<Got>, headers: HeaderMap, body: Bytes) -> Vec<u8> {
        let text = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let enc = text("content-encoding");
        let body = if enc == "gzip" {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
                .expect("a gzip body");
            out
        } else {
            body.to_vec()
        };
        let req = ExportTraceServiceRequest::decode(&body[..]).expect("OTLP protobuf");
        got.lock().unwrap().record(req, text("authorization"), enc);
        Vec::new()
    }
    let got = Got::default();
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, got)
}

// ---------------------------------------------------------------------------------------------
// Helpers for jobs and metrics.

async fn worker(addr: SocketAddr, func: &str) -> Conn {
    let mut w = Conn::connect(addr).await;
    w.send(CAN_DO, &[func.as_bytes()]).await;
    w
}

/// Runs one background job through `w`, ending it with `end` (WORK_COMPLETE or WORK_FAIL).
async fn run_job(
    client: &mut Conn,
    w: &mut Conn,
    func: &str,
    end: gearhouse::codec::PacketType,
) -> String {
    let h = client.submit(SUBMIT_JOB_BG, func, "", b"x").await;
    w.send(GRAB_JOB, &[]).await;
    let a = w.expect(JOB_ASSIGN).await;
    assert_eq!(a.arg(0), h);
    if end == WORK_COMPLETE {
        w.send(WORK_COMPLETE, &[h.as_bytes(), b"ok"]).await;
    } else {
        w.send(end, &[h.as_bytes()]).await;
    }
    h
}

async fn metric(http: SocketAddr, series: &str) -> f64 {
    let (code, body) = http_get(http, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200);
    body.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .next()
        .unwrap_or(-1.0)
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// gRPC over TLS with a custom CA and a client certificate, gzip and an auth header; tail
/// sampling at ratio 0 exports the failed job and not the ordinary one; the start-up operation
/// span arrives with `service.name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_tls_gzip_headers_and_tail_sampling() {
    let certs = make_certs();
    let (addr, got) = grpc_collector(&certs).await;
    let endpoint = format!("https://localhost:{}", addr.port());
    let (ca, cert, key) = (
        certs.p("ca.pem"),
        certs.p("client.pem"),
        certs.p("client.key"),
    );
    let server = BinServer::start(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key.as_str()),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20x"),
            ("OTEL_SERVICE_NAME", "gearhouse-grpc-test"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let mut client = Conn::connect(server.addr()).await;
    let mut w = worker(server.addr(), "tail").await;
    let ordinary = run_job(&mut client, &mut w, "tail", WORK_COMPLETE).await;
    let failed = run_job(&mut client, &mut w, "tail", WORK_FAIL).await;

    wait_for(
        &got,
        "the failed job's trace over gRPC",
        Duration::from_secs(20),
        |r| root_of(r, &failed).is_some(),
    )
    .await;
    wait_for(
        &got,
        "the gearhouse.startup operation span",
        Duration::from_secs(20),
        |r| r.spans.iter().any(|(_, s)| s.name == "gearhouse.startup"),
    )
    .await;
    {
        let r = got.lock().unwrap();
        // Events are handled in order: the ordinary job was decided before the failed one.
        assert!(
            !has_handle(&r, &ordinary),
            "an ordinary job is sampled out at ratio 0"
        );
        assert_eq!(
            str_attr(&root_of(&r, &failed).unwrap().attributes, "gearman.outcome").as_deref(),
            Some("fail")
        );
        for (service, s) in &r.spans {
            assert_eq!(service, "gearhouse-grpc-test", "service.name of {}", s.name);
        }
        assert!(
            r.authorization.iter().all(|a| a == "Bearer x"),
            "{:?}",
            r.authorization
        );
        assert!(r.encodings.iter().all(|e| e == "gzip"), "{:?}", r.encodings);
    }

    let http = server.http_addr();
    assert!(
        metric(
            http,
            r#"gearhouse_trace_jobs_sampled_total{decision="dropped",reason="ratio"}"#
        )
        .await
            >= 1.0
    );
    assert!(
        metric(
            http,
            r#"gearhouse_trace_jobs_sampled_total{decision="kept",reason="failed"}"#
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric(
            http,
            r#"gearhouse_trace_jobs_sampled_total{decision="kept",reason="slow"}"#
        )
        .await,
        0.0,
        "every reason is exported from the start"
    );
}

/// OTLP/HTTP with gzip and a header; `always_on` exports an ordinary job; operation spans take
/// the same way (opentelemetry-otlp's HTTP exporter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_gzip_headers_and_every_job_with_always_on() {
    let (addr, got) = http_collector().await;
    let endpoint = format!("http://{addr}");
    let server = BinServer::start(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20x"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("OTEL_SERVICE_NAME", "gearhouse-http-test"),
            ("GEARHOUSE_LOG__FORMAT", "json"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let mut client = Conn::connect(server.addr()).await;
    let mut w = worker(server.addr(), "every").await;
    let ordinary = run_job(&mut client, &mut w, "every", WORK_COMPLETE).await;
    wait_for(
        &got,
        "the ordinary job's trace over HTTP",
        Duration::from_secs(20),
        |r| root_of(r, &ordinary).is_some(),
    )
    .await;
    wait_for(
        &got,
        "the gearhouse.startup operation span",
        Duration::from_secs(20),
        |r| r.spans.iter().any(|(_, s)| s.name == "gearhouse.startup"),
    )
    .await;
    {
        let r = got.lock().unwrap();
        assert!(
            r.authorization.iter().all(|a| a == "Bearer x"),
            "{:?}",
            r.authorization
        );
        assert!(r.encodings.iter().all(|e| e == "gzip"), "{:?}", r.encodings);
        for (service, s) in &r.spans {
            assert_eq!(service, "gearhouse-http-test", "service.name of {}", s.name);
        }
        // A log line written inside the operation span carries its trace and span ids.
        let startup = &r
            .spans
            .iter()
            .find(|(_, s)| s.name == "gearhouse.startup")
            .unwrap()
            .1;
        let log = server.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("job traces and operation spans go to the collector"))
            .unwrap_or_else(|| panic!("no start-up line in:\n{log}"));
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert_eq!(v["trace_id"], hex(&startup.trace_id).as_str(), "{line}");
        assert_eq!(v["span_id"], hex(&startup.span_id).as_str(), "{line}");
    }
    assert!(
        metric(
            server.http_addr(),
            r#"gearhouse_trace_jobs_sampled_total{decision="kept",reason="ratio"}"#
        )
        .await
            >= 1.0
    );
}

/// A value gearhouse cannot honour stops the real binary at start-up, naming the variable and
/// the value.
#[test]
fn an_unsupported_protocol_stops_the_server_naming_it() {
    let out = Command::new(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .output()
        .expect("run gearhouse");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it must not start: {stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && stderr.contains("http/json"),
        "{stderr}"
    );
}
