//! Automatic takeover between two real gearhouse processes sharing three real memcached nodes
//! (replicas 2): a server killed with SIGKILL has its queue run by the other within
//! `takeover_after_s` + 10 s; a server cut off from memcached (its connections black-holed by a
//! proxy that tells its sockets from the peer's through /proc) fences itself, the peer takes its
//! queue over, and when its access comes back it runs none of the jobs the peer took; the
//! start-up warning about a queue nobody owns; moved jobs keep the handles their clients got
//! (through a chain of two takeovers), and dead letters move with the queue.
//!
//! Workers count the payloads they receive, so every check is about jobs that really ran. The
//! tests run one at a time (they race deadlines). In the debug profile on a busy 2-core machine
//! the 20,000-job move finishes in 10 to 12 s of its 13 s; `cargo test --release --test
//! takeover` runs the release binary and leaves ample room.

mod common;

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

/// `BinServer::start`, tried again when the server exits at once (a parallel test took a port
/// the harness had picked).
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
        start_retrying(
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

/// A TCP proxy in front of one memcached that can black-hole the connections of one process
/// (found through /proc: the socket inode of the connection's far end among the process's
/// file descriptors), so one server loses memcached while its peer, using the same addresses,
/// keeps it.
struct CutProxy {
    addr: SocketAddr,
    victim: Arc<AtomicU32>,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CutProxy {
    async fn start(upstream: String) -> CutProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let victim = Arc::new(AtomicU32::new(0));
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let v = victim.clone();
        tokio::spawn(async move {
            while let Ok((s, peer)) = l.accept().await {
                let (up, v, rx) = (upstream.clone(), v.clone(), cut_rx.clone());
                tokio::spawn(relay(s, peer.port(), addr.port(), up, v, rx));
            }
        });
        CutProxy { addr, victim, cut }
    }
}

/// Forwards one connection; while the proxy is cut and the connection is the victim's, holds
/// it open without forwarding a byte (a black hole, as a partition looks), then closes it.
async fn relay(
    mut s: TcpStream,
    peer_port: u16,
    proxy_port: u16,
    upstream: String,
    victim: Arc<AtomicU32>,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    let is_victim = || {
        let pid = victim.load(Ordering::SeqCst);
        pid != 0 && socket_of(pid, peer_port, proxy_port)
    };
    if *cut.borrow() && is_victim() {
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Ok(mut u) = TcpStream::connect(&upstream).await else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut s, &mut u) => return,
            changed = cut.changed() => {
                if changed.is_err() {
                    return;
                }
                if *cut.borrow() && is_victim() {
                    let _ = cut.wait_for(|c| !*c).await;
                    return;
                }
            }
        }
    }
}

