//! Worker abilities, timeouts and wake-ups, and priorities.

use super::*;

// ---- worker abilities, timeouts and wake-ups ----

#[tokio::test]
async fn can_do_timeout_fails_a_job_held_too_long() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let mut slow = server.connect().await;
    // 200 ms asked; like gearmand 1.1.20 the server raises anything under 1000 ms to 1000 ms
    // (clients document the number in seconds).
    slow.send(CAN_DO_TIMEOUT, &[b"to", b"200"]).await;
    let h = client.submit(SUBMIT_JOB, "to", "", b"job").await;
    let hb = h.as_bytes();
    slow.send(GRAB_JOB, &[]).await;
    let grabbed = Instant::now();
    expect_pkt(&mut slow, JOB_ASSIGN, &[hb, b"to", b"job"]).await;

    // The protocol: past the timeout the job fails and its client is told (gearmand 1.1
    // requeues it, and a worker slower than its timeout loops on it forever).
    expect_pkt(&mut client, WORK_FAIL, &[hb]).await;
    let waited = grabbed.elapsed();
    assert!(
        waited >= Duration::from_millis(950),
        "failed after only {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "failed only after {waited:?}"
    );

    // The timed-out worker no longer holds the job, and nothing went back to the queue.
    slow.send(WORK_COMPLETE, &[hb, b"late"]).await;
    assert_eq!(slow.expect(ERROR).await.arg(0), "JOB_NOT_FOUND");
    let mut other = worker(&server, &[b"to"]).await;
    other.send(GRAB_JOB, &[]).await;
    other.expect(NO_JOB).await;
    assert_eq!(client.admin("show jobs").await, ".\n");
    server.stop().await;
}

#[tokio::test]
async fn can_do_timeout_does_not_requeue_a_job_finished_in_time() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let mut w = server.connect().await;
    w.send(CAN_DO_TIMEOUT, &[b"quick", b"300"]).await;
    let h = client.submit(SUBMIT_JOB, "quick", "", b"job").await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(JOB_ASSIGN).await;
    w.send(WORK_COMPLETE, &[h.as_bytes(), b"r"]).await;
    expect_pkt(&mut client, WORK_COMPLETE, &[h.as_bytes(), b"r"]).await;
    let mut other = worker(&server, &[b"quick"]).await;
    other.send(PRE_SLEEP, &[]).await;
    // Past the timeout (raised to 1000 ms, as gearmand does) nothing comes back to the queue.
    assert!(other
        .recv_timeout(Duration::from_millis(1300))
        .await
        .is_none());
    other.send(GRAB_JOB, &[]).await;
    other.expect(NO_JOB).await;
    server.stop().await;
}

#[tokio::test]
async fn can_do_timeout_zero_means_no_timeout_even_when_re_registering() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let mut w = server.connect().await;
    // First registered without a timeout, then re-registered with 0 (= none).
    w.send(CAN_DO, &[b"zero"]).await;
    w.send(CAN_DO_TIMEOUT, &[b"zero", b"0"]).await;
    let h = client.submit(SUBMIT_JOB, "zero", "", b"job").await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[h.as_bytes(), b"zero", b"job"]).await;
    let mut other = worker(&server, &[b"zero"]).await;
    other.send(PRE_SLEEP, &[]).await;
    assert!(
        other
            .recv_timeout(Duration::from_millis(300))
            .await
            .is_none(),
        "the job was taken away from its worker"
    );
    w.send(WORK_COMPLETE, &[h.as_bytes(), b"kept"]).await;
    expect_pkt(&mut client, WORK_COMPLETE, &[h.as_bytes(), b"kept"]).await;
    server.stop().await;
}

/// A worker holding a job gives up its function with `give_up`; another worker gets the job.
async fn giving_up_requeues(give_up: PacketType, args: &[&[u8]]) {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let h = client.submit(SUBMIT_JOB, "gu", "", b"job").await;
    let hb = h.as_bytes();
    let mut w1 = worker(&server, &[b"gu", b"other"]).await;
    w1.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w1, JOB_ASSIGN, &[hb, b"gu", b"job"]).await;
    let mut w2 = worker(&server, &[b"gu"]).await;
    w2.send(PRE_SLEEP, &[]).await;
    assert_quiet(&mut w2).await;

    w1.send(give_up, args).await;
    w2.expect(NOOP).await;
    w2.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w2, JOB_ASSIGN, &[hb, b"gu", b"job"]).await;
    w1.send(WORK_COMPLETE, &[hb, b"stale"]).await;
    assert_eq!(w1.expect(ERROR).await.arg(0), "JOB_NOT_FOUND");
    w2.send(WORK_COMPLETE, &[hb, b"fresh"]).await;
    expect_pkt(&mut client, WORK_COMPLETE, &[hb, b"fresh"]).await;
    assert_eq!(client.admin("show jobs").await, ".\n");
    server.stop().await;
}

