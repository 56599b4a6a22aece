//! The durable queue against real memcached processes and the real binary: crash recovery,
//! node loss, memcached failures, restarts that lose memcached's data, takeover.
//!
//! Jobs carry their id in the payload, so every check counts what workers really received.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_get, BinServer, Conn, Memcached};
use gearhouse::codec::PacketType::{self, *};

/// Starts the real server on `nodes` with node id `node_id` and extra env settings.
fn start_server(node_id: &str, nodes: &[&Memcached], env: &[(&str, &str)]) -> BinServer {
    let list = memcached_list(nodes);
    let mut e: Vec<(&str, &str)> = vec![("GEARHOUSE_PERSISTENCE__REPAIR_INTERVAL_MS", "200")];
    e.extend_from_slice(env);
    start_retrying(&["--node-id", node_id, "--memcached", &list], &e)
}

/// `BinServer::start`, tried again when the server exits at once: the harness picks free ports
/// by binding and releasing them, so a parallel test can take one before the server binds it.
fn start_retrying(args: &[&str], env: &[(&str, &str)]) -> BinServer {
    for _ in 0..2 {
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| BinServer::start(args, env)));
        if let Ok(s) = r {
            return s;
        }
        eprintln!("server did not start (port taken?); trying again on other ports");
    }
    BinServer::start(args, env)
}

fn memcached_list(nodes: &[&Memcached]) -> String {
    nodes.iter().map(|m| m.addr()).collect::<Vec<_>>().join(",")
}

/// Runs a blocking start in a thread so the runtime's other tasks keep running.
async fn start_server_async(
    node_id: &'static str,
    list: String,
    env: Vec<(&'static str, String)>,
) -> BinServer {
    tokio::task::spawn_blocking(move || {
        let mut e: Vec<(&str, &str)> = vec![("GEARHOUSE_PERSISTENCE__REPAIR_INTERVAL_MS", "200")];
        e.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
        start_retrying(&["--node-id", node_id, "--memcached", &list], &e)
    })
    .await
    .unwrap()
}

/// Sends a submit and waits for its answer: Ok(handle) or Err(error text). `None` when the
/// connection closed or nothing came back in time.
async fn submit(
    c: &mut Conn,
    kind: PacketType,
    args: &[&[u8]],
    wait: Duration,
) -> Option<Result<String, String>> {
    c.send(kind, args).await;
    loop {
        let r = c.recv_timeout(wait).await?;
        match r.kind {
            JOB_CREATED => return Some(Ok(r.arg(0))),
            ERROR => return Some(Err(format!("{} {}", r.arg(0), r.arg(1)))),
            _ => continue,
        }
    }
}

/// Number of jobs (queued + running) of `func` from the admin `status` command.
async fn queued(addr: SocketAddr, func: &str) -> u64 {
    let mut c = Conn::connect(addr).await;
    let s = c.admin("status").await;
    s.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[0] == func).then(|| f[1].parse().unwrap())
        })
        .unwrap_or(0)
}

/// A job as a worker received it.
#[derive(Debug, Clone)]
struct Assigned {
    handle: String,
    unique: String,
    data: String,
}

/// Runs a worker for `func` until the function has `leave` jobs left (epoch jobs not due yet),
/// completing each job; returns what it received, in order.
async fn drain(addr: SocketAddr, func: &str, leave: u64) -> Vec<Assigned> {
    let mut w = Conn::connect(addr).await;
    w.send(CAN_DO, &[func.as_bytes()]).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "drain of {func} did not finish");
        w.send(GRAB_JOB_UNIQ, &[]).await;
        let r = w.recv().await;
        match r.kind {
            JOB_ASSIGN_UNIQ => {
                let a = Assigned {
                    handle: r.arg(0),
                    unique: r.arg(2),
                    data: r.arg(3),
                };
                w.send(WORK_COMPLETE, &[a.handle.as_bytes(), b"ok"]).await;
                got.push(a);
            }
            NO_JOB => {
                if queued(addr, func).await <= leave {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            NOOP => {}
            other => panic!("worker got {other:?}"),
        }
    }
}

