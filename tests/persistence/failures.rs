//! memcached failing under the durable queue: nodes lost, down at start-up, out of memory or
//! refusing items, restarted empty, able to evict; and `accept_in_memory`.

use super::*;

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
