//! The status page: `GET /` on the HTTP listener, the operator's panel. One HTML file
//! (`page.html`, compiled in with `include_str!`) with its style and a small script inline: no
//! build step, no external assets, so it works on an air-gapped host and from a `curl`.
//!
//! The server renders the first view from the same JSON that `/api/v1/status` answers (one
//! source of truth, so the page and scripts never disagree), which makes the page useful without
//! JavaScript; the script then polls the JSON API every 1.5 s and redraws with DOM calls and
//! `textContent`. Everything put into HTML here goes through `html-escape`: function names are
//! bytes a client chose. The template is filled in one pass over its `{{marker}}`s, so a name
//! that spells a marker is printed, not expanded. The Content-Security-Policy allows only the
//! page's own inline script and style (by their SHA-256) and requests to this origin: an
//! injected tag could load nothing and run nothing.
//!
//! Throughput needs counters: [`Counts`] sums the engine's per-function Prometheus counters for
//! the status JSON, so the page (and scripts) read the same totals that Prometheus scrapes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::LazyLock;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use prometheus::core::Collector;
use prometheus::IntCounterVec;
use serde_json::Value;

use super::AppState;
use crate::metrics::{Metrics, OTHER_FUNCTION};

const TEMPLATE: &str = include_str!("page.html");

/// The template cut at its markers, and the policy that admits its inline script and style.
struct Page {
    parts: Vec<Part>,
    csp: String,
}

/// A piece of the template: literal HTML, or a marker the handler fills.
#[derive(Debug, PartialEq)]
enum Part {
    Html(&'static str),
    Node,
    Version,
    Ready,
    Summary,
    Functions,
    Nodes,
}

static PAGE: LazyLock<Page> = LazyLock::new(|| Page {
    parts: parse(TEMPLATE),
    csp: content_security_policy(TEMPLATE),
});

/// The route of the status page.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/", get(page))
}

async fn page(State(s): State<AppState>) -> Response {
    let status = super::status_json(&s);
    let page = &*PAGE;
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, page.csp.as_str()),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        render(&page.parts, &status),
    )
        .into_response()
}

/// Cuts the template at `{{name}}` markers. An unknown marker is a bug in `page.html`, caught
/// by the unit tests below before any request sees it.
fn parse(template: &'static str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let end = rest[start..]
            .find("}}")
            .map(|e| start + e)
            .expect("page.html: a {{ without }}");
        parts.push(Part::Html(&rest[..start]));
        parts.push(match &rest[start + 2..end] {
            "node" => Part::Node,
            "version" => Part::Version,
            "ready" => Part::Ready,
            "summary" => Part::Summary,
            "functions" => Part::Functions,
            "nodes" => Part::Nodes,
            other => panic!("page.html: unknown marker {{{{{other}}}}}"),
        });
        rest = &rest[end + 2..];
    }
    parts.push(Part::Html(rest));
    parts
}

/// Only this page's inline script and style may run, found by their hashes; `fetch` may reach
/// this origin only; nothing else loads (the icon is an empty `data:` URL, so the browser asks
/// for no `/favicon.ico`).
fn content_security_policy(template: &str) -> String {
    let hash = |tag: &str| {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        let start = template.find(&open).expect("page.html has the tag") + open.len();
        let end = start + template[start..].find(&close).expect("the tag is closed");
        let digest = ring::digest::digest(&ring::digest::SHA256, &template.as_bytes()[start..end]);
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("script"),
        hash("style")
    )
}

/// Fills the template from the status JSON.
fn render(parts: &[Part], st: &Value) -> String {
    let mut out = String::with_capacity(TEMPLATE.len() + 4096);
    for part in parts {
        match part {
            Part::Html(h) => out.push_str(h),
            Part::Node => push_text(&mut out, &text(&st["node_id"])),
            Part::Version => push_text(&mut out, &text(&st["version"])),
            Part::Ready => out.push_str(if st["ready"] == true {
                "ready"
            } else {
                "recovering"
            }),
            Part::Summary => summary(&mut out, st),
            Part::Functions => functions(&mut out, st),
            Part::Nodes => nodes(&mut out, st),
        }
    }
    out
}

