//! What a moved job keeps (its handle, through two takeovers) and a dead node's dead letters
//! moving with its queue.

use super::*;

/// Submits background jobs `job-<id>` of [`FUNC`] for `ids` on one connection, pipelined;
/// returns the handles of their JOB_CREATED.
async fn submit_for_handles(addr: SocketAddr, ids: std::ops::Range<u64>) -> HashSet<String> {
    let mut conn = Connection::connect(addr).await.unwrap();
    for id in ids.clone() {
        conn.put_submit(&Job::new(FUNC, &format!("job-{id}")), true)
            .unwrap();
    }
    conn.flush().await.unwrap();
    let mut handles = HashSet::new();
    for _ in ids {
        let p = conn.recv().await.unwrap();
        assert_eq!(p.kind, PacketType::JOB_CREATED, "{:?}", p.body);
        handles.insert(String::from_utf8_lossy(&p.body).into_owned());
    }
    handles
}

/// GET_STATUS of `handle` on `addr`: (known, running).
async fn job_status(addr: SocketAddr, handle: &str) -> (bool, bool) {
    let mut c = Connection::connect(addr).await.unwrap();
    let s = c.get_status(handle.as_bytes()).await.unwrap();
    (s.known, s.running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moved_jobs_keep_the_handles_their_clients_got_through_two_takeovers() {
    let _serial = SERIAL.lock().await;
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start(64, &["-M"])).collect();
    let list = memcached_list(&ms.iter().collect::<Vec<_>>());
    let takeover_after = 2;
    let mut a = start("keep-a", &list, takeover_after, &[]).await;
    let mut b = start("keep-b", &list, takeover_after, &[]).await;
    let ran = Arc::new(Ran::default());
    let _w = workers(b.addr(), 4, &ran);

    let n = 500;
    let created = submit_for_handles(a.addr(), 0..n).await;
    assert_eq!(created.len(), n as usize);
    assert!(
        created.iter().all(|h| h.starts_with("H:keep-a:")),
        "{created:?}"
    );
    // A job nobody can run yet: it stays queued through both takeovers.
    let held_fn = "keep-held";
    let held = {
        let mut c = Connection::connect(a.addr()).await.unwrap();
        let h = c
            .submit_background(&Job::new(held_fn, "held").unique("held-1"))
            .await
            .unwrap();
        String::from_utf8_lossy(&h).into_owned()
    };
    assert!(held.starts_with("H:keep-a:"), "{held}");

    a.kill9();
    let r = ran.clone();
    eventually(
        "keep-b to take over and run keep-a's jobs",
        Duration::from_secs(takeover_after as u64 + 10),
        || b.log_text(),
        || {
            let r = r.clone();
            async move { r.distinct() >= n as usize }
        },
    )
    .await;
    assert_eq!(check_none_lost("handles kept", 0..n, &ran.snapshot()), 0);
    let got = ran.handles.lock().unwrap().clone();
    let missing: Vec<_> = created.difference(&got).take(5).collect();
    let unknown: Vec<_> = got.difference(&created).take(5).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "the handles keep-b's workers got differ from keep-a's JOB_CREATED: missing {missing:?}, unknown {unknown:?}"
    );
    // The queued job answers to its old handle on keep-b; its local handle is not its name.
    assert_eq!(job_status(b.addr(), &held).await, (true, false));
    let shown = Connection::connect(b.addr())
        .await
        .unwrap()
        .admin("show jobs")
        .await
        .unwrap();
    assert!(shown.contains(&format!("{held}\t")), "{shown}");
    // A job that ran is gone: its old handle is unknown now.
    let done = created.iter().next().unwrap();
    assert_eq!(job_status(b.addr(), done).await, (false, false));

    // A second takeover: keep-b dies, keep-c takes its queue, and the job still answers to
    // keep-a's handle.
    let c = start("keep-c", &list, takeover_after, &[]).await;
    b.kill9();
    let (c_addr, held2) = (c.addr(), held.clone());
    eventually(
        "keep-c to take over keep-b's queue",
        Duration::from_secs(takeover_after as u64 + 10),
        || c.log_text(),
        || {
            let held = held2.clone();
            async move { job_status(c_addr, &held).await.0 }
        },
    )
    .await;
    let mut w = Connection::connect(c.addr()).await.unwrap();
    w.can_do(held_fn.as_bytes()).await.unwrap();
    let job = w.grab(GrabKind::Uniq).await.unwrap().expect("the held job");
    assert_eq!(String::from_utf8_lossy(&job.handle), held);
    assert_eq!(&job.unique[..], b"held-1");
    assert_eq!(job_status(c.addr(), &held).await, (true, true));
    w.complete(&job.handle, b"done").await.unwrap();
    let c_http = c.http_addr();
    eventually(
        "the held job to end on keep-c",
        Duration::from_secs(5),
        || c.log_text(),
        || {
            let held = held.clone();
            async move { !job_status(c_addr, &held).await.0 }
        },
    )
    .await;
    // At least the held job (a completed job whose delete had not reached memcached yet when
    // keep-b died moves too, and waits on keep-c: no worker for it there). Counted once the
    // whole move is done, which can be after the first moved job already ran.
    eventually(
        "keep-c to count the jobs it took over",
        Duration::from_secs(10),
        || c.log_text(),
        || async move { metric(c_http, "gearhouse_takeover_jobs_total", "").await >= 1.0 },
    )
    .await;
    ran.stop.store(true, Ordering::SeqCst);
}

