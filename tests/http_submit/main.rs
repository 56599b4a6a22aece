//! Job submission over HTTP against the real server: `curl` (Debian's) and reqwest as HTTP
//! clients, the `gearman` CLI and the crate's own worker as workers, a real memcached for the
//! durable path, and the binary started as `gearmand -r http` for gearmand's HTTP protocol.
//!
//! One test binary: this file holds the helpers and most tests; `keep_alive.rs` what a
//! kept-alive connection gives (many clients at once, one engine connection per HTTP
//! connection, never a timed-out job's result on the next request).

#[path = "../common/mod.rs"]
mod common;
mod keep_alive;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client, free_port, http_get, wait_ready, BinServer, Conn, Memcached, TestServer};
use gearhouse::protocol::GrabKind;

/// What `curl` got: status, headers (lower-case names, the last answer's), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    /// curl's own stderr (`-v` output when asked for).
    stderr: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs `curl` with `args` (plus `-sS`, headers and body captured) in a blocking thread.
async fn curl(args: Vec<String>) -> Answer {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let (h, b) = (dir.path().join("h"), dir.path().join("b"));
        let out = Command::new("curl")
            .arg("-sS")
            .arg("-D")
            .arg(&h)
            .arg("-o")
            .arg(&b)
            .args(&args)
            .output()
            .expect("curl must be installed (scripts/install-test-deps.sh)");
        let heads = std::fs::read_to_string(&h).unwrap_or_default();
        // The last answer's block (a 100 Continue may come first).
        let block = heads
            .split("\r\n\r\n")
            .filter(|b| b.starts_with("HTTP/"))
            .last()
            .unwrap_or("");
        let mut lines = block.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Answer {
            status,
            headers,
            body: std::fs::read(&b).unwrap_or_default(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `curl -X POST http://HTTP/PATH --data-binary BODY -H ...`.
async fn post(http: SocketAddr, path: &str, body: &str, headers: &[&str]) -> Answer {
    let mut a = s(&["-X", "POST", "--data-binary", body]);
    for h in headers {
        a.extend(s(&["-H", h]));
    }
    a.push(format!("http://{http}{path}"));
    curl(a).await
}

/// The `gearman` CLI as a worker running `cmd` for `func`; killed on drop.
struct CliWorker(Child);

impl CliWorker {
    fn start(addr: SocketAddr, func: &str, cmd: &[&str]) -> CliWorker {
        let child = Command::new("gearman")
            .args(["-w", "-h", "127.0.0.1", "-p", &addr.port().to_string()])
            .args(["-f", func, "--"])
            .args(cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gearman (gearman-tools, scripts/install-test-deps.sh)");
        CliWorker(child)
    }
}

impl Drop for CliWorker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the crate's worker does with a job.
#[derive(Clone, Copy)]
enum Act {
    Upper,
    Fail,
    Throw,
}

/// A worker on the crate's client: CAN_DO `func`, then handle jobs as `act` says, forever.
fn spawn_worker(addr: SocketAddr, func: &'static str, act: Act) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut w = client(addr).await;
        w.can_do(func.as_bytes()).await.unwrap();
        loop {
            let Some(job) = w.grab(GrabKind::Uniq).await.unwrap() else {
                w.pre_sleep().await.unwrap();
                w.wait_noop().await.unwrap();
                continue;
            };
            match act {
                Act::Upper => w
                    .complete(&job.handle, &job.data.to_ascii_uppercase())
                    .await
                    .unwrap(),
                Act::Fail => w.fail(&job.handle).await.unwrap(),
                Act::Throw => w.exception(&job.handle, b"it broke").await.unwrap(),
            }
        }
    })
}

/// Jobs (queued + running) of `func` from the admin `status` command.
async fn jobs_of(addr: SocketAddr, func: &str) -> u64 {
    let mut c = Conn::connect(addr).await;
    c.admin("status")
        .await
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[0] == func).then(|| f[1].parse().unwrap())
        })
        .unwrap_or(0)
}

