//! Recurring schedules and SUBMIT_JOB_SCHED against the real binary, real memcached and a real
//! worker (the crate's client, for precise receive times): firing accuracy, the HTTP API, the
//! admin commands, a kill -9 across a due time, two servers sharing one namespace, and
//! SUBMIT_JOB_SCHED from raw packets.
//!
//! Every schedule here leaves the default unique (`sched:<id>:<due>`), so the worker learns
//! the due time of each job it receives and the tests can count due times.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{http_get, BinServer, Conn, Memcached};
use gearhouse::client::Connection;
use gearhouse::codec::PacketType;
use gearhouse::protocol::GrabKind;
use tokio::sync::mpsc;

/// The accuracy test runs alone: the other tests start servers and memcached processes, whose
/// start-up would otherwise land in its measurement. It takes this for writing, they for reading.
static TIMING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A job as the worker received it.
#[derive(Debug, Clone)]
struct Received {
    at: f64,
    unique: String,
    data: String,
    /// The server (its Gearman port) that handed it out.
    from: u16,
}

impl Received {
    /// The due time carried by the default unique `sched:<id>:<due>`.
    fn due(&self) -> u64 {
        self.unique
            .rsplit(':')
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("unique {:?} carries no due time", self.unique))
    }
}

/// A worker for `function` on `addr` (GRAB_JOB_UNIQ, sleeping between jobs) reporting each job
/// with its receive time; it ends when the server goes away.
fn worker(addr: SocketAddr, function: &'static str, tx: mpsc::UnboundedSender<Received>) {
    tokio::spawn(async move {
        let mut c = Connection::connect(addr).await.expect("worker connects");
        c.can_do(function.as_bytes()).await.unwrap();
        loop {
            match c.grab(GrabKind::Uniq).await {
                Ok(Some(a)) => {
                    let r = Received {
                        at: now_f64(),
                        unique: String::from_utf8_lossy(&a.unique).into_owned(),
                        data: String::from_utf8_lossy(&a.data).into_owned(),
                        from: addr.port(),
                    };
                    if tx.send(r).is_err() || c.complete(&a.handle, b"").await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    if c.pre_sleep().await.is_err() || c.wait_noop().await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
}

/// Jobs received until `until` (Unix seconds).
async fn collect_until(rx: &mut mpsc::UnboundedReceiver<Received>, until: f64) -> Vec<Received> {
    let mut got = Vec::new();
    loop {
        let left = until - now_f64();
        if left <= 0.0 {
            return got;
        }
        match tokio::time::timeout(Duration::from_secs_f64(left), rx.recv()).await {
            Ok(Some(r)) => got.push(r),
            Ok(None) | Err(_) => return got,
        }
    }
}

/// One HTTP/1.1 request: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    common::http_request(addr, method, path, body)
        .await
        .unwrap()
}

fn schedule_json(id: &str, cron: &str, function: &str) -> String {
    serde_json::json!({"id": id, "cron": cron, "function": function, "payload": format!("from {id}"), "priority": "high"}).to_string()
}

/// The value of an unlabelled metric (or the sum over the series whose labels contain
/// `labels`).
async fn metric(http: SocketAddr, name: &str, labels: &str) -> f64 {
    let (_, text) = http_get(http, "/metrics").await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split([' ', '{']).next() == Some(name) && (labels.is_empty() || l.contains(labels))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn persistent(mc: &Memcached, node: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("GEARHOUSE_PERSISTENCE__MEMCACHED", mc.addr()),
        ("GEARHOUSE_ENGINE__NODE_ID", node.to_string()),
        ("GEARHOUSE_SCHEDULER__SYNC_INTERVAL_MS", "300".to_string()),
    ]
}

fn start(env: &[(&'static str, String)]) -> BinServer {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    BinServer::start(&[], &env)
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64) * 0.99).ceil() as usize;
    v[i.saturating_sub(1).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_every_second_schedule_fires_within_50ms_of_each_due_time() {
    let _alone = TIMING.write().await;
    let mc = Memcached::start(64, &[]);
    let server = start(&persistent(&mc, "acc"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    worker(server.addr(), "tick", tx);
    let (code, body) = http(
        server.http_addr(),
        "POST",
        "/api/v1/schedules",
        &schedule_json("tick", "* * * * * *", "tick"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let got = collect_until(&mut rx, now_f64() + 31.5).await;
    assert!(got.len() >= 29, "30 due times, {} jobs: {got:?}", got.len());
    let mut dues: Vec<u64> = got.iter().map(Received::due).collect();
    dues.dedup();
    assert_eq!(dues.len(), got.len(), "a due time fired twice: {got:?}");
    assert!(
        dues.windows(2).all(|w| w[1] == w[0] + 1),
        "a due time was skipped: {dues:?}"
    );
    assert!(got.iter().all(|r| r.data == "from tick"));
    let lateness: Vec<f64> = got.iter().map(|r| r.at - r.due() as f64).collect();
    assert!(
        lateness.iter().all(|l| *l >= 0.0),
        "a job ran early: {lateness:?}"
    );
    let p = p99(lateness.clone());
    let max = lateness.iter().cloned().fold(0.0, f64::max);
    let mean = lateness.iter().sum::<f64>() / lateness.len() as f64;
    println!(
        "schedule lateness at the worker over {} runs: mean {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lateness.len(),
        mean * 1e3,
        p * 1e3,
        max * 1e3
    );
    assert!(p < 0.050, "p99 lateness {:.1} ms: {lateness:?}", p * 1e3);
    // The server's own histogram saw the same runs.
    let count = metric(
        server.http_addr(),
        "gearhouse_schedule_lateness_seconds_count",
        "",
    )
    .await;
    assert!(count >= got.len() as f64, "{count}");
    let fired = metric(
        server.http_addr(),
        "gearhouse_schedule_fired_total",
        "schedule=\"tick\"",
    )
    .await;
    assert!(fired >= got.len() as f64, "{fired}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_added_listed_and_removed_over_http_and_admin() {
    let _shared = TIMING.read().await;
    let mc = Memcached::start(64, &[]);
    let server = start(&persistent(&mc, "api"));
    let h = server.http_addr();
    let (code, body) = http(
        h,
        "POST",
        "/api/v1/schedules",
        &schedule_json("nightly", "0 30 2 * * *", "report"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = http(
        h,
        "POST",
        "/api/v1/schedules",
        &schedule_json("nightly", "* * * * *", "report"),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = http(
        h,
        "POST",
        "/api/v1/schedules",
        &schedule_json("bad", "61 * * * *", "report"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid cron expression"), "{body}");
    let (code, body) = http(
        h,
        "POST",
        "/api/v1/schedules",
        r#"{"id": "nofn", "cron": "* * * * *"}"#,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("function"), "{body}");
    let (code, body) = http(
        h,
        "POST",
        "/api/v1/schedules",
        &schedule_json("hourly", "0 * * * *", "report"),
    )
    .await;
    assert_eq!(code, 201, "{body}");

    let (code, body) = http(h, "GET", "/api/v1/schedules", "").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{body}");
    let nightly = list.iter().find(|s| s["id"] == "nightly").unwrap();
    let next = nightly["next_due_unix"].as_u64().unwrap();
    assert_eq!(next % 86400, 2 * 3600 + 30 * 60, "{nightly}");
    assert!(next > now_f64() as u64 && next <= now_f64() as u64 + 86400);
    assert!(nightly["next_due"]
        .as_str()
        .unwrap()
        .ends_with("T02:30:00Z"));
    assert_eq!(nightly["priority"], "high");
    assert_eq!(nightly["last_run"], serde_json::Value::Null);
    let hourly = list.iter().find(|s| s["id"] == "hourly").unwrap();
    assert_eq!(hourly["next_due_unix"].as_u64().unwrap() % 3600, 0);

    let mut c = Conn::connect(server.addr()).await;
    let shown = c.admin("show schedules").await;
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 3, "{shown}");
    assert!(
        lines[1].starts_with("nightly\t0 30 2 * * *\treport\thigh\t"),
        "{shown}"
    );
    assert!(lines[1].ends_with("T02:30:00Z\t-"), "{shown}");
    assert_eq!(lines[2], ".");

    assert_eq!(c.admin("cancel schedule hourly").await, "OK\r\n");
    assert!(c
        .admin("cancel schedule hourly")
        .await
        .starts_with("ERR UNKNOWN_SCHEDULE"));
    let (code, _) = http(h, "DELETE", "/api/v1/schedules/nightly", "").await;
    assert_eq!(code, 204);
    let (code, _) = http(h, "DELETE", "/api/v1/schedules/nightly", "").await;
    assert_eq!(code, 404);
    let (_, body) = http(h, "GET", "/api/v1/schedules", "").await;
    assert_eq!(body, "[]");
    assert_eq!(c.admin("show schedules").await, ".\n");
    assert_eq!(metric(h, "gearhouse_schedules", "").await, 0.0);

    // Removed from memcached too: a restarted server finds none.
    drop(server);
    let again = start(&persistent(&mc, "api"));
    let (_, body) = http(again.http_addr(), "GET", "/api/v1/schedules", "").await;
    assert_eq!(body, "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_refused_outside_the_admin_networks() {
    let _shared = TIMING.read().await;
    let server = BinServer::start(&[], &[("GEARHOUSE_SERVER__ADMIN_NETWORKS", "10.9.0.0/16")]);
    let h = server.http_addr();
    let (code, body) = http(
        h,
        "POST",
        "/api/v1/schedules",
        &schedule_json("x", "* * * * *", "f"),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("server.admin_networks"), "{body}");
    let (code, _) = http(h, "DELETE", "/api/v1/schedules/x", "").await;
    assert_eq!(code, 403);
    let (code, _) = http(h, "GET", "/api/v1/schedules", "").await;
    assert_eq!(code, 200);
    let mut c = Conn::connect(server.addr()).await;
    assert_eq!(
        c.admin("cancel schedule x").await,
        "ERR PERMISSION_DENIED cancel+schedule+is+accepted+only+from+server.admin_networks\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_missed_during_a_kill_9_fires_once_and_no_due_time_doubles() {
    let _shared = TIMING.read().await;
    let mc = Memcached::start(64, &[]);
    let env = persistent(&mc, "crash");
    let mut server = start(&env);
    let (port, http_port) = (server.port, server.http_port);
    let (tx, mut rx) = mpsc::unbounded_channel();
    worker(server.addr(), "every2", tx.clone());
    let (code, body) = http(
        server.http_addr(),
        "POST",
        "/api/v1/schedules",
        &schedule_json("every2", "*/2 * * * * *", "every2"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let mut got = collect_until(&mut rx, now_f64() + 6.0).await;
    assert!(got.len() >= 2, "{got:?}");
    // Kill in the middle of an interval, so no firing is half done, and stay down across at
    // least two due times.
    let last = got.last().unwrap().due() as f64;
    tokio::time::sleep(Duration::from_secs_f64((last + 1.0 - now_f64()).max(0.0))).await;
    let killed_at = now_f64();
    server.kill9();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let restarted = BinServer::start_on(port, http_port, &[], &env);
    let ready_at = now_f64();
    worker(restarted.addr(), "every2", tx);
    got.extend(collect_until(&mut rx, now_f64() + 6.0).await);

    let mut dues: Vec<u64> = got.iter().map(Received::due).collect();
    dues.sort();
    let before = dues.len();
    dues.dedup();
    assert_eq!(dues.len(), before, "a due time fired twice: {got:?}");
    // Down for 4.5 s: at least two due times passed. Only the latest one due when the
    // scheduler started fires (once), then every due time from there on.
    let after: Vec<u64> = dues
        .iter()
        .copied()
        .filter(|d| *d as f64 > killed_at)
        .collect();
    let why = format!("down from {killed_at:.1}, ready again at {ready_at:.1}; fired {dues:?}");
    assert!(after.len() >= 3, "{why}");
    assert!(
        after[0] as f64 >= ready_at - 2.5 && after[0] as f64 <= ready_at + 0.1,
        "the first run after the restart is the latest due time, not an early missed one: {why}"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 2),
        "a due time was lost after the restart: {why}"
    );
    assert_eq!(
        metric(
            restarted.http_addr(),
            "gearhouse_schedule_missed_fired_total",
            ""
        )
        .await,
        1.0,
        "{why}"
    );
    // Still listed after the crash, with its last run.
    let (_, body) = http(restarted.http_addr(), "GET", "/api/v1/schedules", "").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["id"], "every2");
    assert!(v[0]["last_run_unix"].as_u64().unwrap() >= after[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_sharing_a_namespace_fire_each_due_time_once() {
    let _shared = TIMING.read().await;
    let mc = Memcached::start(64, &[]);
    let a = start(&persistent(&mc, "node-a"));
    let b = start(&persistent(&mc, "node-b"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    worker(a.addr(), "shared", tx.clone());
    worker(b.addr(), "shared", tx);
    let (code, body) = http(
        a.http_addr(),
        "POST",
        "/api/v1/schedules",
        &schedule_json("shared", "* * * * * *", "shared"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    // b learns it from the shared index within its sync interval.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, listed) = http(b.http_addr(), "GET", "/api/v1/schedules", "").await;
    assert!(listed.contains("\"id\":\"shared\""), "{listed}");
    let start_at = now_f64();
    let got = collect_until(&mut rx, start_at + 10.0).await;
    let mut by_due: BTreeMap<u64, Vec<u16>> = BTreeMap::new();
    for r in &got {
        by_due.entry(r.due()).or_default().push(r.from);
    }
    let doubled: Vec<_> = by_due.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(doubled.is_empty(), "due times fired twice: {doubled:?}");
    let dues: Vec<u64> = by_due
        .keys()
        .copied()
        .filter(|d| *d as f64 > start_at)
        .collect();
    assert!(dues.len() >= 8, "{dues:?}");
    assert!(
        dues.windows(2).all(|w| w[1] == w[0] + 1),
        "a due time was lost: {dues:?}"
    );
    let fired_a = metric(
        a.http_addr(),
        "gearhouse_schedule_fired_total",
        "schedule=\"shared\"",
    )
    .await;
    let fired_b = metric(
        b.http_addr(),
        "gearhouse_schedule_fired_total",
        "schedule=\"shared\"",
    )
    .await;
    let lost = metric(a.http_addr(), "gearhouse_schedule_claims_lost_total", "").await
        + metric(b.http_addr(), "gearhouse_schedule_claims_lost_total", "").await;
    println!("two servers: a fired {fired_a}, b fired {fired_b}, claims lost {lost}");
    assert!(
        lost >= dues.len() as f64 - 1.0,
        "both servers tried each due time: {lost}"
    );
    // A removal on one server reaches the other.
    let (code, _) = http(b.http_addr(), "DELETE", "/api/v1/schedules/shared", "").await;
    assert_eq!(code, 204);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, listed) = http(a.http_addr(), "GET", "/api/v1/schedules", "").await;
    assert_eq!(listed, "[]");
    let mut tail = collect_until(&mut rx, now_f64() + 2.0).await;
    tail.retain(|r| r.at > now_f64() - 1.0);
    assert!(tail.is_empty(), "fired after removal: {tail:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_job_sched_runs_at_the_next_matching_minute() {
    let _shared = TIMING.read().await;
    let mc = Memcached::start(64, &[]);
    let server = start(&persistent(&mc, "sched"));
    let mut c = Conn::connect(server.addr()).await;
    c.send(
        PacketType::SUBMIT_JOB_SCHED,
        &[b"at_minute", b"u1", b"99", b"", b"", b"", b"", b"d"],
    )
    .await;
    let e = c.expect(PacketType::ERROR).await;
    assert_eq!(e.arg(0), "INVALID_ARGUMENT");
    assert!(e.arg(1).contains("invalid cron expression"), "{}", e.arg(1));
    // Every field empty: the next whole minute.
    let sent = now_f64();
    c.send(
        PacketType::SUBMIT_JOB_SCHED,
        &[b"at_minute", b"u2", b"", b"", b"", b"", b"", b"payload"],
    )
    .await;
    c.expect(PacketType::JOB_CREATED).await;
    let minute = ((sent as u64) / 60 + 1) * 60;
    let (_, status) = http_get(server.http_addr(), "/api/v1/status")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let f = v["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "at_minute")
        .cloned()
        .unwrap();
    assert_eq!(f["scheduled"], 1, "{f}");
    let (tx, mut rx) = mpsc::unbounded_channel();
    worker(server.addr(), "at_minute", tx);
    let got = collect_until(&mut rx, minute as f64 + 3.0).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].data, "payload");
    let late = got[0].at - minute as f64;
    assert!((0.0..1.0).contains(&late), "ran {late:.3} s after {minute}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_schedules_run_from_memory_without_persistence() {
    let _shared = TIMING.read().await;
    use gearhouse::config::Config;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[schedules]]\nid = \"x\"\ncron = \"every minute\"\nfunction = \"f\"\n",
    )
    .unwrap();
    let e = Config::load_with_env(Some(&bad), &[], Vec::new()).unwrap_err();
    assert!(e.to_string().contains("[[schedules]] #1"), "{e}");
    let path = dir.path().join("gearhouse.toml");
    std::fs::write(
        &path,
        "[[schedules]]\nid = \"cfg\"\ncron = \"* * * * * *\"\nfunction = \"from_config\"\npayload = \"cfg\"\n",
    )
    .unwrap();
    let env = vec![("GEARHOUSE_ENGINE__NODE_ID".to_string(), "cfg".to_string())];
    let cfg = Config::load_with_env(Some(&path), &[], env).unwrap();
    assert_eq!(cfg.schedules.len(), 1);
    let gearman = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, h) = (gearman.local_addr().unwrap(), http_l.local_addr().unwrap());
    let stop = gearhouse::server::Shutdown::default();
    let task = tokio::spawn(gearhouse::app::run_with(cfg, gearman, http_l, stop.clone()));
    common::wait_ready(h).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    worker(addr, "from_config", tx);
    let got = collect_until(&mut rx, now_f64() + 3.2).await;
    assert!(got.len() >= 2, "{got:?}");
    assert!(got
        .iter()
        .all(|r| r.data == "cfg" && r.unique.starts_with("sched:cfg:")));
    let (_, body) = http(h, "GET", "/api/v1/schedules", "").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["source"], "config", "{body}");
    assert!(v[0]["last_handle"].as_str().unwrap().starts_with("H:cfg:"));
    stop.now();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gearman_cli_works_scheduled_jobs() {
    let _shared = TIMING.read().await;
    let mc = Memcached::start(64, &[]);
    let server = start(&persistent(&mc, "cli"));
    let port = server.port.to_string();
    let worker = common::process::Proc::spawn(
        "gearman worker",
        "gearman",
        &["-p", &port, "-w", "-f", "cli_tick", "-c", "3"].map(String::from),
    );
    let body = serde_json::json!({"id": "cli", "cron": "* * * * * *", "function": "cli_tick", "payload": "tick from cron"});
    let (code, text) = http(
        server.http_addr(),
        "POST",
        "/api/v1/schedules",
        &body.to_string(),
    )
    .await;
    assert_eq!(code, 201, "{text}");
    let done = tokio::task::spawn_blocking(move || worker.finish_within(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(done.status.success(), "{}", done.diag());
    assert_eq!(
        done.stdout().matches("tick from cron").count(),
        3,
        "{}",
        done.diag()
    );
}
