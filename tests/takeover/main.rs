//! Automatic takeover between two real gearhouse processes sharing three real memcached nodes
//! (replicas 2): a server killed with SIGKILL has its queue run by the other within
//! `takeover_after_s` + 10 s; a server cut off from memcached (its connections black-holed by a
//! proxy that tells its sockets from the peer's through /proc) fences itself, the peer takes its
//! queue over, and when its access comes back it runs none of the jobs the peer took; the
//! start-up warning about a queue nobody owns; moved jobs keep the handles their clients got
//! (through a chain of two takeovers), and dead letters move with the queue, also when
//! `gearhouse recover --from-node` asks a server to take a node over.
//!
//! One test binary: this file holds the harness (servers, workers that count what ran, metric
//! and status reads), the kill test and the start-up warning; `cut_off.rs` the memcached cut-off
//! and fencing; `kept.rs` what a moved job and a dead node's letters keep.
//!
//! Workers count the payloads they receive, so every check is about jobs that really ran. The
//! tests run one at a time (they race deadlines). In the debug profile on a busy 2-core machine
//! the 20,000-job move finishes in 10 to 12 s of its 13 s; `cargo test --release --test
//! takeover` runs the release binary and leaves ample room.

#[path = "../common/mod.rs"]
mod common;

mod cut_off;
mod kept;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_get, BinServer, Memcached};
use gearhouse::client::{Connection, Job};
use gearhouse::codec::PacketType;
use gearhouse::persist::kv::Kv;
use gearhouse::protocol::GrabKind;
use tokio::net::{TcpListener, TcpStream};

const FUNC: &str = "takeover-fn";

/// The tests of this file run one at a time: each measures how fast a queue moves against a
/// deadline, and two of them at once on a small machine measure each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts `gearhouse serve --node-id ID --memcached LIST --takeover-after T` off the runtime.
async fn start(node_id: &str, list: &str, takeover_after: u32, env: &[(&str, &str)]) -> BinServer {
    let (node_id, list) = (node_id.to_string(), list.to_string());
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let t = takeover_after.to_string();
        let mut e: Vec<(&str, &str)> = vec![("GEARHOUSE_PERSISTENCE__REPAIR_INTERVAL_MS", "200")];
        e.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        BinServer::start(
            &[
                "--node-id",
                &node_id,
                "--memcached",
                &list,
                "--takeover-after",
                &t,
            ],
            &e,
        )
    })
    .await
    .unwrap()
}

