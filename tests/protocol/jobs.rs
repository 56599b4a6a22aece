//! Unique-id coalescing, disconnects, results from the wrong connection, exceptions and epoch
//! jobs.

use super::*;

// ---- coalescing ----

#[tokio::test]
async fn foreground_clients_with_the_same_unique_share_one_job_and_every_result() {
    let server = TestServer::start(&[]).await;
    let mut c1 = server.connect().await;
    let mut c2 = server.connect().await;
    let h = c1.submit(SUBMIT_JOB, "co", "same", b"first").await;
    assert_eq!(c2.submit(SUBMIT_JOB_HIGH, "co", "same", b"second").await, h);
    let hb = h.as_bytes();
    let mut w = worker(&server, &[b"co"]).await;
    w.send(GRAB_JOB_UNIQ, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN_UNIQ, &[hb, b"co", b"same", b"first"]).await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;

    let results: [(PacketType, &[&[u8]]); 5] = [
        (WORK_DATA, &[hb, b"chunk\0with nul"]),
        (WORK_WARNING, &[hb, b"careful"]),
        (WORK_STATUS, &[hb, b"1", b"2"]),
        (WORK_DATA, &[hb, b"chunk-2"]),
        (WORK_COMPLETE, &[hb, b"all done"]),
    ];
    for (kind, args) in results {
        w.send(kind, args).await;
    }
    for c in [&mut c1, &mut c2] {
        for (kind, args) in results {
            expect_pkt(c, kind, args).await;
        }
        assert_quiet(c).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_background_submit_joins_a_foreground_job() {
    let server = TestServer::start(&[]).await;
    let mut fg = server.connect().await;
    let mut bg = server.connect().await;
    let h = fg.submit(SUBMIT_JOB, "mix", "u1", b"a").await;
    assert_eq!(bg.submit(SUBMIT_JOB_BG, "mix", "u1", b"b").await, h);
    assert_eq!(fg.admin("status").await, "mix\t1\t0\t0\n.\n");
    let mut w = worker(&server, &[b"mix"]).await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[h.as_bytes(), b"mix", b"a"]).await;
    w.send(WORK_COMPLETE, &[h.as_bytes(), b"r"]).await;
    expect_pkt(&mut fg, WORK_COMPLETE, &[h.as_bytes(), b"r"]).await;
    assert_quiet(&mut bg).await;
    server.stop().await;
}

#[tokio::test]
async fn the_same_unique_on_different_functions_does_not_coalesce() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect().await;
    let h1 = c.submit(SUBMIT_JOB_BG, "f-one", "shared", b"1").await;
    let h2 = c.submit(SUBMIT_JOB_BG, "f-two", "shared", b"2").await;
    assert_ne!(h1, h2);
    assert_eq!(
        c.admin("status").await,
        "f-one\t1\t0\t0\nf-two\t1\t0\t0\n.\n"
    );
    let mut w = worker(&server, &[b"f-two"]).await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[h2.as_bytes(), b"f-two", b"2"]).await;
    server.stop().await;
}