/// Whether process `pid` holds the loopback socket whose local port is `port` and whose
/// remote port is `remote` (from /proc/net/tcp and /proc/<pid>/fd).
fn socket_of(pid: u32, port: u16, remote: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let port_of = |a: &str| {
        a.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && port_of(f[1]) == Some(port) && port_of(f[2]) == Some(remote))
            .then(|| f[9].to_string())
    });
    let Some(inode) = inode else { return false };
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_cut_off_from_memcached_fences_and_never_runs_what_its_peer_took() {
    let _serial = SERIAL.lock().await;
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start(64, &["-M"])).collect();
    let mut proxies = Vec::new();
    for m in &ms {
        proxies.push(CutProxy::start(m.addr()).await);
    }
    // Both servers use the proxies' addresses: the same ring, the same lease and lock keys.
    let list = proxies
        .iter()
        .map(|p| p.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let takeover_after = 3;
    let mut a = start("cut-a", &list, takeover_after, &[]).await;
    for p in &proxies {
        p.victim.store(a.child.id(), Ordering::SeqCst);
    }
    let b = start("cut-b", &list, takeover_after, &[]).await;
    let n = 2_000;
    submit_all(a.addr(), 0..n, 4).await;

    let cut_at = Instant::now();
    for p in &proxies {
        p.cut.send_replace(true);
    }
    let (a_http, b_http) = (a.http_addr(), b.http_addr());
    eventually(
        "node cut-a to fence itself",
        Duration::from_secs(10),
        || a.log_text(),
        || async move { metric(a_http, "gearhouse_fenced", "").await == 1.0 },
    )
    .await;
    println!(
        "cut-a fenced {:.2} s after losing memcached",
        cut_at.elapsed().as_secs_f64()
    );
    let ran_a = Arc::new(Ran::default());
    let ran_b = Arc::new(Ran::default());
    let _wa = workers(a.addr(), 2, &ran_a);
    let _wb = workers(b.addr(), 2, &ran_b);
    let r = ran_b.clone();
    eventually(
        "cut-b to take over and run cut-a's queue",
        Duration::from_secs(takeover_after as u64 + 10),
        || b.log_text(),
        || {
            let r = r.clone();
            async move { r.distinct() >= n as usize }
        },
    )
    .await;
    println!(
        "cut-b ran all {n} jobs {:.2} s after cut-a lost memcached",
        cut_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        ran_a.distinct(),
        0,
        "cut-a ran durable jobs while fenced: {:?}",
        ran_a.snapshot()
    );

    // Access comes back: cut-a renews, finds its queue taken and stays fenced.
    for p in &proxies {
        p.cut.send_replace(false);
    }
    eventually(
        "cut-a to learn that cut-b took its queue",
        Duration::from_secs(10),
        || a.log_text(),
        || async move { status(a_http).await["lease"]["taken_over_by"] == "cut-b" },
    )
    .await;
    assert_eq!(metric(a_http, "gearhouse_fenced", "").await, 1.0);
    // Its workers still get none of the jobs it holds in memory.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(ran_a.distinct(), 0, "cut-a ran jobs cut-b had taken over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut all = ran_b.snapshot();
    for (k, v) in ran_a.snapshot() {
        *all.entry(k).or_insert(0) += v;
    }
    assert_eq!(check_none_lost("cut off and back", 0..n, &all), 0);
    let log = a.log_text();
    assert!(
        log.contains("fenced: no lease renewal reached memcached"),
        "{log}"
    );
    assert!(log.contains("staying fenced: node cut-b took"), "{log}");
    takeover_shown(b_http, 0, "cut-a", n).await;

    // Jobs cut-a accepts while it stays fenced wait there; if it dies before anyone restarts
    // it, cut-b (the owner of its completed takeover lock) takes them over too.
    submit_all(a.addr(), n..n + 5, 1).await;
    let r = ran_b.clone();
    let late = (n..n + 5).map(|id| format!("job-{id}")).collect::<Vec<_>>();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ran_a.distinct(), 0, "cut-a ran jobs while fenced");
    a.kill9();
    eventually(
        "cut-b to take over the jobs cut-a accepted while fenced",
        Duration::from_secs(takeover_after as u64 + 10),
        || b.log_text(),
        || {
            let (r, late) = (r.clone(), late.clone());
            async move {
                let seen = r.snapshot();
                late.iter().all(|j| seen.contains_key(j))
            }
        },
    )
    .await;
    takeover_shown(b_http, 1, "cut-a", 5).await;

    // The way out is a restart: cut-a comes back with an empty queue, unfenced, and takes
    // new work again.
    ran_a.stop.store(true, Ordering::SeqCst);
    let a = start("cut-a", &list, takeover_after, &[]).await;
    let log = a.log_text();
    assert!(
        log.contains("node cut-b took this node's queue over while it was away"),
        "{log}"
    );
    let a_http = a.http_addr();
    assert_eq!(metric(a_http, "gearhouse_fenced", "").await, 0.0);
    let ran_a2 = Arc::new(Ran::default());
    let _wa2 = workers(a.addr(), 1, &ran_a2);
    submit_all(a.addr(), n + 5..n + 15, 1).await;
    let r = ran_a2.clone();
    eventually(
        "the restarted cut-a to run new jobs",
        Duration::from_secs(10),
        || a.log_text(),
        || {
            let r = r.clone();
            async move { r.distinct() >= 10 }
        },
    )
    .await;
    assert_eq!(
        check_none_lost("after the restart", n + 5..n + 15, &ran_a2.snapshot()),
        0
    );
    assert_eq!(
        ran_a2.distinct(),
        10,
        "old jobs of cut-a came back after its restart"
    );
    ran_a2.stop.store(true, Ordering::SeqCst);
    ran_b.stop.store(true, Ordering::SeqCst);
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

/// Submits background jobs `job-<id>` of [`FUNC`] for `ids` on one connection, pipelined;
/// returns the handles of their JOB_CREATED.
async fn submit_for_handles(addr: SocketAddr, ids: std::ops::Range<u64>) -> HashSet<String> {
    let mut conn = Connection::connect(addr).await.unwrap();
    for id in ids.clone() {
        conn.put_submit(&Job::new(FUNC, &format!("job-{id}")), true)
            .unwrap();
    }
    conn.flush().await.unwrap();
    let mut handles = HashSet::new();
    for _ in ids {
        let p = conn.recv().await.unwrap();
        assert_eq!(p.kind, PacketType::JOB_CREATED, "{:?}", p.body);
        handles.insert(String::from_utf8_lossy(&p.body).into_owned());
    }
    handles
}

