//! The status page at `/` in a real browser: Debian's headless `chromium`, driven over the
//! DevTools protocol (one WebSocket, flattened target sessions) while a real worker and client
//! move jobs through the server, with two real memcached nodes behind it.
//!
//! Asserted: the page loads with no exception, no `console.error` and no error in the browser's
//! log (a Content-Security-Policy violation or a failed load lands there); the function the test
//! created is in the DOM with its name as plain text (the name carries HTML); its completed count
//! changes while jobs flow, which only the page's own polling can do; the memcached nodes show
//! as up; features this build lacks show as "not enabled". `GEARHOUSE_SCREENSHOT=path` also saves
//! a PNG of the page (the README's docs/status-page.png).
//!
//! Limits, schedules and dead letters come from features built beside this one: a second
//! browser test serves their documented JSON to the real page through the DevTools `Fetch`
//! domain and checks that it is shown, as text, without errors.
//!
//! Without chromium the test tries `apt-get install chromium` (as root) and skips with the reason
//! only when that fails too; scripts/install-test-deps.sh installs it for the suite.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use gearhouse::client::{Connection, Job};
use gearhouse::protocol::{GrabKind, Priority};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use common::{http_get, Memcached, TestServer};

/// A function name that is also HTML: it must come out as text, on the server and in the script.
const NAME: &str = "page<b>&\"demo\"";
/// A second function with no worker, so a queue visibly grows.
const IDLE: &str = "resize";
/// Endpoints of features built by others; a build without them answers 404.
const OPTIONAL: [&str; 2] = ["/api/v1/schedules", "/api/v1/dead-letters"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_live_numbers_in_a_real_browser_without_console_errors() {
    let Some(chromium) = chromium_binary() else {
        println!("SKIPPED: chromium is not installed and `apt-get install chromium` failed");
        return;
    };
    let mc_a = Memcached::start(64, &["-M"]);
    let mc_b = Memcached::start(64, &["-M"]);
    let nodes = format!("{},{}", mc_a.addr(), mc_b.addr());
    let server = TestServer::start(&[("GEARHOUSE_PERSISTENCE__MEMCACHED", nodes.as_str())]).await;
    let mut absent = Vec::new();
    for path in OPTIONAL {
        if http_get(server.http, path).await.unwrap().0 == 404 {
            absent.push(path);
        }
    }

    let flow = CancellationToken::new();
    let worker = tokio::spawn(work(server.addr, flow.clone()));
    let client = tokio::spawn(submit(server.addr, flow.clone()));

    let browser = Chromium::start(&chromium);
    let mut cdp = Cdp::connect(&browser.ws_url).await;
    let session = cdp.open_page().await;
    let s = Some(session.as_str());
    cdp.navigate(&session, &format!("http://{}/", server.http))
        .await;

    // The function's row, found by its name as data (not by markup), and its completed count.
    let row = format!(
        "Array.from(document.querySelectorAll('#functions tbody tr')).find(r => r.dataset.name === {})",
        serde_json::to_string(NAME).unwrap()
    );
    let completed = format!("(() => {{ const r = {row}; return r ? Number(r.querySelector('td.completed').textContent) : null; }})()");
    let first = cdp
        .wait_value(
            s,
            &completed,
            |v| v.as_f64().is_some(),
            "the function's row",
        )
        .await;
    let later = cdp
        .wait_value(
            s,
            &completed,
            |v| v.as_f64().is_some_and(|n| n > first.as_f64().unwrap()),
            "a completed count above the first one",
        )
        .await;
    let rate = cdp
        .wait_value(
            s,
            "Number(document.getElementById('s-rate').textContent)",
            |v| v.as_f64().is_some_and(|r| r > 0.0),
            "a completed/s rate above 0",
        )
        .await;
    println!("completed count on the page: {first} then {later}; {rate} jobs/s");

    let name_cell = cdp
        .eval(s, &format!("{row}.querySelector('td.name').textContent"))
        .await;
    assert_eq!(name_cell, NAME, "the name is shown as text");
    let injected = cdp
        .eval(s, "document.querySelectorAll('#functions b').length")
        .await;
    assert_eq!(injected, 0, "the name's <b> became markup");
    let updated = cdp
        .eval(s, "document.getElementById('s-updated').textContent")
        .await;
    assert!(
        updated.as_str().unwrap().starts_with("updated "),
        "the script never refreshed the page: {updated}"
    );
    let node_rows = cdp
        .wait_value(
            s,
            "Array.from(document.querySelectorAll('#nodes tbody tr')).map(r => [r.cells[0].textContent, r.cells[1].textContent])",
            |v| {
                v.as_array().is_some_and(|rows| {
                    rows.len() == 2 && rows.iter().all(|r| r[1] == "up")
                })
            },
            "both memcached nodes up",
        )
        .await;
    for addr in [mc_a.addr(), mc_b.addr()] {
        assert!(node_rows.to_string().contains(&addr), "{addr}: {node_rows}");
    }
    for (path, table) in OPTIONAL.iter().zip(["schedules", "dead-letters"]) {
        let shown = cdp
            .wait_value(
                s,
                &format!("document.querySelector('#{table} tbody').textContent"),
                |v| v != "loaded by the page's script",
                "the optional tables filled by the script",
            )
            .await;
        if absent.contains(path) {
            assert_eq!(shown, "not enabled", "{path} answers 404");
        }
    }

    if let Ok(path) = std::env::var("GEARHOUSE_SCREENSHOT") {
        // Let the throughput column show a rate (it needs two refreshes).
        cdp.pump(Duration::from_secs(4)).await;
        let shot = cdp
            .call(
                s,
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(&path, png).unwrap();
        println!("screenshot saved to {path}");
    }
    // A last refresh or two, so errors from the steady state are seen as well.
    cdp.pump(Duration::from_secs(2)).await;
    let errors = console_errors(&cdp.events, &absent);
    assert!(
        errors.is_empty(),
        "the page logged errors:\n{}",
        errors.join("\n")
    );

    flow.cancel();
    worker.await.unwrap();
    client.await.unwrap();
    drop(browser);
    server.stop().await;
}

/// Limits, schedules and dead letters, once their features answer, are shown as text: the
/// JSON those features document is served to the real page in place of this build's (for the
/// schedules and dead-letter endpoints) or added to it (a `settings` object per function).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_limits_schedules_and_dead_letters_as_text() {
    let Some(chromium) = chromium_binary() else {
        println!("SKIPPED: chromium is not installed and `apt-get install chromium` failed");
        return;
    };
    let server = TestServer::start(&[]).await;
    let mut c = Connection::connect(server.addr).await.unwrap();
    c.submit_background(&Job::new(NAME, "x")).await.unwrap();

    let browser = Chromium::start(&chromium);
    let mut cdp = Cdp::connect(&browser.ws_url).await;
    let session = cdp.open_page().await;
    let s = Some(session.as_str());
    cdp.fixture = Some(feature_fixtures);
    let patterns = json!({ "patterns": [
        { "urlPattern": "*/api/v1/status", "requestStage": "Response" },
        { "urlPattern": "*/api/v1/schedules", "requestStage": "Request" },
        { "urlPattern": "*/api/v1/dead-letters", "requestStage": "Request" },
    ] });
    cdp.call(s, "Fetch.enable", patterns).await;
    cdp.navigate(&session, &format!("http://{}/", server.http))
        .await;

    let cells = |table: &str| {
        format!(
            "Array.from(document.querySelectorAll('#{table} tbody tr')).map(r => Array.from(r.cells).map(c => c.textContent))"
        )
    };
    let schedules = cdp
        .wait_value(
            s,
            &cells("schedules"),
            |v| v[0].as_array().is_some_and(|r| r.len() == 5),
            "the schedule row",
        )
        .await;
    assert_eq!(
        schedules,
        json!([[
            "1",
            "*/5 * * * *",
            "<img src=x>",
            "2026-11-30T09:00:00Z",
            "\u{2014}"
        ]])
    );
    let dead = cdp
        .wait_value(
            s,
            &cells("dead-letters"),
            |v| v[0].as_array().is_some_and(|r| r.len() == 6),
            "the dead letter row",
        )
        .await;
    assert_eq!(
        dead,
        json!([[
            "7",
            NAME,
            "H:test:9",
            "<script>x</script>",
            "3",
            "2026-11-30T08:00:00Z"
        ]])
    );
    let settings = cdp
        .wait_value(
            s,
            "document.querySelector('#functions td.settings').textContent",
            |v| v != "none",
            "the function's limits",
        )
        .await;
    // Keys in the JSON's order; a null setting is not shown.
    assert_eq!(settings, "dead_letter=<i>dl</i> max_running=2 rate=5");
    let markup = cdp
        .eval(
            s,
            "document.querySelectorAll('table b, table i, table img, table script').length",
        )
        .await;
    assert_eq!(markup, 0, "data became markup");
    let nodes = cdp
        .eval(s, "document.querySelector('#nodes tbody').textContent")
        .await;
    assert_eq!(nodes, "not enabled (the queue is in memory only)");

    cdp.pump(Duration::from_secs(2)).await;
    let errors = console_errors(&cdp.events, &[]);
    assert!(
        errors.is_empty(),
        "the page logged errors:\n{}",
        errors.join("\n")
    );
    drop(browser);
    server.stop().await;
}

/// The JSON of the limits, schedules and dead-letter features, as their endpoints document it,
/// with HTML in the strings a client chose.
fn feature_fixtures(url: &str, served: Option<&[u8]>) -> Option<Vec<u8>> {
    let body = if url.ends_with("/api/v1/schedules") {
        json!([{ "id": 1, "cron": "*/5 * * * *", "function": "<img src=x>",
                 "next_due": "2026-11-30T09:00:00Z", "last_run": null }])
    } else if url.ends_with("/api/v1/dead-letters") {
        json!([{ "id": 7, "function": NAME, "handle": "H:test:9", "reason": "<script>x</script>",
                 "attempts": 3, "time": "2026-11-30T08:00:00Z" }])
    } else {
        let mut status: Value = serde_json::from_slice(served?).unwrap();
        for f in status["functions"].as_array_mut().unwrap() {
            f["settings"] =
                json!({ "rate": 5, "burst": null, "max_running": 2, "dead_letter": "<i>dl</i>" });
        }
        status
    };
    Some(body.to_string().into_bytes())
}

/// The first view is rendered by the server (useful without JavaScript), escaped, and sent with
/// a policy that lets nothing but the page's own script and style run.
#[tokio::test]
async fn page_is_rendered_by_the_server_escaped_and_with_a_policy() {
    let server = TestServer::start(&[]).await;
    let mut c = Connection::connect(server.addr).await.unwrap();
    c.submit_background(&Job::new(NAME, "x")).await.unwrap();
    let (head, body) = raw_get(server.http, "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .unwrap_or_else(|| panic!("no Content-Security-Policy: {head}"));
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(
        body.contains("<td class=\"name\">page&lt;b&gt;&amp;\"demo\"</td>"),
        "the name, escaped, in the first view: {body}"
    );
    assert!(!body.contains("page<b>"), "the name unescaped: {body}");
    // The queued job is in the first view, before any script ran.
    assert!(body.contains("<td class=\"normal\">1</td>"), "{body}");
    assert!(body.contains("<dd id=\"s-queued\">1</dd>"), "{body}");
    server.stop().await;
}

/// A worker for [`NAME`]: grabs, takes a moment, completes; sleeps on PRE_SLEEP when idle.
async fn work(addr: SocketAddr, stop: CancellationToken) {
    let mut w = Connection::connect(addr).await.unwrap();
    w.can_do(NAME.as_bytes()).await.unwrap();
    while !stop.is_cancelled() {
        match w.grab(GrabKind::All).await.unwrap() {
            Some(job) => {
                // Paced so the queue has a depth to show; not a synchronisation point.
                tokio::time::sleep(Duration::from_millis(40)).await;
                w.complete(&job.handle, b"done").await.unwrap();
            }
            None => {
                w.pre_sleep().await.unwrap();
                tokio::select! {
                    r = w.wait_noop() => r.unwrap(),
                    () = stop.cancelled() => {}
                }
            }
        }
    }
}

/// A client submitting background jobs at all three priorities, until stopped.
async fn submit(addr: SocketAddr, stop: CancellationToken) {
    let mut c = Connection::connect(addr).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let priorities = [Priority::High, Priority::Normal, Priority::Low];
    let mut n = 0usize;
    while !stop.is_cancelled() {
        tick.tick().await;
        let p = priorities[n % 3];
        c.submit_background(&Job::new(NAME, "x").priority(p))
            .await
            .unwrap();
        if n.is_multiple_of(10) {
            c.submit_background(&Job::new(IDLE, "y")).await.unwrap();
        }
        n += 1;
    }
}

/// Errors the browser reported: exceptions, `console.error`/`console.assert`, and log entries of
/// level error. A 404 from an endpoint this build does not have is expected (the page says
/// "not enabled" and stops asking), and nothing else is.
fn console_errors(events: &[Value], absent: &[&str]) -> Vec<String> {
    let mut errors = Vec::new();
    for e in events {
        let p = &e["params"];
        match e["method"].as_str() {
            Some("Runtime.exceptionThrown") => errors.push(format!("exception: {p}")),
            Some("Runtime.consoleAPICalled")
                if matches!(p["type"].as_str(), Some("error" | "assert")) =>
            {
                errors.push(format!("console.{}: {}", p["type"], p["args"]))
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                let entry = &p["entry"];
                let url = entry["url"].as_str().unwrap_or_default();
                let expected = entry["source"] == "network"
                    && absent.iter().any(|path| url.ends_with(path))
                    && entry["text"].as_str().unwrap_or_default().contains("404");
                if expected {
                    println!("expected, {url} is absent: {}", entry["text"]);
                } else {
                    errors.push(format!("log: {entry}"));
                }
            }
            _ => {}
        }
    }
    errors
}

/// A GET that keeps the response head: (head with lower-case header names, body).
async fn raw_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let head = head
        .lines()
        .map(|l| match l.split_once(": ") {
            Some((k, v)) => format!("{}: {v}", k.to_ascii_lowercase()),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    (head, body.to_owned())
}

/// `chromium` on the PATH, installed with apt-get first when it is missing and we are root.
fn chromium_binary() -> Option<String> {
    let found = || {
        Command::new("sh")
            .args(["-c", "command -v chromium"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    if let Some(path) = found() {
        return Some(path);
    }
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("chromium is missing: apt-get install chromium");
        let _ = Command::new("sh")
            .args([
                "-c",
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core",
            ])
            .status();
    }
    found()
}

/// A headless chromium with a throw-away profile, in its own process group so that dropping
/// it (also when an assertion failed) ends the browser and every helper process it started.
struct Chromium {
    child: Child,
    ws_url: String,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn start(binary: &str) -> Chromium {
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(binary);
        cmd.args([
            "--headless=new",
            "--remote-debugging-port=0",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
        // Chromium's sandbox refuses to run as root; the page is our own.
        if unsafe { libc::geteuid() } == 0 {
            cmd.arg("--no-sandbox");
        }
        let mut child = cmd.spawn().expect("spawn chromium");
        // The DevTools address is printed on stderr; the rest is kept for a failure message.
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut browser = Chromium {
            child,
            ws_url: String::new(),
            _profile: profile,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => browser.ws_url = url,
            Err(_) => panic!(
                "chromium printed no DevTools address within 60 s:\n{}",
                log.lock().unwrap().join("\n")
            ),
        }
        browser
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // The group is ours alone: process_group(0) made chromium its leader.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A DevTools protocol connection: commands answered in order, and every event kept, so the
/// test can look at console output after the fact.
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    events: Vec<Value>,
    /// Requests held by `Fetch.enable`, answered by `fixture` at the next pump.
    paused: Vec<Value>,
    /// The answer for a held request: its URL and, held at the response stage, the server's
    /// body; `None` lets it through unchanged.
    fixture: Option<Fixture>,
}

type Fixture = fn(&str, Option<&[u8]>) -> Option<Vec<u8>>;

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("DevTools WebSocket {url}: {e}"));
        Cdp {
            ws,
            next_id: 0,
            events: Vec::new(),
            paused: Vec::new(),
            fixture: None,
        }
    }

    /// A new tab, attached as a flattened session, with its console, log and page events on
    /// and a fixed window size; returns the session id.
    async fn open_page(&mut self) -> String {
        let target = self
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        let session = attached["sessionId"].as_str().unwrap().to_owned();
        let s = Some(session.as_str());
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            self.call(s, domain, json!({})).await;
        }
        self.call(
            s,
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1200, "height": 740, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        session
    }

    /// Loads `url` in the session's tab and waits for its load event.
    async fn navigate(&mut self, session: &str, url: &str) {
        let nav = self
            .call(Some(session), "Page.navigate", json!({ "url": url }))
            .await;
        assert!(nav.get("errorText").is_none(), "navigation failed: {nav}");
        self.wait_event(session, "Page.loadEventFired", Duration::from_secs(30))
            .await;
    }

    /// Sends a command without waiting for its answer (which the read loops then skip).
    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) {
        self.next_id += 1;
        let mut msg = json!({ "id": self.next_id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
    }

    /// Answers the requests `Fetch.enable` holds: with the fixture's body, or unchanged.
    async fn answer_paused(&mut self) {
        let Some(fixture) = self.fixture else {
            return;
        };
        while let Some(e) = self.paused.pop() {
            let session = e["sessionId"].as_str().map(str::to_owned);
            let s = session.as_deref();
            let p = &e["params"];
            let id = p["requestId"].clone();
            let url = p["request"]["url"].as_str().unwrap_or_default().to_owned();
            let served = if p.get("responseStatusCode").is_some() {
                let r = self
                    .call(s, "Fetch.getResponseBody", json!({ "requestId": id }))
                    .await;
                let body = r["body"].as_str().unwrap_or_default();
                Some(if r["base64Encoded"] == true {
                    base64::engine::general_purpose::STANDARD
                        .decode(body)
                        .unwrap()
                } else {
                    body.as_bytes().to_vec()
                })
            } else {
                None
            };
            match fixture(&url, served.as_deref()) {
                Some(body) => {
                    let params = json!({
                        "requestId": id,
                        "responseCode": 200,
                        "responseHeaders": [{ "name": "Content-Type", "value": "application/json" }],
                        "body": base64::engine::general_purpose::STANDARD.encode(body),
                    });
                    self.send(s, "Fetch.fulfillRequest", params).await
                }
                None => {
                    self.send(s, "Fetch.continueRequest", json!({ "requestId": id }))
                        .await
                }
            }
        }
    }

    /// Sends one command (to the browser, or to a page's `session`) and returns its result.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let v = self
                .next_message(Duration::from_secs(30))
                .await
                .unwrap_or_else(|| panic!("no answer to {method} within 30 s"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// The next message, with events stored on the way; `None` when `limit` passed first.
    async fn next_message(&mut self, limit: Duration) -> Option<Value> {
        let msg = timeout(limit, self.ws.next()).await.ok()?;
        let msg = msg.expect("the DevTools WebSocket closed").unwrap();
        let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        if v["method"] == "Fetch.requestPaused" {
            self.paused.push(v.clone());
        } else if v.get("method").is_some() {
            self.events.push(v.clone());
        }
        Some(v)
    }

    /// Reads events for `d`, answering held requests on the way.
    async fn pump(&mut self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            self.answer_paused().await;
            let Some(left) = end.checked_duration_since(Instant::now()) else {
                break;
            };
            if self.next_message(left).await.is_none() {
                break;
            }
        }
    }

    /// Waits for an event of `session` (it may have come already).
    async fn wait_event(&mut self, session: &str, method: &str, limit: Duration) {
        let end = Instant::now() + limit;
        loop {
            // Also stored by the reads inside answer_paused, so look at every event each time.
            let seen =
                |e: &Value| e["method"] == method && e["sessionId"].as_str() == Some(session);
            if self.events.iter().any(seen) {
                return;
            }
            self.answer_paused().await;
            let left = end
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {method} within {limit:?}"));
            self.next_message(left).await;
        }
    }

    /// Evaluates `expr` in the page and returns its value (an exception fails the test).
    async fn eval(&mut self, session: Option<&str>, expr: &str) -> Value {
        let r = self
            .call(
                session,
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true }),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` every 200 ms until `ok` accepts its value (30 s at most).
    async fn wait_value(
        &mut self,
        session: Option<&str>,
        expr: &str,
        ok: impl Fn(&Value) -> bool,
        what: &str,
    ) -> Value {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(session, expr).await;
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "waited 30 s for {what}; last value {v}; the browser reported:\n{}",
                console_errors(&self.events, &[]).join("\n")
            );
            self.pump(Duration::from_millis(200)).await;
        }
    }
}
