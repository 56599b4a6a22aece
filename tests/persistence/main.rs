//! The durable queue against real memcached processes and the real binary: crash recovery,
//! node loss, memcached failures, restarts that lose memcached's data, takeover.
//!
//! One test binary: this file holds the harness and the crash tests; `failures.rs` memcached
//! nodes lost, down, full, restarted empty or able to evict; `moving.rs` a dead node's queue
//! moved at start-up and by `gearhouse recover`.
//!
//! Jobs carry their id in the payload, so every check counts what workers really received.

#[path = "../common/mod.rs"]
mod common;

mod failures;
mod moving;

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
    BinServer::start(&["--node-id", node_id, "--memcached", &list], &e)
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
        BinServer::start(&["--node-id", node_id, "--memcached", &list], &e)
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