fn summary(out: &mut String, st: &Value) {
    let fns = st["functions"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let sum = |pick: &dyn Fn(&Value) -> u64| fns.iter().map(pick).sum::<u64>();
    let queued = sum(&|f| {
        ["high", "normal", "low"]
            .iter()
            .filter_map(|p| f["queued"][p].as_u64())
            .sum()
    });
    let running = sum(&|f| f["running"].as_u64().unwrap_or(0));
    let items: [(&str, &str, String); 9] = [
        ("s-jobs", "Live jobs", text(&st["jobs"])),
        ("s-queued", "Queued", queued.to_string()),
        ("s-running", "Running", running.to_string()),
        ("s-workers", "Workers", text(&st["workers"])),
        ("s-clients", "Clients", text(&st["clients"])),
        ("s-connections", "Connections", text(&st["connections"])),
        ("s-completed", "Completed", text(&st["counts"]["completed"])),
        ("s-failed", "Failed", text(&st["counts"]["failed"])),
        ("s-rate", "Completed/s", text(&Value::Null)),
    ];
    for (id, label, value) in items {
        let _ = write!(out, "<div><dt>{label}</dt><dd id=\"{id}\">");
        push_text(out, &value);
        out.push_str("</dd></div>");
    }
}

fn functions(out: &mut String, st: &Value) {
    let fns = st["functions"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if fns.is_empty() {
        out.push_str("<tr><td class=\"empty\" colspan=\"11\">no functions yet</td></tr>");
    }
    for f in fns {
        let name = f["name"].as_str().unwrap_or_default();
        out.push_str("<tr data-name=\"");
        out.push_str(&html_escape::encode_double_quoted_attribute(name));
        out.push_str("\">");
        push_cell(out, "name", name);
        for p in ["high", "normal", "low"] {
            push_cell(out, p, &text(&f["queued"][p]));
        }
        for key in ["running", "scheduled", "workers"] {
            push_cell(out, key, &text(&f[key]));
        }
        push_cell(out, "completed", &text(&f["counts"]["completed"]));
        push_cell(out, "failed", &text(&f["counts"]["failed"]));
        push_cell(out, "rate", &text(&Value::Null));
        push_cell(out, "text settings", &settings_text(&f["settings"]));
        out.push_str("</tr>");
    }
}

fn nodes(out: &mut String, st: &Value) {
    let p = &st["persistence"];
    if p["enabled"] != true {
        out.push_str(
            "<tr><td class=\"empty\" colspan=\"7\">not enabled (the queue is in memory only)</td></tr>",
        );
        return;
    }
    let nodes = p["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if nodes.is_empty() {
        out.push_str("<tr><td class=\"empty\" colspan=\"7\">no nodes configured</td></tr>");
    }
    for n in nodes {
        out.push_str("<tr>");
        push_cell(out, "text", &text(&n["address"]));
        if n["up"] == true {
            push_cell(out, "up", "up");
        } else {
            let reason = n["reason"].as_str().map(|r| format!(": {r}"));
            push_cell(out, "down", &format!("down{}", reason.unwrap_or_default()));
        }
        push_cell(out, "", &text(&n["pid"]));
        push_cell(out, "", &text(&n["items"]));
        let memory = format!("{} of {}", size(&n["bytes"]), size(&n["limit_maxbytes"]));
        push_cell(out, "", &memory);
        if n["eviction_enabled"] == true {
            push_cell(out, "down", "on: jobs can be lost");
        } else {
            push_cell(out, "up", "off (-M)");
        }
        push_cell(out, "", &text(&n["evictions"]));
        out.push_str("</tr>");
    }
}

/// A function's limits as `key=value` pairs, as the script shows them; "none" without any.
fn settings_text(settings: &Value) -> String {
    let Some(map) = settings.as_object() else {
        return "none".into();
    };
    let pairs: Vec<String> = map
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| format!("{k}={}", text(v)))
        .collect();
    if pairs.is_empty() {
        "none".into()
    } else {
        pairs.join(" ")
    }
}

/// Bytes in binary units, as the script's `size()` shows them.
fn size(v: &Value) -> String {
    let Some(n) = v.as_u64() else {
        return "\u{2014}".into();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut x, mut i) = (n as f64, 0);
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

/// A JSON value as the script's `text()` shows it: strings bare, nothing as an em dash.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "\u{2014}".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn push_text(out: &mut String, s: &str) {
    out.push_str(&html_escape::encode_text(s));
}

fn push_cell(out: &mut String, class: &str, value: &str) {
    if class.is_empty() {
        out.push_str("<td>");
    } else {
        let _ = write!(out, "<td class=\"{class}\">");
    }
    push_text(out, value);
    out.push_str("</td>");
}

/// Per-function totals of jobs submitted, completed, failed and ended by an exception, read
/// from the engine's Prometheus counters (keyed by their `function` label), for the status JSON.
#[derive(Debug, Default)]
pub struct Counts {
    by_label: BTreeMap<String, [u64; 4]>,
}

const COUNT_NAMES: [&str; 4] = ["submitted", "completed", "failed", "exceptions"];

impl Counts {
    /// Sums every priority and mode of each function's counters.
    pub fn gather(m: &Metrics) -> Counts {
        let mut c = Counts::default();
        let vecs: [&IntCounterVec; 4] = [
            &m.jobs_submitted,
            &m.jobs_completed,
            &m.jobs_failed,
            &m.jobs_exceptions,
        ];
        for (i, v) in vecs.into_iter().enumerate() {
            for family in v.collect() {
                for sample in family.get_metric() {
                    let Some(label) = sample.get_label().iter().find(|l| l.name() == "function")
                    else {
                        continue;
                    };
                    let e = c.by_label.entry(label.value().to_owned()).or_default();
                    e[i] += sample.get_counter().value() as u64;
                }
            }
        }
        c
    }

    /// One function's counts by its metric label; `null` for functions folded into
    /// `__other__`, whose counters are shared and would be misread as their own.
    pub fn of(&self, label: &str) -> Value {
        if label == OTHER_FUNCTION {
            return Value::Null;
        }
        Self::json(self.by_label.get(label).copied().unwrap_or_default())
    }

    /// The server-wide totals.
    pub fn total(&self) -> Value {
        let mut t = [0u64; 4];
        for c in self.by_label.values() {
            for i in 0..4 {
                t[i] += c[i];
            }
        }
        Self::json(t)
    }

    fn json(c: [u64; 4]) -> Value {
        let map = COUNT_NAMES
            .iter()
            .zip(c)
            .map(|(k, v)| (k.to_string(), Value::from(v)))
            .collect();
        Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_has_each_marker_and_no_unknown_one() {
        let parts = parse(TEMPLATE);
        for m in [
            Part::Node,
            Part::Version,
            Part::Ready,
            Part::Summary,
            Part::Functions,
            Part::Nodes,
        ] {
            assert!(parts.contains(&m), "page.html lacks {m:?}");
        }
    }

    #[test]
    fn names_are_escaped_and_never_expand_markers() {
        let st = serde_json::json!({
            "node_id": "n<1>",
            "version": "0",
            "ready": true,
            "functions": [{
                "name": "<script>alert(1)</script>{{nodes}}\"'",
                "queued": { "high": 1, "normal": 2, "low": 3 },
                "running": 4, "scheduled": 0, "workers": 5,
                "counts": { "completed": 6, "failed": 7 },
                "settings": { "rate": 10, "dead_letter": null },
            }],
            "persistence": { "enabled": false },
        });
        let html = render(&parse(TEMPLATE), &st);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;{{nodes}}"));
        assert!(
            html.contains("data-name=\"&lt;script&gt;alert(1)&lt;/script&gt;{{nodes}}&quot;'\"")
        );
        assert!(html.contains("<title>gearhouse n&lt;1&gt;</title>"));
        assert!(html.contains("<td class=\"completed\">6</td>"));
        assert!(html.contains("<td class=\"text settings\">rate=10</td>"));
        assert!(html.contains("not enabled (the queue is in memory only)"));
        assert!(html.contains("<dd id=\"s-queued\">6</dd>"));
    }

    #[test]
    fn nodes_show_health_memory_and_eviction() {
        let st = serde_json::json!({
            "persistence": { "enabled": true, "nodes": [
                { "address": "10.0.0.1:11211", "up": true, "pid": 7, "items": 3,
                  "bytes": 2048, "limit_maxbytes": 1048576, "evictions": 0,
                  "eviction_enabled": false },
                { "address": "10.0.0.2:11211", "up": false, "reason": "refused <connect>",
                  "eviction_enabled": true },
            ] },
        });
        let mut out = String::new();
        nodes(&mut out, &st);
        assert!(out.contains("<td class=\"up\">up</td><td>7</td><td>3</td><td>2.0 KiB of 1.0 MiB</td><td class=\"up\">off (-M)</td>"), "{out}");
        assert!(
            out.contains("<td class=\"down\">down: refused &lt;connect&gt;</td>"),
            "{out}"
        );
        assert!(
            out.contains("<td class=\"down\">on: jobs can be lost</td>"),
            "{out}"
        );
    }

    #[test]
    fn sizes_read_like_the_script_writes_them() {
        assert_eq!(size(&Value::from(512)), "512 B");
        assert_eq!(size(&Value::from(17735)), "17.3 KiB");
        assert_eq!(size(&Value::from(64u64 << 20)), "64.0 MiB");
        assert_eq!(size(&Value::Null), "\u{2014}");
    }

    #[test]
    fn the_policy_admits_exactly_the_inline_script_and_style() {
        let csp = content_security_policy(TEMPLATE);
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"));
        assert_eq!(csp.matches("'sha256-").count(), 2);
        assert!(!csp.contains("unsafe"));
        // A changed script gets another hash: the policy follows the file, not a pasted value.
        let other = TEMPLATE.replace("POLL_MS = 1500", "POLL_MS = 1501");
        assert_ne!(csp, content_security_policy(&other));
    }

    #[test]
    fn counts_sum_priorities_and_modes_and_keep_other_apart() {
        let m = Metrics::new(10);
        m.jobs_completed
            .with_label_values(&["f", "high", "background"])
            .inc_by(2);
        m.jobs_completed
            .with_label_values(&["f", "low", "foreground"])
            .inc();
        m.jobs_failed
            .with_label_values(&[OTHER_FUNCTION, "normal", "foreground"])
            .inc();
        let c = Counts::gather(&m);
        assert_eq!(c.of("f")["completed"], 3);
        assert_eq!(c.of("f")["failed"], 0);
        assert_eq!(c.of(OTHER_FUNCTION), Value::Null);
        assert_eq!(c.total()["completed"], 3);
        assert_eq!(c.total()["failed"], 1);
    }
}