/// `GET /api/v1/dead-letters` of a server.
async fn dead_letters(http: SocketAddr) -> Vec<serde_json::Value> {
    let (_, body) = http_get(http, "/api/v1/dead-letters").await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["dead_letters"].as_array().cloned().unwrap_or_default()
}

/// Submits `n` background jobs of `function` (a `dead_letter` function) to `server` and fails
/// them; returns its dead letters once memcached holds all `n`.
async fn make_dead_letters(server: &BinServer, function: &str, n: usize) -> Vec<serde_json::Value> {
    let mut c = Connection::connect(server.addr()).await.unwrap();
    for i in 0..n {
        c.submit_background(&Job::new(function, &format!("payload-{i}")).unique(&format!("u-{i}")))
            .await
            .unwrap();
    }
    common::fail_jobs(server.addr(), function, n).await;
    let http = server.http_addr();
    eventually(
        &format!("{n} persisted dead letters"),
        Duration::from_secs(10),
        || server.log_text(),
        || async move {
            let l = dead_letters(http).await;
            l.len() == n && l.iter().all(|d| d["persisted"] == true)
        },
    )
    .await;
    dead_letters(http).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_move_with_the_queue_and_leave_the_dead_nodes_keys() {
    let _serial = SERIAL.lock().await;
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start(64, &["-M"])).collect();
    let list = memcached_list(&ms.iter().collect::<Vec<_>>());
    let takeover_after = 2;
    let env = [("GEARHOUSE_FUNCTIONS__MOVEDL__DEAD_LETTER", "true")];
    let mut a = start("dl-a", &list, takeover_after, &env).await;
    let b = start("dl-b", &list, takeover_after, &env).await;

    // Three background jobs fail on dl-a and become its dead letters, in memcached.
    let before = make_dead_letters(&a, "movedl", 3).await;
    // No job is queued on dl-a: its letters alone make it worth taking over.
    let nodes: Vec<String> = ms.iter().map(|m| m.addr()).collect();
    let kv = Kv::new(&nodes, 2, Duration::from_secs(2));
    let key = |part: &str| Kv::key("gearhouse", &["dl-a", "dl", part]);
    assert!(kv.get(&key("hi")).await.unwrap().is_some());

    a.kill9();
    let b_http = b.http_addr();
    eventually(
        "dl-b to take over dl-a's dead letters",
        Duration::from_secs(takeover_after as u64 + 10),
        || b.log_text(),
        || async move { dead_letters(b_http).await.len() >= 3 },
    )
    .await;
    let after = dead_letters(b_http).await;
    assert_eq!(after.len(), 3, "{after:?}");
    for (old, new) in before.iter().zip(&after) {
        for k in [
            "function", "handle", "unique", "payload", "attempts", "reason", "worker", "time",
        ] {
            assert_eq!(old[k], new[k], "{k} of {new}");
        }
        assert!(
            old["handle"].as_str().unwrap().starts_with("H:dl-a:"),
            "{old}"
        );
    }
    eventually(
        "dl-b to mirror the moved letters",
        Duration::from_secs(5),
        || b.log_text(),
        || async move {
            dead_letters(b_http)
                .await
                .iter()
                .all(|d| d["persisted"] == true)
        },
    )
    .await;
    // Gone from dl-a's keys: its letters and its watermarks.
    for d in &before {
        let id = d["id"].as_u64().unwrap().to_string();
        assert_eq!(kv.get(&key(&id)).await.unwrap(), None, "letter {id}");
    }
    assert_eq!(kv.get(&key("hi")).await.unwrap(), None);
    assert_eq!(kv.get(&key("lo")).await.unwrap(), None);
    // Under dl-b's keys now.
    for d in &after {
        let id = d["id"].as_u64().unwrap().to_string();
        let k = Kv::key("gearhouse", &["dl-b", "dl", &id]);
        assert!(kv.get(&k).await.unwrap().is_some(), "dl-b's letter {id}");
    }
    assert_eq!(
        metric(b_http, "gearhouse_dead_letters_taken_over_total", "").await,
        3.0
    );
    let log = b.log_text();
    assert!(log.contains("3 dead letters moved"), "{log}");
}

