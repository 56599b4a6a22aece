//! The admin text protocol on the Gearman port, with gearmand 1.1.20's exact output formats so
//! `gearadmin` and existing monitoring scripts parse it. Commands that change state are accepted
//! only from `server.admin_networks`, and each runs inside a `gearhouse.admin` span (command and
//! peer) with one info line saying what changed, so who changed what is on record.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use ipnet::IpNet;

use crate::engine::Engine;
use crate::protocol::ErrorCode;

/// What the connection should do after answering an admin command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAdmin {
    Continue,
    /// `shutdown`: stop the server (graceful: let connections finish what they hold).
    Shutdown {
        graceful: bool,
    },
    /// A listing that can be as long as the queue: the connection writes it a page at a time
    /// ([`Listing::write_page`]), sending each before it takes the next, so neither the
    /// engine lock nor the connection's unsent output grows with the queue.
    List(Listing),
}

/// An admin listing produced in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `show jobs`
    Jobs,
    /// `show unique jobs`
    Uniques,
}

impl Listing {
    /// Appends the page starting at job slot `from`; returns where the next page starts, or
    /// `None` after the last page (whose closing `.` line it wrote).
    pub fn write_page(self, engine: &Engine, from: usize, out: &mut BytesMut) -> Option<usize> {
        let next = match self {
            Listing::Jobs => {
                let page = engine.jobs_page(from);
                for j in page.items {
                    out.put_slice(&j.handle);
                    // gearmand counts a retry when a job goes back to the queue: a queued job
                    // has failed every attempt it had, a running one all but the current one.
                    let retries = if j.queued {
                        j.attempts
                    } else {
                        j.attempts.saturating_sub(1)
                    };
                    out.put_slice(format!("\t{retries}\t0\t{}\n", j.queued as u8).as_bytes());
                }
                page.next
            }
            Listing::Uniques => {
                let page = engine.uniques_page(from);
                for u in page.items {
                    out.put_slice(&u);
                    out.put_u8(b'\n');
                }
                page.next
            }
        };
        if next.is_none() {
            out.put_slice(b".\n");
        }
        next
    }

    /// Writes the whole listing (for callers without a socket to pace it).
    pub fn write_all(self, engine: &Engine, out: &mut BytesMut) {
        let mut from = 0;
        while let Some(next) = self.write_page(engine, from, out) {
            from = next;
        }
    }
}

