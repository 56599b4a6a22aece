//! Span assembly: a finished job's record becomes `opentelemetry_proto::tonic::trace::v1::Span`
//! messages (prost-encoded by the transport), with the start and end times the events recorded.
//!
//! A trace per job: a root span `job <function>` from submit to the final outcome, a child
//! `queue <function>` span for every wait in a queue, a child `attempt <function>` span for every
//! time a worker held the job (a requeued job shows two attempts and two waits), and a
//! `persist <function>` span for the durable write a background job waited for, when a memcached
//! mirror is configured. Attribute names follow the OpenTelemetry messaging conventions
//! (`messaging.system = gearman`, ...) plus `gearman.*`.
//!
//! Why these messages are built here instead of through the SDK's span objects: see the
//! README ("Which tracing crates, and why"); in short, `SpanData` plus the exporter's
//! conversion cost a large share of the server's CPU per job, and the ids would be drawn at
//! random instead of from the job's sequence number, which log lines need while it runs.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;

use hashbrown::HashMap;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

use crate::engine::JobOutcome;

use super::export::{JobTrace, Segment};
use super::tracer::Peer;

/// The trace id of job `seq`: a keyed hash, so it needs no storage and is never 0.
pub(crate) fn trace_id(keys: &RandomState, seq: u64) -> u128 {
    let hi = keys.hash_one((seq, 0u8)) as u128;
    let lo = keys.hash_one((seq, 1u8)).max(1) as u128;
    (hi << 64) | lo
}

/// A trace id as logs and trace backends print it.
pub(crate) fn trace_hex(id: u128) -> String {
    format!("{id:032x}")
}

/// A span id as logs and trace backends print it.
pub(crate) fn span_hex(id: u64) -> String {
    format!("{id:016x}")
}

/// Span ids: a keyed hash of a counter (unique per process, never 0).
pub(crate) struct SpanIds {
    keys: RandomState,
    next: u64,
}

impl Default for SpanIds {
    fn default() -> Self {
        SpanIds {
            keys: RandomState::new(),
            next: 0,
        }
    }
}

impl SpanIds {
    pub(crate) fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.keys.hash_one(self.next).max(1)
    }
}

fn str_kv(key: &str, v: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
        ..Default::default()
    }
}

fn int_kv(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

fn bool_kv(key: &str, v: bool) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::BoolValue(v)),
        }),
        ..Default::default()
    }
}

/// The OTLP resource for `attributes` (service.name first).
pub(crate) fn resource(attributes: &[(String, String)]) -> Resource {
    Resource {
        attributes: attributes.iter().map(|(k, v)| str_kv(k, v)).collect(),
        ..Default::default()
    }
}

/// An error status with `message`, or none (unset).
fn status(error: Option<&str>) -> Option<Status> {
    error.map(|m| Status {
        message: m.to_string(),
        code: StatusCode::Error as i32,
    })
}

/// Spans of finished jobs waiting to be sent, with the resource and scope they go out under.
pub(crate) struct Batch {
    spans: Vec<Span>,
    resource: Resource,
    scope: InstrumentationScope,
    ids: SpanIds,
    handle_prefix: String,
    /// `ip:port` of connections seen in traces (connections are long-lived: formatted once).
    addr_text: HashMap<SocketAddr, Box<str>>,
}

impl Batch {
    pub(crate) fn new(resource: Resource, node_id: &str) -> Batch {
        Batch {
            spans: Vec::new(),
            resource,
            scope: InstrumentationScope {
                name: "gearhouse".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            },
            ids: SpanIds::default(),
            handle_prefix: format!("H:{node_id}:"),
            addr_text: HashMap::new(),
        }
    }

    /// A fresh span id (the export thread draws root and attempt ids as the job moves, so log
    /// lines can name them).
    pub(crate) fn span_id(&mut self) -> u64 {
        self.ids.next_id()
    }