/// Runs `gearhouse recover --from-node NODE --memcached LIST --server ADDR`, again while the
/// server answers that the node still renews its lease (its TTL after the kill), up to 15 s
/// when `retry`.
async fn recover_command(
    node: &str,
    list: &str,
    server: SocketAddr,
    retry: bool,
) -> (bool, String) {
    let args: Vec<String> = [
        "recover",
        "--from-node",
        node,
        "--memcached",
        list,
        "--server",
        &server.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let a = args.clone();
        let o = tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::binary())
                .args(&a)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if !retry
            || o.status.success()
            || !text.contains("renews its lease")
            || Instant::now() > until
        {
            return (o.status.success(), text);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_recover_command_has_the_server_take_over_with_handles_and_dead_letters() {
    let _serial = SERIAL.lock().await;
    let ms: Vec<Memcached> = (0..2).map(|_| Memcached::start(64, &["-M"])).collect();
    let list = memcached_list(&ms.iter().collect::<Vec<_>>());
    // Automatic takeover off: only the command moves the queue. A short lease (2 s TTL) so the
    // dead node's lease lapses soon after the kill.
    let env = [
        ("GEARHOUSE_FUNCTIONS__CMDDL__DEAD_LETTER", "true"),
        ("GEARHOUSE_PERSISTENCE__LEASE_RENEW_MS", "300"),
    ];
    let mut a = start("cmd-a", &list, 0, &env).await;
    let b = start("cmd-b", &list, 0, &env).await;
    let n = 300;
    let created = submit_for_handles(a.addr(), 0..n).await;
    let before = make_dead_letters(&a, "cmddl", 2).await;
    // A live node is refused by name.
    let (ok, text) = recover_command("cmd-a", &list, b.addr(), false).await;
    assert!(!ok && text.contains("renews its lease"), "{text}");

    a.kill9();
    let (ok, text) = recover_command("cmd-a", &list, b.addr(), true).await;
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("moved {n} jobs of node cmd-a with their handles")),
        "{text}"
    );
    let ran = Arc::new(Ran::default());
    let _w = workers(b.addr(), 2, &ran);
    let r = ran.clone();
    eventually(
        "cmd-b to run cmd-a's jobs",
        Duration::from_secs(10),
        || b.log_text(),
        || {
            let r = r.clone();
            async move { r.distinct() >= n as usize }
        },
    )
    .await;
    assert_eq!(check_none_lost("recover command", 0..n, &ran.snapshot()), 0);
    let got = ran.handles.lock().unwrap().clone();
    assert_eq!(got, created, "the handles cmd-b's workers got");
    let after = dead_letters(b.http_addr()).await;
    assert_eq!(after.len(), 2, "{after:?}");
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old["handle"], new["handle"], "{new}");
        assert_eq!(old["payload"], new["payload"], "{new}");
    }
    // Run again: nothing is left, and the answer says so.
    let (ok, text) = recover_command("cmd-a", &list, b.addr(), false).await;
    assert!(ok && text.contains("moved 0 jobs of node cmd-a"), "{text}");
    // The requested takeover is counted apart from automatic ones.
    assert_eq!(
        metric(
            b.http_addr(),
            "gearhouse_takeovers_total",
            "result=\"requested\""
        )
        .await,
        1.0
    );
    ran.stop.store(true, Ordering::SeqCst);
}
