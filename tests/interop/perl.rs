//! Perl Gearman::Client and Gearman::Worker (a pure-Perl implementation of the protocol),
//! including its `uniq => '-'` convention.

use super::*;

/// The unique "-" means "coalesce on the payload" (Gearman::Client documents `uniq => '-'`;
/// gearmand 1.1.20 looks such jobs up by their data). Jobs with different payloads must not
/// share a result; jobs with the same payload do.
#[test]
fn unique_dash_coalesces_on_the_payload() {
    let srv = server();
    let alpha = perl_client(srv.port, "fg", &["dash", "normal", "alpha", "-"]);
    wait_status(&srv, "dash", "has the alpha job", |r| r.0 == 1);
    let beta = perl_client(srv.port, "fg", &["dash", "normal", "beta", "-"]);
    wait_status(&srv, "dash", "has a separate beta job", |r| r.0 == 2);
    let alpha_again = php_client(srv.port, "tasks", &["dash", "0", "-", "alpha"]);
    alpha_again.wait_event("created");
    assert_eq!(
        status_row(srv.port, "dash"),
        Some((2, 0, 0)),
        "the second alpha must join"
    );

    let worker = php_worker(srv.port, 0, &["dash=reverse"]);
    for (p, want) in [(alpha, "ahpla"), (beta, "ateb")] {
        let f = p.finish_ok();
        assert_eq!(
            f.one("result")["data"],
            want,
            "{}\n{}",
            f.diag(),
            worker.diag()
        );
    }
    let f = alpha_again.finish_ok();
    assert_eq!(f.one("complete")["data"], "ahpla", "{}", f.diag());
    wait_status(&srv, "dash", "drained", |r| r.0 == 0);
    let w = worker.kill9();
    let mut ran = workloads(&jobs_of(&w));
    ran.sort();
    assert_eq!(ran, ["alpha", "beta"], "{}", w.diag());
    assert!(
        jobs_of(&w).iter().all(|j| j["unique"] == "-"),
        "{}",
        w.diag()
    );
}

/// Perl Gearman::Client and Gearman::Worker: foreground at each priority (with status
/// callbacks), background with a uniq, all served by a Perl worker.
#[test]
fn perl_client_and_worker() {
    let srv = server();
    let worker = perl_worker(srv.port, 0, &["perl_rev=reverse", "perl_st=status"]);
    wait_status(&srv, "perl_rev", "has a worker", |r| r.2 == 1);
    for (prio, payload) in [
        ("high", "perl high"),
        ("normal", "perl normal"),
        ("low", "perl low"),
    ] {
        let c = perl_client(srv.port, "fg", &["perl_rev", prio, payload]).finish_ok();
        assert_eq!(
            c.one("result")["data"],
            rev(payload).as_str(),
            "{}\n{}",
            c.diag(),
            worker.diag()
        );
    }
    let c = perl_client(srv.port, "fg", &["perl_st", "normal", "tracked"]).finish_ok();
    assert_eq!(c.all("status").len(), 2, "{}", c.diag());
    assert_eq!(c.one("result")["data"], "done:tracked", "{}", c.diag());

    let c = perl_client(
        srv.port,
        "bg",
        &["perl_rev", "low", "perl background", "perl-bg-1"],
    )
    .finish_ok();
    let h = s(&c.one("queued")["handle"]).to_string();
    let prefix = format!("127.0.0.1:{}//", srv.port);
    let handle = h
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{h}\n{}", c.diag()))
        .to_string();
    let events = worker.wait_for("the background job", T, |e| {
        e.iter().any(|v| v["handle"] == handle.as_str())
    });
    let job = events
        .iter()
        .find(|v| v["handle"] == handle.as_str())
        .unwrap();
    assert_eq!(job["workload"], "perl background");
    wait_status(&srv, "perl_rev", "drained", |r| r.0 == 0);
}
