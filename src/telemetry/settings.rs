//! Trace settings: the standard `OTEL_*` variables, as the OpenTelemetry specification defines
//! them, combined with the `[tracing]` config section (the variables win).
//!
//! One resolution feeds both pipelines (job traces and the server's own operation spans), so
//! they always share endpoint, protocol, TLS, headers, compression and resource. Every value a
//! user can set is either applied or refused here, naming the variable: a typo in
//! `OTEL_EXPORTER_OTLP_PROTOCOL` stops the server at start-up instead of silently exporting
//! nothing.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::TracingSection;

use super::TelemetryError;

/// How spans travel to the collector (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`grpc`), usually port 4317.
    Grpc,
    /// OTLP/HTTP with a protobuf body (`http/protobuf`, the specification's default), usually
    /// port 4318.
    HttpProtobuf,
}

/// Which jobs' traces are exported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Every job (`always_on`, or a ratio of 1).
    All,
    /// Tail sampling: a job that failed, raised an exception, was retried, dropped, refused or
    /// was slow is always kept; the others are kept at this ratio (by trace id, as
    /// TraceIdRatioBased decides).
    Tail { ratio: f64 },
}

/// Trace export settings after the `OTEL_*` environment and the config file are combined.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// For OTLP/HTTP the full URL of the traces endpoint (`.../v1/traces`); for gRPC the
    /// collector's URL (`http://` = plaintext, `https://` = TLS).
    pub endpoint: String,
    pub protocol: Protocol,
    /// PEM file of the CA that signed the collector's certificate (added to the system roots).
    pub certificate: Option<PathBuf>,
    /// PEM files of the client certificate and its key, for collectors that require mTLS.
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Gzip request bodies.
    pub gzip: bool,
    pub service_name: String,
    pub sampling: Sampling,
    /// Queue waits or run times this long keep a job's trace (`tracing.slow_ms`).
    pub slow: Duration,
    /// Events waiting for the export thread before new jobs are not traced.
    pub max_queue: usize,
    /// Jobs followed at once; jobs submitted past it are not traced (and counted).
    pub max_jobs_in_flight: usize,
    /// Largest batch per export request.
    pub max_export_batch: usize,
    /// Longest time a finished span waits before its batch is sent.
    pub schedule_delay: Duration,
    /// Longest time one export request may take.
    pub timeout: Duration,
    /// Extra headers (HTTP) or metadata (gRPC) for the collector, e.g. credentials.
    pub headers: Vec<(String, String)>,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource_attributes: Vec<(String, String)>,
}

/// Decodes `%XX` escapes (the W3C Baggage format the OTEL variables use for values).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(x) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `key=value,key2=value2` with percent-encoded values, as `OTEL_EXPORTER_OTLP_HEADERS`
/// and `OTEL_RESOURCE_ATTRIBUTES` write them. An entry without `=` is refused.
fn key_values(var: &'static str, s: &str) -> Result<Vec<(String, String)>, TelemetryError> {
    let mut out = Vec::new();
    for kv in s.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                out.push((k.trim().to_string(), percent_decode(v.trim())))
            }
            _ => {
                return Err(TelemetryError::Unsupported {
                    var,
                    value: s.to_string(),
                    hint: "write key=value pairs separated by commas, values percent-encoded",
                })
            }
        }
    }
    Ok(out)
}