async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A metric's value from /metrics (sum over the label sets containing `labels`).
async fn metric(http: SocketAddr, name: &str, labels: &str) -> f64 {
    let (_, body) = http_get(http, "/metrics").await.unwrap();
    body.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_answers_with_the_result_and_background_with_the_handle() {
    let server = TestServer::start(&[]).await;
    let _w = CliWorker::start(server.addr, "upper", &["tr", "a-z", "A-Z"]);

    let a = post(server.http, "/jobs/upper", "hello http", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.text(), "HELLO HTTP");
    assert_eq!(a.header("x-gearman-command"), "WORK_COMPLETE");
    assert!(
        a.header("x-gearman-job-handle").starts_with("H:test:"),
        "{a:?}"
    );

    let a = post(
        server.http,
        "/jobs/upper",
        "later",
        &["X-Gearman-Background: true", "X-Gearman-Priority: high"],
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    assert_eq!(a.header("x-gearman-command"), "JOB_CREATED");
    let handle = a.header("x-gearman-job-handle").to_string();
    assert_eq!(a.text(), handle);
    // The worker runs it: the job leaves the queue and its status becomes unknown.
    eventually("the background job to run", || async {
        jobs_of(server.addr, "upper").await == 0
    })
    .await;
    let st = curl(vec![format!("http://{}/jobs/{handle}", server.http)]).await;
    assert_eq!(st.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&st.body).unwrap();
    assert_eq!(v["known"], false, "{v}");
    assert_eq!(
        metric(
            server.http,
            "gearhouse_http_job_requests_total",
            "route=\"submit\",status=\"202\""
        )
        .await,
        1.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_running_job_is_get_status_as_json() {
    let server = TestServer::start(&[]).await;
    let a = post(
        server.http,
        "/jobs/slow",
        "x",
        &["X-Gearman-Background: true"],
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let handle = a.header("x-gearman-job-handle").to_string();
    let url = format!("http://{}/jobs/{handle}", server.http);
    let v: serde_json::Value = serde_json::from_slice(&curl(vec![url.clone()]).await.body).unwrap();
    assert_eq!(
        (v["known"].as_bool(), v["running"].as_bool()),
        (Some(true), Some(false)),
        "{v}"
    );
    let mut w = client(server.addr).await;
    w.can_do(b"slow").await.unwrap();
    let job = w.grab(GrabKind::Uniq).await.unwrap().expect("the job");
    assert_eq!(job.handle.as_ref(), handle.as_bytes());
    w.status(&job.handle, 3, 7).await.unwrap();
    eventually("the status to show 3/7", || {
        let url = url.clone();
        async move {
            let v: serde_json::Value = serde_json::from_slice(&curl(vec![url]).await.body).unwrap();
            v["running"] == true && v["numerator"] == 3 && v["denominator"] == 7
        }
    })
    .await;
    w.complete(&job.handle, b"done").await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_excepted_jobs_get_502_with_the_command_named() {
    let server = TestServer::start(&[]).await;
    spawn_worker(server.addr, "fails", Act::Fail);
    spawn_worker(server.addr, "throws", Act::Throw);
    let a = post(server.http, "/jobs/fails", "x", &[]).await;
    assert_eq!(a.status, 502, "{a:?}");
    assert_eq!(a.header("x-gearman-command"), "WORK_FAIL");
    assert!(a.text().contains("WORK_FAIL"), "{a:?}");
    let a = post(server.http, "/jobs/throws", "x", &[]).await;
    assert_eq!(a.status, 502, "{a:?}");
    assert_eq!(a.header("x-gearman-command"), "WORK_EXCEPTION");
    assert_eq!(a.text(), "it broke");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_result_in_time_is_504_and_the_unstarted_job_is_cancelled() {
    let server = TestServer::start(&[("GEARHOUSE_HTTP__JOB_TIMEOUT_MS", "60000")]).await;
    let t0 = Instant::now();
    let a = post(
        server.http,
        "/jobs/nobody",
        "x",
        &["X-Gearman-Timeout: 300"],
    )
    .await;
    assert_eq!(a.status, 504, "{a:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "X-Gearman-Timeout was not used"
    );
    assert!(a.header("x-gearman-job-handle").starts_with("H:test:"));
    assert!(a.text().contains("300 ms"), "{a:?}");
    eventually("the job to be cancelled", || async {
        jobs_of(server.addr, "nobody").await == 0
    })
    .await;
    let a = post(
        server.http,
        "/jobs/nobody",
        "x",
        &["X-Gearman-Timeout: soon"],
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_unstarted_job() {
    let server = TestServer::start(&[]).await;
    let a = curl(s(&[
        "-X",
        "POST",
        "--data-binary",
        "x",
        "--max-time",
        "0.5",
        &format!("http://{}/jobs/abandoned", server.http),
    ]))
    .await;
    assert_eq!(a.status, 0, "curl gave up before any answer: {a:?}");
    eventually("the abandoned job to be cancelled", || async {
        jobs_of(server.addr, "abandoned").await == 0
    })
    .await;
    eventually("the hang-up to be counted as 499", || async {
        metric(
            server.http,
            "gearhouse_http_job_requests_total",
            "route=\"submit\",status=\"499\"",
        )
        .await
            == 1.0
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_distinct_statuses() {
    let server = TestServer::start(&[("GEARHOUSE_SERVER__MAX_PACKET_SIZE", "2048")]).await;
    // Over the packet limit: 413, whether the length is declared or not.
    let big = "y".repeat(3000);
    let a = post(server.http, "/jobs/f", &big, &[]).await;
    assert_eq!(a.status, 413, "{a:?}");
    assert!(a.text().contains("server.max_packet_size"), "{a:?}");
    let a = post(
        server.http,
        "/jobs/f",
        &big,
        &["Transfer-Encoding: chunked"],
    )
    .await;
    assert_eq!(a.status, 413, "chunked: {a:?}");
    // Bad function names: too long, NUL.
    let long = "f".repeat(600);
    let a = post(server.http, &format!("/jobs/{long}"), "x", &[]).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.text().contains("server.max_function_len"), "{a:?}");
    let a = post(server.http, "/jobs/a%00b", "x", &[]).await;
    assert_eq!(a.status, 400, "{a:?}");
    let a = post(server.http, "/jobs/f", "x", &["X-Gearman-Priority: urgent"]).await;
    assert_eq!(a.status, 400, "{a:?}");
    // A full queue: 429 with Retry-After.
    let mut admin = Conn::connect(server.addr).await;
    assert_eq!(admin.admin("maxqueue full 1").await.trim(), "OK");
    let bg = ["X-Gearman-Background: true"];
    assert_eq!(post(server.http, "/jobs/full", "1", &bg).await.status, 202);
    let a = post(server.http, "/jobs/full", "2", &bg).await;
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.header("retry-after"), "1");
    assert!(a.text().contains("is full"), "{a:?}");
    assert_eq!(jobs_of(server.addr, "full").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_bound_answers_503() {
    let server = TestServer::start(&[("GEARHOUSE_HTTP__MAX_CONCURRENT_JOBS", "1")]).await;
    let http = server.http;
    let waiting =
        tokio::spawn(
            async move { post(http, "/jobs/held", "x", &["X-Gearman-Timeout: 3000"]).await },
        );
    eventually("the first request to be in flight", || async {
        metric(
            http,
            "gearhouse_http_job_requests_in_flight",
            "route=\"submit\"",
        )
        .await
            == 1.0
    })
    .await;
    let a = post(http, "/jobs/held", "y", &[]).await;
    assert_eq!(a.status, 503, "{a:?}");
    assert!(a.text().contains("http.max_concurrent_jobs"), "{a:?}");
    assert_eq!(waiting.await.unwrap().status, 504);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_admin_networks_a_token_is_needed() {
    let token = "0123456789abcdef0123";
    // Loopback is not an admin network here, so the test's requests come from "outside".
    let server = TestServer::start(&[
        ("GEARHOUSE_SERVER__ADMIN_NETWORKS", "10.0.0.0/8"),
        (
            "GEARHOUSE_HTTP__SUBMIT_TOKENS",
            &format!("othertoken-0000000,{token}"),
        ),
    ])
    .await;
    let bg = "X-Gearman-Background: true";
    let a = post(server.http, "/jobs/t", "x", &[bg]).await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.header("www-authenticate").starts_with("Bearer"), "{a:?}");
    let a = post(
        server.http,
        "/jobs/t",
        "x",
        &[bg, "Authorization: Bearer 0123456789abcdef0124"],
    )
    .await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.text().contains("not one of http.submit_tokens"), "{a:?}");
    let a = curl(vec![format!("http://{}/jobs/H:test:1", server.http)]).await;
    assert_eq!(a.status, 401, "status needs the token too: {a:?}");
    assert_eq!(jobs_of(server.addr, "t").await, 0);
    let auth = format!("Authorization: Bearer {token}");
    let a = post(server.http, "/jobs/t", "x", &[bg, &auth]).await;
    assert_eq!(a.status, 202, "{a:?}");
    // gearmand's paths follow the same rule.
    let a = post(server.http, "/t", "x", &[bg]).await;
    assert_eq!(a.status, 401, "{a:?}");
    let a = post(server.http, "/t", "x", &[bg, &auth]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(jobs_of(server.addr, "t").await, 2);
    server.stop().await;

    // No tokens configured (the default): refused from outside whatever is sent.
    let server = TestServer::start(&[("GEARHOUSE_SERVER__ADMIN_NETWORKS", "10.0.0.0/8")]).await;
    let a = post(server.http, "/jobs/t", "x", &[bg, &auth]).await;
    assert_eq!(a.status, 401, "{a:?}");
    server.stop().await;
}

/// Reads `key` from memcached with the ASCII protocol; `None` when it is absent.
fn memcached_get(addr: &str, key: &str) -> Option<Vec<u8>> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("get {key}\r\n").as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(b"END\r\n") {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "memcached closed");
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.starts_with(b"VALUE").then_some(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_job_is_durable_before_202() {
    let mc = Memcached::start(64, &["-M"]);
    let list = mc.addr();
    let start = move || {
        let list = list.clone();
        tokio::task::spawn_blocking(move || {
            BinServer::start(&["--node-id", "httpdur", "--memcached", &list], &[])
        })
    };
    let mut server = start().await.unwrap();
    let a = post(
        server.http_addr(),
        "/jobs/durable",
        "keep me",
        &["X-Gearman-Background: true", "X-Gearman-Unique: u1"],
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let handle = a.header("x-gearman-job-handle").to_string();
    let seq = handle.rsplit(':').next().unwrap();
    // Acknowledged means written: the record is in memcached now, before any crash.
    let record = memcached_get(&mc.addr(), &format!("gearhouse:httpdur:j:{seq}"));
    let record = record.expect("the job's record in memcached after 202");
    assert!(
        record.windows(7).any(|w| w == b"keep me"),
        "{:?}",
        String::from_utf8_lossy(&record)
    );
    server.kill9();
    let server = start().await.unwrap();
    let mut w = client(server.addr()).await;
    w.can_do(b"durable").await.unwrap();
    let job = w
        .grab(GrabKind::Uniq)
        .await
        .unwrap()
        .expect("the recovered job");
    assert_eq!(job.handle, Bytes::from(handle));
    assert_eq!(job.unique.as_ref(), b"u1");
    assert_eq!(job.data.as_ref(), b"keep me");
    w.complete(&job.handle, b"").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_durable_is_507() {
    // A memcached whose items cannot hold the job: the write is refused, so is the job.
    let mc = Memcached::start(64, &["-M", "-I", "2k", "-o", "slab_chunk_max=1024"]);
    let list = mc.addr();
    let server = tokio::task::spawn_blocking(move || {
        BinServer::start(&["--node-id", "http507", "--memcached", &list], &[])
    })
    .await
    .unwrap();
    let big = "z".repeat(4000);
    let a = post(
        server.http_addr(),
        "/jobs/big",
        &big,
        &["X-Gearman-Background: true"],
    )
    .await;
    assert_eq!(a.status, 507, "{a:?}");
    assert!(a.text().contains("memcached"), "{a:?}");
    assert_eq!(jobs_of(server.addr(), "big").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gearmand_paths_on_the_same_listener() {
    let server = TestServer::start(&[]).await;
    let _w = CliWorker::start(server.addr, "reverse", &["rev"]);
    // gearmand's POST /FUNCTION: 200 with the result and its headers.
    let a = post(server.http, "/reverse", "abc", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.text().trim_end(), "cba");
    assert_eq!(a.header("x-gearman-command"), "WORK_COMPLETE");
    assert!(a.header("x-gearman-job-handle").starts_with("H:test:"));
    // PUT too; a background job is 200 JOB_CREATED with an empty body.
    let a = curl(s(&[
        "-X",
        "PUT",
        "--data-binary",
        "xyz",
        "-H",
        "X-Gearman-Background: true",
        &format!("http://{}/nobody-home", server.http),
    ]))
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-gearman-command"), "JOB_CREATED");
    assert!(a.body.is_empty());
    // The default unique is "-": the same payload joins the queued job (one job, one handle).
    let b = post(
        server.http,
        "/nobody-home",
        "xyz",
        &["X-Gearman-Background: true"],
    )
    .await;
    assert_eq!(
        b.header("x-gearman-job-handle"),
        a.header("x-gearman-job-handle")
    );
    assert_eq!(jobs_of(server.addr, "nobody-home").await, 1);
    // WORK_FAIL is 200 as in gearmand, the command says what happened.
    spawn_worker(server.addr, "fails", Act::Fail);
    let a = post(server.http, "/fails", "x", &[]).await;
    assert_eq!(
        (a.status, a.header("x-gearman-command")),
        (200, "WORK_FAIL")
    );
    // gearhouse's own paths are not job paths.
    let a = post(server.http, "/api/v1/whatever", "x", &[]).await;
    assert_eq!(a.status, 404, "{a:?}");
    let (code, _) = http_get(server.http, "/healthz").await.unwrap();
    assert_eq!(code, 200);
    server.stop().await;
}

#[test]
fn started_as_gearmand_with_r_http_it_speaks_gearmands_http() {
    let dir = tempfile::tempdir().unwrap();
    let gearmand = dir.path().join("gearmand");
    std::os::unix::fs::symlink(common::binary(), &gearmand).unwrap();
    let (port, http) = (free_port(), free_port());
    let log = dir.path().join("log");
    let mut child = Command::new(&gearmand)
        .args(["-p", &port.to_string(), "-L", "127.0.0.1"])
        .args(["-r", "http", "--http-port", &http.to_string()])
        .args(["-l", "stderr", "--verbose", "INFO"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        let http_addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
        let gear: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        tokio::time::timeout(Duration::from_secs(60), wait_ready(http_addr))
            .await
            .map_err(|_| "not ready".to_string())?;
        let _w = CliWorker::start(gear, "upper", &["tr", "a-z", "A-Z"]);
        let a = curl(s(&[
            "--data-binary",
            "from a gearmand script",
            "-H",
            "X-Gearman-Unique: one",
            &format!("http://{http_addr}/upper"),
        ]))
        .await;
        Ok::<_, String>(a)
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let a = result.unwrap_or_else(|e| panic!("{e}; server log:\n{log}"));
    assert_eq!(a.status, 200, "{a:?}\n{log}");
    assert_eq!(a.text(), "FROM A GEARMAND SCRIPT");
    assert_eq!(a.header("x-gearman-command"), "WORK_COMPLETE");
    assert!(log.contains("gearmand's HTTP job paths"), "{log}");
}
