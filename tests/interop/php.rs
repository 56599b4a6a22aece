//! PHP's GearmanClient and GearmanWorker (pecl-gearman on libgearman): the tutorial's flow,
//! priorities, CAN_DO_TIMEOUT, job retries, foreground clients joining background jobs and a
//! 10 MiB payload.

use super::*;

/// The Gearman tutorial: a PHP client queues `doBackground("testFunction", json)` before any
/// worker exists; a PHP GearmanWorker started afterwards receives exactly that payload.
#[test]
fn php_tutorial_background_job_waits_for_the_worker() {
    let srv = server();
    let payload = r#"{"email":"alice@example.com","id":42,"tags":["a","b"],"note":"h\u00e9"}"#;
    let c = php_client(srv.port, "bg", &["testFunction", "normal", payload]).finish_ok();
    let q = c.one("queued");
    let handle = s(&q["handle"]).to_string();
    assert!(
        handle.starts_with(&format!("H:{NODE}:")),
        "handle {handle}\n{}",
        c.diag()
    );
    assert_eq!(q["rc"], 0, "{}", c.diag());
    assert_eq!(status_row(srv.port, "testFunction"), Some((1, 0, 0)));

    let w = php_worker(srv.port, 1, &["testFunction=echo"]).finish_ok();
    let job = w.one("job");
    assert_eq!(job["func"], "testFunction", "{}", w.diag());
    assert_eq!(job["handle"], handle.as_str(), "{}", w.diag());
    assert_eq!(job["workload"], payload, "{}", w.diag());
    assert_eq!(w.one("exit")["jobs"], 1, "{}", w.diag());
    wait_status(&srv, "testFunction", "empty with no worker", |r| {
        r == (0, 0, 0)
    });
}

/// doHighBackground/doBackground/doLowBackground land in the right priority queues
/// (`gearadmin --priority-status`), doHigh/doNormal/doLow return the worker's results.
#[test]
fn php_all_priorities_background_and_foreground() {
    let srv = server();
    let mut handles = Vec::new();
    for prio in ["low", "normal", "high"] {
        let c = php_client(srv.port, "bg", &["prio_bg", prio, &format!("bg-{prio}")]).finish_ok();
        handles.push(s(&c.one("queued")["handle"]).to_string());
    }
    let ps = gearadmin(srv.port, "--priority-status");
    assert!(
        ps.lines.iter().any(|l| l == "prio_bg\t1\t1\t1\t0"),
        "one job at each priority expected\n{}",
        ps.diag()
    );

    let worker = php_worker(srv.port, 0, &["prio_bg=echo", "prio_fg=reverse"]);
    // The worker drains the queued background jobs high first.
    let events = worker.wait_for("the three background jobs", T, |e| {
        e.iter().filter(|v| v["func"] == "prio_bg").count() == 3
    });
    let bg: Vec<&Value> = events.iter().filter(|v| v["func"] == "prio_bg").collect();
    let order: Vec<&str> = bg.iter().map(|v| s(&v["workload"])).collect();
    assert_eq!(
        order,
        ["bg-high", "bg-normal", "bg-low"],
        "{}",
        worker.diag()
    );
    assert_eq!(bg[0]["handle"], handles[2].as_str(), "{}", worker.diag());
    assert_eq!(bg[2]["handle"], handles[0].as_str(), "{}", worker.diag());

    for prio in ["high", "normal", "low"] {
        let payload = format!("foreground at {prio} priority");
        let c = php_client(srv.port, "do", &["prio_fg", prio, &payload]).finish_ok();
        let r = c.one("result");
        assert_eq!(r["rc"], 0, "{}", c.diag());
        assert_eq!(r["data"], rev(&payload), "{}\n{}", c.diag(), worker.diag());
    }
    let ps = gearadmin(srv.port, "--priority-status");
    assert!(
        ps.lines.iter().any(|l| l == "prio_bg\t0\t0\t0\t1"),
        "{}",
        ps.diag()
    );
    assert!(
        ps.lines.iter().any(|l| l == "prio_fg\t0\t0\t0\t1"),
        "{}",
        ps.diag()
    );
}

/// PHP's `addFunction(name, cb, ctx, timeout)` (libgearman CAN_DO_TIMEOUT): the documented unit is
/// seconds, gearmand 1.1.20 reads milliseconds and raises anything under 1000 to 1000. So a
/// worker registered with timeout 1 that takes 300 ms must finish normally (not be requeued
/// after 1 ms), and one that takes longer than a second loses the job to another worker.
#[test]
fn php_worker_timeout_has_gearmands_one_second_floor() {
    let srv = server();
    let w = php_worker(srv.port, 1, &["tq@1=sleep:300"]);
    wait_status(&srv, "tq", "has a worker", |r| r.2 == 1);
    let c = php_client(srv.port, "tasks", &["tq", "0", "", "in time"]);
    let w = w.finish_ok();
    assert_eq!(w.one("exit")["jobs"], 1, "{}", w.diag());
    let c = c.finish_ok();
    assert_eq!(c.one("complete")["data"], "r:in time", "{}", c.diag());

    // Past the floor the job fails, as the protocol text says: the PHP client's fail callback
    // runs about a second after the worker took the job (gearmand 1.1 requeues it, and a worker
    // slower than its timeout would take it again and again), and nothing is left queued.
    let slow = php_worker(srv.port, 1, &["tl@1=sleep:4000"]);
    wait_status(&srv, "tl", "has a worker", |r| r.2 == 1);
    let c = php_client(srv.port, "tasks", &["tl", "0", "", "too slow"]);
    let taken = slow.wait_event("job");
    let at = Instant::now();
    let c = c.finish_ok();
    let waited = at.elapsed();
    let failed = c.one("fail");
    assert_eq!(failed["handle"], taken["handle"], "{}", c.diag());
    assert!(
        waited < Duration::from_secs(3),
        "failed only after {waited:?}"
    );
    assert_eq!(
        status_row(srv.port, "tl").map(|r| r.1),
        Some(0),
        "requeued\n{}",
        srv.log_text()
    );
    assert!(
        srv.log_text().contains("passed its CAN_DO_TIMEOUT"),
        "{}",
        srv.log_text()
    );
}

