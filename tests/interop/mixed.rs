//! Several implementations at once on one server: coalescing across clients, status and
//! WORK_* callbacks across implementations, exceptions, crashed workers and load sharing.

use super::*;

/// Four foreground clients from three implementations (two PHP, Python gear, Perl) submit the
/// same (function, unique) before any worker: one job, one handle, one run, and every client
/// receives the result.
#[test]
fn unique_coalescing_across_clients_runs_once() {
    let srv = server();
    let (func, unique, payload) = ("coalesce", "coal-unique-7", "same payload");
    let php_a = php_client(srv.port, "tasks", &[func, "0", unique, payload]);
    let php_b = php_client(srv.port, "tasks", &[func, "0", unique, payload]);
    let py = py_client(srv.port, "fg", &[func, "normal", payload, unique]);
    let perl = perl_client(srv.port, "fg", &[func, "normal", payload, unique]);
    let deadline = Instant::now() + T;
    while waiting_clients(srv.port, unique) < 4 {
        assert!(
            Instant::now() < deadline,
            "4 clients never waited on {unique}: {}\n{}\n{}\n{}",
            php_a.diag(),
            php_b.diag(),
            py.diag(),
            perl.diag()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_row(srv.port, func), Some((1, 0, 0)));
    let created_a = php_a.wait_event("created");
    let created_b = php_b.wait_event("created");
    assert_eq!(created_a["handle"], created_b["handle"]);
    let handle = s(&created_a["handle"]).to_string();

    let worker = php_worker(srv.port, 0, &[&format!("{func}=reverse")]);
    let want = rev(payload);
    for p in [php_a, php_b] {
        let f = p.finish_ok();
        let c = f.one("complete");
        assert_eq!(c["data"], want.as_str(), "{}", f.diag());
        assert_eq!(c["handle"], handle.as_str(), "{}", f.diag());
        assert_eq!(c["unique"], unique, "{}", f.diag());
    }
    let f = py.finish_ok();
    let r = f.one("result");
    assert_eq!(r["handle"], handle.as_str(), "{}", f.diag());
    assert_eq!(r["data"], serde_json::json!([want]), "{}", f.diag());
    let f = perl.finish_ok();
    assert_eq!(f.one("result")["data"], want.as_str(), "{}", f.diag());

    wait_status(&srv, func, "drained", |r| r.0 == 0);
    let w = worker.kill9();
    let jobs = jobs_of(&w);
    assert_eq!(
        jobs.len(),
        1,
        "the worker must run the coalesced job once\n{}",
        w.diag()
    );
    assert_eq!(jobs[0]["handle"], handle.as_str());
    assert_eq!(jobs[0]["unique"], unique);
}

/// GET_STATUS through PHP jobStatus and Perl get_status (and GET_STATUS_UNIQUE through PHP
/// jobStatusByUniqueKey) for a running job that sent WORK_STATUS 1/4, and for a handle (unique)
/// the server never issued; Python gear's STATUS_RES handling likewise.
#[test]
fn status_of_running_and_unknown_jobs() {
    let srv = server();
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release-php");
    let worker = php_worker(srv.port, 1, &[&format!("held=hold:{}", release.display())]);
    let c = php_client(
        srv.port,
        "bg",
        &["held", "normal", "hold me", "held-unique"],
    )
    .finish_ok();
    let handle = s(&c.one("queued")["handle"]).to_string();
    let job = worker.wait_event("job");
    assert_eq!(job["handle"], handle.as_str(), "{}", worker.diag());

    // The worker printed its job line after sending WORK_STATUS on another connection, so ask
    // until the server has seen it.
    let want = (true, true, 1, 4);
    let st = php_status_until(srv.port, &handle, |v| v == want);
    assert_eq!(
        status_fields(&st.one("status")),
        want,
        "{}\n{}",
        st.diag(),
        worker.diag()
    );
    let js = format!("127.0.0.1:{}//{handle}", srv.port);
    let st = perl_client(srv.port, "status", &[&js]).finish_ok();
    assert_eq!(status_fields(&st.one("status")), want, "{}", st.diag());
    // GET_STATUS_UNIQUE through PHP's jobStatusByUniqueKey.
    let st = php_client(srv.port, "ustatus", &["held-unique"]).finish_ok();
    assert_eq!(status_fields(&st.one("status")), want, "{}", st.diag());
    let st = php_client(srv.port, "ustatus", &["no-such-unique"]).finish_ok();
    assert_eq!(
        status_fields(&st.one("status")),
        (false, false, 0, 0),
        "{}",
        st.diag()
    );
    let unknown = format!("H:{NODE}:987654321");
    let st = php_client(srv.port, "status", &[&unknown]).finish_ok();
    assert_eq!(
        status_fields(&st.one("status")),
        (false, false, 0, 0),
        "{}",
        st.diag()
    );

    std::fs::write(&release, b"go").unwrap();
    let w = worker.finish_ok();
    assert_eq!(w.one("exit")["jobs"], 1, "{}", w.diag());
    let st = php_status_until(srv.port, &handle, |v| !v.0);
    assert_eq!(
        status_fields(&st.one("status")),
        (false, false, 0, 0),
        "{}",
        st.diag()
    );

    // Python gear: its own GET_STATUS while its worker holds the job.
    let release = dir.path().join("release-py");
    let worker = py_worker(
        srv.port,
        1,
        &[&format!("pyheld=hold:{}", release.display())],
    );
    wait_status(&srv, "pyheld", "has a worker", |r| r.2 == 1);
    let c = py_client(srv.port, "status", &["pyheld", "python holds"]).finish_ok();
    let diag = format!("{}\n{}", c.diag(), worker.diag());
    assert_eq!(
        status_fields(&c.one("status")),
        (true, true, 1, 4),
        "{diag}"
    );
    assert_eq!(
        status_fields(&c.one("unknown")),
        (false, false, 0, 0),
        "{diag}"
    );
    std::fs::write(&release, b"go").unwrap();
    let w = worker.finish_ok();
    assert_eq!(
        w.one("job")["handle"],
        c.one("status")["handle"],
        "{}",
        w.diag()
    );
}

/// WORK_DATA, WORK_WARNING and WORK_STATUS from a worker reach the client's callbacks, in order,
/// across implementations: PHP client <- Python worker, Python client <- PHP worker, Perl client
/// <- Perl worker.
#[test]
fn data_warning_status_callbacks() {
    let srv = server();
    let py_w = py_worker(srv.port, 0, &["chat_py=chatty"]);
    let php_w = php_worker(srv.port, 0, &["chat_php=chatty"]);
    let perl_w = perl_worker(srv.port, 0, &["chat_perl=status"]);
    wait_status(&srv, "chat_py", "has a worker", |r| r.2 == 1);
    wait_status(&srv, "chat_php", "has a worker", |r| r.2 == 1);
    wait_status(&srv, "chat_perl", "has a worker", |r| r.2 == 1);

    let c = php_client(srv.port, "tasks", &["chat_py", "0", "", "hello"]).finish_ok();
    let ev: Vec<Value> = c
        .events()
        .into_iter()
        .filter(|v| v["ev"] != "done")
        .collect();
    let handle = ev[0]["handle"].clone();
    let got: Vec<(String, String)> = ev
        .iter()
        .map(|v| {
            assert_eq!(v["handle"], handle, "{}", c.diag());
            let detail = match s(&v["ev"]) {
                "status" => format!("{}/{}", v["num"], v["den"]),
                "created" => String::new(),
                _ => s(&v["data"]).to_string(),
            };
            (s(&v["ev"]).to_string(), detail)
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("created", ""),
        ("data", "d1"),
        ("warning", "w1"),
        ("status", "1/4"),
        ("data", "d2"),
        ("status", "4/4"),
        ("complete", "done:hello"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "{}\n{}", c.diag(), py_w.diag());

    let c = py_client(srv.port, "fg", &["chat_php", "normal", "abc"]).finish_ok();
    let r = c.one("result");
    assert_eq!(
        r["data"],
        serde_json::json!(["d1", "w1", "d2", "done:abc"]),
        "{}",
        c.diag()
    );
    assert_eq!(
        (&r["warning"], &r["failure"]),
        (&Value::Bool(true), &Value::Bool(false))
    );
    assert_eq!(
        (&r["num"], &r["den"]),
        (&Value::from("4"), &Value::from("4")),
        "{}",
        c.diag()
    );

    let c = perl_client(srv.port, "fg", &["chat_perl", "normal", "xyz"]).finish_ok();
    let ev = c.events();
    let statuses: Vec<(i64, i64)> = ev
        .iter()
        .filter(|v| v["ev"] == "status")
        .map(|v| (v["num"].as_i64().unwrap(), v["den"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        [(1, 4), (4, 4)],
        "{}\n{}",
        c.diag(),
        perl_w.diag()
    );
    assert_eq!(c.one("result")["data"], "done:xyz", "{}", c.diag());
    drop((py_w, php_w, perl_w));
}

/// A worker that fails or throws: clients that asked for exceptions (OPTION_REQ exceptions)
/// get WORK_EXCEPTION with its data; clients that did not get WORK_FAIL. PHP and Python gear
/// clients, PHP and Python gear workers.
#[test]
fn fail_and_exception_reach_clients_as_asked() {
    let srv = server();
    let php_w = php_worker(srv.port, 0, &["f_php=fail", "t_php=throw"]);
    let py_w = py_worker(srv.port, 0, &["f_py=fail", "t_py=throw"]);
    for f in ["f_php", "t_php", "f_py", "t_py"] {
        wait_status(&srv, f, "has a worker", |r| r.2 == 1);
    }
    // (client, function, exceptions?, expected outcome)
    let cases = [
        ("php", "t_py", "1", "exception"),
        ("php", "t_php", "1", "exception"),
        ("php", "f_php", "1", "fail"),
        ("php", "t_py", "0", "fail"),
        ("php", "t_php", "0", "fail"),
        ("php", "f_py", "0", "fail"),
        ("py", "t_php", "1", "exception"),
        ("py", "t_py", "1", "exception"),
        ("py", "f_py", "1", "fail"),
        ("py", "t_php", "0", "fail"),
        ("py", "f_php", "0", "fail"),
    ];
    let running: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, &(client, func, exc, _))| {
            let payload = format!("case{i}");
            match client {
                "php" => php_client(srv.port, "tasks", &[func, exc, "", &payload]),
                _ => py_client(srv.port, "exc", &[func, &payload, exc]),
            }
        })
        .collect();
    for (i, (p, &(client, func, exc, want))) in running.into_iter().zip(cases.iter()).enumerate() {
        let f = p.finish_ok();
        let ctx = format!("case {i}: {client} client, {func}, exceptions={exc}, want {want}");
        let boom = format!("boom:case{i}");
        if client == "php" {
            assert_eq!(f.all("complete").len(), 0, "{ctx}\n{}", f.diag());
            if want == "exception" {
                assert_eq!(
                    f.one("exception")["data"],
                    boom.as_str(),
                    "{ctx}\n{}",
                    f.diag()
                );
                assert_eq!(f.all("fail").len(), 0, "{ctx}\n{}", f.diag());
            } else {
                f.one("fail");
                assert_eq!(f.all("exception").len(), 0, "{ctx}\n{}", f.diag());
            }
        } else {
            let r = f.one("result");
            assert_eq!(r["failure"], true, "{ctx}\n{}", f.diag());
            let exc_data = if want == "exception" {
                Value::from(boom)
            } else {
                Value::Null
            };
            assert_eq!(r["exception"], exc_data, "{ctx}\n{}", f.diag());
        }
    }
    drop((php_w, py_w));
}

/// A worker takes a job and dies without answering (SIGKILL): the server requeues the job,
/// another worker (another implementation) completes it, and the waiting client gets the
/// result under the original handle. Foreground (PHP client) and background (gearman CLI).
#[test]
fn crashed_worker_job_is_requeued_and_completed() {
    let srv = server();
    let doomed = php_worker(srv.port, 1, &["crashy=hang"]);
    wait_status(&srv, "crashy", "has a worker", |r| r.2 == 1);
    let client = php_client(srv.port, "tasks", &["crashy", "0", "", "precious cargo"]);
    let taken = doomed.wait_event("job");
    assert_eq!(status_row(srv.port, "crashy"), Some((1, 1, 1)));
    let crashed = doomed.kill9();
    wait_status(&srv, "crashy", "requeued", |r| r == (1, 0, 0));

    let rescuer = py_worker(srv.port, 1, &["crashy=echo"]).finish_ok();
    let job = rescuer.one("job");
    assert_eq!(
        job["handle"],
        taken["handle"],
        "{}\n{}",
        crashed.diag(),
        rescuer.diag()
    );
    assert_eq!(job["workload"], "precious cargo", "{}", rescuer.diag());
    let c = client.finish_ok();
    assert_eq!(c.one("created")["handle"], taken["handle"], "{}", c.diag());
    let r = c.one("complete");
    assert_eq!(r["data"], "precious cargo", "{}", c.diag());
    assert_eq!(r["handle"], taken["handle"], "{}", c.diag());
    assert_eq!(c.all("fail").len(), 0, "{}", c.diag());
    wait_status(&srv, "crashy", "empty with no worker", |r| r == (0, 0, 0));

    // Background: the job survives its worker's crash too, and the dead worker's WORK_STATUS
    // does not outlive it (gearmand resets a requeued job's progress to 0/0).
    gearman(srv.port, &["-b", "-f", "crashy_bg", "background cargo"]).finish_ok();
    let never = std::env::temp_dir().join("gearhouse-interop-never-created");
    let doomed = php_worker(
        srv.port,
        1,
        &[&format!("crashy_bg=hold:{}", never.display())],
    );
    let taken = doomed.wait_event("job");
    let handle = s(&taken["handle"]).to_string();
    let st = php_status_until(srv.port, &handle, |v| v == (true, true, 1, 4));
    assert_eq!(
        status_fields(&st.one("status")),
        (true, true, 1, 4),
        "{}",
        st.diag()
    );
    doomed.kill9();
    wait_status(&srv, "crashy_bg", "requeued", |r| r == (1, 0, 0));
    let st = php_client(srv.port, "status", &[&handle]).finish_ok();
    assert_eq!(
        status_fields(&st.one("status")),
        (true, false, 0, 0),
        "{}",
        st.diag()
    );
    let rescuer = perl_worker(srv.port, 1, &["crashy_bg=echo"]).finish_ok();
    let job = rescuer.one("job");
    assert_eq!(job["handle"], taken["handle"], "{}", rescuer.diag());
    assert_eq!(job["workload"], "background cargo", "{}", rescuer.diag());
    wait_status(&srv, "crashy_bg", "drained", |r| r.0 == 0);
}

/// Four workers (two PHP, one Perl, one Python gear) share 200 foreground jobs from one PHP
/// client: every job is done exactly once, every result comes back, and the load is shared.
#[test]
fn many_workers_share_the_load() {
    let srv = server();
    let workers = vec![
        php_worker(srv.port, 0, &["share=sleep:5"]),
        php_worker(srv.port, 0, &["share=sleep:5"]),
        perl_worker(srv.port, 0, &["share=sleep:5"]),
        py_worker(srv.port, 0, &["share=sleep:5"]),
    ];
    wait_status(&srv, "share", "has 4 workers", |r| r.2 == 4);
    let payloads: Vec<String> = (0..200).map(|i| format!("job-{i:03}")).collect();
    let mut args = vec!["share", "0", ""];
    args.extend(payloads.iter().map(String::as_str));
    let c = php_client(srv.port, "tasks", &args).finish_within(Duration::from_secs(60));
    assert!(c.status.success(), "{}", c.diag());
    assert_eq!(c.one("done")["ok"], true, "{}", c.diag());
    let results: BTreeSet<String> = c
        .all("complete")
        .iter()
        .map(|v| s(&v["data"]).to_string())
        .collect();
    let want: BTreeSet<String> = payloads.iter().map(|p| format!("r:{p}")).collect();
    assert_eq!(c.all("complete").len(), 200, "{}", c.diag());
    assert_eq!(results, want, "{}", c.diag());
    wait_status(&srv, "share", "drained", |r| r.0 == 0);

    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_worker = Vec::new();
    for w in workers {
        let f = w.kill9();
        let jobs = jobs_of(&f);
        per_worker.push((f.label.clone(), jobs.len()));
        for j in jobs {
            *runs.entry(s(&j["workload"]).to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert_eq!(runs.len(), 200, "every job must have run: {per_worker:?}");
    let busy = per_worker.iter().filter(|(_, n)| *n > 0).count();
    assert!(busy >= 2, "only one worker did work: {per_worker:?}");
}
