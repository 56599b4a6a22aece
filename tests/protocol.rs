//! Protocol semantics over raw bytes: every submit form, status queries, options, worker
//! abilities and timeouts, wake-ups, priorities, unique-id coalescing, disconnects, retries,
//! exceptions and epoch jobs. Each test starts its own in-process server on port 0.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Conn, TestServer};
use gearhouse::codec::PacketType::{self, *};

/// A packet body: arguments joined by NUL.
fn body(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&0u8)
}

/// Expects the next packet to be exactly `kind` with `parts` as its arguments.
async fn expect_pkt(c: &mut Conn, kind: PacketType, parts: &[&[u8]]) {
    let r = c.recv().await;
    assert_eq!(
        (r.kind, String::from_utf8_lossy(&r.body)),
        (kind, String::from_utf8_lossy(&body(parts))),
        "unexpected packet"
    );
    assert_eq!(&r.body[..], &body(parts)[..]);
}

/// Proves nothing else is pending for `c`: two echo round trips with nothing in between.
/// (A packet already queued for the connection is written together with the first echo.)
async fn assert_quiet(c: &mut Conn) {
    for tag in [&b"quiet-1"[..], b"quiet-2"] {
        c.send(ECHO_REQ, &[tag]).await;
        expect_pkt(c, ECHO_RES, &[tag]).await;
    }
}

/// A connection that registered `funcs` (the echo proves the server processed them).
async fn worker(server: &TestServer, funcs: &[&[u8]]) -> Conn {
    let mut w = server.connect().await;
    for f in funcs {
        w.send(CAN_DO, &[f]).await;
    }
    w.send(ECHO_REQ, &[b"ready"]).await;
    expect_pkt(&mut w, ECHO_RES, &[b"ready"]).await;
    w
}

async fn submit_raw(c: &mut Conn, kind: PacketType, args: &[&[u8]]) -> String {
    c.send(kind, args).await;
    c.expect(JOB_CREATED).await.arg(0)
}

