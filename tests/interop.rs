//! Interoperability: the real Gearman clients, run as child processes against the real
//! `gearhouse` binary. The clients are the ones users run unchanged: the `gearman` CLI and
//! `gearadmin` (libgearman), PHP's GearmanClient/GearmanWorker (pecl-gearman on libgearman), Perl
//! Gearman::Client/Worker (a separate pure-Perl implementation) and Python `gear` (Zuul's
//! library). The scripts they run live in `tests/clients/` and print one JSON object per line;
//! a failing assertion shows the clients' own stdout and stderr (and the server log when the
//! server's state never became what the test waited for).
//!
//! Every child is bounded: waits have deadlines, a child that overruns is killed and the test
//! fails, and a child still running when its test ends is killed on drop.
//! `scripts/install-test-deps.sh` installs the clients.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::BinServer;
use serde_json::Value;

/// Deadline for one client run or one awaited condition.
const T: Duration = Duration::from_secs(30);
const NODE: &str = "interop";

// ---------------------------------------------------------------------------------------------
// Child processes with captured, incrementally readable output.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Captured {
    lines: Vec<String>,
    stderr: String,
    stdout_done: bool,
    stderr_done: bool,
}

type Shared = Arc<(Mutex<Captured>, Condvar)>;

/// A client or worker process. Its stdout is split into lines as they arrive (so a test can
/// wait for "the worker has taken the job" while the worker still runs); it is killed on drop.
struct Proc {
    label: String,
    child: Child,
    out: Shared,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

/// What a finished process printed.
struct Finished {
    label: String,
    status: ExitStatus,
    lines: Vec<String>,
    stderr: String,
}

fn parse_events(label: &str, lines: &[String], stderr: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "{label}: stdout line is not JSON ({e}): {l:?}\n{}",
                    render(label, None, lines, stderr)
                )
            })
        })
        .collect()
}

fn render(label: &str, status: Option<ExitStatus>, lines: &[String], stderr: &str) -> String {
    let status = status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "still running".into());
    let mut s = format!("----- {label} [{status}] stdout:\n");
    for l in lines {
        let l: String = l.chars().take(600).collect();
        s.push_str(&l);
        s.push('\n');
    }
    s.push_str(&format!("----- {label} stderr:\n{}\n", stderr.trim_end()));
    s
}

impl Proc {
    fn spawn(label: &str, program: &str, args: &[String]) -> Proc {
        Self::spawn_with_input(label, program, args, None)
    }