#[tokio::test]
async fn an_empty_unique_never_coalesces() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect().await;
    let h1 = c.submit(SUBMIT_JOB_BG, "e", "", b"same").await;
    let h2 = c.submit(SUBMIT_JOB_BG, "e", "", b"same").await;
    let h3 = c.submit(SUBMIT_JOB, "e", "", b"same").await;
    assert!(h1 != h2 && h2 != h3 && h1 != h3, "{h1} {h2} {h3}");
    assert_eq!(c.admin("status").await, "e\t3\t0\t0\n.\n");
    c.send(GET_STATUS_UNIQUE, &[b""]).await;
    expect_pkt(
        &mut c,
        STATUS_RES_UNIQUE,
        &[b"", b"0", b"0", b"0", b"0", b"0"],
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn function_names_and_uniques_are_binary_safe() {
    let server = TestServer::start(&[]).await;
    let func: &[u8] = b"bin f\xff-x";
    let near: &[u8] = b"bin f\xfe-x";
    let uniq: &[u8] = b"u \xff-1";
    let mut c1 = server.connect().await;
    let mut c2 = server.connect().await;
    let h = submit_raw(&mut c1, SUBMIT_JOB, &[func, uniq, b"d1"]).await;
    assert_eq!(
        submit_raw(&mut c2, SUBMIT_JOB, &[func, uniq, b"d2"]).await,
        h
    );
    let other_func = submit_raw(&mut c2, SUBMIT_JOB_BG, &[near, uniq, b"d3"]).await;
    let other_uniq = submit_raw(&mut c2, SUBMIT_JOB_BG, &[func, b"u \xff-2", b"d4"]).await;
    assert_ne!(other_func, h);
    assert_ne!(other_uniq, h);

    c2.send(GET_STATUS_UNIQUE, &[uniq]).await;
    expect_pkt(
        &mut c2,
        STATUS_RES_UNIQUE,
        &[uniq, b"1", b"0", b"0", b"0", b"2"],
    )
    .await;

    let mut w = worker(&server, &[func]).await;
    w.send(GRAB_JOB_UNIQ, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN_UNIQ, &[h.as_bytes(), func, uniq, b"d1"]).await;
    w.send(GRAB_JOB_UNIQ, &[]).await;
    expect_pkt(
        &mut w,
        JOB_ASSIGN_UNIQ,
        &[other_uniq.as_bytes(), func, b"u \xff-2", b"d4"],
    )
    .await;
    w.send(GRAB_JOB_UNIQ, &[]).await;
    w.expect(NO_JOB).await;
    w.send(WORK_COMPLETE, &[h.as_bytes(), b"ok"]).await;
    expect_pkt(&mut c1, WORK_COMPLETE, &[h.as_bytes(), b"ok"]).await;
    expect_pkt(&mut c2, WORK_COMPLETE, &[h.as_bytes(), b"ok"]).await;

    let mut w2 = worker(&server, &[near]).await;
    w2.send(GRAB_JOB_UNIQ, &[]).await;
    expect_pkt(
        &mut w2,
        JOB_ASSIGN_UNIQ,
        &[other_func.as_bytes(), near, uniq, b"d3"],
    )
    .await;
    server.stop().await;
}

// ---- disconnects ----

#[tokio::test]
async fn a_foreground_client_leaving_a_background_job_does_not_cancel_it() {
    let server = TestServer::start(&[]).await;
    let mut bg = server.connect().await;
    let h = bg.submit(SUBMIT_JOB_BG, "keep", "k1", b"payload").await;
    let mut fg = server.connect().await;
    assert_eq!(fg.submit(SUBMIT_JOB, "keep", "k1", b"ignored").await, h);
    bg.send(GET_STATUS_UNIQUE, &[b"k1"]).await;
    expect_pkt(
        &mut bg,
        STATUS_RES_UNIQUE,
        &[b"k1", b"1", b"0", b"0", b"0", b"1"],
    )
    .await;
    drop(fg);
    // Wait until the server has seen the disconnect (no waiting client left).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        bg.send(GET_STATUS_UNIQUE, &[b"k1"]).await;
        let r = bg.expect(STATUS_RES_UNIQUE).await;
        let a = r.args();
        assert_eq!(&a[1][..], b"1", "the background job was cancelled");
        if &a[5][..] == b"0" {
            break;
        }
        assert!(Instant::now() < deadline, "disconnect never seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut w = worker(&server, &[b"keep"]).await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[h.as_bytes(), b"keep", b"payload"]).await;
    server.stop().await;
}

#[tokio::test]
async fn a_queued_foreground_job_whose_only_client_left_is_cancelled() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    let mut w = worker(&server, &[b"gone"]).await;
    let mut c = server.connect().await;
    let h = c.submit(SUBMIT_JOB, "gone", "g1", b"x").await;
    assert_eq!(admin.admin("show jobs").await, format!("{h}\t0\t0\t1\n.\n"));
    drop(c);
    admin_until(&mut admin, "show jobs", |o| o == ".\n").await;
    assert_eq!(admin.admin("status").await, "gone\t0\t0\t1\n.\n");
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    // The unique is free again: a new submit makes a new job.
    let mut c2 = server.connect().await;
    let h2 = c2.submit(SUBMIT_JOB, "gone", "g1", b"y").await;
    assert_ne!(h2, h);
    server.stop().await;
}

#[tokio::test]
async fn a_running_job_survives_its_client_leaving() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect().await;
    let h = c.submit(SUBMIT_JOB, "run", "", b"x").await;
    let mut w = worker(&server, &[b"run"]).await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(JOB_ASSIGN).await;
    drop(c);
    let mut admin = server.connect().await;
    admin_until(&mut admin, "workers", |o| o.lines().count() == 3).await;
    assert_eq!(admin.admin("show jobs").await, format!("{h}\t0\t0\t0\n.\n"));
    w.send(WORK_COMPLETE, &[h.as_bytes(), b"nobody listens"])
        .await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    assert_eq!(admin.admin("show jobs").await, ".\n");
    server.stop().await;
}