#[tokio::test]
async fn cant_do_requeues_the_held_job() {
    giving_up_requeues(CANT_DO, &[b"gu"]).await;
}

#[tokio::test]
async fn reset_abilities_requeues_the_held_job() {
    giving_up_requeues(RESET_ABILITIES, &[]).await;
}

#[tokio::test]
async fn pre_sleep_worker_is_woken_by_a_new_job_and_pre_sleep_with_work_gets_noop_at_once() {
    let server = TestServer::start(&[]).await;
    let mut w = worker(&server, &[b"wake"]).await;
    w.send(PRE_SLEEP, &[]).await;
    assert_quiet(&mut w).await; // no NOOP while nothing is queued
    let mut client = server.connect().await;
    let h1 = client.submit(SUBMIT_JOB_BG, "wake", "", b"one").await;
    w.expect(NOOP).await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[h1.as_bytes(), b"wake", b"one"]).await;

    // An awake worker is not sent NOOP; PRE_SLEEP while work waits answers NOOP at once.
    let h2 = client.submit(SUBMIT_JOB_BG, "wake", "", b"two").await;
    assert_quiet(&mut w).await;
    w.send(PRE_SLEEP, &[]).await;
    w.expect(NOOP).await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[h2.as_bytes(), b"wake", b"two"]).await;
    server.stop().await;
}

#[tokio::test]
async fn a_job_for_another_function_does_not_wake_a_worker() {
    let server = TestServer::start(&[]).await;
    let mut w = worker(&server, &[b"mine"]).await;
    w.send(PRE_SLEEP, &[]).await;
    let mut client = server.connect().await;
    client.submit(SUBMIT_JOB_BG, "theirs", "", b"x").await;
    assert!(w.recv_timeout(Duration::from_millis(200)).await.is_none());
    client.submit(SUBMIT_JOB_BG, "mine", "", b"y").await;
    w.expect(NOOP).await;
    server.stop().await;
}

// ---- priorities ----

#[tokio::test]
async fn high_before_normal_before_low_and_fifo_within_each() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let plan = [
        (SUBMIT_JOB_LOW_BG, "low-1"),
        (SUBMIT_JOB_BG, "normal-1"),
        (SUBMIT_JOB_HIGH_BG, "high-1"),
        (SUBMIT_JOB_LOW_BG, "low-2"),
        (SUBMIT_JOB_BG, "normal-2"),
        (SUBMIT_JOB_HIGH_BG, "high-2"),
        (SUBMIT_JOB_LOW_BG, "low-3"),
        (SUBMIT_JOB_HIGH_BG, "high-3"),
    ];
    for (kind, data) in plan {
        client.submit(kind, "prio", "", data.as_bytes()).await;
    }
    let mut w = worker(&server, &[b"prio"]).await;
    let mut got = Vec::new();
    for _ in 0..plan.len() {
        w.send(GRAB_JOB, &[]).await;
        got.push(w.expect(JOB_ASSIGN).await.arg(2));
    }
    assert_eq!(
        got,
        ["high-1", "high-2", "high-3", "normal-1", "normal-2", "low-1", "low-2", "low-3"]
    );
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    server.stop().await;
}

#[tokio::test]
async fn a_worker_with_two_functions_gets_jobs_of_both_in_priority_order() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    client.submit(SUBMIT_JOB_LOW_BG, "fa", "", b"fa-low").await;
    client.submit(SUBMIT_JOB_BG, "fa", "", b"fa-normal-1").await;
    client.submit(SUBMIT_JOB_BG, "fb", "", b"fb-normal").await;
    client
        .submit(SUBMIT_JOB_HIGH_BG, "fb", "", b"fb-high")
        .await;
    client.submit(SUBMIT_JOB_BG, "fa", "", b"fa-normal-2").await;
    client.submit(SUBMIT_JOB_BG, "fc", "", b"not-mine").await;
    let mut w = worker(&server, &[b"fa", b"fb"]).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        w.send(GRAB_JOB, &[]).await;
        let a = w.expect(JOB_ASSIGN).await;
        assert_eq!(
            a.arg(2).split('-').next().unwrap(),
            a.arg(1),
            "function/data mismatch"
        );
        got.push(a.arg(2));
    }
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    assert_eq!(got[0], "fb-high");
    let mut normals = got[1..4].to_vec();
    let fa_order: Vec<&String> = normals.iter().filter(|d| d.starts_with("fa")).collect();
    assert_eq!(
        fa_order,
        ["fa-normal-1", "fa-normal-2"],
        "FIFO within fa: {got:?}"
    );
    normals.sort();
    assert_eq!(normals, ["fa-normal-1", "fa-normal-2", "fb-normal"]);
    assert_eq!(got[4], "fa-low");
    // All five are running on the worker; fc's job still waits.
    assert_eq!(
        client.admin("status").await,
        "fa\t3\t3\t1\nfb\t2\t2\t1\nfc\t1\t0\t0\n.\n"
    );
    server.stop().await;
}