/// With `--job-retries 2`, a job whose worker crashes once is requeued; when its second worker
/// crashes too it is dropped and the waiting PHP client gets WORK_FAIL (not a hang).
#[test]
fn job_retries_limit_fails_the_waiting_client() {
    let srv = BinServer::start(&["--node-id", NODE, "--job-retries", "2"], &[]);
    let client = php_client(srv.port, "tasks", &["doomed", "0", "", "cursed"]);
    client.wait_event("created");
    for attempt in 1..=2 {
        let w = php_worker(srv.port, 1, &["doomed=hang"]);
        let job = w.wait_event("job");
        assert_eq!(job["workload"], "cursed", "attempt {attempt}\n{}", w.diag());
        w.kill9();
        if attempt == 1 {
            wait_status(&srv, "doomed", "requeued after one crash", |r| {
                r == (1, 0, 0)
            });
        }
    }
    let c = client.finish_ok();
    c.one("fail");
    assert_eq!(c.all("complete").len(), 0, "{}", c.diag());
    wait_status(&srv, "doomed", "dropped", |r| r == (0, 0, 0));
}

/// A foreground client that joins a queued background job (same function and unique) and then
/// disconnects does not take the job with it; the next foreground client to join receives the
/// background job's result.
#[test]
fn foreground_clients_joining_a_background_job() {
    let srv = server();
    let (func, unique) = ("mixed", "mixed-unique");
    let c = php_client(srv.port, "bg", &[func, "normal", "bg payload", unique]).finish_ok();
    let handle = c.one("queued")["handle"].clone();

    let quitter = php_client(srv.port, "tasks", &[func, "0", unique, "ignored 1"]);
    assert_eq!(quitter.wait_event("created")["handle"], handle);
    assert_eq!(waiting_clients(srv.port, unique), 1);
    quitter.kill9();
    let deadline = Instant::now() + T;
    while waiting_clients(srv.port, unique) != 0 {
        assert!(Instant::now() < deadline, "the killed client still waits");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        status_row(srv.port, func),
        Some((1, 0, 0)),
        "the job must survive"
    );

    let joiner = php_client(srv.port, "tasks", &[func, "0", unique, "ignored 2"]);
    assert_eq!(joiner.wait_event("created")["handle"], handle);
    let w = php_worker(srv.port, 1, &[&format!("{func}=reverse")]).finish_ok();
    assert_eq!(w.one("job")["workload"], "bg payload", "{}", w.diag());
    let j = joiner.finish_ok();
    let done = j.one("complete");
    assert_eq!(done["handle"], handle, "{}", j.diag());
    assert_eq!(done["data"], "daolyap gb", "{}", j.diag());
    wait_status(&srv, func, "drained", |r| r == (0, 0, 0));
}

/// A 10 MiB binary payload (every byte value, NULs included) through a PHP client and a PHP
/// worker that returns it reversed: the worker's hash of what it received equals the client's
/// hash of what it sent, and the result is byte-exact.
#[test]
fn ten_mib_payload_round_trip() {
    let srv = server();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let data: Vec<u8> = (0..10 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&input, &data).unwrap();
    let worker = php_worker(srv.port, 1, &["big=reverse"]);
    let c = php_client(
        srv.port,
        "file",
        &["big", &input.to_string_lossy(), &output.to_string_lossy()],
    )
    .finish_within(Duration::from_secs(60));
    assert!(c.status.success(), "{}\n{}", c.diag(), worker.diag());
    let w = worker.finish_ok();
    let r = c.one("result");
    let job = w.one("job");
    assert_eq!(r["rc"], 0, "{}", c.diag());
    assert_eq!(r["sent_size"], data.len(), "{}", c.diag());
    assert_eq!(job["size"], data.len(), "{}", w.diag());
    assert_eq!(
        job["sha"], r["sent_sha"],
        "worker received other bytes than sent"
    );
    assert_eq!(r["size"], data.len(), "{}", c.diag());
    let got = std::fs::read(&output).unwrap();
    let mut want = data;
    want.reverse();
    assert!(
        got == want,
        "result differs from the reversed payload ({} bytes)",
        got.len()
    );
}