    /// The job handle of `seq`, as clients see it.
    pub(crate) fn handle(&self, seq: u64) -> String {
        format!("{}{}", self.handle_prefix, seq)
    }

    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Everything waiting, as one request.
    pub(crate) fn take_request(&mut self) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(self.scope.clone()),
                    spans: std::mem::take(&mut self.spans),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// Adds the spans of one finished job.
    pub(crate) fn push_job(
        &mut self,
        trace: u128,
        seq: u64,
        t: &JobTrace,
        outcome: JobOutcome,
        end: u64,
    ) {
        if self.addr_text.len() > 4096 {
            self.addr_text.clear();
        }
        let peers = t.client.iter().chain(t.done.iter().filter_map(|s| match s {
            Segment::Attempt { worker, .. } => Some(worker),
            _ => None,
        }));
        for p in peers {
            self.addr_text
                .entry(p.addr)
                .or_insert_with(|| p.addr.to_string().into());
        }
        let addr_text = &self.addr_text;
        let id_of = |p: &Peer| -> Cow<'_, str> {
            match p.id.as_str() {
                "-" | "" => Cow::Borrowed(addr_text.get(&p.addr).map(|s| &**s).unwrap_or("-")),
                id => Cow::Owned(id.to_string()),
            }
        };
        let trace_bytes = trace.to_be_bytes().to_vec();
        let root_bytes = t.root_span.to_be_bytes().to_vec();
        let func: &str = t.function.as_str();
        let handle = format!("{}{}", self.handle_prefix, seq);
        let common = || {
            vec![
                str_kv("messaging.system", "gearman"),
                str_kv("messaging.destination.name", func),
                str_kv("gearman.handle", &handle),
            ]
        };
        let mut out = Vec::with_capacity(t.done.len() + 2);
        let mut child = |name: &str, span_id: u64, start, end, attributes, error: Option<&str>| {
            out.push(Span {
                trace_id: trace_bytes.clone(),
                span_id: span_id.to_be_bytes().to_vec(),
                parent_span_id: root_bytes.clone(),
                name: format!("{name}{func}"),
                kind: SpanKind::Internal as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                attributes,
                status: status(error),
                ..Default::default()
            });
        };
        if let Some((start, end)) = t.persisted {
            child("persist ", self.ids.next_id(), start, end, common(), None);
        }
        let last_attempt = t.attempts();
        let mut attempt_no = 0;
        for seg in t.done.iter() {
            match seg {
                Segment::Queue { start, end } => {
                    child("queue ", self.ids.next_id(), *start, *end, common(), None);
                }
                Segment::Attempt {
                    n: number,
                    span_id,
                    start,
                    end,
                    worker,
                    requeued,
                } => {
                    attempt_no += 1;
                    let error = match requeued {
                        Some(why) => Some(&**why),
                        None if attempt_no == last_attempt => match outcome {
                            JobOutcome::Fail => Some("the worker sent WORK_FAIL"),
                            JobOutcome::Exception => Some("the worker sent WORK_EXCEPTION"),
                            JobOutcome::TimedOut => Some("the worker passed its CAN_DO_TIMEOUT"),
                            _ => None,
                        },
                        None => None,
                    };
                    let mut attrs = common();
                    attrs.push(str_kv("messaging.operation.type", "process"));
                    attrs.push(int_kv("gearman.attempt", *number as i64));
                    attrs.push(str_kv("gearman.worker_id", &id_of(worker)));
                    if let Some(why) = requeued {
                        attrs.push(str_kv("gearman.requeue_reason", why));
                    }
                    child("attempt ", *span_id, *start, *end, attrs, error);
                }
            }
        }

        // The root: the job from submit to its final outcome.
        let mut attrs = common();
        attrs.extend([
            str_kv("messaging.operation.type", "send"),
            str_kv("gearman.unique", t.unique.as_deref().unwrap_or("")),
            str_kv("gearman.priority", t.priority.as_str()),
            bool_kv("gearman.background", t.background),
            str_kv("gearman.outcome", outcome.as_str()),
            int_kv("gearman.attempts", last_attempt as i64),
        ]);
        if let Some(c) = &t.client {
            attrs.push(str_kv("gearman.client_id", &id_of(c)));
        }
        if let Some(Segment::Attempt {
            worker,
            requeued: None,
            ..
        }) = t.done.iter().last()
        {
            attrs.push(str_kv("gearman.worker_id", &id_of(worker)));
        }
        let error = match outcome {
            JobOutcome::Complete | JobOutcome::Cancelled => None,
            JobOutcome::Fail => Some("the worker sent WORK_FAIL"),
            JobOutcome::Exception => Some("the worker sent WORK_EXCEPTION"),
            JobOutcome::Dropped => Some("dropped after engine.job_retries attempts"),
            JobOutcome::Refused => Some("its durable write failed (ERROR QUEUE_ERROR)"),
            JobOutcome::TimedOut => Some("its worker passed its CAN_DO_TIMEOUT (WORK_FAIL sent)"),
        };
        out.push(Span {
            trace_id: trace_bytes,
            span_id: root_bytes,
            name: format!("job {func}"),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: t.submitted,
            end_time_unix_nano: end,
            attributes: attrs,
            status: status(error),
            ..Default::default()
        });
        self.spans.append(&mut out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_sample_evenly() {
        let keys = RandomState::new();
        let ids: std::collections::HashSet<u128> =
            (0..10_000).map(|s| trace_id(&keys, s)).collect();
        assert_eq!(ids.len(), 10_000);
        // Ratio sampling looks at the low 63 bits: about half are below the middle.
        let low = ids
            .iter()
            .filter(|&&t| ((t as u64) >> 1) < (1u64 << 62))
            .count();
        assert!((4_500..5_500).contains(&low), "{low}");
    }

    #[test]
    fn span_ids_are_unique_and_non_zero() {
        let mut ids = SpanIds::default();
        let set: std::collections::HashSet<u64> = (0..10_000).map(|_| ids.next_id()).collect();
        assert_eq!(set.len(), 10_000);
        assert!(!set.contains(&0));
    }
}
