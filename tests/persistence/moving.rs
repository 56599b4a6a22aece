//! A dead node's queue moved into another server: at start-up (`persistence.recover_from_node`)
//! and into a running server by `gearhouse recover --from-node` through the Gearman protocol
//! (the server's own takeover on request is tested in `tests/takeover/kept.rs`).

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_server_takes_over_a_dead_nodes_queue_once() {
    let m1 = Memcached::start(64, &["-M"]);
    let m2 = Memcached::start(64, &["-M"]);
    let mut a = start_server("node-a", &[&m1, &m2], &[]);
    let out = Arc::new(Load::default());
    load(
        a.addr(),
        "take-fn",
        0,
        1000,
        4,
        Arc::new(AtomicBool::new(false)),
        out.clone(),
    )
    .await;
    let mut c = Conn::connect(a.addr()).await;
    submit(
        &mut c,
        SUBMIT_JOB_HIGH_BG,
        &[b"take-fn", b"same-unique", b"job-5000"],
        Duration::from_secs(5),
    )
    .await
    .unwrap()
    .unwrap();
    a.kill9();

    let env = [("GEARHOUSE_PERSISTENCE__RECOVER_FROM_NODE", "node-a")];
    let mut b = start_server("node-b", &[&m1, &m2], &env);
    assert!(
        b.log_text().contains("takeover complete"),
        "{}",
        b.log_text()
    );
    let mut c = Conn::connect(b.addr()).await;
    // The unique still coalesces on the moved job, which kept node-a's handle.
    let h = submit(
        &mut c,
        SUBMIT_JOB_BG,
        &[b"take-fn", b"same-unique", b"other"],
        Duration::from_secs(5),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(h.starts_with("H:node-a:"), "{h}");
    assert_eq!(queued(b.addr(), "take-fn").await, 1001);
    // Crash B and restart it: the moved jobs come back once, nothing is moved twice.
    b.kill9();
    let b = start_server("node-b", &[&m1, &m2], &env);
    let jobs = drain(b.addr(), "take-fn", 0).await;
    let ran = ids_of(&jobs);
    let mut acked = out.acked.lock().unwrap().clone();
    acked.insert(5000);
    assert_eq!(
        check_none_lost("takeover", &acked, &ran),
        0,
        "a job ran twice"
    );
    assert_eq!(ran.len(), 1001);
    // B's own recovery gave them back the handles node-a's clients got.
    assert!(jobs.iter().all(|j| j.handle.starts_with("H:node-a:")));
    // Node A, back with its old id, finds no queue left.
    let a = start_server("node-a", &[&m1, &m2], &[]);
    assert_eq!(queued(a.addr(), "take-fn").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recover_command_moves_a_dead_nodes_queue_into_a_running_server() {
    let m1 = Memcached::start(64, &["-M"]);
    let m2 = Memcached::start(64, &["-M"]);
    let mut a = start_server("node-x", &[&m1, &m2], &[]);
    let out = Arc::new(Load::default());
    load(
        a.addr(),
        "cli-fn",
        0,
        500,
        4,
        Arc::new(AtomicBool::new(false)),
        out.clone(),
    )
    .await;
    a.kill9();
    // A server of another namespace cannot take node-x over itself (the admin command
    // `takeover` answers UNKNOWN_OPTION): the command moves the jobs through the protocol.
    let c = start_server(
        "node-c",
        &[&m1, &m2],
        &[("GEARHOUSE_PERSISTENCE__NAMESPACE", "elsewhere")],
    );
    let list = memcached_list(&[&m1, &m2]);
    let server = format!("127.0.0.1:{}", c.port);
    let run = move || {
        Command::new(common::binary())
            .args([
                "recover",
                "--from-node",
                "node-x",
                "--memcached",
                &list,
                "--server",
                &server,
            ])
            .output()
            .unwrap()
    };
    let o = tokio::task::spawn_blocking(run.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("moved 500 jobs"), "{stdout}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("cannot take node node-x over itself"),
        "{stderr}"
    );
    // A second run finds nothing left.
    let o = tokio::task::spawn_blocking(run).await.unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        stdout.contains("moved 0 jobs"),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ran = ids_of(&drain(c.addr(), "cli-fn", 0).await);
    let acked = out.acked.lock().unwrap().clone();
    assert_eq!(check_none_lost("recover command", &acked, &ran), 0);
    assert_eq!(ran.len(), 500);
}
