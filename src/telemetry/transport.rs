//! Getting spans to the collector: OTLP/gRPC through opentelemetry-proto's generated tonic
//! client, OTLP/HTTP as a prost-encoded `ExportTraceServiceRequest` POSTed with reqwest; TLS by
//! rustls (system roots plus an optional CA, optional client certificate), gzip, headers.
//!
//! Both pipelines use what is built here, so they cannot disagree: the job export thread sends
//! through [`JobSender`], and the SDK exporter for operation spans gets the same tonic
//! [`Channel`] (gRPC) or the same reqwest client wrapped as [`OpsHttpClient`] (HTTP).
//!
//! Why a runtime of its own: tonic and reqwest need tokio's reactor, the job export thread and
//! the SDK's batch processor are plain threads, and the server's runtime may be gone (or be a
//! test's current-thread runtime, on which the SDK's gRPC exporter times out on flush). One
//! worker thread on [`io_runtime`] drives every connection to the collector; callers block on
//! it (the export thread) or await a task spawned on it (the SDK exporter).

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::settings::{Protocol, TraceSettings};
use super::TelemetryError;

static IO_RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The runtime that drives connections to the collector (created once, never dropped: it may
/// be first needed inside the server's runtime, where dropping a runtime is not allowed).
pub(crate) fn io_runtime() -> Result<&'static tokio::runtime::Runtime, TelemetryError> {
    if let Some(rt) = IO_RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gearhouse-otlp-io")
        .enable_all()
        .build()?;
    Ok(IO_RUNTIME.get_or_init(|| rt))
}

fn exporter_error(s: &TraceSettings, why: impl std::fmt::Display) -> TelemetryError {
    TelemetryError::Exporter {
        endpoint: s.endpoint.clone(),
        why: why.to_string(),
    }
}

/// The PEM files the settings name, read once at start-up.
struct TlsFiles {
    ca: Option<Vec<u8>>,
    /// (certificate chain, key)
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    fn read(s: &TraceSettings) -> Result<TlsFiles, TelemetryError> {
        let read = |var: &'static str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| TelemetryError::File {
                var,
                path: p.display().to_string(),
                why: e.to_string(),
            })
        };
        let ca = match &s.certificate {
            Some(p) => Some(read("OTEL_EXPORTER_OTLP_CERTIFICATE", p)?),
            None => None,
        };
        let identity = match (&s.client_certificate, &s.client_key) {
            (Some(c), Some(k)) => Some((
                read("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", c)?,
                read("OTEL_EXPORTER_OTLP_CLIENT_KEY", k)?,
            )),
            _ => None,
        };
        Ok(TlsFiles { ca, identity })
    }
}

fn is_tls(s: &TraceSettings) -> bool {
    s.endpoint.starts_with("https://")
}

/// A lazily connecting gRPC channel to the collector (TLS for `https://`), on [`io_runtime`].
pub(crate) fn grpc_channel(s: &TraceSettings) -> Result<Channel, TelemetryError> {
    let rt = io_runtime()?;
    let _in_rt = rt.enter();
    let mut ep = Endpoint::from_shared(s.endpoint.clone())
        .map_err(|e| exporter_error(s, format!("not a gRPC endpoint URL: {e}")))?
        .timeout(s.timeout)
        .connect_timeout(s.timeout.min(Duration::from_secs(10)));
    if is_tls(s) {
        let files = TlsFiles::read(s)?;
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = files.ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = files.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| exporter_error(s, format!("TLS settings: {e}")))?;
    }
    Ok(ep.connect_lazy())
}

/// `OTEL_EXPORTER_OTLP_HEADERS` as gRPC metadata (names lower-cased, as HTTP/2 requires).
pub(crate) fn grpc_metadata(s: &TraceSettings) -> Result<MetadataMap, TelemetryError> {
    let mut md = MetadataMap::new();
    for (k, v) in &s.headers {
        let key = MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()).map_err(|_| {
            TelemetryError::Unsupported {
                var: "OTEL_EXPORTER_OTLP_HEADERS",
                value: k.clone(),
                hint: "header names are letters, digits, '-' and '_'",
            }
        })?;
        let value =
            MetadataValue::try_from(v.as_str()).map_err(|_| TelemetryError::Unsupported {
                var: "OTEL_EXPORTER_OTLP_HEADERS",
                value: v.clone(),
                hint: "header values are visible ASCII (percent-encode the rest)",
            })?;
        md.insert(key, value);
    }
    Ok(md)
}

