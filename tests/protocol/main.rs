//! Protocol semantics over raw bytes: every submit form, status queries, options, worker
//! abilities and timeouts, wake-ups, priorities, unique-id coalescing, disconnects, retries,
//! exceptions and epoch jobs. Each test starts its own in-process server on port 0.
//!
//! One test binary: this file holds the helpers, submit forms and status queries; `workers.rs`
//! worker abilities, timeouts, wake-ups and priorities; `jobs.rs` coalescing, disconnects,
//! results from the wrong connection, exceptions and epoch jobs.

#[path = "../common/mod.rs"]
mod common;

mod jobs;
mod workers;

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