/// GET_STATUS of `handle` on `addr`: (known, running).
async fn job_status(addr: SocketAddr, handle: &str) -> (bool, bool) {
    let mut c = Connection::connect(addr).await.unwrap();
    let s = c.get_status(handle.as_bytes()).await.unwrap();
    (s.known, s.running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moved_jobs_keep_the_handles_their_clients_got_through_two_takeovers() {
    let _serial = SERIAL.lock().await;
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start(64, &["-M"])).collect();
    let list = memcached_list(&ms.iter().collect::<Vec<_>>());
    let takeover_after = 2;
    let mut a = start("keep-a", &list, takeover_after, &[]).await;
    let mut b = start("keep-b", &list, takeover_after, &[]).await;
    let ran = Arc::new(Ran::default());
    let _w = workers(b.addr(), 4, &ran);

    let n = 500;
    let created = submit_for_handles(a.addr(), 0..n).await;
    assert_eq!(created.len(), n as usize);
    assert!(
        created.iter().all(|h| h.starts_with("H:keep-a:")),
        "{created:?}"
    );
    // A job nobody can run yet: it stays queued through both takeovers.
    let held_fn = "keep-held";
    let held = {
        let mut c = Connection::connect(a.addr()).await.unwrap();
        let h = c
            .submit_background(&Job::new(held_fn, "held").unique("held-1"))
            .await
            .unwrap();
        String::from_utf8_lossy(&h).into_owned()
    };
    assert!(held.starts_with("H:keep-a:"), "{held}");

    a.kill9();
    let r = ran.clone();
    eventually(
        "keep-b to take over and run keep-a's jobs",
        Duration::from_secs(takeover_after as u64 + 10),
        || b.log_text(),
        || {
            let r = r.clone();
            async move { r.distinct() >= n as usize }
        },
    )
    .await;
    assert_eq!(check_none_lost("handles kept", 0..n, &ran.snapshot()), 0);
    let got = ran.handles.lock().unwrap().clone();
    let missing: Vec<_> = created.difference(&got).take(5).collect();
    let unknown: Vec<_> = got.difference(&created).take(5).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "the handles keep-b's workers got differ from keep-a's JOB_CREATED: missing {missing:?}, unknown {unknown:?}"
    );
    // The queued job answers to its old handle on keep-b; its local handle is not its name.
    assert_eq!(job_status(b.addr(), &held).await, (true, false));
    let shown = Connection::connect(b.addr())
        .await
        .unwrap()
        .admin("show jobs")
        .await
        .unwrap();
    assert!(shown.contains(&format!("{held}\t")), "{shown}");
    // A job that ran is gone: its old handle is unknown now.
    let done = created.iter().next().unwrap();
    assert_eq!(job_status(b.addr(), done).await, (false, false));

    // A second takeover: keep-b dies, keep-c takes its queue, and the job still answers to
    // keep-a's handle.
    let c = start("keep-c", &list, takeover_after, &[]).await;
    b.kill9();
    let (c_addr, held2) = (c.addr(), held.clone());
    eventually(
        "keep-c to take over keep-b's queue",
        Duration::from_secs(takeover_after as u64 + 10),
        || c.log_text(),
        || {
            let held = held2.clone();
            async move { job_status(c_addr, &held).await.0 }
        },
    )
    .await;
    let mut w = Connection::connect(c.addr()).await.unwrap();
    w.can_do(held_fn.as_bytes()).await.unwrap();
    let job = w.grab(GrabKind::Uniq).await.unwrap().expect("the held job");
    assert_eq!(String::from_utf8_lossy(&job.handle), held);
    assert_eq!(&job.unique[..], b"held-1");
    assert_eq!(job_status(c.addr(), &held).await, (true, true));
    w.complete(&job.handle, b"done").await.unwrap();
    let c_http = c.http_addr();
    eventually(
        "the held job to end on keep-c",
        Duration::from_secs(5),
        || c.log_text(),
        || {
            let held = held.clone();
            async move { !job_status(c_addr, &held).await.0 }
        },
    )
    .await;
    // At least the held job (a completed job whose delete had not reached memcached yet when
    // keep-b died moves too, and waits on keep-c: no worker for it there). Counted once the
    // whole move is done, which can be after the first moved job already ran.
    eventually(
        "keep-c to count the jobs it took over",
        Duration::from_secs(10),
        || c.log_text(),
        || async move { metric(c_http, "gearhouse_takeover_jobs_total", "").await >= 1.0 },
    )
    .await;
    ran.stop.store(true, Ordering::SeqCst);
}

