//! Cached job results against real parts: the server in-process on a real memcached, a worker on
//! the crate's client counting its calls, and the `gearman` CLI (libgearman) as a client. A
//! second foreground submit of a cached function with the same unique is answered without the
//! worker, with the same result, across priorities and a restart; empty uniques and failures are
//! never cached; a result over memcached's `-I` limit is skipped and counted; a cache without
//! memcached stops the binary at start-up; and the hit latency is measured.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::Proc;
use common::{http_get, Memcached, TestServer};
use gearhouse::client::{Connection, Job, WorkEvent};
use gearhouse::protocol::{GrabKind, Priority};

/// A worker of `function` on the crate's client, counting the jobs it is handed: payload `fail`
/// gets WORK_FAIL, `big:N` a result of N bytes, anything else `done:<payload>#<call>` (the call
/// number shows which run a result came from).
fn spawn_worker(
    addr: SocketAddr,
    function: &'static str,
    calls: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut w = Connection::connect(addr).await.unwrap();
        w.can_do(function.as_bytes()).await.unwrap();
        loop {
            match w.grab(GrabKind::Uniq).await.unwrap() {
                Some(a) => {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    let data = String::from_utf8_lossy(&a.data).into_owned();
                    if data == "fail" {
                        w.fail(&a.handle).await.unwrap();
                    } else if let Some(size) = data.strip_prefix("big:") {
                        let body = vec![b'x'; size.parse().unwrap()];
                        w.complete(&a.handle, &body).await.unwrap();
                    } else {
                        w.complete(&a.handle, format!("done:{data}#{n}").as_bytes())
                            .await
                            .unwrap();
                    }
                }
                None => {
                    w.pre_sleep().await.unwrap();
                    w.wait_noop().await.unwrap();
                }
            }
        }
    })
}

