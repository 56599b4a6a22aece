//! libgearman's command-line tools: `gearman` as client and worker (priorities, -n, -u) and
//! `gearadmin`'s view of the server in gearmand's formats.

use super::*;

/// Jobs queued (gearman CLI, -b with -L / none / -I) before any worker: one PHP worker receives
/// high first, then normal, then low, FIFO within each priority.
#[test]
fn priority_order_high_normal_low_fifo_within_each() {
    let srv = server();
    let mut submitted = Vec::new();
    for round in 1..=3 {
        for (prio, flags) in [
            ("low", &["-L"][..]),
            ("normal", &[][..]),
            ("high", &["-I"][..]),
        ] {
            let payload = format!("{prio}-{round}");
            let mut args = vec!["-b", "-f", "order"];
            args.extend_from_slice(flags);
            args.push(&payload);
            gearman(srv.port, &args).finish_ok();
            submitted.push(payload);
        }
    }
    let ps = gearadmin(srv.port, "--priority-status");
    assert!(
        ps.lines.iter().any(|l| l == "order\t3\t3\t3\t0"),
        "{}",
        ps.diag()
    );

    let w = php_worker(srv.port, 9, &["order=echo"]).finish_ok();
    let got = workloads(&jobs_of(&w));
    let want: Vec<String> = ["high", "normal", "low"]
        .iter()
        .flat_map(|p| (1..=3).map(move |r| format!("{p}-{r}")))
        .collect();
    assert_eq!(got, want, "submitted in order {submitted:?}\n{}", w.diag());
}

/// The gearman CLI as client and as worker: foreground jobs at -I, normal and -L return the
/// worker command's output, -n sends one job per input line, and two background submits with
/// the same -u coalesce into one job.
#[test]
fn gearman_cli_foreground_priorities_and_background_unique() {
    let srv = server();
    let worker = gearman(
        srv.port,
        &["-w", "-f", "upper", "-c", "3", "--", "tr", "a-z", "A-Z"],
    );
    wait_status(&srv, "upper", "has a worker", |r| r.2 == 1);
    for (flag, payload) in [
        ("-I", "high priority words"),
        ("", "normal words"),
        ("-L", "low words"),
    ] {
        let mut args = vec!["-f", "upper"];
        if !flag.is_empty() {
            args.push(flag);
        }
        args.push(payload);
        let c = gearman(srv.port, &args).finish_ok();
        assert_eq!(
            c.stdout().trim_end(),
            payload.to_uppercase(),
            "{}\n{}",
            c.diag(),
            worker.diag()
        );
    }
    worker.finish_ok();

    // -n: one job per stdin line, results printed in order.
    let worker = gearman(
        srv.port,
        &["-w", "-f", "count", "-c", "3", "--", "wc", "-c"],
    );
    wait_status(&srv, "count", "has a worker", |r| r.2 == 1);
    let c = Proc::spawn_with_input(
        "gearman cli",
        "gearman",
        &strings(&[
            "-h",
            "127.0.0.1",
            "-p",
            &srv.port.to_string(),
            "-f",
            "count",
            "-n",
        ]),
        Some(b"one\ntwo2\nthree33\n".to_vec()),
    )
    .finish_ok();
    let counts: Vec<&str> = c.lines.iter().map(|l| l.trim()).collect();
    assert_eq!(counts, ["4", "5", "8"], "{}\n{}", c.diag(), worker.diag());
    worker.finish_ok();

    for payload in ["first", "second"] {
        gearman(
            srv.port,
            &["-b", "-u", "cli-unique-1", "-f", "later", payload],
        )
        .finish_ok();
    }
    assert_eq!(
        status_row(srv.port, "later"),
        Some((1, 0, 0)),
        "same unique must coalesce"
    );
    let u = gearadmin(srv.port, "--show-unique-jobs");
    assert!(u.lines.iter().any(|l| l == "cli-unique-1"), "{}", u.diag());
    let w = php_worker(srv.port, 1, &["later=echo"]).finish_ok();
    let job = w.one("job");
    assert_eq!(job["unique"], "cli-unique-1", "{}", w.diag());
    assert_eq!(
        job["workload"],
        "first",
        "the job keeps the first submit's payload\n{}",
        w.diag()
    );
}