/// The rustls settings for OTLP/HTTP: system roots plus the configured CA, optional client
/// certificate; ring as the crypto provider (no openssl, no aws-lc build).
fn rustls_config(s: &TraceSettings) -> Result<rustls::ClientConfig, TelemetryError> {
    let files = TlsFiles::read(s)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A broken system certificate should not stop the server; the CA below may be all
        // that is needed.
        let _ = roots.add(cert);
    }
    let bad = |var: &'static str, why: String| TelemetryError::File {
        var,
        path: String::new(),
        why,
    };
    if let Some(ca) = &files.ca {
        for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
            let cert =
                cert.map_err(|e| bad("OTEL_EXPORTER_OTLP_CERTIFICATE", format!("not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad("OTEL_EXPORTER_OTLP_CERTIFICATE", e.to_string()))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| exporter_error(s, e))?
        .with_root_certificates(roots);
    let cfg = match files.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = rustls_pemfile::certs(&mut cert.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", e.to_string()))?;
            let key = rustls_pemfile::private_key(&mut key.as_slice())
                .map_err(|e| bad("OTEL_EXPORTER_OTLP_CLIENT_KEY", e.to_string()))?
                .ok_or_else(|| bad("OTEL_EXPORTER_OTLP_CLIENT_KEY", "no private key".into()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("OTEL_EXPORTER_OTLP_CLIENT_KEY", e.to_string()))?
        }
    };
    Ok(cfg)
}

/// The reqwest client for OTLP/HTTP (its own timeout is the export timeout).
pub(crate) fn http_client(s: &TraceSettings) -> Result<reqwest::Client, TelemetryError> {
    let mut b = reqwest::Client::builder().timeout(s.timeout);
    if is_tls(s) {
        b = b.tls_backend_preconfigured(rustls_config(s)?);
    } else {
        b = b.tls_backend_preconfigured(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| exporter_error(s, e))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
    }
    b.build().map_err(|e| exporter_error(s, e))
}

fn header_map(s: &TraceSettings) -> Result<http::HeaderMap, TelemetryError> {
    let mut h = http::HeaderMap::new();
    for (k, v) in &s.headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
            TelemetryError::Unsupported {
                var: "OTEL_EXPORTER_OTLP_HEADERS",
                value: k.clone(),
                hint: "header names are letters, digits, '-' and '_'",
            }
        })?;
        let value = http::HeaderValue::from_str(v).map_err(|_| TelemetryError::Unsupported {
            var: "OTEL_EXPORTER_OTLP_HEADERS",
            value: v.clone(),
            hint: "header values are visible ASCII (percent-encode the rest)",
        })?;
        h.insert(name, value);
    }
    Ok(h)
}

/// Why one export request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("gRPC export: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("HTTP export: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("gzip: {0}")]
    Gzip(#[from] std::io::Error),
}

enum Wire {
    Grpc {
        client: TraceServiceClient<Channel>,
        metadata: MetadataMap,
    },
    Http {
        client: reqwest::Client,
        headers: http::HeaderMap,
    },
}

/// Sends job spans; used from the export thread, which blocks on [`io_runtime`].
pub(crate) struct JobSender {
    wire: Wire,
    url: String,
    gzip: bool,
    timeout: Duration,
}

impl JobSender {
    pub(crate) fn new(s: &TraceSettings) -> Result<JobSender, TelemetryError> {
        let wire = match s.protocol {
            Protocol::Grpc => {
                let mut client = TraceServiceClient::new(grpc_channel(s)?);
                if s.gzip {
                    client = client
                        .send_compressed(CompressionEncoding::Gzip)
                        .accept_compressed(CompressionEncoding::Gzip);
                }
                Wire::Grpc {
                    client,
                    metadata: grpc_metadata(s)?,
                }
            }
            Protocol::HttpProtobuf => {
                let mut headers = header_map(s)?;
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-protobuf"),
                );
                if s.gzip {
                    headers.insert(
                        http::header::CONTENT_ENCODING,
                        http::HeaderValue::from_static("gzip"),
                    );
                }
                Wire::Http {
                    client: http_client(s)?,
                    headers,
                }
            }
        };
        Ok(JobSender {
            wire,
            url: s.endpoint.clone(),
            gzip: s.gzip,
            timeout: s.timeout,
        })
    }

    /// Sends one request and waits for the collector's answer (at most the export timeout).
    pub(crate) fn send(&mut self, req: ExportTraceServiceRequest) -> Result<(), SendError> {
        let rt = io_runtime().map_err(|e| SendError::Gzip(std::io::Error::other(e)))?;
        match &mut self.wire {
            Wire::Grpc { client, metadata } => {
                let mut r = tonic::Request::new(req);
                *r.metadata_mut() = metadata.clone();
                r.set_timeout(self.timeout);
                let mut c = client.clone();
                rt.block_on(async move { c.export(r).await })?;
                Ok(())
            }
            Wire::Http { client, headers } => {
                let mut body = req.encode_to_vec();
                if self.gzip {
                    body = gzip(&body)?;
                }
                let url = &self.url;
                rt.block_on(async move {
                    // Built inside the runtime: reqwest arms its timer when the request starts.
                    let resp = client
                        .post(url)
                        .headers(headers.clone())
                        .body(body)
                        .send()
                        .await?;
                    let status = resp.status();
                    if status.is_success() {
                        return Ok(());
                    }
                    let body = resp.text().await.unwrap_or_default();
                    Err(SendError::Refused {
                        url: url.clone(),
                        status: status.as_u16(),
                        body: body.chars().take(200).collect(),
                    })
                })
            }
        }
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    enc.finish()
}

/// The reqwest client as opentelemetry-otlp's HTTP client for operation spans; each request
/// runs as a task on [`io_runtime`], so the SDK's batch thread needs no runtime of its own.
#[derive(Debug, Clone)]
pub(crate) struct OpsHttpClient {
    client: reqwest::Client,
}

impl OpsHttpClient {
    pub(crate) fn new(s: &TraceSettings) -> Result<OpsHttpClient, TelemetryError> {
        io_runtime()?;
        Ok(OpsHttpClient {
            client: http_client(s)?,
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OpsHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let call = async move {
            let resp = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp.bytes().await?;
            let mut out = http::Response::new(bytes);
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            Ok::<_, reqwest::Error>(out)
        };
        let rt = io_runtime().map_err(Box::new)?;
        Ok(rt.spawn(call).await??)
    }
}