    /// Like [`Proc::spawn`], writing `input` to the child's stdin and then closing it.
    fn spawn_with_input(
        label: &str,
        program: &str,
        args: &[String],
        input: Option<Vec<u8>>,
    ) -> Proc {
        let label = format!("{label} `{program} {}`", args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{label}: cannot start: {e} (scripts/install-test-deps.sh installs it)")
            });
        let mut readers = Vec::new();
        if let Some(input) = input {
            let mut stdin = child.stdin.take().expect("stdin");
            readers.push(thread::spawn(move || {
                let _ = stdin.write_all(&input);
            }));
        }
        let out: Shared = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let o = out.clone();
        let r1 = thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        o.0.lock().unwrap().lines.push(line);
                        o.1.notify_all();
                    }
                }
            }
            o.0.lock().unwrap().stdout_done = true;
            o.1.notify_all();
        });
        let o = out.clone();
        let r2 = thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match stderr.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        o.0.lock()
                            .unwrap()
                            .stderr
                            .push_str(&String::from_utf8_lossy(&chunk[..n]))
                    }
                }
            }
            o.0.lock().unwrap().stderr_done = true;
            o.1.notify_all();
        });
        readers.push(r1);
        readers.push(r2);
        Proc {
            label,
            child,
            out,
            readers,
            status: None,
        }
    }

    fn diag(&self) -> String {
        let c = self.out.0.lock().unwrap();
        render(&self.label, self.status, &c.lines, &c.stderr)
    }

    /// Waits until the events printed so far satisfy `cond`; returns them. Fails (with the
    /// process output) if the process ends first or `timeout` passes.
    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut c = lock.lock().unwrap();
        loop {
            let events = parse_events(&self.label, &c.lines, &c.stderr);
            if cond(&events) {
                return events;
            }
            let now = Instant::now();
            if c.stdout_done || now >= deadline {
                let why = if c.stdout_done { "ended" } else { "timed out" };
                let text = render(&self.label, None, &c.lines, &c.stderr);
                drop(c);
                panic!("{why} waiting for {what}\n{text}");
            }
            c = cv.wait_timeout(c, deadline - now).unwrap().0;
        }
    }

    /// Waits for the first event named `ev` and returns it.
    fn wait_event(&self, ev: &str) -> Value {
        let events = self.wait_for(&format!("event {ev:?}"), T, |e| {
            e.iter().any(|v| v["ev"] == ev)
        });
        events.into_iter().find(|v| v["ev"] == ev).unwrap()
    }

    /// Waits (at most `timeout`) for the process to exit; kills it and fails if it does not.
    fn finish_within(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                thread::sleep(Duration::from_millis(50));
                panic!("did not finish within {timeout:?}, killed\n{}", self.diag());
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.status = Some(status);
        // Its output ends with it, unless a grandchild (a `gearman -w` command) still holds the
        // pipe: then take what arrived within a few seconds rather than wait for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (lock, cv) = &*self.out;
        let mut c = lock.lock().unwrap();
        while !(c.stdout_done && c.stderr_done) && Instant::now() < deadline {
            c = cv.wait_timeout(c, deadline - Instant::now()).unwrap().0;
        }
        drop(c);
        for r in self.readers.drain(..) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
        let c = std::mem::take(&mut *self.out.0.lock().unwrap());
        Finished {
            label: self.label.clone(),
            status,
            lines: c.lines,
            stderr: c.stderr,
        }
    }

    /// Finishes within [`T`] and requires exit status 0.
    fn finish_ok(self) -> Finished {
        let f = self.finish_within(T);
        assert!(f.status.success(), "exited with {}\n{}", f.status, f.diag());
        f
    }

    /// SIGKILL now (a crash), and collect what it printed.
    fn kill9(mut self) -> Finished {
        let _ = self.child.kill();
        self.finish_within(T)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Finished {
    fn diag(&self) -> String {
        render(&self.label, Some(self.status), &self.lines, &self.stderr)
    }
    fn events(&self) -> Vec<Value> {
        parse_events(&self.label, &self.lines, &self.stderr)
    }
    fn all(&self, ev: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|v| v["ev"] == ev)
            .collect()
    }
    /// The only event named `ev`.
    fn one(&self, ev: &str) -> Value {
        let all = self.all(ev);
        assert_eq!(
            all.len(),
            1,
            "expected exactly one {ev:?} event\n{}",
            self.diag()
        );
        all.into_iter().next().unwrap()
    }
    fn stdout(&self) -> String {
        self.lines.join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// The clients.
// ---------------------------------------------------------------------------------------------

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn php_client(port: u16, mode: &str, args: &[&str]) -> Proc {
    let mut a = vec![script("php_client.php"), mode.into(), port.to_string()];
    a.extend(strings(args));
    Proc::spawn("php client", "php", &a)
}

/// `count` 0 = until killed.
fn php_worker(port: u16, count: u32, funcs: &[&str]) -> Proc {
    let mut a = vec![
        script("php_worker.php"),
        port.to_string(),
        count.to_string(),
    ];
    a.extend(strings(funcs));
    Proc::spawn("php worker", "php", &a)
}

fn perl_client(port: u16, mode: &str, args: &[&str]) -> Proc {
    let mut a = vec![script("perl_client.pl"), port.to_string(), mode.into()];
    a.extend(strings(args));
    Proc::spawn("perl client", "perl", &a)
}

fn perl_worker(port: u16, count: u32, funcs: &[&str]) -> Proc {
    let mut a = vec![
        script("perl_worker.pl"),
        port.to_string(),
        count.to_string(),
    ];
    a.extend(strings(funcs));
    Proc::spawn("perl worker", "perl", &a)
}

fn py_client(port: u16, mode: &str, args: &[&str]) -> Proc {
    let mut a = vec![
        script("py_gear.py"),
        port.to_string(),
        "client".into(),
        mode.into(),
    ];
    a.extend(strings(args));
    Proc::spawn("python gear client", "python3", &a)
}

fn py_worker(port: u16, count: u32, funcs: &[&str]) -> Proc {
    let mut a = vec![
        script("py_gear.py"),
        port.to_string(),
        "worker".into(),
        count.to_string(),
    ];
    a.extend(strings(funcs));
    Proc::spawn("python gear worker", "python3", &a)
}

/// The `gearman` CLI (libgearman) against the server.
fn gearman(port: u16, args: &[&str]) -> Proc {
    let mut a = strings(&["-h", "127.0.0.1", "-p", &port.to_string()]);
    a.extend(strings(args));
    Proc::spawn("gearman cli", "gearman", &a)
}

/// A finished `gearadmin OPTION` run (exit status 0 required).
fn gearadmin(port: u16, option: &str) -> Finished {
    let p = Proc::spawn(
        "gearadmin",
        "gearadmin",
        &strings(&["-h", "127.0.0.1", "-p", &port.to_string(), option]),
    );
    p.finish_ok()
}

// ---------------------------------------------------------------------------------------------
// Observing the server: admin text protocol and GET_STATUS_UNIQUE over plain sockets.
// ---------------------------------------------------------------------------------------------

fn server() -> BinServer {
    BinServer::start(&["--node-id", NODE], &[])
}

/// One admin listing (`status`, `workers`, ...), up to and including the `.` line.
fn admin(port: u16, cmd: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !(text == ".\n" || text.ends_with("\n.\n")) {
        let n = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("admin {cmd:?}: {e}; got {text:?}"));
        assert!(n > 0, "admin {cmd:?}: connection closed; got {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

/// `status` row of `func`: (total, running, workers).
fn status_row(port: u16, func: &str) -> Option<(u64, u64, u64)> {
    admin(port, "status").lines().find_map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        (f.len() == 4 && f[0] == func).then(|| {
            (
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
    })
}

/// Polls `status` until `func`'s row satisfies `cond`.
fn wait_status(srv: &BinServer, func: &str, what: &str, cond: impl Fn((u64, u64, u64)) -> bool) {
    let deadline = Instant::now() + T;
    loop {
        let row = status_row(srv.port, func);
        if row.is_some_and(&cond) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status of {func}: never {what}; last row {row:?}\nserver log:\n{}",
            srv.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Foreground clients waiting on the job with `unique` (GET_STATUS_UNIQUE's last field).
fn waiting_clients(port: u16, unique: &str) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = b"\0REQ".to_vec();
    req.extend_from_slice(&41u32.to_be_bytes());
    req.extend_from_slice(&(unique.len() as u32).to_be_bytes());
    req.extend_from_slice(unique.as_bytes());
    s.write_all(&req).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[..4], b"\0RES");
    assert_eq!(
        u32::from_be_bytes(head[4..8].try_into().unwrap()),
        42,
        "STATUS_RES_UNIQUE"
    );
    let mut body = vec![0u8; u32::from_be_bytes(head[8..12].try_into().unwrap()) as usize];
    s.read_exact(&mut body).unwrap();
    let fields: Vec<String> = body
        .split(|&b| b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    assert_eq!(fields.len(), 6, "{fields:?}");
    fields[5].parse().unwrap()
}

/// (known, running, numerator, denominator) of a status event; the numbers may be JSON numbers
/// (PHP, Perl) or strings (Python gear).
fn status_fields(v: &Value) -> (bool, bool, i64, i64) {
    let num = |x: &Value| {
        x.as_i64()
            .or_else(|| x.as_str().and_then(|t| t.parse().ok()))
            .unwrap_or_else(|| panic!("not a number: {x} in {v}"))
    };
    let flag = |x: &Value| {
        x.as_bool()
            .unwrap_or_else(|| panic!("not a bool: {x} in {v}"))
    };
    (
        flag(&v["known"]),
        flag(&v["running"]),
        num(&v["num"]),
        num(&v["den"]),
    )
}

/// PHP `jobStatus(handle)`, asked again until `cond` holds (or [`T`] passes); the last answer.
fn php_status_until(
    port: u16,
    handle: &str,
    cond: impl Fn((bool, bool, i64, i64)) -> bool,
) -> Finished {
    let deadline = Instant::now() + T;
    loop {
        let st = php_client(port, "status", &[handle]).finish_ok();
        if cond(status_fields(&st.one("status"))) || Instant::now() >= deadline {
            return st;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn rev(x: &str) -> String {
    x.chars().rev().collect()
}

fn jobs_of(f: &Finished) -> Vec<Value> {
    f.all("job")
}

fn workloads(jobs: &[Value]) -> Vec<String> {
    jobs.iter().map(|j| s(&j["workload"]).to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

/// The Gearman tutorial: a PHP client queues `doBackground("testFunction", json)` before any
/// worker exists; a PHP GearmanWorker started afterwards receives exactly that payload.
#[test]
fn php_tutorial_background_job_waits_for_the_worker() {
    let srv = server();
    let payload = r#"{"email":"alice@example.com","id":42,"tags":["a","b"],"note":"h\u00e9"}"#;
    let c = php_client(srv.port, "bg", &["testFunction", "normal", payload]).finish_ok();
    let q = c.one("queued");
    let handle = s(&q["handle"]).to_string();
    assert!(
        handle.starts_with(&format!("H:{NODE}:")),
        "handle {handle}\n{}",
        c.diag()
    );
    assert_eq!(q["rc"], 0, "{}", c.diag());
    assert_eq!(status_row(srv.port, "testFunction"), Some((1, 0, 0)));

    let w = php_worker(srv.port, 1, &["testFunction=echo"]).finish_ok();
    let job = w.one("job");
    assert_eq!(job["func"], "testFunction", "{}", w.diag());
    assert_eq!(job["handle"], handle.as_str(), "{}", w.diag());
    assert_eq!(job["workload"], payload, "{}", w.diag());
    assert_eq!(w.one("exit")["jobs"], 1, "{}", w.diag());
    wait_status(&srv, "testFunction", "empty with no worker", |r| {
        r == (0, 0, 0)
    });
}

/// doHighBackground/doBackground/doLowBackground land in the right priority queues
/// (`gearadmin --priority-status`), doHigh/doNormal/doLow return the worker's results.
#[test]
fn php_all_priorities_background_and_foreground() {
    let srv = server();
    let mut handles = Vec::new();
    for prio in ["low", "normal", "high"] {
        let c = php_client(srv.port, "bg", &["prio_bg", prio, &format!("bg-{prio}")]).finish_ok();
        handles.push(s(&c.one("queued")["handle"]).to_string());
    }
    let ps = gearadmin(srv.port, "--priority-status");
    assert!(
        ps.lines.iter().any(|l| l == "prio_bg\t1\t1\t1\t0"),
        "one job at each priority expected\n{}",
        ps.diag()
    );

    let worker = php_worker(srv.port, 0, &["prio_bg=echo", "prio_fg=reverse"]);
    // The worker drains the queued background jobs high first.
    let events = worker.wait_for("the three background jobs", T, |e| {
        e.iter().filter(|v| v["func"] == "prio_bg").count() == 3
    });
    let bg: Vec<&Value> = events.iter().filter(|v| v["func"] == "prio_bg").collect();
    let order: Vec<&str> = bg.iter().map(|v| s(&v["workload"])).collect();
    assert_eq!(
        order,
        ["bg-high", "bg-normal", "bg-low"],
        "{}",
        worker.diag()
    );
    assert_eq!(bg[0]["handle"], handles[2].as_str(), "{}", worker.diag());
    assert_eq!(bg[2]["handle"], handles[0].as_str(), "{}", worker.diag());

    for prio in ["high", "normal", "low"] {
        let payload = format!("foreground at {prio} priority");
        let c = php_client(srv.port, "do", &["prio_fg", prio, &payload]).finish_ok();
        let r = c.one("result");
        assert_eq!(r["rc"], 0, "{}", c.diag());
        assert_eq!(r["data"], rev(&payload), "{}\n{}", c.diag(), worker.diag());
    }
    let ps = gearadmin(srv.port, "--priority-status");
    assert!(
        ps.lines.iter().any(|l| l == "prio_bg\t0\t0\t0\t1"),
        "{}",
        ps.diag()
    );
    assert!(
        ps.lines.iter().any(|l| l == "prio_fg\t0\t0\t0\t1"),
        "{}",
        ps.diag()
    );
}

/// Jobs queued (gearman CLI, -b with -L / none / -I) before any worker: one PHP worker receives
/// high first, then normal, then low, FIFO within each priority.
#[test]
fn priority_order_high_normal_low_fifo_within_each() {
    let srv = server();
    let mut submitted = Vec::new();
    for round in 1..=3 {
        for (prio, flags) in [
            ("low", &["-L"][..]),
            ("normal", &[][..]),
            ("high", &["-I"][..]),
        ] {
            let payload = format!("{prio}-{round}");
            let mut args = vec!["-b", "-f", "order"];
            args.extend_from_slice(flags);
            args.push(&payload);
            gearman(srv.port, &args).finish_ok();
            submitted.push(payload);
        }
    }
    let ps = gearadmin(srv.port, "--priority-status");
    assert!(
        ps.lines.iter().any(|l| l == "order\t3\t3\t3\t0"),
        "{}",
        ps.diag()
    );

    let w = php_worker(srv.port, 9, &["order=echo"]).finish_ok();
    let got = workloads(&jobs_of(&w));
    let want: Vec<String> = ["high", "normal", "low"]
        .iter()
        .flat_map(|p| (1..=3).map(move |r| format!("{p}-{r}")))
        .collect();
    assert_eq!(got, want, "submitted in order {submitted:?}\n{}", w.diag());
}

/// The gearman CLI as client and as worker: foreground jobs at -I, normal and -L return the
/// worker command's output, -n sends one job per input line, and two background submits with
/// the same -u coalesce into one job.
#[test]
fn gearman_cli_foreground_priorities_and_background_unique() {
    let srv = server();
    let worker = gearman(
        srv.port,
        &["-w", "-f", "upper", "-c", "3", "--", "tr", "a-z", "A-Z"],
    );
    wait_status(&srv, "upper", "has a worker", |r| r.2 == 1);
    for (flag, payload) in [
        ("-I", "high priority words"),
        ("", "normal words"),
        ("-L", "low words"),
    ] {
        let mut args = vec!["-f", "upper"];
        if !flag.is_empty() {
            args.push(flag);
        }
        args.push(payload);
        let c = gearman(srv.port, &args).finish_ok();
        assert_eq!(
            c.stdout().trim_end(),
            payload.to_uppercase(),
            "{}\n{}",
            c.diag(),
            worker.diag()
        );
    }
    worker.finish_ok();

    // -n: one job per stdin line, results printed in order.
    let worker = gearman(
        srv.port,
        &["-w", "-f", "count", "-c", "3", "--", "wc", "-c"],
    );
    wait_status(&srv, "count", "has a worker", |r| r.2 == 1);
    let c = Proc::spawn_with_input(
        "gearman cli",
        "gearman",
        &strings(&[
            "-h",
            "127.0.0.1",
            "-p",
            &srv.port.to_string(),
            "-f",
            "count",
            "-n",
        ]),
        Some(b"one\ntwo2\nthree33\n".to_vec()),
    )
    .finish_ok();
    let counts: Vec<&str> = c.lines.iter().map(|l| l.trim()).collect();
    assert_eq!(counts, ["4", "5", "8"], "{}\n{}", c.diag(), worker.diag());
    worker.finish_ok();

    for payload in ["first", "second"] {
        gearman(
            srv.port,
            &["-b", "-u", "cli-unique-1", "-f", "later", payload],
        )
        .finish_ok();
    }
    assert_eq!(
        status_row(srv.port, "later"),
        Some((1, 0, 0)),
        "same unique must coalesce"
    );
    let u = gearadmin(srv.port, "--show-unique-jobs");
    assert!(u.lines.iter().any(|l| l == "cli-unique-1"), "{}", u.diag());
    let w = php_worker(srv.port, 1, &["later=echo"]).finish_ok();
    let job = w.one("job");
    assert_eq!(job["unique"], "cli-unique-1", "{}", w.diag());
    assert_eq!(
        job["workload"],
        "first",
        "the job keeps the first submit's payload\n{}",
        w.diag()
    );
}

/// Four foreground clients from three implementations (two PHP, Python gear, Perl) submit the
/// same (function, unique) before any worker: one job, one handle, one run, and every client
/// receives the result.
#[test]
fn unique_coalescing_across_clients_runs_once() {
    let srv = server();
    let (func, unique, payload) = ("coalesce", "coal-unique-7", "same payload");
    let php_a = php_client(srv.port, "tasks", &[func, "0", unique, payload]);
    let php_b = php_client(srv.port, "tasks", &[func, "0", unique, payload]);
    let py = py_client(srv.port, "fg", &[func, "normal", payload, unique]);
    let perl = perl_client(srv.port, "fg", &[func, "normal", payload, unique]);
    let deadline = Instant::now() + T;
    while waiting_clients(srv.port, unique) < 4 {
        assert!(
            Instant::now() < deadline,
            "4 clients never waited on {unique}: {}\n{}\n{}\n{}",
            php_a.diag(),
            php_b.diag(),
            py.diag(),
            perl.diag()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_row(srv.port, func), Some((1, 0, 0)));
    let created_a = php_a.wait_event("created");
    let created_b = php_b.wait_event("created");
    assert_eq!(created_a["handle"], created_b["handle"]);
    let handle = s(&created_a["handle"]).to_string();

    let worker = php_worker(srv.port, 0, &[&format!("{func}=reverse")]);
    let want = rev(payload);
    for p in [php_a, php_b] {
        let f = p.finish_ok();
        let c = f.one("complete");
        assert_eq!(c["data"], want.as_str(), "{}", f.diag());
        assert_eq!(c["handle"], handle.as_str(), "{}", f.diag());
        assert_eq!(c["unique"], unique, "{}", f.diag());
    }
    let f = py.finish_ok();
    let r = f.one("result");
    assert_eq!(r["handle"], handle.as_str(), "{}", f.diag());
    assert_eq!(r["data"], serde_json::json!([want]), "{}", f.diag());
    let f = perl.finish_ok();
    assert_eq!(f.one("result")["data"], want.as_str(), "{}", f.diag());

    wait_status(&srv, func, "drained", |r| r.0 == 0);
    let w = worker.kill9();
    let jobs = jobs_of(&w);
    assert_eq!(
        jobs.len(),
        1,
        "the worker must run the coalesced job once\n{}",
        w.diag()
    );
    assert_eq!(jobs[0]["handle"], handle.as_str());
    assert_eq!(jobs[0]["unique"], unique);
}

/// The unique "-" means "coalesce on the payload" (Gearman::Client documents `uniq => '-'`;
/// gearmand 1.1.20 looks such jobs up by their data). Jobs with different payloads must not
/// share a result; jobs with the same payload do.
#[test]
fn unique_dash_coalesces_on_the_payload() {
    let srv = server();
    let alpha = perl_client(srv.port, "fg", &["dash", "normal", "alpha", "-"]);
    wait_status(&srv, "dash", "has the alpha job", |r| r.0 == 1);
    let beta = perl_client(srv.port, "fg", &["dash", "normal", "beta", "-"]);
    wait_status(&srv, "dash", "has a separate beta job", |r| r.0 == 2);
    let alpha_again = php_client(srv.port, "tasks", &["dash", "0", "-", "alpha"]);
    alpha_again.wait_event("created");
    assert_eq!(
        status_row(srv.port, "dash"),
        Some((2, 0, 0)),
        "the second alpha must join"
    );

    let worker = php_worker(srv.port, 0, &["dash=reverse"]);
    for (p, want) in [(alpha, "ahpla"), (beta, "ateb")] {
        let f = p.finish_ok();
        assert_eq!(
            f.one("result")["data"],
            want,
            "{}\n{}",
            f.diag(),
            worker.diag()
        );
    }
    let f = alpha_again.finish_ok();
    assert_eq!(f.one("complete")["data"], "ahpla", "{}", f.diag());
    wait_status(&srv, "dash", "drained", |r| r.0 == 0);
    let w = worker.kill9();
    let mut ran = workloads(&jobs_of(&w));
    ran.sort();
    assert_eq!(ran, ["alpha", "beta"], "{}", w.diag());
    assert!(
        jobs_of(&w).iter().all(|j| j["unique"] == "-"),
        "{}",
        w.diag()
    );
}

/// GET_STATUS through PHP jobStatus and Perl get_status (and GET_STATUS_UNIQUE through PHP
/// jobStatusByUniqueKey) for a running job that sent WORK_STATUS 1/4, and for a handle (unique)
/// the server never issued; Python gear's STATUS_RES handling likewise.
#[test]
fn status_of_running_and_unknown_jobs() {
    let srv = server();
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release-php");
    let worker = php_worker(srv.port, 1, &[&format!("held=hold:{}", release.display())]);
    let c = php_client(
        srv.port,
        "bg",
        &["held", "normal", "hold me", "held-unique"],
    )
    .finish_ok();
    let handle = s(&c.one("queued")["handle"]).to_string();
    let job = worker.wait_event("job");
    assert_eq!(job["handle"], handle.as_str(), "{}", worker.diag());

    // The worker printed its job line after sending WORK_STATUS on another connection, so ask
    // until the server has seen it.
    let want = (true, true, 1, 4);
    let st = php_status_until(srv.port, &handle, |v| v == want);
    assert_eq!(
        status_fields(&st.one("status")),
        want,
        "{}\n{}",
        st.diag(),
        worker.diag()
    );
    let js = format!("127.0.0.1:{}//{handle}", srv.port);
    let st = perl_client(srv.port, "status", &[&js]).finish_ok();
    assert_eq!(status_fields(&st.one("status")), want, "{}", st.diag());
    // GET_STATUS_UNIQUE through PHP's jobStatusByUniqueKey.
    let st = php_client(srv.port, "ustatus", &["held-unique"]).finish_ok();
    assert_eq!(status_fields(&st.one("status")), want, "{}", st.diag());
    let st = php_client(srv.port, "ustatus", &["no-such-unique"]).finish_ok();
    assert_eq!(
        status_fields(&st.one("status")),
        (false, false, 0, 0),
        "{}",
        st.diag()
    );
    let unknown = format!("H:{NODE}:987654321");
    let st = php_client(srv.port, "status", &[&unknown]).finish_ok();
    assert_eq!(
        status_fields(&st.one("status")),
        (false, false, 0, 0),
        "{}",
        st.diag()
    );

    std::fs::write(&release, b"go").unwrap();
    let w = worker.finish_ok();
    assert_eq!(w.one("exit")["jobs"], 1, "{}", w.diag());
    let st = php_status_until(srv.port, &handle, |v| !v.0);
    assert_eq!(
        status_fields(&st.one("status")),
        (false, false, 0, 0),
        "{}",
        st.diag()
    );

    // Python gear: its own GET_STATUS while its worker holds the job.
    let release = dir.path().join("release-py");
    let worker = py_worker(
        srv.port,
        1,
        &[&format!("pyheld=hold:{}", release.display())],
    );
    wait_status(&srv, "pyheld", "has a worker", |r| r.2 == 1);
    let c = py_client(srv.port, "status", &["pyheld", "python holds"]).finish_ok();
    let diag = format!("{}\n{}", c.diag(), worker.diag());
    assert_eq!(
        status_fields(&c.one("status")),
        (true, true, 1, 4),
        "{diag}"
    );
    assert_eq!(
        status_fields(&c.one("unknown")),
        (false, false, 0, 0),
        "{diag}"
    );
    std::fs::write(&release, b"go").unwrap();
    let w = worker.finish_ok();
    assert_eq!(
        w.one("job")["handle"],
        c.one("status")["handle"],
        "{}",
        w.diag()
    );
}

/// WORK_DATA, WORK_WARNING and WORK_STATUS from a worker reach the client's callbacks, in order,
/// across implementations: PHP client <- Python worker, Python client <- PHP worker, Perl client
/// <- Perl worker.
#[test]
fn data_warning_status_callbacks() {
    let srv = server();
    let py_w = py_worker(srv.port, 0, &["chat_py=chatty"]);
    let php_w = php_worker(srv.port, 0, &["chat_php=chatty"]);
    let perl_w = perl_worker(srv.port, 0, &["chat_perl=status"]);
    wait_status(&srv, "chat_py", "has a worker", |r| r.2 == 1);
    wait_status(&srv, "chat_php", "has a worker", |r| r.2 == 1);
    wait_status(&srv, "chat_perl", "has a worker", |r| r.2 == 1);

    let c = php_client(srv.port, "tasks", &["chat_py", "0", "", "hello"]).finish_ok();
    let ev: Vec<Value> = c
        .events()
        .into_iter()
        .filter(|v| v["ev"] != "done")
        .collect();
    let handle = ev[0]["handle"].clone();
    let got: Vec<(String, String)> = ev
        .iter()
        .map(|v| {
            assert_eq!(v["handle"], handle, "{}", c.diag());
            let detail = match s(&v["ev"]) {
                "status" => format!("{}/{}", v["num"], v["den"]),
                "created" => String::new(),
                _ => s(&v["data"]).to_string(),
            };
            (s(&v["ev"]).to_string(), detail)
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("created", ""),
        ("data", "d1"),
        ("warning", "w1"),
        ("status", "1/4"),
        ("data", "d2"),
        ("status", "4/4"),
        ("complete", "done:hello"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "{}\n{}", c.diag(), py_w.diag());

    let c = py_client(srv.port, "fg", &["chat_php", "normal", "abc"]).finish_ok();
    let r = c.one("result");
    assert_eq!(
        r["data"],
        serde_json::json!(["d1", "w1", "d2", "done:abc"]),
        "{}",
        c.diag()
    );
    assert_eq!(
        (&r["warning"], &r["failure"]),
        (&Value::Bool(true), &Value::Bool(false))
    );
    assert_eq!(
        (&r["num"], &r["den"]),
        (&Value::from("4"), &Value::from("4")),
        "{}",
        c.diag()
    );

    let c = perl_client(srv.port, "fg", &["chat_perl", "normal", "xyz"]).finish_ok();
    let ev = c.events();
    let statuses: Vec<(i64, i64)> = ev
        .iter()
        .filter(|v| v["ev"] == "status")
        .map(|v| (v["num"].as_i64().unwrap(), v["den"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        [(1, 4), (4, 4)],
        "{}\n{}",
        c.diag(),
        perl_w.diag()
    );
    assert_eq!(c.one("result")["data"], "done:xyz", "{}", c.diag());
    drop((py_w, php_w, perl_w));
}

/// A worker that fails or throws: clients that asked for exceptions (OPTION_REQ exceptions)
/// get WORK_EXCEPTION with its data; clients that did not get WORK_FAIL. PHP and Python gear
/// clients, PHP and Python gear workers.
#[test]
fn fail_and_exception_reach_clients_as_asked() {
    let srv = server();
    let php_w = php_worker(srv.port, 0, &["f_php=fail", "t_php=throw"]);
    let py_w = py_worker(srv.port, 0, &["f_py=fail", "t_py=throw"]);
    for f in ["f_php", "t_php", "f_py", "t_py"] {
        wait_status(&srv, f, "has a worker", |r| r.2 == 1);
    }
    // (client, function, exceptions?, expected outcome)
    let cases = [
        ("php", "t_py", "1", "exception"),
        ("php", "t_php", "1", "exception"),
        ("php", "f_php", "1", "fail"),
        ("php", "t_py", "0", "fail"),
        ("php", "t_php", "0", "fail"),
        ("php", "f_py", "0", "fail"),
        ("py", "t_php", "1", "exception"),
        ("py", "t_py", "1", "exception"),
        ("py", "f_py", "1", "fail"),
        ("py", "t_php", "0", "fail"),
        ("py", "f_php", "0", "fail"),
    ];
    let running: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, &(client, func, exc, _))| {
            let payload = format!("case{i}");
            match client {
                "php" => php_client(srv.port, "tasks", &[func, exc, "", &payload]),
                _ => py_client(srv.port, "exc", &[func, &payload, exc]),
            }
        })
        .collect();
    for (i, (p, &(client, func, exc, want))) in running.into_iter().zip(cases.iter()).enumerate() {
        let f = p.finish_ok();
        let ctx = format!("case {i}: {client} client, {func}, exceptions={exc}, want {want}");
        let boom = format!("boom:case{i}");
        if client == "php" {
            assert_eq!(f.all("complete").len(), 0, "{ctx}\n{}", f.diag());
            if want == "exception" {
                assert_eq!(
                    f.one("exception")["data"],
                    boom.as_str(),
                    "{ctx}\n{}",
                    f.diag()
                );
                assert_eq!(f.all("fail").len(), 0, "{ctx}\n{}", f.diag());
            } else {
                f.one("fail");
                assert_eq!(f.all("exception").len(), 0, "{ctx}\n{}", f.diag());
            }
        } else {
            let r = f.one("result");
            assert_eq!(r["failure"], true, "{ctx}\n{}", f.diag());
            let exc_data = if want == "exception" {
                Value::from(boom)
            } else {
                Value::Null
            };
            assert_eq!(r["exception"], exc_data, "{ctx}\n{}", f.diag());
        }
    }
    drop((php_w, py_w));
}

/// A worker takes a job and dies without answering (SIGKILL): the server requeues the job,
/// another worker (another implementation) completes it, and the waiting client gets the
/// result under the original handle. Foreground (PHP client) and background (gearman CLI).
#[test]
fn crashed_worker_job_is_requeued_and_completed() {
    let srv = server();
    let doomed = php_worker(srv.port, 1, &["crashy=hang"]);
    wait_status(&srv, "crashy", "has a worker", |r| r.2 == 1);
    let client = php_client(srv.port, "tasks", &["crashy", "0", "", "precious cargo"]);
    let taken = doomed.wait_event("job");
    assert_eq!(status_row(srv.port, "crashy"), Some((1, 1, 1)));
    let crashed = doomed.kill9();
    wait_status(&srv, "crashy", "requeued", |r| r == (1, 0, 0));

    let rescuer = py_worker(srv.port, 1, &["crashy=echo"]).finish_ok();
    let job = rescuer.one("job");
    assert_eq!(
        job["handle"],
        taken["handle"],
        "{}\n{}",
        crashed.diag(),
        rescuer.diag()
    );
    assert_eq!(job["workload"], "precious cargo", "{}", rescuer.diag());
    let c = client.finish_ok();
    assert_eq!(c.one("created")["handle"], taken["handle"], "{}", c.diag());
    let r = c.one("complete");
    assert_eq!(r["data"], "precious cargo", "{}", c.diag());
    assert_eq!(r["handle"], taken["handle"], "{}", c.diag());
    assert_eq!(c.all("fail").len(), 0, "{}", c.diag());
    wait_status(&srv, "crashy", "empty with no worker", |r| r == (0, 0, 0));

    // Background: the job survives its worker's crash too, and the dead worker's WORK_STATUS
    // does not outlive it (gearmand resets a requeued job's progress to 0/0).
    gearman(srv.port, &["-b", "-f", "crashy_bg", "background cargo"]).finish_ok();
    let never = std::env::temp_dir().join("gearhouse-interop-never-created");
    let doomed = php_worker(
        srv.port,
        1,
        &[&format!("crashy_bg=hold:{}", never.display())],
    );
    let taken = doomed.wait_event("job");
    let handle = s(&taken["handle"]).to_string();
    let st = php_status_until(srv.port, &handle, |v| v == (true, true, 1, 4));
    assert_eq!(
        status_fields(&st.one("status")),
        (true, true, 1, 4),
        "{}",
        st.diag()
    );
    doomed.kill9();
    wait_status(&srv, "crashy_bg", "requeued", |r| r == (1, 0, 0));
    let st = php_client(srv.port, "status", &[&handle]).finish_ok();
    assert_eq!(
        status_fields(&st.one("status")),
        (true, false, 0, 0),
        "{}",
        st.diag()
    );
    let rescuer = perl_worker(srv.port, 1, &["crashy_bg=echo"]).finish_ok();
    let job = rescuer.one("job");
    assert_eq!(job["handle"], taken["handle"], "{}", rescuer.diag());
    assert_eq!(job["workload"], "background cargo", "{}", rescuer.diag());
    wait_status(&srv, "crashy_bg", "drained", |r| r.0 == 0);
}

/// PHP's `addFunction(name, cb, ctx, timeout)` (libgearman CAN_DO_TIMEOUT): the documented unit is
/// seconds, gearmand 1.1.20 reads milliseconds and raises anything under 1000 to 1000. So a
/// worker registered with timeout 1 that takes 300 ms must finish normally (not be requeued
/// after 1 ms), and one that takes longer than a second loses the job to another worker.
#[test]
fn php_worker_timeout_has_gearmands_one_second_floor() {
    let srv = server();
    let w = php_worker(srv.port, 1, &["tq@1=sleep:300"]);
    wait_status(&srv, "tq", "has a worker", |r| r.2 == 1);
    let c = php_client(srv.port, "tasks", &["tq", "0", "", "in time"]);
    let w = w.finish_ok();
    assert_eq!(w.one("exit")["jobs"], 1, "{}", w.diag());
    let c = c.finish_ok();
    assert_eq!(c.one("complete")["data"], "r:in time", "{}", c.diag());

    // Past the floor the job is requeued and another worker completes it.
    let slow = php_worker(srv.port, 1, &["tl@1=sleep:4000"]);
    wait_status(&srv, "tl", "has a worker", |r| r.2 == 1);
    let c = php_client(srv.port, "tasks", &["tl", "0", "", "too slow"]);
    let taken = slow.wait_event("job");
    let at = Instant::now();
    assert_eq!(
        status_row(srv.port, "tl").map(|r| r.1),
        Some(1),
        "requeued at once\n{}",
        srv.log_text()
    );
    let rescuer = py_worker(srv.port, 1, &["tl=echo"]).finish_ok();
    let waited = at.elapsed();
    assert_eq!(
        rescuer.one("job")["handle"],
        taken["handle"],
        "{}",
        rescuer.diag()
    );
    let c = c.finish_ok();
    assert_eq!(c.one("complete")["data"], "too slow", "{}", c.diag());
    assert!(
        waited < Duration::from_secs(4),
        "requeued only after {waited:?}"
    );
}

/// With `--job-retries 2`, a job whose worker crashes once is requeued; when its second worker
/// crashes too it is dropped and the waiting PHP client gets WORK_FAIL (not a hang).
#[test]
fn job_retries_limit_fails_the_waiting_client() {
    let srv = BinServer::start(&["--node-id", NODE, "--job-retries", "2"], &[]);
    let client = php_client(srv.port, "tasks", &["doomed", "0", "", "cursed"]);
    client.wait_event("created");
    for attempt in 1..=2 {
        let w = php_worker(srv.port, 1, &["doomed=hang"]);
        let job = w.wait_event("job");
        assert_eq!(job["workload"], "cursed", "attempt {attempt}\n{}", w.diag());
        w.kill9();
        if attempt == 1 {
            wait_status(&srv, "doomed", "requeued after one crash", |r| {
                r == (1, 0, 0)
            });
        }
    }
    let c = client.finish_ok();
    c.one("fail");
    assert_eq!(c.all("complete").len(), 0, "{}", c.diag());
    wait_status(&srv, "doomed", "dropped", |r| r == (0, 0, 0));
}

/// A foreground client that joins a queued background job (same function and unique) and then
/// disconnects does not take the job with it; the next foreground client to join receives the
/// background job's result.
#[test]
fn foreground_clients_joining_a_background_job() {
    let srv = server();
    let (func, unique) = ("mixed", "mixed-unique");
    let c = php_client(srv.port, "bg", &[func, "normal", "bg payload", unique]).finish_ok();
    let handle = c.one("queued")["handle"].clone();

    let quitter = php_client(srv.port, "tasks", &[func, "0", unique, "ignored 1"]);
    assert_eq!(quitter.wait_event("created")["handle"], handle);
    assert_eq!(waiting_clients(srv.port, unique), 1);
    quitter.kill9();
    let deadline = Instant::now() + T;
    while waiting_clients(srv.port, unique) != 0 {
        assert!(Instant::now() < deadline, "the killed client still waits");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        status_row(srv.port, func),
        Some((1, 0, 0)),
        "the job must survive"
    );

    let joiner = php_client(srv.port, "tasks", &[func, "0", unique, "ignored 2"]);
    assert_eq!(joiner.wait_event("created")["handle"], handle);
    let w = php_worker(srv.port, 1, &[&format!("{func}=reverse")]).finish_ok();
    assert_eq!(w.one("job")["workload"], "bg payload", "{}", w.diag());
    let j = joiner.finish_ok();
    let done = j.one("complete");
    assert_eq!(done["handle"], handle, "{}", j.diag());
    assert_eq!(done["data"], "daolyap gb", "{}", j.diag());
    wait_status(&srv, func, "drained", |r| r == (0, 0, 0));
}

/// Four workers (two PHP, one Perl, one Python gear) share 200 foreground jobs from one PHP
/// client: every job is done exactly once, every result comes back, and the load is shared.
#[test]
fn many_workers_share_the_load() {
    let srv = server();
    let workers = vec![
        php_worker(srv.port, 0, &["share=sleep:5"]),
        php_worker(srv.port, 0, &["share=sleep:5"]),
        perl_worker(srv.port, 0, &["share=sleep:5"]),
        py_worker(srv.port, 0, &["share=sleep:5"]),
    ];
    wait_status(&srv, "share", "has 4 workers", |r| r.2 == 4);
    let payloads: Vec<String> = (0..200).map(|i| format!("job-{i:03}")).collect();
    let mut args = vec!["share", "0", ""];
    args.extend(payloads.iter().map(String::as_str));
    let c = php_client(srv.port, "tasks", &args).finish_within(Duration::from_secs(60));
    assert!(c.status.success(), "{}", c.diag());
    assert_eq!(c.one("done")["ok"], true, "{}", c.diag());
    let results: BTreeSet<String> = c
        .all("complete")
        .iter()
        .map(|v| s(&v["data"]).to_string())
        .collect();
    let want: BTreeSet<String> = payloads.iter().map(|p| format!("r:{p}")).collect();
    assert_eq!(c.all("complete").len(), 200, "{}", c.diag());
    assert_eq!(results, want, "{}", c.diag());
    wait_status(&srv, "share", "drained", |r| r.0 == 0);

    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_worker = Vec::new();
    for w in workers {
        let f = w.kill9();
        let jobs = jobs_of(&f);
        per_worker.push((f.label.clone(), jobs.len()));
        for j in jobs {
            *runs.entry(s(&j["workload"]).to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert_eq!(runs.len(), 200, "every job must have run: {per_worker:?}");
    let busy = per_worker.iter().filter(|(_, n)| *n > 0).count();
    assert!(busy >= 2, "only one worker did work: {per_worker:?}");
}

/// A 10 MiB binary payload (every byte value, NULs included) through a PHP client and a PHP
/// worker that returns it reversed: the worker's hash of what it received equals the client's
/// hash of what it sent, and the result is byte-exact.
#[test]
fn ten_mib_payload_round_trip() {
    let srv = server();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let data: Vec<u8> = (0..10 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&input, &data).unwrap();
    let worker = php_worker(srv.port, 1, &["big=reverse"]);
    let c = php_client(
        srv.port,
        "file",
        &["big", &input.to_string_lossy(), &output.to_string_lossy()],
    )
    .finish_within(Duration::from_secs(60));
    assert!(c.status.success(), "{}\n{}", c.diag(), worker.diag());
    let w = worker.finish_ok();
    let r = c.one("result");
    let job = w.one("job");
    assert_eq!(r["rc"], 0, "{}", c.diag());
    assert_eq!(r["sent_size"], data.len(), "{}", c.diag());
    assert_eq!(job["size"], data.len(), "{}", w.diag());
    assert_eq!(
        job["sha"], r["sent_sha"],
        "worker received other bytes than sent"
    );
    assert_eq!(r["size"], data.len(), "{}", c.diag());
    let got = std::fs::read(&output).unwrap();
    let mut want = data;
    want.reverse();
    assert!(
        got == want,
        "result differs from the reversed payload ({} bytes)",
        got.len()
    );
}

/// Perl Gearman::Client and Gearman::Worker: foreground at each priority (with status
/// callbacks), background with a uniq, all served by a Perl worker.
#[test]
fn perl_client_and_worker() {
    let srv = server();
    let worker = perl_worker(srv.port, 0, &["perl_rev=reverse", "perl_st=status"]);
    wait_status(&srv, "perl_rev", "has a worker", |r| r.2 == 1);
    for (prio, payload) in [
        ("high", "perl high"),
        ("normal", "perl normal"),
        ("low", "perl low"),
    ] {
        let c = perl_client(srv.port, "fg", &["perl_rev", prio, payload]).finish_ok();
        assert_eq!(
            c.one("result")["data"],
            rev(payload).as_str(),
            "{}\n{}",
            c.diag(),
            worker.diag()
        );
    }
    let c = perl_client(srv.port, "fg", &["perl_st", "normal", "tracked"]).finish_ok();
    assert_eq!(c.all("status").len(), 2, "{}", c.diag());
    assert_eq!(c.one("result")["data"], "done:tracked", "{}", c.diag());

    let c = perl_client(
        srv.port,
        "bg",
        &["perl_rev", "low", "perl background", "perl-bg-1"],
    )
    .finish_ok();
    let h = s(&c.one("queued")["handle"]).to_string();
    let prefix = format!("127.0.0.1:{}//", srv.port);
    let handle = h
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{h}\n{}", c.diag()))
        .to_string();
    let events = worker.wait_for("the background job", T, |e| {
        e.iter().any(|v| v["handle"] == handle.as_str())
    });
    let job = events
        .iter()
        .find(|v| v["handle"] == handle.as_str())
        .unwrap();
    assert_eq!(job["workload"], "perl background");
    wait_status(&srv, "perl_rev", "drained", |r| r.0 == 0);
}

/// Python gear client and worker: foreground at each precedence, background with a unique.
#[test]
fn python_gear_client_and_worker() {
    let srv = server();
    let worker = py_worker(srv.port, 0, &["py_rev=reverse"]);
    wait_status(&srv, "py_rev", "has a worker", |r| r.2 == 1);
    for prio in ["high", "normal", "low"] {
        let payload = format!("python {prio}");
        let c = py_client(srv.port, "fg", &["py_rev", prio, &payload]).finish_ok();
        let r = c.one("result");
        assert_eq!(
            r["data"],
            serde_json::json!([rev(&payload)]),
            "{}\n{}",
            c.diag(),
            worker.diag()
        );
        assert_eq!(r["failure"], false, "{}", c.diag());
    }
    let c = py_client(
        srv.port,
        "bg",
        &["py_rev", "high", "python background", "py-bg-1"],
    )
    .finish_ok();
    let handle = c.one("queued")["handle"].clone();
    assert!(
        s(&handle).starts_with(&format!("H:{NODE}:")),
        "{}",
        c.diag()
    );
    let events = worker.wait_for("the background job", T, |e| {
        e.iter().any(|v| v["handle"] == handle)
    });
    let job = events.iter().find(|v| v["handle"] == handle).unwrap();
    assert_eq!(job["workload"], "python background");
    assert_eq!(job["unique"], "py-bg-1");
}

/// gearadmin against gearhouse: --status, --priority-status, --workers, --show-jobs,
/// --show-unique-jobs, --getpid and --server-version parse in gearmand's formats and report the
/// server's real state (5 jobs, 1 running on 1 worker); --cancel-job, --create-function and
/// --drop-function answer OK and take effect.
#[test]
fn gearadmin_reports_in_gearmand_formats() {
    let srv = server();
    for (flags, payload) in [
        (&[][..], "n1"),
        (&[][..], "n2"),
        (&["-I"][..], "h1"),
        (&[][..], "n3"),
        (&["-L"][..], "l1"),
    ] {
        let mut args = vec!["-b", "-f", "adm"];
        args.extend_from_slice(flags);
        args.push(payload);
        gearman(srv.port, &args).finish_ok();
    }
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let worker = php_worker(srv.port, 1, &[&format!("adm=hold:{}", release.display())]);
    let held = worker.wait_event("job");
    assert_eq!(
        held["workload"],
        "h1",
        "the high job runs first\n{}",
        worker.diag()
    );

    // status: FUNC\tTOTAL\tRUNNING\tWORKERS, then "."
    let st = gearadmin(srv.port, "--status");
    assert_eq!(
        st.lines.last().map(String::as_str),
        Some("."),
        "{}",
        st.diag()
    );
    for l in &st.lines[..st.lines.len() - 1] {
        let f: Vec<&str> = l.split('\t').collect();
        assert!(
            f.len() == 4 && f[1..].iter().all(|n| n.parse::<u64>().is_ok()),
            "bad line {l:?}"
        );
    }
    assert!(
        st.lines.iter().any(|l| l == "adm\t5\t1\t1"),
        "{}",
        st.diag()
    );

    let ps = gearadmin(srv.port, "--priority-status");
    assert_eq!(
        ps.lines.last().map(String::as_str),
        Some("."),
        "{}",
        ps.diag()
    );
    assert!(
        ps.lines.iter().any(|l| l == "adm\t0\t3\t1\t1"),
        "{}",
        ps.diag()
    );

    // workers: "FD IP CLIENT_ID : FUNC ...", then "."; Python gear sets a client id.
    let py = py_worker(srv.port, 0, &["adm_py=echo", "adm_py2=echo"]);
    wait_status(&srv, "adm_py", "has a worker", |r| r.2 == 1);
    let py_id = format!("interop-py-worker-{}", py.child.id());
    let wk = gearadmin(srv.port, "--workers");
    assert_eq!(
        wk.lines.last().map(String::as_str),
        Some("."),
        "{}",
        wk.diag()
    );
    let (mut with_adm, mut with_py_id) = (0, 0);
    for l in &wk.lines[..wk.lines.len() - 1] {
        let (head, funcs) = l
            .split_once(" :")
            .unwrap_or_else(|| panic!("bad line {l:?}"));
        let h: Vec<&str> = head.split(' ').collect();
        assert!(
            h.len() == 3 && h[0].parse::<u64>().is_ok(),
            "bad line {l:?}\n{}",
            wk.diag()
        );
        assert_eq!(h[1], "127.0.0.1", "bad line {l:?}");
        if funcs.split_whitespace().eq(["adm"]) {
            with_adm += 1;
        }
        if h[2] == py_id {
            let mut f: Vec<&str> = funcs.split_whitespace().collect();
            f.sort();
            assert_eq!(f, ["adm_py", "adm_py2"], "bad line {l:?}\n{}", wk.diag());
            with_py_id += 1;
        }
    }
    assert_eq!(
        with_py_id,
        1,
        "the Python worker's client id\n{}",
        wk.diag()
    );
    assert_eq!(
        with_adm,
        1,
        "exactly the PHP worker can do adm\n{}",
        wk.diag()
    );

    // show jobs: HANDLE\tRETRIES\tIGNORE\tQUEUED, then "."
    let sj = gearadmin(srv.port, "--show-jobs");
    assert_eq!(
        sj.lines.last().map(String::as_str),
        Some("."),
        "{}",
        sj.diag()
    );
    let jobs = &sj.lines[..sj.lines.len() - 1];
    assert_eq!(jobs.len(), 5, "{}", sj.diag());
    for l in jobs {
        let f: Vec<&str> = l.split('\t').collect();
        assert!(
            f.len() == 4
                && f[0].starts_with(&format!("H:{NODE}:"))
                && f[1..].iter().all(|n| n.parse::<u64>().is_ok()),
            "bad line {l:?}"
        );
    }
    assert!(
        jobs.iter()
            .any(|l| l.starts_with(&format!("{}\t", s(&held["handle"])))),
        "{}",
        sj.diag()
    );

    let su = gearadmin(srv.port, "--show-unique-jobs");
    assert_eq!(
        su.lines.last().map(String::as_str),
        Some("."),
        "{}",
        su.diag()
    );
    assert_eq!(su.lines.len(), 6, "{}", su.diag());
    assert!(
        su.lines.iter().any(|l| l == s(&held["unique"])),
        "{}",
        su.diag()
    );

    let pid = gearadmin(srv.port, "--getpid");
    assert_eq!(
        pid.stdout().trim(),
        srv.child.id().to_string(),
        "{}",
        pid.diag()
    );
    let v = gearadmin(srv.port, "--server-version");
    assert_eq!(v.stdout().trim(), env!("CARGO_PKG_VERSION"), "{}", v.diag());

    // cancel a queued job; create and drop a function.
    let victim = jobs
        .iter()
        .map(|l| l.split('\t').next().unwrap())
        .find(|h| *h != s(&held["handle"]))
        .unwrap();
    let c = gearadmin(srv.port, &format!("--cancel-job={victim}"));
    assert_eq!(c.stdout().trim(), "OK", "{}", c.diag());
    assert_eq!(status_row(srv.port, "adm"), Some((4, 1, 1)));
    let c = gearadmin(srv.port, "--create-function=made_up");
    assert_eq!(c.stdout().trim(), "OK", "{}", c.diag());
    assert_eq!(status_row(srv.port, "made_up"), Some((0, 0, 0)));
    let c = gearadmin(srv.port, "--drop-function=made_up");
    assert_eq!(c.stdout().trim(), "OK", "{}", c.diag());
    assert_eq!(status_row(srv.port, "made_up"), None);

    std::fs::write(&release, b"go").unwrap();
    worker.finish_ok();
    drop(py);
    wait_status(&srv, "adm", "back to 3 queued, none running", |r| {
        r == (3, 0, 0)
    });
}