/// Submits background jobs `job-<id>` for `ids`, pipelined in batches of 500 over `conns`
/// connections; panics unless every one is acknowledged with JOB_CREATED.
async fn submit_all(addr: SocketAddr, ids: std::ops::Range<u64>, conns: u64) {
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mine: Vec<u64> = ids.clone().filter(|id| id % conns == c).collect();
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::connect(addr).await.unwrap();
            for batch in mine.chunks(500) {
                for id in batch {
                    let data = format!("job-{id}");
                    conn.put_submit(&Job::new(FUNC, &data), true).unwrap();
                }
                conn.flush().await.unwrap();
                for _ in batch {
                    let p = conn.recv().await.unwrap();
                    assert_eq!(
                        p.kind,
                        PacketType::JOB_CREATED,
                        "submit refused: {:?}",
                        String::from_utf8_lossy(&p.body)
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Payloads received by the workers of one server, with how often, and the handles they came
/// with.
#[derive(Default)]
struct Ran {
    seen: Mutex<HashMap<String, u32>>,
    handles: Mutex<HashSet<String>>,
    stop: AtomicBool,
}

impl Ran {
    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn snapshot(&self) -> HashMap<String, u32> {
        self.seen.lock().unwrap().clone()
    }
}

/// A worker for [`FUNC`] on `addr` that completes every job and counts its payload, until
/// `ran.stop` or the server goes away.
async fn worker(addr: SocketAddr, ran: Arc<Ran>) {
    let Ok(mut c) = Connection::connect(addr).await else {
        return;
    };
    if c.can_do(FUNC.as_bytes()).await.is_err() {
        return;
    }
    while !ran.stop.load(Ordering::SeqCst) {
        match c.grab(GrabKind::Uniq).await {
            Ok(Some(a)) => {
                let data = String::from_utf8_lossy(&a.data).into_owned();
                let handle = String::from_utf8_lossy(&a.handle).into_owned();
                ran.handles.lock().unwrap().insert(handle);
                *ran.seen.lock().unwrap().entry(data).or_insert(0) += 1;
                // Sent with the next GRAB_JOB_UNIQ: one write per job.
                c.put(PacketType::WORK_COMPLETE, &[&a.handle, b"ok"]);
            }
            Ok(None) => {
                if c.flush().await.is_err() || c.pre_sleep().await.is_err() {
                    return;
                }
                // Woken by a NOOP or, at worst, asks again 200 ms later.
                let _ = tokio::time::timeout(Duration::from_millis(200), c.wait_noop()).await;
            }
            Err(_) => return,
        }
    }
}

fn workers(addr: SocketAddr, n: usize, ran: &Arc<Ran>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| tokio::spawn(worker(addr, ran.clone())))
        .collect()
}

/// A metric's value from /metrics (sum over the label sets that contain `labels`).
async fn metric(http: SocketAddr, name: &str, labels: &str) -> f64 {
    let (_, body) = http_get(http, "/metrics").await.unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next().is_some_and(|n| n == name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn status(http: SocketAddr) -> serde_json::Value {
    let (_, s) = http_get(http, "/api/v1/status").await.unwrap();
    serde_json::from_str(&s).unwrap()
}

/// Waits until `/api/v1/status` lists takeover `i` (of `node`, with `jobs` jobs): it is
/// recorded once the move is complete, while the first moved jobs may already run. Returns the
/// status.
async fn takeover_shown(http: SocketAddr, i: usize, node: &str, jobs: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status(http).await;
        let t = &st["takeovers"][i];
        if !t.is_null() {
            assert_eq!(t["node"], node, "{st}");
            assert_eq!(t["jobs"], jobs, "{st}");
            assert!(t["at"].as_u64().is_some(), "{st}");
            return st;
        }
        assert!(Instant::now() < deadline, "takeover {i} not shown: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `cond` holds, at most `t`; panics with `what` (and `log`) after.
async fn eventually<F, Fut>(what: &str, t: Duration, log: impl Fn() -> String, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + t;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every id in `ids` ran; returns how many ran more than once (printed).
fn check_none_lost(what: &str, ids: std::ops::Range<u64>, ran: &HashMap<String, u32>) -> usize {
    let lost: Vec<u64> = ids
        .clone()
        .filter(|id| !ran.contains_key(&format!("job-{id}")))
        .collect();
    assert!(
        lost.is_empty(),
        "{what}: {} of {} acknowledged jobs never ran, e.g. {:?}",
        lost.len(),
        ids.end - ids.start,
        &lost[..lost.len().min(10)]
    );
    let dups = ran.values().filter(|&&n| n > 1).count();
    println!(
        "{what}: {} acknowledged, {} ran, none lost, {dups} ran more than once",
        ids.end - ids.start,
        ran.len()
    );
    dups
}

fn memcached_list(nodes: &[&Memcached]) -> String {
    nodes.iter().map(|m| m.addr()).collect::<Vec<_>>().join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_servers_queue_runs_on_its_peer_within_takeover_after_plus_10_s() {
    let _serial = SERIAL.lock().await;
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start(128, &["-M"])).collect();
    let list = memcached_list(&ms.iter().collect::<Vec<_>>());
    let takeover_after = 3;
    let mut a = start("node-a", &list, takeover_after, &[]).await;
    let b = start("node-b", &list, takeover_after, &[]).await;
    let ran = Arc::new(Ran::default());
    let _w = workers(b.addr(), 8, &ran);

    let n = 20_000;
    let t = Instant::now();
    submit_all(a.addr(), 0..n, 8).await;
    println!(
        "{n} background jobs acknowledged by node-a in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(ran.distinct(), 0, "node-b ran jobs before node-a died");

    a.kill9();
    let killed = Instant::now();
    let limit = Duration::from_secs(takeover_after as u64 + 10);
    let mut first = None;
    while ran.distinct() < n as usize {
        assert!(
            killed.elapsed() < limit,
            "node-b ran {} of node-a's {n} jobs within {} s\n{}",
            ran.distinct(),
            limit.as_secs(),
            b.log_text()
        );
        if first.is_none() && ran.distinct() > 0 {
            first = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!(
        "kill -9 of node-a to the first of its jobs run on node-b: {:.2} s, to the last of all {n}: {:.2} s (limit {} s)",
        first.unwrap_or_default().as_secs_f64(),
        killed.elapsed().as_secs_f64(),
        limit.as_secs()
    );
    let log = b.log_text();
    for l in log
        .lines()
        .filter(|l| l.contains("taking its queue over") || l.contains("took over"))
    {
        println!("node-b: {l}");
    }
    let dups = check_none_lost("takeover after kill -9", 0..n, &ran.snapshot());
    // node-a had no worker: nothing of its queue ran before the move, so nothing may run twice.
    assert_eq!(dups, 0, "jobs ran twice");

    assert!(
        log.contains(&format!("took over node node-a: {n} jobs now run here")),
        "{log}"
    );
    let st = takeover_shown(b.http_addr(), 0, "node-a", n).await;
    assert_eq!(st["lease"]["fenced"], false, "{st}");
    let http = b.http_addr();
    assert_eq!(
        metric(http, "gearhouse_takeovers_total", "result=\"moved\"").await,
        1.0
    );
    assert_eq!(
        metric(http, "gearhouse_takeover_jobs_total", "").await,
        n as f64
    );
    ran.stop.store(true, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_warns_about_a_queue_that_no_live_server_owns() {
    let _serial = SERIAL.lock().await;
    let m1 = Memcached::start(64, &["-M"]);
    let m2 = Memcached::start(64, &["-M"]);
    let list = memcached_list(&[&m1, &m2]);
    // Short leases, so the dead node's lapses quickly.
    let fast = [("GEARHOUSE_PERSISTENCE__LEASE_RENEW_MS", "300")];
    let mut a = start("orphan-a", &list, 0, &fast).await;
    submit_all(a.addr(), 0..10, 1).await;
    a.kill9();
    let kv = Kv::new(&[m1.addr(), m2.addr()], 2, Duration::from_secs(2));
    let lease = Kv::key("gearhouse", &["lease", "orphan-a"]);
    let kv = &kv;
    let lease = &lease;
    eventually(
        "orphan-a's lease to lapse",
        Duration::from_secs(10),
        String::new,
        || async move { kv.get(lease).await.unwrap().is_none() },
    )
    .await;

    // Takeover off: the warning names the command that moves the queue.
    let mut b = start("orphan-b", &list, 0, &[]).await;
    let log = b.log_text();
    assert!(
        log.contains("memcached holds queued jobs of node orphan-a")
            && log.contains("gearhouse recover --from-node orphan-a"),
        "{log}"
    );
    b.terminate();

    // Takeover on: the warning says it will happen, and it does.
    let c = start("orphan-c", &list, 1, &fast).await;
    let log = c.log_text();
    assert!(
        log.contains("automatic takeover moves them to this server or a peer once the lease has been missing for 1 s"),
        "{log}"
    );
    let ran = Arc::new(Ran::default());
    let _w = workers(c.addr(), 1, &ran);
    let r = ran.clone();
    eventually(
        "orphan-c to take over and run orphan-a's jobs",
        Duration::from_secs(15),
        || c.log_text(),
        || {
            let r = r.clone();
            async move { r.distinct() >= 10 }
        },
    )
    .await;
    assert_eq!(check_none_lost("orphaned queue", 0..10, &ran.snapshot()), 0);
    ran.stop.store(true, Ordering::SeqCst);
}