/// A metric's value from /metrics (sum over label sets that contain `labels`).
async fn metric(http: SocketAddr, name: &str, labels: &str) -> f64 {
    let (_, body) = http_get(http, "/metrics").await.unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next().is_some_and(|n| n == name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `cond` holds (bounded).
async fn eventually<F, Fut>(what: &str, t: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + t;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Result of a load run: ids acknowledged with JOB_CREATED, ids refused with ERROR.
#[derive(Default)]
struct Load {
    acked: Mutex<HashSet<u64>>,
    refused: Mutex<Vec<(u64, String)>>,
    answered: AtomicUsize,
}

/// `clients` connections submit `func` jobs with ids `start..start+n` (one in flight each, so
/// every answer belongs to a known id) until done or `stop` is set / the server goes away.
async fn load(
    addr: SocketAddr,
    func: &'static str,
    start: u64,
    n: u64,
    clients: u64,
    stop: Arc<AtomicBool>,
    out: Arc<Load>,
) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (stop, out) = (stop.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await;
            let mut id = start + c;
            while id < start + n && !stop.load(Ordering::SeqCst) {
                let data = format!("job-{id}");
                let r = submit(
                    &mut conn,
                    SUBMIT_JOB_BG,
                    &[func.as_bytes(), b"", data.as_bytes()],
                    Duration::from_secs(10),
                )
                .await;
                match r {
                    Some(Ok(_)) => {
                        out.acked.lock().unwrap().insert(id);
                    }
                    Some(Err(e)) => out.refused.lock().unwrap().push((id, e)),
                    None => return,
                }
                out.answered.fetch_add(1, Ordering::SeqCst);
                id += clients;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn ids_of(jobs: &[Assigned]) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for j in jobs {
        let id: u64 = j.data.trim_start_matches("job-").parse().unwrap();
        *m.entry(id).or_insert(0) += 1;
    }
    m
}

/// Every acknowledged id ran; returns how many ran more than once.
fn check_none_lost(what: &str, acked: &HashSet<u64>, ran: &HashMap<u64, usize>) -> usize {
    let lost: Vec<_> = acked.iter().filter(|id| !ran.contains_key(id)).collect();
    assert!(
        lost.is_empty(),
        "{what}: {} acknowledged jobs were lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let dups = ran.values().filter(|&&n| n > 1).count();
    println!(
        "{what}: {} acknowledged, {} executed, none lost, {dups} executed more than once",
        acked.len(),
        ran.len()
    );
    dups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_submitting_loses_no_acknowledged_job() {
    let m1 = Memcached::start(64, &["-M"]);
    let m2 = Memcached::start(64, &["-M"]);
    let list = memcached_list(&[&m1, &m2]);
    let mut server = start_server_async("crash", list.clone(), vec![]).await;
    let n = 20_000;
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Load::default());
    let runner = tokio::spawn(load(
        server.addr(),
        "crash-fn",
        0,
        n,
        8,
        stop.clone(),
        out.clone(),
    ));
    // Kill while submits are flowing.
    let o = out.clone();
    eventually("half of the submits", Duration::from_secs(60), || {
        let o = o.clone();
        async move { o.answered.load(Ordering::SeqCst) >= n as usize / 2 }
    })
    .await;
    server.kill9();
    runner.await.unwrap();
    let acked = out.acked.lock().unwrap().clone();
    assert!(acked.len() >= n as usize / 2);
    assert!(
        acked.len() < n as usize,
        "the kill came after every submit: nothing was in flight"
    );
    assert!(out.refused.lock().unwrap().is_empty());

    let server = start_server_async("crash", list, vec![]).await;
    assert!(
        server.log_text().contains("recovery complete"),
        "{}",
        server.log_text()
    );
    let ran = ids_of(&drain(server.addr(), "crash-fn", 0).await);
    check_none_lost("crash", &acked, &ran);
    let recovered = metric(server.http_addr(), "gearhouse_jobs_recovered_total", "").await;
    assert!(recovered >= acked.len() as f64, "recovered {recovered}");
    // Finished jobs leave memcached (deletes are sent within a few milliseconds): nothing comes
    // back after another crash.
    let http = server.http_addr();
    eventually(
        "the deletes to reach memcached",
        Duration::from_secs(10),
        || async {
            let (_, s) = http_get(http, "/api/v1/status").await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            // Left: the watermark keys (one per writer connection) and the server's own small
            // state (its lease, the node registry, the dead-letter watermarks): no job record.
            v["persistence"]["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["items"].as_u64().unwrap() <= 6)
        },
    )
    .await;
    let mut server = server;
    server.kill9();
    let server = start_server_async("crash", memcached_list(&[&m1, &m2]), vec![]).await;
    assert_eq!(queued(server.addr(), "crash-fn").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_uniques_priorities_epochs_and_reducers_survive_a_crash() {
    let m1 = Memcached::start(64, &["-M"]);
    let m2 = Memcached::start(64, &["-M"]);
    let mut server = start_server("keep", &[&m1, &m2], &[]);
    let mut c = Conn::connect(server.addr()).await;
    let f = "resize-image";
    let w = Duration::from_secs(5);
    let mut handles = HashMap::new();
    for (kind, unique, data) in [
        (SUBMIT_JOB_LOW_BG, "", "low-1"),
        (SUBMIT_JOB_LOW_BG, "", "low-2"),
        (SUBMIT_JOB_BG, "u-normal-1", "normal-1"),
        (SUBMIT_JOB_BG, "", "normal-2"),
        (SUBMIT_JOB_HIGH_BG, "", "high-1"),
        (SUBMIT_JOB_HIGH_BG, "u-high-2", "high-2"),
    ] {
        let h = submit(
            &mut c,
            kind,
            &[f.as_bytes(), unique.as_bytes(), data.as_bytes()],
            w,
        )
        .await
        .unwrap()
        .unwrap();
        handles.insert(data, h);
    }
    let future = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600)
        .to_string();
    let epoch_h = submit(
        &mut c,
        SUBMIT_JOB_EPOCH,
        &[b"later", b"e-1", future.as_bytes(), b"epoch-data"],
        w,
    )
    .await
    .unwrap()
    .unwrap();
    let reduce_h = submit(
        &mut c,
        SUBMIT_REDUCE_JOB_BACKGROUND,
        &[b"map-fn", b"r-1", b"reduce-fn", b"reduce-data"],
        w,
    )
    .await
    .unwrap()
    .unwrap();
    server.kill9();

    let server = start_server("keep", &[&m1, &m2], &[]);
    let mut c = Conn::connect(server.addr()).await;
    // Old handles are still known.
    for h in handles.values().chain([&epoch_h, &reduce_h]) {
        c.send(GET_STATUS, &[h.as_bytes()]).await;
        let r = c.expect(STATUS_RES).await;
        assert_eq!((r.arg(0), r.arg(1)), (h.clone(), "1".to_string()), "{h}");
    }
    // A submit with a recovered unique coalesces onto the recovered job.
    let again = submit(
        &mut c,
        SUBMIT_JOB_BG,
        &[f.as_bytes(), b"u-normal-1", b"x"],
        w,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(again, handles["normal-1"]);
    let again = submit(
        &mut c,
        SUBMIT_JOB_EPOCH,
        &[b"later", b"e-1", future.as_bytes(), b"x"],
        w,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(again, epoch_h);
    // New handles continue after the recovered ones.
    let new_h = submit(&mut c, SUBMIT_JOB_BG, &[b"other", b"", b"n"], w)
        .await
        .unwrap()
        .unwrap();
    let seq = |h: &str| h.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    assert!(seq(&new_h) > seq(&reduce_h), "{new_h} after {reduce_h}");

    // Priority order, FIFO within a priority, empty uniques kept apart.
    let order: Vec<String> = drain(server.addr(), f, 0)
        .await
        .into_iter()
        .map(|a| {
            assert_eq!(handles[a.data.as_str()], a.handle);
            format!("{}/{}", a.data, a.unique)
        })
        .collect();
    assert_eq!(
        order,
        [
            "high-1/",
            "high-2/u-high-2",
            "normal-1/u-normal-1",
            "normal-2/",
            "low-1/",
            "low-2/"
        ]
    );
    // The epoch job waits for its time; the reduce job keeps its reducer.
    c.send(GET_STATUS, &[epoch_h.as_bytes()]).await;
    assert_eq!(
        c.expect(STATUS_RES).await.arg(1),
        "1",
        "the epoch job is still waiting"
    );
    let mut w = Conn::connect(server.addr()).await;
    w.send(CAN_DO, &[b"map-fn"]).await;
    w.send(GRAB_JOB_ALL, &[]).await;
    let a = w.expect(JOB_ASSIGN_ALL).await;
    assert_eq!(
        (a.arg(0), a.arg(2), a.arg(3), a.arg(4)),
        (
            reduce_h,
            "r-1".to_string(),
            "reduce-fn".to_string(),
            "reduce-data".to_string()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_memcached_nodes_loses_nothing_and_refusals_are_counted() {
    let m1 = Memcached::start(64, &["-M"]);
    let mut m2 = Memcached::start(64, &["-M"]);
    let mut m3 = Memcached::start(64, &["-M"]);
    let list = memcached_list(&[&m1, &m2, &m3]);
    let env = vec![("GEARHOUSE_PERSISTENCE__REPLICAS", "2".to_string())];
    let mut server = start_server_async("loss", list.clone(), env.clone()).await;
    let n = 10_000;
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Load::default());
    let runner = tokio::spawn(load(
        server.addr(),
        "loss-fn",
        0,
        n,
        6,
        stop.clone(),
        out.clone(),
    ));
    let o = out.clone();
    eventually("a third of the submits", Duration::from_secs(60), || {
        let o = o.clone();
        async move { o.answered.load(Ordering::SeqCst) >= n as usize / 3 }
    })
    .await;
    // One node of three dies under load: writes move to the others.
    m2.kill();
    runner.await.unwrap();
    let acked = out.acked.lock().unwrap().clone();
    let refused = out.refused.lock().unwrap().clone();
    assert_eq!(acked.len() + refused.len(), n as usize);
    // Writes in flight on the dead node move to the next node: none is refused.
    assert!(
        refused.is_empty(),
        "refused with one node down: {:?}",
        &refused[..refused.len().min(3)]
    );
    assert_eq!(
        metric(
            server.http_addr(),
            "gearhouse_memcached_node_up",
            &m2.addr()
        )
        .await,
        0.0
    );

    // Crash the server too, restart with the node still dead.
    server.kill9();
    let server = start_server_async("loss", list.clone(), env.clone()).await;
    let ran = ids_of(&drain(server.addr(), "loss-fn", 0).await);
    check_none_lost("node loss", &acked, &ran);

    // Two of three down: submits cannot be made durable and are refused.
    m3.kill();
    let out2 = Arc::new(Load::default());
    load(
        server.addr(),
        "loss2-fn",
        100_000,
        300,
        3,
        Arc::new(AtomicBool::new(false)),
        out2.clone(),
    )
    .await;
    let refused = out2.refused.lock().unwrap().clone();
    let acked2 = out2.acked.lock().unwrap().clone();
    assert_eq!(refused.len() + acked2.len(), 300);
    assert!(
        refused.len() >= 290,
        "only {} of 300 refused",
        refused.len()
    );
    for (_, e) in &refused {
        assert!(e.starts_with("QUEUE_ERROR"), "{e}");
    }
    assert!(
        refused
            .iter()
            .any(|(_, e)| e.contains("memcached") && e.contains(&m3.addr())),
        "{:?}",
        refused[0]
    );
    let counted = metric(
        server.http_addr(),
        "gearhouse_jobs_refused_total",
        "reason=\"not_durable\"",
    )
    .await;
    assert_eq!(counted as usize, refused.len(), "server count vs clients");
    assert_eq!(queued(server.addr(), "loss2-fn").await, acked2.len() as u64);
    // Not ready while writes cannot be made durable.
    let (code, body) = http_get(server.http_addr(), "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("replicas"), "{body}");
    drop(m1);
}

/// The real server for tests where it is not (yet) ready: killed on drop.
struct Proc {
    child: Child,
    port: u16,
    http: u16,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(node_id: &str, list: &str, env: &[(&str, &str)]) -> Proc {
        let port = common::free_port();
        let http = common::free_port();
        let log = std::env::temp_dir().join(format!(
            "gearhouse-persist-{}-{port}.log",
            std::process::id()
        ));
        let mut cmd = Command::new(common::binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args(["--node-id", node_id, "--memcached", list])
            .env("GEARHOUSE_PERSISTENCE__REPAIR_INTERVAL_MS", "200")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().unwrap(),
            port,
            http,
            log,
        }
    }

    fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    fn http_addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.http).parse().unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until recovery finished and clients are accepted (ready or not).
    async fn wait_accepting(&self) {
        eventually("recovery to finish", Duration::from_secs(30), || async {
            self.log_text().contains("recovery done")
        })
        .await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_down_at_start_up_keeps_the_server_unready_until_it_comes() {
    let mut m = Memcached::start(64, &["-M"]);
    m.kill();
    let p = Proc::spawn("down", &m.addr(), &[]);
    let (http_addr, addr, log) = (p.http_addr(), p.addr(), p.log.clone());
    eventually("an unready answer", Duration::from_secs(20), || async {
        matches!(http_get(http_addr, "/readyz").await, Ok((503, _)))
    })
    .await;
    eventually("the error in the log", Duration::from_secs(20), || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("unreachable")
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&m.addr()), "{text}");
    assert!(!text.contains("in memory only"), "{text}");
    let (_, body) = http_get(http_addr, "/readyz").await.unwrap();
    assert!(body.contains("not ready"), "{body}");
    assert_eq!(
        metric(http_addr, "gearhouse_recovery_failed", "").await,
        1.0
    );
    // Gearman clients are not served before recovery: they are refused at once (and fail over)
    // rather than left hanging.
    let mut c = Conn::connect(addr).await;
    c.send(ECHO_REQ, &[b"hi"]).await;
    let refused = c.expect(ERROR).await;
    assert_eq!(refused.arg(0), "QUEUE_ERROR");
    assert!(refused.arg(1).contains("recovering"), "{}", refused.arg(1));
    assert!(c.is_closed_within(Duration::from_secs(2)).await);
    // memcached arrives: recovery completes and durable submits work.
    m.restart_empty();
    common::wait_ready(http_addr).await;
    let mut c = Conn::connect(addr).await;
    c.send(ECHO_REQ, &[b"hi"]).await;
    assert_eq!(c.expect(ECHO_RES).await.arg(0), "hi");
    let h = submit(
        &mut c,
        SUBMIT_JOB_BG,
        &[b"f", b"", b"d"],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(h.is_ok(), "{h:?}");
    assert_eq!(
        metric(http_addr, "gearhouse_recovery_failed", "").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_out_of_memory_and_items_over_its_limit_are_refused_with_advice() {
    // One node, so replicas = 1; 2 MB of memory, no eviction.
    let m = Memcached::start(2, &["-M", "-I", "1m"]);
    let server = start_server("oom", &[&m], &[]);
    let mut c = Conn::connect(server.addr()).await;
    let w = Duration::from_secs(5);
    // Too large for -I.
    let big = vec![b'x'; 1_500_000];
    let r = submit(&mut c, SUBMIT_JOB_BG, &[b"big-fn", b"", &big], w)
        .await
        .unwrap();
    let e = r.unwrap_err();
    assert!(e.starts_with("QUEUE_ERROR") && e.contains("-I"), "{e}");
    assert_eq!(queued(server.addr(), "big-fn").await, 0);
    // Fill memory until memcached says out of memory.
    let data = vec![b'y'; 50_000];
    let mut accepted = 0;
    let err = loop {
        match submit(&mut c, SUBMIT_JOB_BG, &[b"fill-fn", b"", &data], w)
            .await
            .unwrap()
        {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 1000, "memcached never ran out of memory");
    };
    assert!(err.contains("out of memory") && err.contains("-m"), "{err}");
    assert_eq!(queued(server.addr(), "fill-fn").await, accepted);
    // The accepted ones are all there after a drain frees memory.
    assert_eq!(
        drain(server.addr(), "fill-fn", 0).await.len() as u64,
        accepted
    );
    assert!(
        metric(
            server.http_addr(),
            "gearhouse_memcached_errors_total",
            "op=\"write\""
        )
        .await
            >= 2.0
    );
}

/// The WARN lines that report a refusal by `node` whose text contains `what` (not the
/// summaries of refusals held back, which come at most once per 10 s after them).
fn warnings<'a>(log: &'a str, node: &str, what: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| {
            l.contains("WARN")
                && l.contains(&format!("memcached {node} refused the write"))
                && l.contains(what)
        })
        .collect()
}

/// Lines allowed by a limit of one per 10 s over `t`.
fn per_10s(t: Duration) -> usize {
    1 + (t.as_secs() / 10) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_refusals_are_counted_each_time_and_logged_once_with_the_fix() {
    // One node (replicas = 1), 2 MB of memory, items up to 1 MB, no eviction.
    let m = Memcached::start(2, &["-M", "-I", "1m"]);
    let server = start_server("warn", &[&m], &[]);
    let http = server.http_addr();
    // Every reason's series exists at 0 before anything failed (increase() sees the first).
    let (_, body) = http_get(http, "/metrics").await.unwrap();
    for reason in ["out_of_memory", "too_large", "timeout", "node_down"] {
        let series = format!(
            "gearhouse_memcached_write_failures_total{{node=\"{}\",reason=\"{reason}\"}} 0",
            m.addr()
        );
        assert!(body.contains(&series), "no {series} in\n{body}");
    }
    let mut c = Conn::connect(server.addr()).await;
    let w = Duration::from_secs(5);
    let big = vec![b'x'; 1_100_000];
    let too_large = 12;
    let started = Instant::now();
    for _ in 0..too_large {
        let e = submit(&mut c, SUBMIT_JOB_BG, &[b"big-fn", b"", &big], w)
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.contains("item size limit") && e.contains("-I"), "{e}");
    }
    // Fill memory, then keep submitting while memcached is out of memory.
    let big_took = started.elapsed();
    let data = vec![b'y'; 50_000];
    let mut out_of_memory = 0;
    let mut first_oom = None;
    for _ in 0..1000 {
        match submit(&mut c, SUBMIT_JOB_BG, &[b"fill-fn", b"", &data], w)
            .await
            .unwrap()
        {
            Ok(_) => assert_eq!(out_of_memory, 0, "accepted after running out of memory"),
            Err(e) => {
                assert!(e.contains("out of memory") && e.contains("-m"), "{e}");
                first_oom.get_or_insert_with(Instant::now);
                out_of_memory += 1;
                if out_of_memory == 10 {
                    break;
                }
            }
        }
    }
    assert_eq!(out_of_memory, 10, "memcached never ran out of memory");
    let oom_took = first_oom.unwrap().elapsed();
    // Every refusal is counted under its reason.
    let node = format!("node=\"{}\"", m.addr());
    let counted = |reason: &'static str| {
        let node = node.clone();
        async move {
            metric(
                http,
                "gearhouse_memcached_write_failures_total",
                &format!("{node},reason=\"{reason}\""),
            )
            .await
        }
    };
    assert_eq!(counted("too_large").await, too_large as f64);
    assert_eq!(counted("out_of_memory").await, out_of_memory as f64);
    // The log has one WARN line per reason and 10 s, naming the node and the fix.
    let log = server.log_text();
    let big_lines = warnings(&log, &m.addr(), "item size limit");
    assert!(
        !big_lines.is_empty() && big_lines.len() <= per_10s(big_took),
        "{big_took:?}: {big_lines:#?}"
    );
    assert!(big_lines[0].contains("-I"), "{}", big_lines[0]);
    let oom_lines = warnings(&log, &m.addr(), "out of memory");
    assert!(
        !oom_lines.is_empty() && oom_lines.len() <= per_10s(oom_took),
        "{oom_took:?}: {oom_lines:#?}"
    );
    assert!(oom_lines[0].contains("-m"), "{}", oom_lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memcached_that_restarted_empty_gets_its_copies_back() {
    let mut m1 = Memcached::start(64, &["-M"]);
    let mut m2 = Memcached::start(64, &["-M"]);
    let mut server = start_server("empty", &[&m1, &m2], &[]);
    let n = 500;
    let out = Arc::new(Load::default());
    load(
        server.addr(),
        "empty-fn",
        0,
        n,
        4,
        Arc::new(AtomicBool::new(false)),
        out.clone(),
    )
    .await;
    assert_eq!(out.acked.lock().unwrap().len(), n as usize);
    m1.restart_empty();
    let http = server.http_addr();
    eventually(
        "the restart to be noticed and repaired",
        Duration::from_secs(20),
        || async {
            let (_, s) = http_get(http, "/api/v1/status").await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            let p = &v["persistence"];
            p["replicas_below_target"] == 0
                && p["nodes"][0]["up"] == true
                && p["nodes"][0]["items"].as_u64().unwrap_or(0) >= n
        },
    )
    .await;
    assert_eq!(
        metric(http, "gearhouse_memcached_replicas_below_target", "").await,
        0.0
    );
    // Only the rewritten copies remain once the other node is gone.
    m2.kill();
    server.kill9();
    // One of two nodes with replicas = 2: recovery runs, but the server is not ready for
    // new durable writes.
    let server = Proc::spawn("empty", &memcached_list(&[&m1, &m2]), &[]);
    server.wait_accepting().await;
    let acked = out.acked.lock().unwrap().clone();
    let ran = ids_of(&drain(server.addr(), "empty-fn", 0).await);
    check_none_lost("restarted empty", &acked, &ran);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_in_memory_takes_jobs_memcached_cannot_hold_and_counts_them() {
    let mut m = Memcached::start(64, &["-M"]);
    let server = start_server(
        "lenient",
        &[&m],
        &[("GEARHOUSE_PERSISTENCE__ON_FAILURE", "accept_in_memory")],
    );
    m.kill();
    let mut c = Conn::connect(server.addr()).await;
    for i in 0..5 {
        let r = submit(
            &mut c,
            SUBMIT_JOB_BG,
            &[b"f", b"", format!("{i}").as_bytes()],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(
        metric(server.http_addr(), "gearhouse_jobs_not_durable_total", "").await,
        5.0
    );
    assert_eq!(drain(server.addr(), "f", 0).await.len(), 5);
    assert!(server.log_text().contains("in memory only"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_server_takes_over_a_dead_nodes_queue_once() {
    let m1 = Memcached::start(64, &["-M"]);
    let m2 = Memcached::start(64, &["-M"]);
    let mut a = start_server("node-a", &[&m1, &m2], &[]);
    let out = Arc::new(Load::default());
    load(
        a.addr(),
        "take-fn",
        0,
        1000,
        4,
        Arc::new(AtomicBool::new(false)),
        out.clone(),
    )
    .await;
    let mut c = Conn::connect(a.addr()).await;
    submit(
        &mut c,
        SUBMIT_JOB_HIGH_BG,
        &[b"take-fn", b"same-unique", b"job-5000"],
        Duration::from_secs(5),
    )
    .await
    .unwrap()
    .unwrap();
    a.kill9();

    let env = [("GEARHOUSE_PERSISTENCE__RECOVER_FROM_NODE", "node-a")];
    let mut b = start_server("node-b", &[&m1, &m2], &env);
    assert!(
        b.log_text().contains("takeover complete"),
        "{}",
        b.log_text()
    );
    let mut c = Conn::connect(b.addr()).await;
    // The unique still coalesces on the moved job, which kept node-a's handle.
    let h = submit(
        &mut c,
        SUBMIT_JOB_BG,
        &[b"take-fn", b"same-unique", b"other"],
        Duration::from_secs(5),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(h.starts_with("H:node-a:"), "{h}");
    assert_eq!(queued(b.addr(), "take-fn").await, 1001);
    // Crash B and restart it: the moved jobs come back once, nothing is moved twice.
    b.kill9();
    let b = start_server("node-b", &[&m1, &m2], &env);
    let jobs = drain(b.addr(), "take-fn", 0).await;
    let ran = ids_of(&jobs);
    let mut acked = out.acked.lock().unwrap().clone();
    acked.insert(5000);
    assert_eq!(
        check_none_lost("takeover", &acked, &ran),
        0,
        "a job ran twice"
    );
    assert_eq!(ran.len(), 1001);
    // B's own recovery gave them back the handles node-a's clients got.
    assert!(jobs.iter().all(|j| j.handle.starts_with("H:node-a:")));
    // Node A, back with its old id, finds no queue left.
    let a = start_server("node-a", &[&m1, &m2], &[]);
    assert_eq!(queued(a.addr(), "take-fn").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recover_command_moves_a_dead_nodes_queue_into_a_running_server() {
    let m1 = Memcached::start(64, &["-M"]);
    let m2 = Memcached::start(64, &["-M"]);
    let mut a = start_server("node-x", &[&m1, &m2], &[]);
    let out = Arc::new(Load::default());
    load(
        a.addr(),
        "cli-fn",
        0,
        500,
        4,
        Arc::new(AtomicBool::new(false)),
        out.clone(),
    )
    .await;
    a.kill9();
    let c = start_server("node-c", &[&m1, &m2], &[]);
    let list = memcached_list(&[&m1, &m2]);
    let server = format!("127.0.0.1:{}", c.port);
    let run = move || {
        Command::new(common::binary())
            .args([
                "recover",
                "--from-node",
                "node-x",
                "--memcached",
                &list,
                "--server",
                &server,
            ])
            .output()
            .unwrap()
    };
    let o = tokio::task::spawn_blocking(run.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("moved 500 jobs"), "{stdout}");
    // A second run finds nothing left.
    let o = tokio::task::spawn_blocking(run).await.unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        stdout.contains("moved 0 jobs"),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ran = ids_of(&drain(c.addr(), "cli-fn", 0).await);
    let acked = out.acked.lock().unwrap().clone();
    assert_eq!(check_none_lost("recover command", &acked, &ran), 0);
    assert_eq!(ran.len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memcached_that_can_evict_is_reported_loudly() {
    let safe = Memcached::start(64, &["-M"]);
    let evicting = Memcached::start(64, &[]);
    let server = start_server("evict", &[&safe, &evicting], &[]);
    let http = server.http_addr();
    eventually("the eviction metric", Duration::from_secs(10), || async {
        metric(
            http,
            "gearhouse_memcached_eviction_enabled",
            &evicting.addr(),
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(
        metric(http, "gearhouse_memcached_eviction_enabled", &safe.addr()).await,
        0.0
    );
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("without -M"))
        .unwrap_or_else(|| panic!("no eviction warning in {log}"));
    assert!(
        line.contains("ERROR") && line.contains(&evicting.addr()),
        "{line}"
    );
    let (_, s) = http_get(http, "/api/v1/status").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(
        v["persistence"]["nodes"][1]["eviction_enabled"], true,
        "{s}"
    );
}
