//! The admin text protocol on the Gearman port, with gearmand 1.1.20's exact output formats so
//! `gearadmin` and existing monitoring scripts parse it. Commands that change state are accepted
//! only from `server.admin_networks`, and each runs inside a `gearhouse.admin` span (command and
//! peer) with one info line saying what changed, so who changed what is on record.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use ipnet::IpNet;

use crate::engine::{ConnId, Engine};
use crate::protocol::ErrorCode;

/// What the connection should do after answering an admin command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAdmin {
    Continue,
    /// `shutdown`: stop the server (graceful: let connections finish what they hold).
    Shutdown {
        graceful: bool,
    },
    /// A listing that can be long (as long as the queue, or the function or connection
    /// tables): the connection writes it a page at a time ([`Listing::write_page`]), sending
    /// each before it takes the next, so neither the engine lock nor the connection's unsent
    /// output grows with what is listed.
    List(Listing),
    /// `takeover <node> ...`: the connection hands the request to the persistence layer and
    /// writes its one-line answer when it comes (`crate::persist::on_request`); nothing is
    /// written before.
    Takeover(crate::persist::on_request::TakeoverAsk),
}

/// The admin listings produced in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingKind {
    /// `show jobs`
    Jobs,
    /// `show unique jobs`
    Uniques,
    /// `status`
    Status,
    /// `prioritystatus`
    PriorityStatus,
    /// `workers`
    Workers,
}

/// Where a listing's next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    Start,
    /// A job slot (`show jobs`, `show unique jobs`).
    Slot(usize),
    /// After this function name (`status`, `prioritystatus`).
    Name(Bytes),
    /// After this connection id (`workers`).
    Conn(ConnId),
    Done,
}

/// An admin listing being written a page at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    kind: ListingKind,
    at: Cursor,
}

impl Listing {
    /// A listing from its first page.
    pub fn new(kind: ListingKind) -> Listing {
        Listing {
            kind,
            at: Cursor::Start,
        }
    }

    /// What is listed.
    pub fn kind(&self) -> ListingKind {
        self.kind
    }

    /// Appends the next page (the last one ends with the closing `.` line); returns whether
    /// more pages follow.
    pub fn write_page(&mut self, engine: &Engine, out: &mut BytesMut) -> bool {
        let slot = match self.at {
            Cursor::Slot(s) => s,
            _ => 0,
        };
        self.at = match self.kind {
            ListingKind::Jobs => {
                let page = engine.jobs_page(slot);
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
                page.next.map_or(Cursor::Done, Cursor::Slot)
            }
            ListingKind::Uniques => {
                let page = engine.uniques_page(slot);
                for u in page.items {
                    out.put_slice(&u);
                    out.put_u8(b'\n');
                }
                page.next.map_or(Cursor::Done, Cursor::Slot)
            }
            ListingKind::Status | ListingKind::PriorityStatus => {
                let after = match &self.at {
                    Cursor::Name(n) => Some(n),
                    _ => None,
                };
                let page = engine.functions_page(after);
                for f in page.items {
                    if self.kind == ListingKind::Status {
                        // gearmand's TOTAL includes the running jobs.
                        let total = f.queued.iter().sum::<u32>() + f.running;
                        line_tab(out, &f.name_bytes, &[total, f.running, f.workers]);
                    } else {
                        let [high, normal, low] = f.queued;
                        line_tab(out, &f.name_bytes, &[high, normal, low, f.workers]);
                    }
                }
                page.next.map_or(Cursor::Done, Cursor::Name)
            }
            ListingKind::Workers => {
                let after = match self.at {
                    Cursor::Conn(id) => Some(id),
                    _ => None,
                };
                let page = engine.connections_page(after);
                for c in page.items {
                    out.put_slice(format!("{} {} ", c.id, c.peer.ip()).as_bytes());
                    out.put_slice(&c.client_id);
                    out.put_slice(b" :");
                    for f in &c.functions {
                        out.put_u8(b' ');
                        out.put_slice(f);
                    }
                    out.put_u8(b'\n');
                }
                page.next.map_or(Cursor::Done, Cursor::Conn)
            }
        };
        if self.at == Cursor::Done {
            out.put_slice(b".\n");
            return false;
        }
        true
    }