/// Waits until the worker has announced `function` (admin `status` shows one worker).
async fn wait_worker(addr: SocketAddr, function: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = Connection::connect(addr).await.unwrap();
    loop {
        let s = c.admin("status").await.unwrap();
        if s.lines()
            .any(|l| l.starts_with(&format!("{function}\t")) && l.ends_with("\t1"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "no worker for {function}: {s}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sum of the samples of `/metrics` whose line starts with `prefix` (name and labels).
async fn metric(http: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = http_get(http, "/metrics").await.unwrap();
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `metric(prefix)` reaches `want`.
async fn wait_metric(http: SocketAddr, prefix: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(http, prefix).await;
        if v >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix} stayed at {v}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn result_of(c: &mut Connection, function: &str, unique: &str, data: &str) -> Vec<u8> {
    let out = c
        .submit(&Job::new(function, data).unique(unique))
        .await
        .unwrap();
    out.result()
        .unwrap_or_else(|| panic!("no WORK_COMPLETE: {out:?}"))
        .to_vec()
}

fn cached_env<'a>(mc: &'a str, function_ttl: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("GEARHOUSE_PERSISTENCE__MEMCACHED", mc),
        (function_ttl, "60"),
    ]
}

/// The `gearman` CLI as a foreground client with a unique; its stdout is the result.
async fn gearman_cli(port: u16, function: &str, unique: &str, data: &str) -> String {
    let args: Vec<String> = [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-f",
        function,
        "-u",
        unique,
        "--",
        data,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    tokio::task::spawn_blocking(move || {
        let f = Proc::spawn("gearman client", "gearman", &args).finish_ok();
        f.stdout()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_submit_with_the_same_unique_is_answered_without_the_worker() {
    let mc = Memcached::start(64, &[]);
    let addr_mc = mc.addr();
    let srv = TestServer::start(&cached_env(
        &addr_mc,
        "GEARHOUSE_FUNCTIONS__CACHED__CACHE_TTL_S",
    ))
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let worker = spawn_worker(srv.addr, "cached", calls.clone());
    wait_worker(srv.addr, "cached").await;

    // libgearman's CLI runs the job on the worker...
    let first = gearman_cli(srv.addr.port(), "cached", "u-1", "hello").await;
    assert_eq!(first.trim_end(), "done:hello#1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // ...and the crate's client gets the same result from the cache, at every priority.
    let mut c = Connection::connect(srv.addr).await.unwrap();
    for p in Priority::ALL {
        let out = c
            .submit(&Job::new("cached", "hello").unique("u-1").priority(p))
            .await
            .unwrap();
        assert_eq!(
            out.events,
            vec![WorkEvent::Complete("done:hello#1".into())],
            "{p:?}"
        );
        assert!(
            String::from_utf8_lossy(&out.handle).starts_with("H:test:c"),
            "a cache hit has a handle of its own: {:?}",
            out.handle
        );
    }
    // The CLI again, now answered by the cache.
    let again = gearman_cli(srv.addr.port(), "cached", "u-1", "hello").await;
    assert_eq!(again.trim_end(), "done:hello#1");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the worker ran only once");
    assert_eq!(
        metric(srv.http, "gearhouse_cache_hits_total{function=\"cached\"}").await,
        4.0
    );

    // Another unique is another job.
    assert_eq!(result_of(&mut c, "cached", "u-2", "x").await, b"done:x#2");
    // An empty unique is never cached.
    for _ in 0..2 {
        let out = c.submit(&Job::new("cached", "same")).await.unwrap();
        assert!(out.result().is_some());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // A failure is never cached: both submits reach the worker.
    for _ in 0..2 {
        let out = c
            .submit(&Job::new("cached", "fail").unique("u-fail"))
            .await
            .unwrap();
        assert_eq!(out.events, vec![WorkEvent::Fail]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    // A background submit with a cached unique still runs (only foreground is answered).
    c.submit_background(&Job::new("cached", "hello").unique("u-1"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) < 7 {
        assert!(Instant::now() < deadline, "background job never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        metric(
            srv.http,
            "gearhouse_cache_misses_total{function=\"cached\"}"
        )
        .await
            >= 2.0
    );
    wait_metric(
        srv.http,
        "gearhouse_cache_stores_total{function=\"cached\"}",
        2.0,
    )
    .await;
    worker.abort();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_results_survive_a_restart_in_memcached() {
    let mc = Memcached::start(64, &[]);
    let addr_mc = mc.addr();
    let env = cached_env(&addr_mc, "GEARHOUSE_FUNCTIONS__KEPT__CACHE_TTL_S");
    let srv = TestServer::start(&env).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let worker = spawn_worker(srv.addr, "kept", calls.clone());
    wait_worker(srv.addr, "kept").await;
    let mut c = Connection::connect(srv.addr).await.unwrap();
    assert_eq!(result_of(&mut c, "kept", "r-1", "p").await, b"done:p#1");
    wait_metric(
        srv.http,
        "gearhouse_cache_stores_total{function=\"kept\"}",
        1.0,
    )
    .await;
    worker.abort();
    drop(c);
    srv.stop().await;

    // A new server, no worker at all: the result comes from memcached.
    let srv = TestServer::start(&env).await;
    let mut c = Connection::connect(srv.addr).await.unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        c.submit(&Job::new("kept", "p").unique("r-1")),
    )
    .await
    .expect("answered without a worker")
    .unwrap();
    assert_eq!(out.result().map(|r| r.to_vec()), Some(b"done:p#1".to_vec()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(srv.http, "gearhouse_cache_hits_total{function=\"kept\"}").await,
        1.0
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_item_size_limit_is_skipped_and_counted() {
    // A 2 KiB item limit (its chunks must be smaller still), so a 4000-byte result is refused.
    let mc = Memcached::start(64, &["-I", "2k", "-o", "slab_chunk_max=1024"]);
    let addr_mc = mc.addr();
    let srv = TestServer::start(&cached_env(
        &addr_mc,
        "GEARHOUSE_FUNCTIONS__LARGE__CACHE_TTL_S",
    ))
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let worker = spawn_worker(srv.addr, "large", calls.clone());
    wait_worker(srv.addr, "large").await;
    let mut c = Connection::connect(srv.addr).await.unwrap();
    assert_eq!(
        result_of(&mut c, "large", "b-1", "big:4000").await.len(),
        4000
    );
    wait_metric(
        srv.http,
        "gearhouse_cache_skips_total{function=\"large\",reason=\"too_large\"}",
        1.0,
    )
    .await;
    // Not answered from the cache: the worker runs it again.
    assert_eq!(
        result_of(&mut c, "large", "b-1", "big:4000").await.len(),
        4000
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A small result of the same function is cached.
    assert_eq!(
        result_of(&mut c, "large", "s-1", "small").await,
        b"done:small#3"
    );
    assert_eq!(
        result_of(&mut c, "large", "s-1", "small").await,
        b"done:small#3"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Answered from the front; memcached's copy is written after, by the store task.
    wait_metric(
        srv.http,
        "gearhouse_cache_stores_total{function=\"large\"}",
        1.0,
    )
    .await;
    worker.abort();
    srv.stop().await;
}

#[test]
fn a_cache_without_memcached_stops_the_server_at_start_up() {
    let log = std::env::temp_dir().join(format!(
        "gearhouse-cache-refusal-{}.log",
        std::process::id()
    ));
    let mut child = std::process::Command::new(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .env("GEARHOUSE_FUNCTIONS__RESIZE__CACHE_TTL_S", "300")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server started anyway: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(!status.success(), "exited with {status}: {stderr}");
    assert!(
        stderr.contains("functions.\"resize\".cache_ttl_s = 300 needs persistence.memcached"),
        "{stderr}"
    );
}

/// 10,000 hits on loopback, one at a time from one client, as a client waiting on each answer
/// sees them (submit to WORK_COMPLETE). Prints the distribution; the bound asserted is loose
/// because this runs in the debug profile on a shared machine (the report gives the numbers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hit_latency_on_loopback() {
    let mc = Memcached::start(64, &[]);
    let addr_mc = mc.addr();
    let srv = TestServer::start(&cached_env(
        &addr_mc,
        "GEARHOUSE_FUNCTIONS__FAST__CACHE_TTL_S",
    ))
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let worker = spawn_worker(srv.addr, "fast", calls.clone());
    wait_worker(srv.addr, "fast").await;
    let mut c = Connection::connect(srv.addr).await.unwrap();
    let want = result_of(&mut c, "fast", "hot", "payload").await;
    let mut took = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let t = Instant::now();
        let out = c
            .submit(&Job::new("fast", "payload").unique("hot"))
            .await
            .unwrap();
        took.push(t.elapsed());
        if out.result().map(|r| r.to_vec()) != Some(want.clone()) {
            let (_, m) = http_get(srv.http, "/metrics").await.unwrap();
            let cache: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("gearhouse_cache"))
                .collect();
            panic!("hit {i}: {out:?}, wanted {want:?}\n{}", cache.join("\n"));
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    took.sort();
    let pct = |p: f64| took[((took.len() as f64 * p) as usize).min(took.len() - 1)];
    println!(
        "cache hits over loopback (10000): p50 {:?} p90 {:?} p99 {:?} p99.9 {:?} max {:?}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        took[took.len() - 1]
    );
    assert!(pct(0.99) < Duration::from_millis(20), "p99 {:?}", pct(0.99));
    worker.abort();
    srv.stop().await;
}