/// Polls an admin listing until `pred` holds (deadline 5 s).
async fn admin_until(c: &mut Conn, cmd: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = c.admin(cmd).await;
        if pred(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{cmd} never satisfied the condition: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn unix_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---- submit forms ----

#[tokio::test]
async fn every_plain_submit_form_is_queued_at_its_priority_and_answered_by_job_assign() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let forms = [
        (SUBMIT_JOB, false),
        (SUBMIT_JOB_HIGH, false),
        (SUBMIT_JOB_LOW, false),
        (SUBMIT_JOB_BG, true),
        (SUBMIT_JOB_HIGH_BG, true),
        (SUBMIT_JOB_LOW_BG, true),
    ];
    let mut handles = Vec::new();
    for (i, (kind, _)) in forms.iter().enumerate() {
        let h = client
            .submit(*kind, "forms", "", format!("data-{i}").as_bytes())
            .await;
        assert!(h.starts_with("H:test:"), "{h}");
        assert!(!handles.contains(&h), "handle {h} given twice");
        handles.push(h);
    }
    assert_eq!(
        client.admin("prioritystatus").await,
        "forms\t2\t2\t2\t0\n.\n"
    );
    assert_eq!(client.admin("status").await, "forms\t6\t0\t0\n.\n");

    let mut w = worker(&server, &[b"forms"]).await;
    // HIGH first, then NORMAL, then LOW; FIFO within each (fg was submitted before bg).
    for i in [1, 4, 0, 3, 2, 5] {
        let h = handles[i].as_bytes();
        let data = format!("data-{i}");
        let result = format!("result-{i}");
        w.send(GRAB_JOB, &[]).await;
        expect_pkt(&mut w, JOB_ASSIGN, &[h, b"forms", data.as_bytes()]).await;
        w.send(WORK_COMPLETE, &[h, result.as_bytes()]).await;
        if !forms[i].1 {
            // Only foreground submits hear about results (a leaked background result would
            // arrive here instead and fail the comparison).
            expect_pkt(&mut client, WORK_COMPLETE, &[h, result.as_bytes()]).await;
        }
    }
    w.send(GRAB_JOB, &[]).await;
    w.expect(NO_JOB).await;
    assert_quiet(&mut client).await;
    assert_eq!(client.admin("status").await, "forms\t0\t0\t1\n.\n");
    server.stop().await;
}

#[tokio::test]
async fn reduce_jobs_get_job_assign_all_and_plain_jobs_get_job_assign_uniq_on_grab_all() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let h1 = submit_raw(
        &mut client,
        SUBMIT_REDUCE_JOB,
        &[b"mapper", b"r-1", b"summer", b"in1"],
    )
    .await;
    let h2 = submit_raw(
        &mut client,
        SUBMIT_REDUCE_JOB_BACKGROUND,
        &[b"mapper", b"r-2", b"summer", b"in2"],
    )
    .await;
    let h3 = client.submit(SUBMIT_JOB, "mapper", "plain-3", b"in3").await;
    let mut w = worker(&server, &[b"mapper"]).await;
    w.send(GRAB_JOB_ALL, &[]).await;
    expect_pkt(
        &mut w,
        JOB_ASSIGN_ALL,
        &[h1.as_bytes(), b"mapper", b"r-1", b"summer", b"in1"],
    )
    .await;
    w.send(GRAB_JOB_ALL, &[]).await;
    expect_pkt(
        &mut w,
        JOB_ASSIGN_ALL,
        &[h2.as_bytes(), b"mapper", b"r-2", b"summer", b"in2"],
    )
    .await;
    w.send(GRAB_JOB_ALL, &[]).await;
    expect_pkt(
        &mut w,
        JOB_ASSIGN_UNIQ,
        &[h3.as_bytes(), b"mapper", b"plain-3", b"in3"],
    )
    .await;
    w.send(GRAB_JOB_ALL, &[]).await;
    w.expect(NO_JOB).await;

    // The foreground reduce job reports to its client; the background one does not.
    w.send(WORK_COMPLETE, &[h2.as_bytes(), b"out2"]).await;
    w.send(WORK_COMPLETE, &[h1.as_bytes(), b"out1"]).await;
    expect_pkt(&mut client, WORK_COMPLETE, &[h1.as_bytes(), b"out1"]).await;
    w.send(WORK_COMPLETE, &[h3.as_bytes(), b"out3"]).await;
    expect_pkt(&mut client, WORK_COMPLETE, &[h3.as_bytes(), b"out3"]).await;
    assert_quiet(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn grab_job_uniq_gets_job_assign_uniq_and_grab_job_drops_the_reducer() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let h1 = client
        .submit(SUBMIT_JOB_BG, "uq", "the-unique", b"payload")
        .await;
    let h2 = submit_raw(
        &mut client,
        SUBMIT_REDUCE_JOB_BACKGROUND,
        &[b"uq", b"r", b"red", b"p2"],
    )
    .await;
    let mut w = worker(&server, &[b"uq"]).await;
    w.send(GRAB_JOB_UNIQ, &[]).await;
    expect_pkt(
        &mut w,
        JOB_ASSIGN_UNIQ,
        &[h1.as_bytes(), b"uq", b"the-unique", b"payload"],
    )
    .await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[h2.as_bytes(), b"uq", b"p2"]).await;
    server.stop().await;
}

#[tokio::test]
async fn submit_job_epoch_in_the_past_runs_at_once() {
    let server = TestServer::start(&[]).await;
    let mut client = server.connect().await;
    let h = submit_raw(
        &mut client,
        SUBMIT_JOB_EPOCH,
        &[b"ep", b"", b"1000", b"old"],
    )
    .await;
    let mut w = worker(&server, &[b"ep"]).await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[h.as_bytes(), b"ep", b"old"]).await;
    // Epoch jobs are background jobs: the client hears nothing.
    w.send(WORK_COMPLETE, &[h.as_bytes(), b"x"]).await;
    w.send(ECHO_REQ, &[b"sync"]).await;
    expect_pkt(&mut w, ECHO_RES, &[b"sync"]).await;
    assert_quiet(&mut client).await;
    server.stop().await;
}

// ---- status, echo, options, client id ----