/// What one admin line did: its command name (for metrics), whether it succeeded, and what the
/// connection does next.
type Executed = (&'static str, bool, AfterAdmin);

/// gearmand's error style: `ERR CODE text+with+plus+for+spaces`.
fn err(out: &mut BytesMut, code: ErrorCode, text: &str) {
    out.put_slice(b"ERR ");
    out.put_slice(code.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(text.replace(' ', "+").as_bytes());
    out.put_slice(b"\r\n");
}

/// True when `ip` falls in one of the admin networks.
pub fn is_admin(ip: IpAddr, networks: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    networks.iter().any(|n| n.contains(&ip))
}

/// Where an admin line came from.
#[derive(Debug, Clone, Copy)]
struct Sender {
    peer: SocketAddr,
    /// In `server.admin_networks`: may run commands that change state.
    is_admin: bool,
}

impl Sender {
    /// Refuses a state-changing command from outside the admin networks; true when refused.
    fn refuses(&self, name: &str, out: &mut BytesMut) -> bool {
        if !self.is_admin {
            err(
                out,
                ErrorCode::PermissionDenied,
                &format!("{name} is accepted only from server.admin_networks"),
            );
        }
        !self.is_admin
    }

    /// The span a state-changing command runs in (exported as a `gearhouse.admin` trace).
    fn span(&self, command: &'static str) -> tracing::Span {
        tracing::info_span!("gearhouse.admin", command, peer = %self.peer)
    }
}

/// Runs one admin line from `peer` and appends its answer to `out`. Returns the command name
/// (for metrics), whether it succeeded, and what to do next.
pub fn execute(
    engine: &Engine,
    line: &Bytes,
    peer: SocketAddr,
    from_admin_network: bool,
    dead_letters: Option<&crate::dead_letters::DeadLetters>,
    out: &mut BytesMut,
) -> Executed {
    let from = Sender {
        peer,
        is_admin: from_admin_network,
    };
    let text = String::from_utf8_lossy(line);
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    let lower: Vec<String> = words
        .iter()
        .take(2)
        .map(|w| w.to_ascii_lowercase())
        .collect();
    let cmd = lower.first().map(String::as_str).unwrap_or("");
    let sub = lower.get(1).map(String::as_str).unwrap_or("");
    match (cmd, sub) {
        ("status", _) => status(engine, out),
        ("prioritystatus", _) => priority_status(engine, out),
        ("workers", _) => workers(engine, out),
        ("show", "jobs") => show_jobs(),
        ("show", "dead") => {
            match dead_letters {
                Some(d) => d.show(out),
                None => out.put_slice(b".\n"),
            }
            ("show dead", true, AfterAdmin::Continue)
        }
        ("show", "unique") if words.get(2).is_some_and(|w| w.eq_ignore_ascii_case("jobs")) => {
            show_unique_jobs()
        }
        ("show", "schedules") => {
            let (name, ok) = crate::schedule::admin::show(engine, out);
            (name, ok, AfterAdmin::Continue)
        }
        ("cancel", "schedule") => {
            let (name, ok) =
                crate::schedule::admin::cancel(engine, &words, from.peer, from.is_admin, out);
            (name, ok, AfterAdmin::Continue)
        }
        ("maxqueue", _) => maxqueue(engine, &words, from, out),
        ("limit", _) if from.refuses("limit", out) => ("limit", false, AfterAdmin::Continue),
        ("limit", _) => {
            let _span = from.span("limit").entered();
            let ok = crate::functions::admin::limit(engine, &words, out);
            ("limit", ok, AfterAdmin::Continue)
        }
        ("show", "limits") => {
            let ok = crate::functions::admin::show_limits(engine, out);
            ("show limits", ok, AfterAdmin::Continue)
        }
        ("cancel", "job") => cancel_job(engine, &words, from, out),
        ("create", "function") => {
            function_command(engine, FunctionCommand::Create, &words, from, out)
        }
        ("drop", "function") => function_command(engine, FunctionCommand::Drop, &words, from, out),
        ("getpid", _) => {
            out.put_slice(format!("OK {}\n", std::process::id()).as_bytes());
            ("getpid", true, AfterAdmin::Continue)
        }
        ("version", _) => {
            out.put_slice(format!("OK {}\n", env!("CARGO_PKG_VERSION")).as_bytes());
            ("version", true, AfterAdmin::Continue)
        }
        ("verbose", _) => {
            let level = tracing::level_filters::LevelFilter::current()
                .to_string()
                .to_uppercase();
            out.put_slice(format!("OK {level}\n").as_bytes());
            ("verbose", true, AfterAdmin::Continue)
        }
        ("shutdown", _) => shutdown(sub == "graceful", from, out),
        _ => {
            out.put_slice(b"ERR ");
            out.put_slice(ErrorCode::UnknownCommand.as_str().as_bytes());
            out.put_slice(b" Unknown+server+command");
            out.put_slice(words.first().unwrap_or(&"").as_bytes());
            out.put_slice(b"\r\n");
            ("unknown", false, AfterAdmin::Continue)
        }
    }
}

/// `status`: `FUNC\tTOTAL\tRUNNING\tWORKERS` per function (TOTAL includes running), then `.`.
fn status(engine: &Engine, out: &mut BytesMut) -> Executed {
    for f in engine.function_stats() {
        let total = f.queued.iter().sum::<u32>() + f.running;
        line_tab(out, &f.name_bytes, &[total, f.running, f.workers]);
    }
    out.put_slice(b".\n");
    ("status", true, AfterAdmin::Continue)
}

/// `prioritystatus`: `FUNC\tHIGH\tNORMAL\tLOW\tWORKERS` per function, then `.`.
fn priority_status(engine: &Engine, out: &mut BytesMut) -> Executed {
    for f in engine.function_stats() {
        line_tab(
            out,
            &f.name_bytes,
            &[f.queued[0], f.queued[1], f.queued[2], f.workers],
        );
    }
    out.put_slice(b".\n");
    ("prioritystatus", true, AfterAdmin::Continue)
}

/// `workers`: `ID IP CLIENT_ID : f1 f2` per connection, then `.`.
fn workers(engine: &Engine, out: &mut BytesMut) -> Executed {
    for c in engine.connections() {
        out.put_slice(format!("{} {} ", c.id, c.peer.ip()).as_bytes());
        out.put_slice(&c.client_id);
        out.put_slice(b" :");
        for f in &c.functions {
            out.put_u8(b' ');
            out.put_slice(f);
        }
        out.put_u8(b'\n');
    }
    out.put_slice(b".\n");
    ("workers", true, AfterAdmin::Continue)
}

/// `show jobs`: `HANDLE\tRETRIES\tIGNORE\tQUEUED` per job, then `.` (written in pages).
fn show_jobs() -> Executed {
    ("show jobs", true, AfterAdmin::List(Listing::Jobs))
}

/// `show unique jobs`: one unique id a line, then `.` (written in pages).
fn show_unique_jobs() -> Executed {
    ("show unique jobs", true, AfterAdmin::List(Listing::Uniques))
}

/// `maxqueue FUNCTION [N | HIGH NORMAL LOW]`: no number removes the limit (0 = none).
fn maxqueue(engine: &Engine, words: &[&str], from: Sender, out: &mut BytesMut) -> Executed {
    const NAME: &str = "maxqueue";
    if from.refuses(NAME, out) {
        return (NAME, false, AfterAdmin::Continue);
    }
    let Some(func) = words.get(1) else {
        err(
            out,
            ErrorCode::InvalidArguments,
            "An incomplete set of arguments was sent to this command maxqueue",
        );
        return (NAME, false, AfterAdmin::Continue);
    };
    let nums: Result<Vec<u32>, _> = words[2..]
        .iter()
        .map(|w| w.parse::<i64>())
        .map(|r| r.map(|v| v.clamp(0, u32::MAX as i64) as u32))
        .collect();
    let limits = match nums.as_deref() {
        Ok([]) => [0, 0, 0],
        Ok([n]) => [*n; 3],
        Ok([h, n, l]) => [*h, *n, *l],
        _ => {
            err(
                out,
                ErrorCode::InvalidArguments,
                "maxqueue FUNCTION [N | HIGH NORMAL LOW]",
            );
            return (NAME, false, AfterAdmin::Continue);
        }
    };
    let _span = from.span(NAME).entered();
    match engine.set_max_queue(&Bytes::copy_from_slice(func.as_bytes()), limits) {
        Ok(()) => {
            tracing::info!(
                function = func,
                high = limits[0],
                normal = limits[1],
                low = limits[2],
                "queue limits of {func} set (0 = no limit)"
            );
            out.put_slice(b"OK\r\n")
        }
        Err(e) => err(out, e.code, &e.text),
    }
    (NAME, true, AfterAdmin::Continue)
}

/// `cancel job HANDLE`: a queued job is removed and its clients get WORK_FAIL.
fn cancel_job(engine: &Engine, words: &[&str], from: Sender, out: &mut BytesMut) -> Executed {
    const NAME: &str = "cancel job";
    if from.refuses(NAME, out) {
        return (NAME, false, AfterAdmin::Continue);
    }
    let Some(h) = words.get(2) else {
        err(out, ErrorCode::InvalidArguments, "cancel job HANDLE");
        return (NAME, false, AfterAdmin::Continue);
    };
    let _span = from.span(NAME).entered();
    match engine.cancel_job(&Bytes::copy_from_slice(h.as_bytes())) {
        Ok(()) => {
            tracing::info!(handle = h, "job {h} cancelled");
            out.put_slice(b"OK\r\n")
        }
        // gearmand's admin protocol names a missing job UNKNOWN_JOB, with no text.
        Err(e) if e.code == ErrorCode::JobNotFound => {
            out.put_slice(b"ERR ");
            out.put_slice(ErrorCode::UnknownJob.as_str().as_bytes());
            out.put_slice(b"\r\n");
        }
        Err(e) => err(out, e.code, &e.text),
    }
    (NAME, true, AfterAdmin::Continue)
}

/// Which function command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FunctionCommand {
    Create,
    Drop,
}

/// `create function F` and `drop function F` (only a function with no jobs and no workers).
fn function_command(
    engine: &Engine,
    which: FunctionCommand,
    words: &[&str],
    from: Sender,
    out: &mut BytesMut,
) -> Executed {
    let name = match which {
        FunctionCommand::Create => "create function",
        FunctionCommand::Drop => "drop function",
    };
    if from.refuses(name, out) {
        return (name, false, AfterAdmin::Continue);
    }
    let Some(f) = words.get(2) else {
        err(
            out,
            ErrorCode::InvalidArguments,
            &format!("{name} FUNCTION"),
        );
        return (name, false, AfterAdmin::Continue);
    };
    let _span = from.span(name).entered();
    let function = Bytes::copy_from_slice(f.as_bytes());
    let r = match which {
        FunctionCommand::Create => engine.create_function(&function),
        FunctionCommand::Drop => engine.drop_function(&function),
    };
    match r {
        Ok(()) => {
            match which {
                FunctionCommand::Create => tracing::info!(function = f, "function {f} created"),
                FunctionCommand::Drop => tracing::info!(function = f, "function {f} dropped"),
            }
            out.put_slice(b"OK\r\n")
        }
        // gearmand's answer to dropping an unknown function.
        Err(e) if e.code == ErrorCode::UnknownFunction => {
            out.put_slice(b"ERR function not found\r\n")
        }
        Err(e) => err(out, e.code, &e.text),
    }
    (name, true, AfterAdmin::Continue)
}

/// `shutdown [graceful]`: the caller stops the server.
fn shutdown(graceful: bool, from: Sender, out: &mut BytesMut) -> Executed {
    const NAME: &str = "shutdown";
    if from.refuses(NAME, out) {
        return (NAME, false, AfterAdmin::Continue);
    }
    let _span = from.span(NAME).entered();
    out.put_slice(b"OK\r\n");
    tracing::warn!(graceful, "shutdown requested by admin command");
    (NAME, true, AfterAdmin::Shutdown { graceful })
}

fn line_tab(out: &mut BytesMut, name: &[u8], nums: &[u32]) {
    out.put_slice(name);
    for n in nums {
        out.put_u8(b'\t');
        out.put_slice(itoa::Buffer::new().format(*n).as_bytes());
    }
    out.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, SubscriberExt};

    /// Collects `name: value` of every field it visits.
    struct Fields(Vec<String>);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push(format!("{}={:?}", field.name(), value));
        }
    }

    /// Records each span's name and fields, and each event with the span it was written in.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl<S> tracing_subscriber::Layer<S> for Recorder
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: Context<'_, S>,
        ) {
            let mut f = Fields(Vec::new());
            attrs.record(&mut f);
            let line = format!("span {} {}", attrs.metadata().name(), f.0.join(" "));
            self.0.lock().unwrap().push(line);
        }

        fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
            let mut f = Fields(Vec::new());
            event.record(&mut f);
            let inside = ctx.event_span(event).map(|s| s.name()).unwrap_or("-");
            let line = format!("event in {inside}: {}", f.0.join(" "));
            self.0.lock().unwrap().push(line);
        }
    }

    #[test]
    fn state_changing_commands_run_in_an_admin_span_that_says_what_changed() {
        let engine = Engine::new(
            Default::default(),
            Arc::new(crate::metrics::Metrics::new(10)),
            None,
            None,
        );
        let peer: SocketAddr = "10.0.0.7:5000".parse().unwrap();
        let rec = Recorder::default();
        let subscriber = tracing_subscriber::registry().with(rec.clone());
        let mut out = BytesMut::new();
        tracing::subscriber::with_default(subscriber, || {
            let run = |line: &'static str, admin: bool, out: &mut BytesMut| {
                execute(&engine, &Bytes::from(line), peer, admin, None, out)
            };
            assert!(run("maxqueue resize 3", true, &mut out).1);
            run("create function thumbs", true, &mut out);
            run("drop function thumbs", true, &mut out);
            run("cancel job H:gearhouse:1", true, &mut out);
            // Refused before it runs: no span, nothing changed.
            run("drop function resize", false, &mut out);
            run("status", true, &mut out);
        });
        let lines = rec.0.lock().unwrap().clone();
        let spans: Vec<&String> = lines.iter().filter(|l| l.starts_with("span")).collect();
        assert_eq!(spans.len(), 4, "{lines:#?}");
        assert!(spans[0].contains("gearhouse.admin command=\"maxqueue\" peer=10.0.0.7:5000"));
        assert!(spans[3].contains("command=\"cancel job\""));
        let changes: Vec<&String> = lines.iter().filter(|l| l.starts_with("event")).collect();
        assert_eq!(
            changes.len(),
            3,
            "the cancel of an unknown job changed nothing: {lines:#?}"
        );
        assert!(changes
            .iter()
            .all(|l| l.starts_with("event in gearhouse.admin")));
        assert!(
            changes[0].contains("queue limits of resize set"),
            "{}",
            changes[0]
        );
        assert!(
            changes[2].contains("function thumbs dropped"),
            "{}",
            changes[2]
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "OK\r\nOK\r\nOK\r\nERR UNKNOWN_JOB\r\n\
             ERR PERMISSION_DENIED drop+function+is+accepted+only+from+server.admin_networks\r\n\
             resize\t0\t0\t0\n.\n"
        );
    }

    #[test]
    fn admin_networks_match_v4_mapped_addresses() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(is_admin("127.0.0.1".parse().unwrap(), &nets));
        assert!(is_admin("::ffff:127.0.0.2".parse().unwrap(), &nets));
        assert!(is_admin("::1".parse().unwrap(), &nets));
        assert!(!is_admin("10.1.2.3".parse().unwrap(), &nets));
    }
}
