//! Python `gear` (Zuul's library) as client and worker.

use super::*;

/// Python gear client and worker: foreground at each precedence, background with a unique.
#[test]
fn python_gear_client_and_worker() {
    let srv = server();
    let worker = py_worker(srv.port, 0, &["py_rev=reverse"]);
    wait_status(&srv, "py_rev", "has a worker", |r| r.2 == 1);
    for prio in ["high", "normal", "low"] {
        let payload = format!("python {prio}");
        let c = py_client(srv.port, "fg", &["py_rev", prio, &payload]).finish_ok();
        let r = c.one("result");
        assert_eq!(
            r["data"],
            serde_json::json!([rev(&payload)]),
            "{}\n{}",
            c.diag(),
            worker.diag()
        );
        assert_eq!(r["failure"], false, "{}", c.diag());
    }
    let c = py_client(
        srv.port,
        "bg",
        &["py_rev", "high", "python background", "py-bg-1"],
    )
    .finish_ok();
    let handle = c.one("queued")["handle"].clone();
    assert!(
        s(&handle).starts_with(&format!("H:{NODE}:")),
        "{}",
        c.diag()
    );
    let events = worker.wait_for("the background job", T, |e| {
        e.iter().any(|v| v["handle"] == handle)
    });
    let job = events.iter().find(|v| v["handle"] == handle).unwrap();
    assert_eq!(job["workload"], "python background");
    assert_eq!(job["unique"], "py-bg-1");
}