/// The value of the signal-specific variable, else the generic one, with the name it came from.
type Found = Option<(&'static str, String)>;

fn refuse<T>(var: &'static str, value: String, hint: &'static str) -> Result<T, TelemetryError> {
    Err(TelemetryError::Unsupported { var, value, hint })
}

impl TraceSettings {
    /// Combines `env` (the `OTEL_*` variables, which win) with the `[tracing]` config section.
    /// `Ok(None)` means tracing is off: no endpoint, `OTEL_SDK_DISABLED=true`,
    /// `OTEL_TRACES_EXPORTER=none`, or `OTEL_TRACES_SAMPLER=always_off`. Each
    /// `OTEL_EXPORTER_OTLP_*` variable has an `OTEL_EXPORTER_OTLP_TRACES_*` form that wins.
    ///
    /// - endpoint: `..._TRACES_ENDPOINT` as is; else `OTEL_EXPORTER_OTLP_ENDPOINT` or
    ///   `tracing.otlp_endpoint`, with `v1/traces` appended for OTLP/HTTP (as is for gRPC).
    /// - protocol: `grpc` or `http/protobuf` (default); `http/json` is refused.
    /// - TLS: an `https://` endpoint; `..._CERTIFICATE` (CA), `..._CLIENT_CERTIFICATE` and
    ///   `..._CLIENT_KEY` (mTLS); `..._INSECURE` for a gRPC endpoint written without a scheme.
    /// - `..._COMPRESSION` (`gzip`, `none`), `..._HEADERS`, `..._TIMEOUT` (ms, default 10000).
    /// - `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` (its `service.name` counts when
    ///   `OTEL_SERVICE_NAME` is unset), else `tracing.service_name`.
    /// - sampler: `OTEL_TRACES_SAMPLER` + `OTEL_TRACES_SAMPLER_ARG` (see [`Sampling`]).
    /// - batching: `OTEL_BSP_SCHEDULE_DELAY` (ms, default 1000), `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
    pub fn resolve(
        cfg: &TracingSection,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TraceSettings>, TelemetryError> {
        let v = Vars(env);
        if v.is_off()? {
            return Ok(None);
        }
        let protocol = v.protocol()?;
        // The sampler is read before the endpoint: always_off turns tracing off either way.
        let Some(sampling) = v.sampling(cfg)? else {
            return Ok(None);
        };
        let Some(endpoint) = v.endpoint(cfg, protocol)? else {
            return Ok(None);
        };
        let tls = v.tls_files(&endpoint)?;
        let timeout_ms = v.millis(
            v.either(
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            10_000,
        )?;
        let schedule_ms = v.millis(v.one("OTEL_BSP_SCHEDULE_DELAY"), 1_000)?;
        let max_batch = v.millis(v.one("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), 512)?;
        let headers = match v.either(
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ) {
            Some((name, h)) => key_values(name, &h)?,
            None => Vec::new(),
        };
        let resource_attributes = match v.var("OTEL_RESOURCE_ATTRIBUTES") {
            Some(r) => key_values("OTEL_RESOURCE_ATTRIBUTES", &r)?,
            None => Vec::new(),
        };
        let service_name = v
            .var("OTEL_SERVICE_NAME")
            .or_else(|| {
                resource_attributes
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| cfg.service_name.clone());

        Ok(Some(TraceSettings {
            endpoint,
            protocol,
            certificate: tls.certificate.map(|(_, p)| p.into()),
            client_certificate: tls.client_certificate.map(|(_, p)| p.into()),
            client_key: tls.client_key.map(|(_, p)| p.into()),
            gzip: v.gzip()?,
            service_name,
            sampling,
            slow: Duration::from_millis(cfg.slow_ms.max(1)),
            max_queue: cfg.max_queue.max(1),
            max_jobs_in_flight: cfg.max_jobs_in_flight,
            max_export_batch: max_batch as usize,
            schedule_delay: Duration::from_millis(schedule_ms),
            timeout: Duration::from_millis(timeout_ms),
            headers,
            resource_attributes,
        }))
    }

    /// The resource every span carries: `service.name`, `service.version`,
    /// `service.instance.id` (the node id, as in job handles), then `OTEL_RESOURCE_ATTRIBUTES`.
    pub fn resource(&self, node_id: &str) -> Vec<(String, String)> {
        let mut res = vec![
            ("service.name".to_string(), self.service_name.clone()),
            (
                "service.version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
            ("service.instance.id".to_string(), node_id.to_string()),
        ];
        for (k, v) in &self.resource_attributes {
            if !res.iter().any(|(rk, _)| rk == k) {
                res.push((k.clone(), v.clone()));
            }
        }
        res
    }
}

/// The CA and client certificate files for TLS to the collector, with the variable each came
/// from.
struct TlsFiles {
    certificate: Found,
    client_certificate: Found,
    client_key: Found,
}

/// The `OTEL_*` variables, read through one function (the process environment, or a test's),
/// each step of [`TraceSettings::resolve`] as a method.
struct Vars<F: Fn(&str) -> Option<String>>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    /// A variable's trimmed value; empty counts as unset.
    fn var(&self, k: &str) -> Option<String> {
        (self.0)(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// A variable with its name.
    fn one(&self, name: &'static str) -> Found {
        self.var(name).map(|v| (name, v))
    }

    /// The signal-specific variable, else the generic one.
    fn either(&self, traces: &'static str, generic: &'static str) -> Found {
        self.one(traces).or_else(|| self.one(generic))
    }

    fn boolean(&self, found: Found) -> Result<Option<bool>, TelemetryError> {
        match found {
            None => Ok(None),
            Some((_, v)) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some((_, v)) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some((name, v)) => refuse(name, v, "use true or false"),
        }
    }

    /// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    fn is_off(&self) -> Result<bool, TelemetryError> {
        if self.boolean(self.one("OTEL_SDK_DISABLED"))? == Some(true) {
            return Ok(true);
        }
        match self.var("OTEL_TRACES_EXPORTER") {
            None => Ok(false),
            Some(e) if e == "otlp" => Ok(false),
            Some(e) if e == "none" => Ok(true),
            Some(e) => refuse(
                "OTEL_TRACES_EXPORTER",
                e,
                "gearhouse exports traces over OTLP only: use otlp or none",
            ),
        }
    }

    fn protocol(&self) -> Result<Protocol, TelemetryError> {
        match self.either(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ) {
            None => Ok(Protocol::HttpProtobuf),
            Some((_, p)) if p == "http/protobuf" => Ok(Protocol::HttpProtobuf),
            Some((_, p)) if p == "grpc" => Ok(Protocol::Grpc),
            Some((name, p)) => refuse(
                name,
                p,
                "use grpc (collector port 4317) or http/protobuf (port 4318); http/json is not supported",
            ),
        }
    }

    /// `OTEL_TRACES_SAMPLER` and its argument, else `tracing.sample_ratio`; `None` when the
    /// sampler turns tracing off.
    fn sampling(&self, cfg: &TracingSection) -> Result<Option<Sampling>, TelemetryError> {
        let arg = match self.var("OTEL_TRACES_SAMPLER_ARG") {
            None => None,
            Some(a) => match a.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Some(r),
                _ => {
                    return refuse(
                        "OTEL_TRACES_SAMPLER_ARG",
                        a,
                        "write a ratio between 0 and 1",
                    )
                }
            },
        };
        let ratio = match self.var("OTEL_TRACES_SAMPLER").as_deref() {
            Some("always_on") | Some("parentbased_always_on") => 1.0,
            Some("always_off") | Some("parentbased_always_off") => return Ok(None),
            // The specification's default argument for a ratio sampler is 1.0.
            Some("traceidratio") | Some("parentbased_traceidratio") => arg.unwrap_or(1.0),
            Some(other) => {
                return refuse(
                    "OTEL_TRACES_SAMPLER",
                    other.to_string(),
                    "use always_on, always_off, traceidratio or their parentbased_ forms",
                )
            }
            None => arg.unwrap_or(cfg.sample_ratio),
        };
        Ok(Some(if ratio >= 1.0 {
            Sampling::All
        } else {
            Sampling::Tail {
                ratio: ratio.max(0.0),
            }
        }))
    }

    /// The collector URL for traces; `None` when no endpoint is set (tracing off).
    fn endpoint(
        &self,
        cfg: &TracingSection,
        protocol: Protocol,
    ) -> Result<Option<String>, TelemetryError> {
        let insecure = self.boolean(self.either(
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
            "OTEL_EXPORTER_OTLP_INSECURE",
        ))?;
        let (name, raw, signal) = if let Some(e) = self.var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e, true)
        } else if let Some(e) = self.var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_ENDPOINT", e, false)
        } else if !cfg.otlp_endpoint.trim().is_empty() {
            (
                "tracing.otlp_endpoint",
                cfg.otlp_endpoint.trim().to_string(),
                false,
            )
        } else {
            return Ok(None);
        };
        let has_scheme = raw.starts_with("http://") || raw.starts_with("https://");
        let endpoint = match (protocol, has_scheme) {
            // A generic OTLP/HTTP endpoint is a base URL: the signal's path is appended.
            (Protocol::HttpProtobuf, true) if !signal => {
                format!("{}/v1/traces", raw.trim_end_matches('/'))
            }
            (_, true) => raw,
            // gRPC endpoints may be host:port; INSECURE says whether to use TLS (default: TLS).
            (Protocol::Grpc, false) if !raw.contains("://") => {
                let scheme = if insecure == Some(true) {
                    "http"
                } else {
                    "https"
                };
                format!("{scheme}://{raw}")
            }
            _ => return refuse(name, raw, "write a URL starting with http:// or https://"),
        };
        if has_scheme && insecure.is_some() {
            tracing::warn!(
                "OTEL_EXPORTER_OTLP_INSECURE only applies to a gRPC endpoint without a scheme: {endpoint} uses {} as its scheme says",
                if endpoint.starts_with("https://") { "TLS" } else { "plaintext" }
            );
        }
        Ok(Some(endpoint))
    }

    /// The CA and client certificate files (both or neither of certificate and key).
    fn tls_files(&self, endpoint: &str) -> Result<TlsFiles, TelemetryError> {
        let files = TlsFiles {
            certificate: self.either(
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
            ),
            client_certificate: self.either(
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            ),
            client_key: self.either(
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ),
        };
        match (&files.client_certificate, &files.client_key) {
            (Some((n, v)), None) | (None, Some((n, v))) => return refuse(
                n,
                v.clone(),
                "set both OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ),
            _ => {}
        }
        if !endpoint.starts_with("https://") {
            for (n, _) in [&files.certificate, &files.client_certificate]
                .into_iter()
                .flatten()
            {
                tracing::warn!("{n} is set but {endpoint} is not https: it is not used");
            }
        }
        Ok(files)
    }

    fn gzip(&self) -> Result<bool, TelemetryError> {
        match self.either(
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ) {
            None => Ok(false),
            Some((_, c)) if c == "gzip" => Ok(true),
            Some((_, c)) if c == "none" => Ok(false),
            Some((name, c)) => refuse(name, c, "use gzip or none"),
        }
    }

    /// A positive whole number (milliseconds, or a count), else `default`.
    fn millis(&self, found: Found, default: u64) -> Result<u64, TelemetryError> {
        match found {
            None => Ok(default),
            Some((name, v)) => match v.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => refuse(name, v, "write a whole number of milliseconds above 0"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn resolve(vars: &[(&str, &str)]) -> Result<Option<TraceSettings>, TelemetryError> {
        TraceSettings::resolve(&TracingSection::default(), env(vars))
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(resolve(&[]).unwrap(), None);
    }

    #[test]
    fn otel_variables_win_over_the_config_file() {
        let cfg = TracingSection {
            otlp_endpoint: "http://file:4318".into(),
            sample_ratio: 0.5,
            ..Default::default()
        };
        let s = TraceSettings::resolve(&cfg, env(&[])).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://file:4318/v1/traces");
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.sampling, Sampling::Tail { ratio: 0.5 });
        assert_eq!(s.service_name, "gearhouse");

        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_SERVICE_NAME", "queue-eu"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ];
        let s = TraceSettings::resolve(&cfg, env(&vars)).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(s.service_name, "queue-eu");
        assert_eq!(s.sampling, Sampling::Tail { ratio: 0.25 });

        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:9999/custom",
            ),
        ];
        let s = TraceSettings::resolve(&cfg, env(&vars)).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://traces:9999/custom");
    }

    #[test]
    fn signal_specific_variables_win_and_grpc_endpoints_get_no_path() {
        let s = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "authorization=Bearer%20x,tenant=t1",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5000"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "250"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.protocol, Protocol::Grpc);
        assert_eq!(s.endpoint, "https://c:4317");
        assert!(s.gzip);
        assert_eq!(
            s.headers,
            vec![
                ("authorization".to_string(), "Bearer x".to_string()),
                ("tenant".to_string(), "t1".to_string())
            ]
        );
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert_eq!(s.certificate, Some(PathBuf::from("/ca.pem")));
        assert_eq!(s.sampling, Sampling::All);

        let s = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://collector:4317");
        let s = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "https://collector:4317");
    }

    #[test]
    fn resource_service_name_and_attributes() {
        let s = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-attrs,deployment.environment=prod%2Ceu",
            ),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.service_name, "from-attrs");
        let r = s.resource("node-1");
        assert!(r.contains(&("service.instance.id".into(), "node-1".into())));
        assert!(r.contains(&("deployment.environment".into(), "prod,eu".into())));
        assert_eq!(r.iter().filter(|(k, _)| k == "service.name").count(), 1);
    }

    #[test]
    fn off_switches() {
        for vars in [
            &[("OTEL_TRACES_SAMPLER", "always_off")][..],
            &[("OTEL_SDK_DISABLED", "true")][..],
            &[("OTEL_TRACES_EXPORTER", "none")][..],
        ] {
            let mut v = vars.to_vec();
            v.push(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"));
            assert_eq!(resolve(&v).unwrap(), None, "{vars:?}");
        }
    }

    #[test]
    fn unsupported_values_are_refused_by_name() {
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_TRACES_SAMPLER", "jaeger_remote"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ("OTEL_SDK_DISABLED", "yes"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/key.pem"),
        ] {
            let e = resolve(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                (var, value),
            ])
            .unwrap_err()
            .to_string();
            assert!(e.contains(var) && e.contains(value), "{var}={value}: {e}");
        }
        let e = resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4318")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
    }
}