    /// Writes the whole listing (for callers without a socket to pace it).
    pub fn write_all(mut self, engine: &Engine, out: &mut BytesMut) {
        while self.write_page(engine, out) {}
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
        ("status", _) => status(),
        ("prioritystatus", _) => priority_status(),
        ("workers", _) => workers(),
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
        ("takeover", _) if from.refuses("takeover", out) => {
            ("takeover", false, AfterAdmin::Continue)
        }
        ("takeover", _) => match crate::persist::on_request::parse(&words[1..]) {
            Ok(ask) => {
                let _span = from.span("takeover").entered();
                tracing::info!(node = %ask.node, "takeover requested");
                ("takeover", true, AfterAdmin::Takeover(ask))
            }
            Err(line) => {
                out.put_slice(line.as_bytes());
                ("takeover", false, AfterAdmin::Continue)
            }
        },
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

/// `status`: `FUNC\tTOTAL\tRUNNING\tWORKERS` per function (TOTAL includes running), then `.`
/// (written in pages).
fn status() -> Executed {
    (
        "status",
        true,
        AfterAdmin::List(Listing::new(ListingKind::Status)),
    )
}

/// `prioritystatus`: `FUNC\tHIGH\tNORMAL\tLOW\tWORKERS` per function, then `.` (in pages).
fn priority_status() -> Executed {
    (
        "prioritystatus",
        true,
        AfterAdmin::List(Listing::new(ListingKind::PriorityStatus)),
    )
}

/// `workers`: `ID IP CLIENT_ID : f1 f2` per connection, then `.` (written in pages).
fn workers() -> Executed {
    (
        "workers",
        true,
        AfterAdmin::List(Listing::new(ListingKind::Workers)),
    )
}

/// `show jobs`: `HANDLE\tRETRIES\tIGNORE\tQUEUED` per job, then `.` (written in pages).
fn show_jobs() -> Executed {
    (
        "show jobs",
        true,
        AfterAdmin::List(Listing::new(ListingKind::Jobs)),
    )
}

/// `show unique jobs`: one unique id a line, then `.` (written in pages).
fn show_unique_jobs() -> Executed {
    (
        "show unique jobs",
        true,
        AfterAdmin::List(Listing::new(ListingKind::Uniques)),
    )
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
            if let (_, true, AfterAdmin::List(l)) = run("status", true, &mut out) {
                l.write_all(&engine, &mut out);
            }
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

    /// `status` and `workers` over more functions and connections than one page holds: every
    /// line once, in order, in several pages (each one short walk under the engine lock).
    #[test]
    fn status_and_workers_are_written_in_pages_in_order() {
        let engine = Engine::new(
            crate::engine::EngineConfig {
                max_functions: 5_000,
                ..Default::default()
            },
            Arc::new(crate::metrics::Metrics::new(10)),
            None,
            None,
        );
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        for i in (0..1_300).rev() {
            engine
                .create_function(&Bytes::from(format!("fn{i:05}")))
                .unwrap();
        }
        let mut conns = Vec::new();
        for _ in 0..1_100 {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let kill = tokio_util::sync::CancellationToken::new();
            conns.push((engine.connect(peer, tx, kill.clone()), rx, kill));
        }
        let pages = |cmd: &'static str| {
            let mut out = BytesMut::new();
            let (_, ok, after) = execute(&engine, &Bytes::from(cmd), peer, false, None, &mut out);
            assert!(ok);
            let AfterAdmin::List(mut l) = after else {
                panic!("{cmd} is not a paged listing")
            };
            let mut n = 1;
            while l.write_page(&engine, &mut out) {
                n += 1;
            }
            (n, String::from_utf8(out.to_vec()).unwrap())
        };

        let (n, text) = pages("status");
        assert_eq!(
            n,
            3,
            "1,300 functions in pages of {}",
            crate::engine::PAGE_FUNCTIONS
        );
        let lines: Vec<&str> = text.lines().collect();
        let want: Vec<String> = (0..1_300).map(|i| format!("fn{i:05}\t0\t0\t0")).collect();
        assert_eq!(lines[..1_300], want[..]);
        assert_eq!(lines[1_300..], ["."]);
        let (_, text) = pages("prioritystatus");
        assert!(
            text.starts_with("fn00000\t0\t0\t0\t0\nfn00001\t"),
            "{}",
            &text[..40]
        );
        assert_eq!(text.lines().count(), 1_301);

        let (n, text) = pages("workers");
        assert_eq!(
            n,
            3,
            "1,100 connections in pages of {}",
            crate::engine::PAGE_CONNECTIONS
        );
        let ids: Vec<u64> = text
            .lines()
            .take_while(|l| *l != ".")
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect();
        let mut want: Vec<u64> = conns.iter().map(|c| c.0).collect();
        want.sort_unstable();
        assert_eq!(ids, want);
        assert!(text.ends_with("\n.\n"));
    }
}