/// A worker that answers `n` jobs of `function` with WORK_FAIL.
async fn fail_jobs(addr: SocketAddr, function: &str, n: usize) {
    let mut w = Connection::connect(addr).await.unwrap();
    w.can_do(function.as_bytes()).await.unwrap();
    let mut done = 0;
    while done < n {
        match w.grab(GrabKind::Uniq).await.unwrap() {
            Some(a) => {
                w.fail(&a.handle).await.unwrap();
                done += 1;
            }
            None => {
                w.pre_sleep().await.unwrap();
                let _ = tokio::time::timeout(Duration::from_millis(200), w.wait_noop()).await;
            }
        }
    }
}

/// `GET /api/v1/dead-letters` of a server.
async fn dead_letters(http: SocketAddr) -> Vec<serde_json::Value> {
    let (_, body) = http_get(http, "/api/v1/dead-letters").await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["dead_letters"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_move_with_the_queue_and_leave_the_dead_nodes_keys() {
    let _serial = SERIAL.lock().await;
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start(64, &["-M"])).collect();
    let list = memcached_list(&ms.iter().collect::<Vec<_>>());
    let takeover_after = 2;
    let env = [("GEARHOUSE_FUNCTIONS__MOVEDL__DEAD_LETTER", "true")];
    let mut a = start("dl-a", &list, takeover_after, &env).await;
    let b = start("dl-b", &list, takeover_after, &env).await;
    let a_http = a.http_addr();

    // Three background jobs fail on dl-a and become its dead letters, in memcached.
    let mut c = Connection::connect(a.addr()).await.unwrap();
    for i in 0..3 {
        c.submit_background(&Job::new("movedl", &format!("payload-{i}")).unique(&format!("u-{i}")))
            .await
            .unwrap();
    }
    fail_jobs(a.addr(), "movedl", 3).await;
    eventually(
        "dl-a to keep 3 persisted dead letters",
        Duration::from_secs(10),
        || a.log_text(),
        || async move {
            let l = dead_letters(a_http).await;
            l.len() == 3 && l.iter().all(|d| d["persisted"] == true)
        },
    )
    .await;
    let before = dead_letters(a_http).await;
    // No job is queued on dl-a: its letters alone make it worth taking over.
    let nodes: Vec<String> = ms.iter().map(|m| m.addr()).collect();
    let kv = Kv::new(&nodes, 2, Duration::from_secs(2));
    let key = |part: &str| Kv::key("gearhouse", &["dl-a", "dl", part]);
    assert!(kv.get(&key("hi")).await.unwrap().is_some());

    a.kill9();
    let b_http = b.http_addr();
    eventually(
        "dl-b to take over dl-a's dead letters",
        Duration::from_secs(takeover_after as u64 + 10),
        || b.log_text(),
        || async move { dead_letters(b_http).await.len() >= 3 },
    )
    .await;
    let after = dead_letters(b_http).await;
    assert_eq!(after.len(), 3, "{after:?}");
    for (old, new) in before.iter().zip(&after) {
        for k in [
            "function", "handle", "unique", "payload", "attempts", "reason", "worker", "time",
        ] {
            assert_eq!(old[k], new[k], "{k} of {new}");
        }
        assert!(
            old["handle"].as_str().unwrap().starts_with("H:dl-a:"),
            "{old}"
        );
    }
    eventually(
        "dl-b to mirror the moved letters",
        Duration::from_secs(5),
        || b.log_text(),
        || async move {
            dead_letters(b_http)
                .await
                .iter()
                .all(|d| d["persisted"] == true)
        },
    )
    .await;
    // Gone from dl-a's keys: its letters and its watermarks.
    for d in &before {
        let id = d["id"].as_u64().unwrap().to_string();
        assert_eq!(kv.get(&key(&id)).await.unwrap(), None, "letter {id}");
    }
    assert_eq!(kv.get(&key("hi")).await.unwrap(), None);
    assert_eq!(kv.get(&key("lo")).await.unwrap(), None);
    // Under dl-b's keys now.
    for d in &after {
        let id = d["id"].as_u64().unwrap().to_string();
        let k = Kv::key("gearhouse", &["dl-b", "dl", &id]);
        assert!(kv.get(&k).await.unwrap().is_some(), "dl-b's letter {id}");
    }
    assert_eq!(
        metric(b_http, "gearhouse_dead_letters_taken_over_total", "").await,
        3.0
    );
    let log = b.log_text();
    assert!(log.contains("3 dead letters moved"), "{log}");
}