#[tokio::test]
async fn get_status_and_get_status_unique_for_queued_running_and_unknown_jobs() {
    let server = TestServer::start(&[]).await;
    let mut c1 = server.connect().await;
    let h = c1.submit(SUBMIT_JOB, "st", "su", b"d").await;
    let hb = h.as_bytes();
    c1.send(GET_STATUS, &[hb]).await;
    expect_pkt(&mut c1, STATUS_RES, &[hb, b"1", b"0", b"0", b"0"]).await;
    c1.send(GET_STATUS_UNIQUE, &[b"su"]).await;
    expect_pkt(
        &mut c1,
        STATUS_RES_UNIQUE,
        &[b"su", b"1", b"0", b"0", b"0", b"1"],
    )
    .await;

    let mut w = worker(&server, &[b"st"]).await;
    w.send(GRAB_JOB, &[]).await;
    expect_pkt(&mut w, JOB_ASSIGN, &[hb, b"st", b"d"]).await;
    c1.send(GET_STATUS, &[hb]).await;
    expect_pkt(&mut c1, STATUS_RES, &[hb, b"1", b"1", b"0", b"0"]).await;
    w.send(WORK_STATUS, &[hb, b"3", b"10"]).await;
    expect_pkt(&mut c1, WORK_STATUS, &[hb, b"3", b"10"]).await;
    c1.send(GET_STATUS, &[hb]).await;
    expect_pkt(&mut c1, STATUS_RES, &[hb, b"1", b"1", b"3", b"10"]).await;

    // A second foreground client joins: two waiting clients.
    let mut c2 = server.connect().await;
    assert_eq!(c2.submit(SUBMIT_JOB, "st", "su", b"other").await, h);
    c2.send(GET_STATUS_UNIQUE, &[b"su"]).await;
    expect_pkt(
        &mut c2,
        STATUS_RES_UNIQUE,
        &[b"su", b"1", b"1", b"3", b"10", b"2"],
    )
    .await;

    // Unknown handle and unique.
    c2.send(GET_STATUS, &[b"H:test:999999"]).await;
    expect_pkt(
        &mut c2,
        STATUS_RES,
        &[b"H:test:999999", b"0", b"0", b"0", b"0"],
    )
    .await;
    c2.send(GET_STATUS_UNIQUE, &[b"nope"]).await;
    expect_pkt(
        &mut c2,
        STATUS_RES_UNIQUE,
        &[b"nope", b"0", b"0", b"0", b"0", b"0"],
    )
    .await;

    w.send(WORK_COMPLETE, &[hb, b"done"]).await;
    expect_pkt(&mut c1, WORK_COMPLETE, &[hb, b"done"]).await;
    expect_pkt(&mut c2, WORK_COMPLETE, &[hb, b"done"]).await;
    c1.send(GET_STATUS, &[hb]).await;
    expect_pkt(&mut c1, STATUS_RES, &[hb, b"0", b"0", b"0", b"0"]).await;
    server.stop().await;
}

#[tokio::test]
async fn echo_returns_the_exact_bytes() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect().await;
    let data: &[u8] = b"hello\0world \xff\xfe-\x01";
    c.send(ECHO_REQ, &[data]).await;
    let r = c.expect(ECHO_RES).await;
    assert_eq!(&r.body[..], data);
    c.send(ECHO_REQ, &[b""]).await;
    assert!(c.expect(ECHO_RES).await.body.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn option_req_accepts_exceptions_and_refuses_unknown_options() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect().await;
    c.send(OPTION_REQ, &[b"exceptions"]).await;
    expect_pkt(&mut c, OPTION_RES, &[b"exceptions"]).await;
    c.send(OPTION_REQ, &[b"telepathy"]).await;
    let e = c.expect(ERROR).await;
    assert_eq!(e.arg(0), "UNKNOWN_OPTION");
    // The connection stays usable.
    assert_quiet(&mut c).await;
    server.stop().await;
}

#[tokio::test]
async fn set_client_id_shows_in_workers() {
    let server = TestServer::start(&[]).await;
    let mut w = server.connect().await;
    w.send(SET_CLIENT_ID, &[b"worker-7"]).await;
    w.send(CAN_DO, &[b"fa"]).await;
    w.send(CAN_DO, &[b"fb"]).await;
    assert_quiet(&mut w).await;
    let mut admin = server.connect().await;
    let out = admin.admin("workers").await;
    let line = out
        .lines()
        .find(|l| l.contains("worker-7"))
        .unwrap_or_else(|| panic!("no worker-7 in {out:?}"));
    let (head, funcs) = line.split_once(" : ").expect("`:` separator");
    let mut head = head.split(' ');
    assert!(head.next().unwrap().parse::<u64>().is_ok(), "{line}");
    assert_eq!(head.next(), Some("127.0.0.1"));
    assert_eq!(head.next(), Some("worker-7"));
    let mut funcs: Vec<&str> = funcs.split(' ').collect();
    funcs.sort();
    assert_eq!(funcs, ["fa", "fb"]);
    server.stop().await;
}

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