#[tokio::test]
async fn a_foreground_job_nobody_waits_for_is_not_requeued_when_its_worker_fails() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    let mut c = server.connect().await;
    let h = c.submit(SUBMIT_JOB, "orphan", "o-1", b"x").await;
    let mut w1 = worker(&server, &[b"orphan"]).await;
    w1.send(GRAB_JOB, &[]).await;
    w1.expect(JOB_ASSIGN).await;
    drop(c);
    admin_until(&mut admin, "workers", |o| o.lines().count() == 3).await;
    assert_eq!(admin.admin("show jobs").await, format!("{h}\t0\t0\t0\n.\n"));
    let mut w2 = worker(&server, &[b"orphan"]).await;
    drop(w1);
    admin_until(&mut admin, "workers", |o| o.lines().count() == 3).await;
    // Nobody would receive the result: the job is gone, not handed to another worker.
    assert_eq!(admin.admin("show jobs").await, ".\n");
    w2.send(GRAB_JOB, &[]).await;
    w2.expect(NO_JOB).await;
    server.stop().await;
}

#[tokio::test]
async fn a_worker_disconnect_requeues_its_job_forever_by_default() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let h = client.submit(SUBMIT_JOB, "crash", "", b"x").await;
    let hb = h.as_bytes();
    for attempt in 1..=3u32 {
        let mut w = worker(&server, &[b"crash"]).await;
        w.send(GRAB_JOB, &[]).await;
        expect_pkt(&mut w, JOB_ASSIGN, &[hb, b"crash", b"x"]).await;
        let mut next = worker(&server, &[b"crash"]).await;
        next.send(PRE_SLEEP, &[]).await;
        drop(w);
        next.expect(NOOP).await;
        assert_eq!(
            client.admin("show jobs").await,
            format!("{h}\t{attempt}\t0\t1\n.\n")
        );
    }
    let mut w = worker(&server, &[b"crash"]).await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[hb, b"crash", b"x"]).await;
    w.send(WORK_COMPLETE, &[hb, b"finally"]).await;
    expect_pkt(&mut client, WORK_COMPLETE, &[hb, b"finally"]).await;
    server.stop().await;
}

#[tokio::test]
async fn job_retries_drops_a_job_after_that_many_attempts_with_work_fail() {
    let server = TestServer::start(&[("GEARHOUSE_ENGINE__JOB_RETRIES", "2")]).await;
    let mut client = server.connect().await;
    let h = client.submit(SUBMIT_JOB, "doomed", "", b"x").await;
    let hb = h.as_bytes();

    let mut w1 = worker(&server, &[b"doomed"]).await;
    w1.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w1, JOB_ASSIGN, &[hb, b"doomed", b"x"]).await;
    let mut w2 = worker(&server, &[b"doomed"]).await;
    w2.send(PRE_SLEEP, &[]).await;
    drop(w1);
    w2.expect(NOOP).await; // attempt 1 failed: requeued
    assert_quiet(&mut client).await;
    w2.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w2, JOB_ASSIGN, &[hb, b"doomed", b"x"]).await;

    let mut w3 = worker(&server, &[b"doomed"]).await;
    w3.send(PRE_SLEEP, &[]).await;
    drop(w2);
    // Attempt 2 failed: dropped, the client is told.
    expect_pkt(&mut client, WORK_FAIL, &[hb]).await;
    w3.send(GRAB_JOB, &[]).await;
    w3.expect(NO_JOB).await;
    assert_eq!(client.admin("show jobs").await, ".\n");
    server.stop().await;
}

