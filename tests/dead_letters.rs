//! Dead letters against real parts: the server in-process (and the real binary for the crash),
//! the `gearman` CLI as a worker that is killed mid-job, workers on the crate's client that
//! fail, a real memcached for durability, and the HTTP API and admin `show dead` as users see
//! them.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::process::Proc;
use common::{BinServer, Memcached, TestServer};
use gearhouse::client::{Connection, Job};
use gearhouse::protocol::GrabKind;
use serde_json::Value;

/// One HTTP/1.1 request without a body: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    common::http_request(addr, method, path, "").await.unwrap()
}

async fn letters(addr: SocketAddr, query: &str) -> Vec<Value> {
    let (status, body) = http(addr, "GET", &format!("/api/v1/dead-letters{query}")).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["dead_letters"].as_array().unwrap().clone()
}

/// Waits until the list (with `query`) satisfies `cond`.
async fn wait_letters(
    addr: SocketAddr,
    query: &str,
    cond: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = letters(addr, query).await;
        if cond(&l) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters never matched: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(http_addr: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = http(http_addr, "GET", "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until admin `status` shows `function` with `running` jobs running.
async fn wait_running(addr: SocketAddr, function: &str, running: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = Connection::connect(addr).await.unwrap();
    loop {
        let s = c.admin("status").await.unwrap();
        let row = s
            .lines()
            .find(|l| l.starts_with(&format!("{function}\t")))
            .map(|l| l.split('\t').map(String::from).collect::<Vec<_>>());
        if row.as_ref().is_some_and(|r| r[2] == running.to_string()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{function} never had {running} running: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_workers_die_is_a_dead_letter_that_can_be_retried() {
    let mc = Memcached::start(64, &[]);
    let mc_addr = mc.addr();
    let srv = TestServer::start(&[
        ("GEARHOUSE_ENGINE__JOB_RETRIES", "2"),
        ("GEARHOUSE_PERSISTENCE__MEMCACHED", &mc_addr),
    ])
    .await;
    let mut c = Connection::connect(srv.addr).await.unwrap();
    let handle = c
        .submit_background(&Job::new("dies", "payload-1").unique("d-1"))
        .await
        .unwrap();
    let handle = String::from_utf8_lossy(&handle).into_owned();
    // Two attempts, each on a `gearman -w` killed while it runs the job.
    for _ in 0..2 {
        let args: Vec<String> = [
            "-w",
            "-h",
            "127.0.0.1",
            "-p",
            &srv.addr.port().to_string(),
            "-f",
            "dies",
            "--",
            "sleep",
            "20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let w = Proc::spawn("gearman worker", "gearman", &args);
        wait_running(srv.addr, "dies", 1).await;
        tokio::task::spawn_blocking(move || w.kill9())
            .await
            .unwrap();
    }
    let l = wait_letters(srv.http, "", |l| l.len() == 1).await;
    let d = &l[0];
    assert_eq!(d["function"], "dies");
    assert_eq!(d["handle"], handle.as_str());
    assert_eq!(d["unique"], "d-1");
    assert_eq!(d["payload"], "payload-1");
    assert_eq!(d["attempts"], 2);
    assert_eq!(d["reason"], "retries_exhausted");
    assert!(
        d["worker"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{d}"
    );
    assert!(d["time"].as_u64().unwrap() > 1_600_000_000);
    let id = d["id"].as_u64().unwrap();
    // Filtered by function.
    assert_eq!(letters(srv.http, "?function=dies").await.len(), 1);
    assert!(letters(srv.http, "?function=other").await.is_empty());
    // Admin `show dead`, tab-separated.
    let show = c.admin("show dead").await.unwrap();
    assert!(
        show.lines().any(|line| line.starts_with(&format!(
            "{id}\tdies\t{handle}\td-1\t2\tretries_exhausted\t127.0.0.1:"
        ))),
        "{show}"
    );
    assert_eq!(
        metric(
            srv.http,
            "gearhouse_dead_letters_total{function=\"dies\",reason=\"retries_exhausted\"}"
        )
        .await,
        1.0
    );

    // Retry: the job runs again on a worker with its payload and unique; the letter is gone.
    let (status, body) = http(
        srv.http,
        "POST",
        &format!("/api/v1/dead-letters/{id}/retry"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_ne!(v["handle"], handle.as_str());
    let mut w = Connection::connect(srv.addr).await.unwrap();
    w.can_do(b"dies").await.unwrap();
    let a = loop {
        if let Some(a) = w.grab(GrabKind::Uniq).await.unwrap() {
            break a;
        }
        w.pre_sleep().await.unwrap();
        w.wait_noop().await.unwrap();
    };
    assert_eq!(
        (&a.data[..], &a.unique[..]),
        (&b"payload-1"[..], &b"d-1"[..])
    );
    assert_eq!(a.handle, v["handle"].as_str().unwrap().as_bytes());
    w.complete(&a.handle, b"ok").await.unwrap();
    assert!(letters(srv.http, "").await.is_empty());
    let (status, _) = http(
        srv.http,
        "POST",
        &format!("/api/v1/dead-letters/{id}/retry"),
    )
    .await;
    assert_eq!(status, 404);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_background_jobs_of_dead_letter_functions_are_kept_and_can_be_deleted() {
    let srv = TestServer::start(&[("GEARHOUSE_FUNCTIONS__DLF__DEAD_LETTER", "true")]).await;
    let mut c = Connection::connect(srv.addr).await.unwrap();
    // Not kept: a failure of a function without dead_letter, and a foreground failure.
    c.submit_background(&Job::new("plain", "a").unique("p-1"))
        .await
        .unwrap();
    common::fail_jobs(srv.addr, "plain", 1).await;
    let fg = tokio::spawn({
        let addr = srv.addr;
        async move {
            let mut c = Connection::connect(addr).await.unwrap();
            c.submit(&Job::new("dlf", "foreground").unique("f-1"))
                .await
                .unwrap()
        }
    });
    wait_running(srv.addr, "dlf", 0).await;
    common::fail_jobs(srv.addr, "dlf", 1).await;
    fg.await.unwrap();
    // Kept: a background WORK_FAIL of a dead_letter function.
    c.submit_background(&Job::new("dlf", "bg-payload").unique("b-1"))
        .await
        .unwrap();
    common::fail_jobs(srv.addr, "dlf", 1).await;
    // The store applies letters in order, so once this one is there the others would be too.
    let l = wait_letters(srv.http, "", |l| !l.is_empty()).await;
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(
        (l[0]["function"].as_str(), l[0]["reason"].as_str()),
        (Some("dlf"), Some("fail"))
    );
    assert_eq!(l[0]["payload"], "bg-payload");
    assert_eq!(l[0]["attempts"], 1);
    assert_eq!(l[0]["persisted"], false, "no memcached: in memory only");
    let id = l[0]["id"].as_u64().unwrap();
    let (status, body) = http(srv.http, "DELETE", &format!("/api/v1/dead-letters/{id}")).await;
    assert_eq!(status, 204, "{body}");
    assert!(letters(srv.http, "").await.is_empty());
    assert_eq!(
        http(srv.http, "DELETE", &format!("/api/v1/dead-letters/{id}"))
            .await
            .0,
        404
    );
    assert_eq!(c.admin("show dead").await.unwrap().trim_end(), ".");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caps_evict_the_oldest_letters_and_count_them() {
    // By count; retry and delete are refused outside server.admin_networks.
    let srv = TestServer::start(&[
        ("GEARHOUSE_FUNCTIONS__CAPPED__DEAD_LETTER", "true"),
        ("GEARHOUSE_DEAD_LETTERS__MAX_COUNT", "3"),
        ("GEARHOUSE_SERVER__ADMIN_NETWORKS", "10.0.0.0/8"),
    ])
    .await;
    let mut c = Connection::connect(srv.addr).await.unwrap();
    for i in 1..=5 {
        c.submit_background(&Job::new("capped", &format!("job-{i}")).unique(&format!("c-{i}")))
            .await
            .unwrap();
    }
    common::fail_jobs(srv.addr, "capped", 5).await;
    let l = wait_letters(srv.http, "", |l| {
        l.last().is_some_and(|d| d["payload"] == "job-5")
    })
    .await;
    let payloads: Vec<&str> = l.iter().map(|d| d["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["job-3", "job-4", "job-5"]);
    assert_eq!(
        metric(srv.http, "gearhouse_dead_letters_evicted_total").await,
        2.0
    );
    assert_eq!(metric(srv.http, "gearhouse_dead_letters ").await, 3.0);
    let id = l[0]["id"].as_u64().unwrap();
    let (status, body) = http(srv.http, "DELETE", &format!("/api/v1/dead-letters/{id}")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("server.admin_networks"), "{body}");
    assert_eq!(
        http(
            srv.http,
            "POST",
            &format!("/api/v1/dead-letters/{id}/retry")
        )
        .await
        .0,
        403
    );
    assert_eq!(letters(srv.http, "").await.len(), 3);
    srv.stop().await;

    // By bytes: each letter carries a 1000-byte payload; 2500 bytes hold two.
    let srv = TestServer::start(&[
        ("GEARHOUSE_FUNCTIONS__HEAVY__DEAD_LETTER", "true"),
        ("GEARHOUSE_DEAD_LETTERS__MAX_BYTES", "2500"),
    ])
    .await;
    let mut c = Connection::connect(srv.addr).await.unwrap();
    let payload = "x".repeat(1000);
    for i in 1..=3 {
        c.submit_background(&Job::new("heavy", &payload).unique(&format!("h-{i}")))
            .await
            .unwrap();
    }
    common::fail_jobs(srv.addr, "heavy", 3).await;
    let l = wait_letters(srv.http, "", |l| {
        l.last().is_some_and(|d| d["unique"] == "h-3")
    })
    .await;
    let uniques: Vec<&str> = l.iter().map(|d| d["unique"].as_str().unwrap()).collect();
    assert_eq!(uniques, ["h-2", "h-3"]);
    assert_eq!(
        metric(srv.http, "gearhouse_dead_letters_evicted_total").await,
        1.0
    );
    srv.stop().await;
}

/// The real binary with memcached, killed with SIGKILL once its letter is persisted: the
/// letter is there after the restart, with its id, and new letters are numbered after it.
#[test]
fn dead_letters_survive_kill_9() {
    let mc = Memcached::start(64, &[]);
    let env = [("GEARHOUSE_FUNCTIONS__DURABLE__DEAD_LETTER", "true")];
    let args = ["--node-id", "dl", "--memcached", &mc.addr()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut srv = BinServer::start(&args, &env);
    let (addr, http_addr) = (srv.addr(), srv.http_addr());
    let first = rt.block_on(async {
        let mut c = Connection::connect(addr).await.unwrap();
        c.submit_background(&Job::new("durable", "keep me").unique("k-1"))
            .await
            .unwrap();
        common::fail_jobs(addr, "durable", 1).await;
        wait_letters(http_addr, "", |l| l.len() == 1 && l[0]["persisted"] == true).await
    });
    srv.kill9();

    let srv = BinServer::start(&args, &env);
    let (addr, http_addr) = (srv.addr(), srv.http_addr());
    rt.block_on(async {
        let l = letters(http_addr, "").await;
        assert_eq!(l.len(), 1, "{}", srv.log_text());
        for k in [
            "id", "function", "handle", "unique", "payload", "attempts", "reason", "worker", "time",
        ] {
            assert_eq!(l[0][k], first[0][k], "{k}");
        }
        let mut c = Connection::connect(addr).await.unwrap();
        c.submit_background(&Job::new("durable", "second").unique("k-2"))
            .await
            .unwrap();
        common::fail_jobs(addr, "durable", 1).await;
        let l = wait_letters(http_addr, "", |l| l.len() == 2).await;
        assert_eq!(
            l[1]["id"].as_u64(),
            Some(first[0]["id"].as_u64().unwrap() + 1)
        );
    });
}
