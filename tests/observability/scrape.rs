//! A real Prometheus (Debian's package) scraping the real binary: every dashboard query returns
//! data; `promtool` checks `/metrics` and runs the alert rules' tests.

use super::*;

fn dashboards_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// Prometheus (Debian's package) on loopback with a temporary store; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus with `dashboards/prometheus.yml`, its target pointed at `target`, the
    /// scrape and evaluation interval at 1 s, and the rule file by absolute path.
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let example = std::fs::read_to_string(dashboards_dir().join("prometheus.yml")).unwrap();
        let rules = dashboards_dir().join("alerts.yml");
        let cfg = example
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
            .replace("\"127.0.0.1:4731\"", &format!("\"{target}\""))
            .replace("  - alerts.yml", &format!("  - {}", rules.display()));
        assert!(
            cfg.contains(&target.to_string()),
            "the example scrapes 127.0.0.1:4731"
        );
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus must be installed (scripts/install-test-deps.sh)");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http10_get(addr, "/-/ready").await.map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    /// Runs an instant query; returns the result vector.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (code, body) = http10_get(self.addr, &path)
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer {expr}"));
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{expr}: {e}: HTTP {code} {body}"));
        assert_eq!(v["status"], "success", "{expr}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    async fn get_json(&self, path: &str) -> serde_json::Value {
        let (_, body) = http10_get(self.addr, path)
            .await
            .expect("prometheus answers");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

/// HTTP/1.0 GET (no chunked encoding to undo): (status, body).
async fn http10_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query expression of the dashboard: (panel title, expr).
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Runs `promtool` with `args` (and `stdin`), returns its output; panics with it on failure.
fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/install-test-deps.sh)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// A worker that completes most jobs, fails every 5th and raises an exception on every 7th
/// (by the number in the payload), until `stop`.
async fn busy_worker(
    addr: SocketAddr,
    func: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut w = worker(addr, "dash-worker", func).await;
    while !stop.load(Ordering::Relaxed) {
        w.send(GRAB_JOB_UNIQ, &[]).await;
        let r = w.recv().await;
        match r.kind {
            JOB_ASSIGN_UNIQ => {
                let h = r.arg(0);
                let n: u64 = r.arg(3).parse().unwrap_or(0);
                w.send(WORK_STATUS, &[h.as_bytes(), b"1", b"2"]).await;
                if n % 7 == 3 {
                    w.send(WORK_EXCEPTION, &[h.as_bytes(), b"boom"]).await;
                } else if n % 5 == 4 {
                    w.send(WORK_FAIL, &[h.as_bytes()]).await;
                } else {
                    w.send(WORK_COMPLETE, &[h.as_bytes(), r.arg(3).as_bytes()])
                        .await;
                }
            }
            NO_JOB => {
                w.send(PRE_SLEEP, &[]).await;
                let _ = w.recv_timeout(Duration::from_millis(100)).await;
            }
            NOOP => {}
            other => panic!("worker got {other:?}"),
        }
    }
}

async fn finished_jobs(http: SocketAddr, func: &str) -> f64 {
    let mut n = 0.0;
    for m in [
        "gearhouse_jobs_completed_total",
        "gearhouse_jobs_failed_total",
        "gearhouse_jobs_exceptions_total",
    ] {
        n += metric_where(http, m, &[("function", func)]).await;
    }
    n
}