// ---- results from the wrong connection, exceptions ----

#[tokio::test]
async fn work_packets_from_a_connection_not_holding_the_job_get_job_not_found() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let h = client.submit(SUBMIT_JOB, "own", "", b"x").await;
    let hb = h.as_bytes();
    let mut holder = worker(&server, &[b"own"]).await;
    holder.send(GRAB_JOB, &[]).await;
    holder.expect(JOB_ASSIGN).await;
    let mut intruder = worker(&server, &[b"own"]).await;
    for (kind, args) in [
        (WORK_COMPLETE, &[hb, &b"fake"[..]][..]),
        (WORK_DATA, &[hb, b"fake"]),
        (WORK_STATUS, &[hb, b"1", b"2"]),
        (WORK_FAIL, &[hb]),
        (WORK_EXCEPTION, &[hb, b"fake"]),
        (WORK_WARNING, &[hb, b"fake"]),
    ] {
        intruder.send(kind, args).await;
        let e = intruder.expect(ERROR).await;
        assert_eq!(e.arg(0), "JOB_NOT_FOUND", "{kind:?}");
    }
    // An unknown handle from the holder itself.
    holder.send(WORK_COMPLETE, &[b"H:test:777777", b"x"]).await;
    assert_eq!(holder.expect(ERROR).await.arg(0), "JOB_NOT_FOUND");
    // A client (not a worker at all).
    client.send(WORK_COMPLETE, &[hb, b"x"]).await;
    assert_eq!(client.expect(ERROR).await.arg(0), "JOB_NOT_FOUND");
    assert_quiet(&mut client).await;

    holder.send(WORK_COMPLETE, &[hb, b"real"]).await;
    expect_pkt(&mut client, WORK_COMPLETE, &[hb, b"real"]).await;
    holder.send(WORK_COMPLETE, &[hb, b"again"]).await;
    assert_eq!(holder.expect(ERROR).await.arg(0), "JOB_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn work_exception_goes_only_to_clients_that_asked_others_get_work_fail() {
    let server = TestServer::start(&[]).await;
    let mut asked = server.connect().await;
    asked.send(OPTION_REQ, &[b"exceptions"]).await;
    expect_pkt(&mut asked, OPTION_RES, &[b"exceptions"]).await;
    let mut plain = server.connect().await;
    let h = asked.submit(SUBMIT_JOB, "exc", "ex1", b"x").await;
    assert_eq!(plain.submit(SUBMIT_JOB, "exc", "ex1", b"x").await, h);
    let hb = h.as_bytes();
    let mut w = worker(&server, &[b"exc"]).await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(JOB_ASSIGN).await;
    w.send(WORK_EXCEPTION, &[hb, b"boom: stack trace"]).await;
    expect_pkt(&mut asked, WORK_EXCEPTION, &[hb, b"boom: stack trace"]).await;
    expect_pkt(&mut plain, WORK_FAIL, &[hb]).await;
    assert_quiet(&mut asked).await;
    assert_quiet(&mut plain).await;
    // The exception ended the job.
    w.send(WORK_COMPLETE, &[hb, b"x"]).await;
    assert_eq!(w.expect(ERROR).await.arg(0), "JOB_NOT_FOUND");
    server.stop().await;
}

// ---- epoch jobs ----