/// gearadmin against gearhouse: --status, --priority-status, --workers, --show-jobs,
/// --show-unique-jobs, --getpid and --server-version parse in gearmand's formats and report the
/// server's real state (5 jobs, 1 running on 1 worker); --cancel-job, --create-function and
/// --drop-function answer OK and take effect.
#[test]
fn gearadmin_reports_in_gearmand_formats() {
    let srv = server();
    for (flags, payload) in [
        (&[][..], "n1"),
        (&[][..], "n2"),
        (&["-I"][..], "h1"),
        (&[][..], "n3"),
        (&["-L"][..], "l1"),
    ] {
        let mut args = vec!["-b", "-f", "adm"];
        args.extend_from_slice(flags);
        args.push(payload);
        gearman(srv.port, &args).finish_ok();
    }
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let worker = php_worker(srv.port, 1, &[&format!("adm=hold:{}", release.display())]);
    let held = worker.wait_event("job");
    assert_eq!(
        held["workload"],
        "h1",
        "the high job runs first\n{}",
        worker.diag()
    );

    // status: FUNC\tTOTAL\tRUNNING\tWORKERS, then "."
    let st = gearadmin(srv.port, "--status");
    assert_eq!(
        st.lines.last().map(String::as_str),
        Some("."),
        "{}",
        st.diag()
    );
    for l in &st.lines[..st.lines.len() - 1] {
        let f: Vec<&str> = l.split('\t').collect();
        assert!(
            f.len() == 4 && f[1..].iter().all(|n| n.parse::<u64>().is_ok()),
            "bad line {l:?}"
        );
    }
    assert!(
        st.lines.iter().any(|l| l == "adm\t5\t1\t1"),
        "{}",
        st.diag()
    );

    let ps = gearadmin(srv.port, "--priority-status");
    assert_eq!(
        ps.lines.last().map(String::as_str),
        Some("."),
        "{}",
        ps.diag()
    );
    assert!(
        ps.lines.iter().any(|l| l == "adm\t0\t3\t1\t1"),
        "{}",
        ps.diag()
    );

    // workers: "FD IP CLIENT_ID : FUNC ...", then "."; Python gear sets a client id.
    let py = py_worker(srv.port, 0, &["adm_py=echo", "adm_py2=echo"]);
    wait_status(&srv, "adm_py", "has a worker", |r| r.2 == 1);
    let py_id = format!("interop-py-worker-{}", py.child.id());
    let wk = gearadmin(srv.port, "--workers");
    assert_eq!(
        wk.lines.last().map(String::as_str),
        Some("."),
        "{}",
        wk.diag()
    );
    let (mut with_adm, mut with_py_id) = (0, 0);
    for l in &wk.lines[..wk.lines.len() - 1] {
        let (head, funcs) = l
            .split_once(" :")
            .unwrap_or_else(|| panic!("bad line {l:?}"));
        let h: Vec<&str> = head.split(' ').collect();
        assert!(
            h.len() == 3 && h[0].parse::<u64>().is_ok(),
            "bad line {l:?}\n{}",
            wk.diag()
        );
        assert_eq!(h[1], "127.0.0.1", "bad line {l:?}");
        if funcs.split_whitespace().eq(["adm"]) {
            with_adm += 1;
        }
        if h[2] == py_id {
            let mut f: Vec<&str> = funcs.split_whitespace().collect();
            f.sort();
            assert_eq!(f, ["adm_py", "adm_py2"], "bad line {l:?}\n{}", wk.diag());
            with_py_id += 1;
        }
    }
    assert_eq!(
        with_py_id,
        1,
        "the Python worker's client id\n{}",
        wk.diag()
    );
    assert_eq!(
        with_adm,
        1,
        "exactly the PHP worker can do adm\n{}",
        wk.diag()
    );

    // show jobs: HANDLE\tRETRIES\tIGNORE\tQUEUED, then "."
    let sj = gearadmin(srv.port, "--show-jobs");
    assert_eq!(
        sj.lines.last().map(String::as_str),
        Some("."),
        "{}",
        sj.diag()
    );
    let jobs = &sj.lines[..sj.lines.len() - 1];
    assert_eq!(jobs.len(), 5, "{}", sj.diag());
    for l in jobs {
        let f: Vec<&str> = l.split('\t').collect();
        assert!(
            f.len() == 4
                && f[0].starts_with(&format!("H:{NODE}:"))
                && f[1..].iter().all(|n| n.parse::<u64>().is_ok()),
            "bad line {l:?}"
        );
    }
    assert!(
        jobs.iter()
            .any(|l| l.starts_with(&format!("{}\t", s(&held["handle"])))),
        "{}",
        sj.diag()
    );

    let su = gearadmin(srv.port, "--show-unique-jobs");
    assert_eq!(
        su.lines.last().map(String::as_str),
        Some("."),
        "{}",
        su.diag()
    );
    assert_eq!(su.lines.len(), 6, "{}", su.diag());
    assert!(
        su.lines.iter().any(|l| l == s(&held["unique"])),
        "{}",
        su.diag()
    );

    let pid = gearadmin(srv.port, "--getpid");
    assert_eq!(
        pid.stdout().trim(),
        srv.child.id().to_string(),
        "{}",
        pid.diag()
    );
    let v = gearadmin(srv.port, "--server-version");
    assert_eq!(v.stdout().trim(), env!("CARGO_PKG_VERSION"), "{}", v.diag());

    // cancel a queued job; create and drop a function.
    let victim = jobs
        .iter()
        .map(|l| l.split('\t').next().unwrap())
        .find(|h| *h != s(&held["handle"]))
        .unwrap();
    let c = gearadmin(srv.port, &format!("--cancel-job={victim}"));
    assert_eq!(c.stdout().trim(), "OK", "{}", c.diag());
    assert_eq!(status_row(srv.port, "adm"), Some((4, 1, 1)));
    let c = gearadmin(srv.port, "--create-function=made_up");
    assert_eq!(c.stdout().trim(), "OK", "{}", c.diag());
    assert_eq!(status_row(srv.port, "made_up"), Some((0, 0, 0)));
    let c = gearadmin(srv.port, "--drop-function=made_up");
    assert_eq!(c.stdout().trim(), "OK", "{}", c.diag());
    assert_eq!(status_row(srv.port, "made_up"), None);

    std::fs::write(&release, b"go").unwrap();
    worker.finish_ok();
    drop(py);
    wait_status(&srv, "adm", "back to 3 queued, none running", |r| {
        r == (3, 0, 0)
    });
}