/// A real Prometheus scrapes the real binary (with a real memcached mirror and a real OTLP
/// receiver) while jobs flow; every query of the Grafana dashboard returns data; the alert
/// rules load and evaluate on the live series; `promtool check metrics` accepts `/metrics`;
/// `promtool check rules` and `promtool test rules` pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_every_dashboard_query_returns_data() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const F: &str = "resize";
    let mc_a = common::Memcached::start(64, &["-M"]);
    let mc_b = common::Memcached::start(64, &[]);
    let nodes = format!("{},{}", mc_a.addr(), mc_b.addr());
    let rx = otlp_receiver(Behaviour::Accept).await;
    let endpoint = format!("http://{}", rx.addr);
    let server = BinServer::start(
        &["--memcached", &nodes],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // The persist span of an ordinary job is checked below: keep every trace.
            ("OTEL_TRACES_SAMPLER", "always_on"),
            // A limit that never holds anything, so the per-function limit panels have series.
            ("GEARHOUSE_FUNCTIONS__RESIZE__MAX_RUNNING", "1000"),
        ],
    );
    let (addr, http) = (server.addr(), server.http_addr());
    let prom = Prometheus::start(http).await;

    let mut client = Conn::connect(addr).await;
    client.send(SET_CLIENT_ID, &[b"dash-client"]).await;
    let mut admin = Conn::connect(addr).await;
    // A refused submit: the queue of `resize` is full.
    assert_eq!(admin.admin(&format!("maxqueue {F} 2")).await, "OK\r\n");
    client.submit(SUBMIT_JOB_BG, F, "", b"0").await;
    client.submit(SUBMIT_JOB_BG, F, "", b"0").await;
    client.send(SUBMIT_JOB_BG, &[F.as_bytes(), b"", b"0"]).await;
    let refused = client.expect(ERROR).await;
    assert_eq!(refused.arg(0), "QUEUE_ERROR");
    assert_eq!(admin.admin(&format!("maxqueue {F} 0")).await, "OK\r\n");
    // A coalesced submit.
    let h1 = client.submit(SUBMIT_JOB_BG, F, "same", b"0").await;
    let h2 = client.submit(SUBMIT_JOB_BG, F, "same", b"0").await;
    assert_eq!(h1, h2);
    // A retry: a worker takes a job and dies.
    let mut flaky = worker(addr, "flaky", F).await;
    grab(&mut flaky).await;
    drop(flaky);
    // An epoch job for tomorrow, and jobs of a function nobody works on.
    let tomorrow = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86_400)
        .to_string();
    client
        .send(
            SUBMIT_JOB_EPOCH,
            &[F.as_bytes(), b"", tomorrow.as_bytes(), b"0"],
        )
        .await;
    client.expect(JOB_CREATED).await;
    client.submit(SUBMIT_JOB_BG, "orphan", "", b"0").await;
    client.submit(SUBMIT_JOB_LOW_BG, "orphan", "", b"0").await;
    // A protocol error on its own connection, and admin commands.
    let mut bad = Conn::connect(addr).await;
    bad.send(JOB_CREATED, &[b"H:x:1"]).await;
    bad.expect(ERROR).await;
    admin.admin("status").await;
    admin.admin("workers").await;

    // Traffic: foreground and background jobs at every priority for about 3 s.
    let stop = Arc::new(AtomicBool::new(false));
    let worker_task = tokio::spawn(busy_worker(addr, F, stop.clone()));
    let mut fg = Conn::connect(addr).await;
    const JOBS: usize = 150;
    for i in 0..JOBS {
        let n = i.to_string();
        let bg = i % 2 == 1;
        let kind = match (i % 3, bg) {
            (0, false) => SUBMIT_JOB_HIGH,
            (1, false) => SUBMIT_JOB,
            (_, false) => SUBMIT_JOB_LOW,
            (0, true) => SUBMIT_JOB_HIGH_BG,
            (1, true) => SUBMIT_JOB_BG,
            (_, true) => SUBMIT_JOB_LOW_BG,
        };
        if bg {
            client.submit(kind, F, "", n.as_bytes()).await;
        } else {
            fg.submit(kind, F, "", n.as_bytes()).await;
            loop {
                let r = fg.recv().await;
                if matches!(r.kind, WORK_COMPLETE | WORK_FAIL) {
                    break;
                }
                assert_eq!(r.kind, WORK_STATUS);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 2 + 1 jobs before the loop (one of them retried once), JOBS in it; the epoch job waits.
    let total = (3 + JOBS) as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while finished_jobs(http, F).await < total {
        assert!(
            Instant::now() < deadline,
            "the worker did not finish the jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Prometheus has scraped the end of the traffic.
    let seen = format!(
        "sum(gearhouse_jobs_completed_total{{function=\"{F}\"}}) + sum(gearhouse_jobs_failed_total{{function=\"{F}\"}}) + sum(gearhouse_jobs_exceptions_total{{function=\"{F}\"}})"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = prom.query(&seen).await;
        let v: f64 = r
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if v >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the finished jobs ({v})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A durable job's trace has a span for its memcached write, before it was queued.
    let spans = trace_of(&rx, &h1, Duration::from_secs(10)).await;
    let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    let persist = spans
        .iter()
        .find(|s| s.name == format!("persist {F}"))
        .unwrap_or_else(|| panic!("no persist span: {spans:#?}"));
    assert_eq!(persist.parent_span_id, root.span_id);
    let first_wait = spans
        .iter()
        .filter(|s| s.name == format!("queue {F}"))
        .map(|s| s.start_time_unix_nano)
        .min()
        .unwrap();
    assert!(persist.start_time_unix_nano >= root.start_time_unix_nano);
    assert!(
        persist.end_time_unix_nano <= first_wait,
        "the job was queued once durable"
    );
    // Spans reached the collector, so the trace panels have data too.
    wait_metric(
        http,
        "gearhouse_trace_spans_exported_total",
        |v| v > 0.0,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // one more scrape for the rates

    // Every dashboard query returns at least one series.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dashboards_dir().join("gearhouse.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["schemaVersion"].as_i64().unwrap() >= 36);
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "function"]);
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 40, "{} queries", queries.len());
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        assert!(
            !expr.contains("$__interval") && !expr.contains("$__range"),
            "{title}: {expr}"
        );
        let q = expr
            .replace("$function", F)
            .replace("$__rate_interval", "1m");
        assert!(!q.contains('$'), "unsubstituted variable in {title}: {q}");
        if prom.query(&q).await.is_empty() {
            empty.push(format!("{title}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );
    // The function variable: label_values(gearman_jobs, function).
    let values = prom
        .get_json("/api/v1/label/function/values?match%5B%5D=gearman_jobs")
        .await;
    let values: Vec<&str> = values["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        values.contains(&F) && values.contains(&"orphan"),
        "{values:?}"
    );

    // The rules loaded, and evaluate on the live series: jobs of `orphan` wait with no worker.
    let rules = prom.get_json("/api/v1/rules").await;
    let loaded: BTreeSet<String> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        loaded,
        alert_names(),
        "Prometheus loaded every rule of alerts.yml"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alerts = prom.get_json("/api/v1/alerts").await;
        let pending: Vec<(String, String)> = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                    a["labels"]["function"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let want = (
            "GearhouseJobsQueuedWithoutWorkers".to_string(),
            "orphan".to_string(),
        );
        if pending.contains(&want) {
            assert!(
                !pending.iter().any(|(_, f)| f == F),
                "nothing fires for {F}, which has a worker: {pending:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alert for orphan not pending: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // promtool accepts the live /metrics.
    let (_, body) = http_get(http, "/metrics").await.unwrap();
    assert!(
        body.contains("gearhouse_memcached_node_up"),
        "persistence metrics are exported"
    );
    assert!(body.contains("process_resident_memory_bytes"));
    promtool(&["check", "metrics"], &dashboards_dir(), Some(&body));

    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), worker_task).await;
    drop((mc_a, mc_b));
}

/// Alert names defined in alerts.yml.
fn alert_names() -> BTreeSet<String> {
    std::fs::read_to_string(dashboards_dir().join("alerts.yml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|s| s.trim().to_string())
        .collect()
}

/// `promtool check rules` and `promtool test rules` pass, and every alert has a unit test
/// that fires it and one that shows it quiet.
#[test]
fn alert_rules_check_and_every_alert_has_firing_and_quiet_tests() {
    let dir = dashboards_dir();
    let out = promtool(&["check", "rules", "alerts.yml"], &dir, None);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "alerts.test.yml"], &dir, None);
    assert!(out.contains("SUCCESS"), "{out}");
    promtool(&["check", "config", "prometheus.yml"], &dir, None);

    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let mut firing: BTreeMap<String, usize> = BTreeMap::new();
    let mut quiet: BTreeMap<String, usize> = BTreeMap::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(name) = l.strip_prefix("alertname: ") {
            let next = lines.get(i + 1).copied().unwrap_or("");
            let which = if next == "exp_alerts: []" {
                &mut quiet
            } else {
                &mut firing
            };
            *which.entry(name.to_string()).or_default() += 1;
        }
    }
    for name in alert_names() {
        assert!(firing.contains_key(&name), "no test fires {name}");
        assert!(quiet.contains_key(&name), "no test shows {name} quiet");
    }
    assert_eq!(alert_names().len(), 15);
}