#[tokio::test]
async fn an_epoch_job_wakes_a_sleeping_worker_when_due_and_not_before() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let mut w = worker(&server, &[b"later"]).await;
    // Due at the next whole second plus one: between 1 and 2 seconds from now.
    let epoch = unix_secs_f64().floor() as u64 + 2;
    let h = submit_raw(
        &mut client,
        SUBMIT_JOB_EPOCH,
        &[b"later", b"ep-1", epoch.to_string().as_bytes(), b"wake me"],
    )
    .await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    assert!(
        unix_secs_f64() < epoch as f64,
        "test too slow to check 'not before'"
    );
    client.send(GET_STATUS, &[h.as_bytes()]).await;
    expect_pkt(
        &mut client,
        STATUS_RES,
        &[h.as_bytes(), b"1", b"0", b"0", b"0"],
    )
    .await;
    w.send(PRE_SLEEP, &[]).await;
    // No other traffic: only the server's timer can wake the worker.
    let r = w
        .recv_timeout(Duration::from_secs(4))
        .await
        .expect("epoch job never woke the worker");
    let woke = unix_secs_f64();
    assert_eq!(r.kind, NOOP);
    assert!(
        woke >= epoch as f64,
        "woken at {woke}, before the epoch {epoch}"
    );
    assert!(
        woke < epoch as f64 + 1.5,
        "woken at {woke}, long after the epoch {epoch}"
    );
    w.send(GRAB_JOB_UNIQ, &[]).await;
    expect_pkt(
        &mut w,
        JOB_ASSIGN_UNIQ,
        &[h.as_bytes(), b"later", b"ep-1", b"wake me"],
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_far_future_epoch_job_is_not_handed_out() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let now = unix_secs_f64() as u64;
    // 2^55 s in nanoseconds is a multiple of 2^64: a wrapping computation would make it due now.
    let mut handles = Vec::new();
    for epoch in [now + (1 << 55), now + (1 << 55) + 1, u64::MAX] {
        handles.push(
            submit_raw(
                &mut client,
                SUBMIT_JOB_EPOCH,
                &[b"far", b"", epoch.to_string().as_bytes(), b"not yet"],
            )
            .await,
        );
    }
    let mut w = worker(&server, &[b"far"]).await;
    w.send(PRE_SLEEP, &[]).await;
    assert!(w.recv_timeout(Duration::from_millis(300)).await.is_none());
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    for h in &handles {
        client.send(GET_STATUS, &[h.as_bytes()]).await;
        expect_pkt(
            &mut client,
            STATUS_RES,
            &[h.as_bytes(), b"1", b"0", b"0", b"0"],
        )
        .await;
    }
    server.stop().await;
}

#[tokio::test]
async fn work_fail_reaches_every_waiting_client_and_ends_the_job() {
    let server = TestServer::start(&[]).await;
    let mut c1 = server.connect().await;
    let mut c2 = server.connect().await;
    let h = c1.submit(SUBMIT_JOB, "fails", "fx", b"x").await;
    assert_eq!(c2.submit(SUBMIT_JOB_LOW, "fails", "fx", b"x").await, h);
    let mut w = worker(&server, &[b"fails"]).await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(JOB_ASSIGN).await;
    w.send(WORK_FAIL, &[h.as_bytes()]).await;
    expect_pkt(&mut c1, WORK_FAIL, &[h.as_bytes()]).await;
    expect_pkt(&mut c2, WORK_FAIL, &[h.as_bytes()]).await;
    assert_eq!(c1.admin("show jobs").await, ".\n");
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    server.stop().await;
}

#[tokio::test]
async fn submit_job_sched_becomes_an_epoch_job_and_bad_fields_are_refused() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect().await;
    c.send(
        SUBMIT_JOB_SCHED,
        &[b"cron", b"", b"0", b"0", b"1", b"1", b"", b"d"],
    )
    .await;
    c.expect(JOB_CREATED).await;
    c.send(
        SUBMIT_JOB_SCHED,
        &[b"cron", b"", b"61", b"0", b"1", b"1", b"0", b"d"],
    )
    .await;
    assert_eq!(c.expect(ERROR).await.arg(0), "INVALID_ARGUMENT");
    assert_quiet(&mut c).await;
    // The function exists; its one job waits for its time (scheduled jobs are not in status's
    // queued count, as gearmand's epoch jobs are not).
    assert_eq!(c.admin("status").await, "cron\t0\t0\t0\n.\n");
    assert!(c.admin("show jobs").await.starts_with("H:"));
    server.stop().await;
}
