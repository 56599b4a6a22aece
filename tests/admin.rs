//! The admin text protocol on the Gearman port: gearmand's exact output formats, case-insensitive
//! commands, admin lines mixed with binary packets, the admin-network restriction on commands
//! that change state, and `shutdown`.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{Conn, TestServer};
use gearhouse::codec::{put_response, PacketType::*};
use tokio::io::AsyncReadExt;

/// Reads raw bytes from `c` until `done` holds for everything read so far (5 s deadline).
async fn read_until(c: &mut Conn, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done(&got) {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, c.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
            other => panic!(
                "incomplete answer ({other:?}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    got
}

/// Sends an admin command whose answer is one line.
async fn line(c: &mut Conn, cmd: &str) -> String {
    c.send_raw(format!("{cmd}\r\n").as_bytes()).await;
    let got = read_until(c, |b| b.ends_with(b"\n")).await;
    String::from_utf8(got).unwrap()
}

/// Sends an admin command whose answer is a listing ending in a line `.`.
async fn listing(c: &mut Conn, cmd: &str) -> String {
    c.send_raw(format!("{cmd}\n").as_bytes()).await;
    let got = read_until(c, |b| {
        b == b".\n" || b.ends_with(b"\n.\n") || (b.starts_with(b"ERR") && b.ends_with(b"\n"))
    })
    .await;
    String::from_utf8(got).unwrap()
}

async fn worker(server: &TestServer, funcs: &[&str]) -> Conn {
    let mut w = server.connect().await;
    for f in funcs {
        w.send(CAN_DO, &[f.as_bytes()]).await;
    }
    w.send(ECHO_REQ, &[b"ready"]).await;
    w.expect(ECHO_RES).await;
    w
}

#[tokio::test]
async fn status_and_prioritystatus_formats() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    assert_eq!(listing(&mut admin, "status").await, ".\n");
    let mut client = server.connect().await;
    client.submit(SUBMIT_JOB_HIGH_BG, "alpha", "", b"a1").await;
    client.submit(SUBMIT_JOB, "alpha", "", b"a2").await;
    client.submit(SUBMIT_JOB_LOW_BG, "alpha", "", b"a3").await;
    client.submit(SUBMIT_JOB_BG, "beta", "", b"b1").await;
    assert_eq!(line(&mut admin, "create function gamma").await, "OK\r\n");
    let mut w1 = worker(&server, &["alpha", "beta"]).await;
    let _w2 = worker(&server, &["alpha"]).await;
    w1.send(GRAB_JOB, &[]).await;
    assert_eq!(w1.expect(JOB_ASSIGN).await.arg(2), "a1");

    // FUNC TOTAL RUNNING WORKERS; TOTAL includes running; sorted by name.
    assert_eq!(
        listing(&mut admin, "status").await,
        "alpha\t3\t1\t2\nbeta\t1\t0\t1\ngamma\t0\t0\t0\n.\n"
    );
    // FUNC HIGH NORMAL LOW WORKERS (queued jobs).
    assert_eq!(
        listing(&mut admin, "prioritystatus").await,
        "alpha\t0\t1\t1\t2\nbeta\t0\t1\t0\t1\ngamma\t0\t0\t0\t0\n.\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn workers_format_lists_every_connection() {
    let server = TestServer::start(&[]).await;
    let mut w = server.connect().await;
    w.send(SET_CLIENT_ID, &[b"w-1"]).await;
    w.send(CAN_DO, &[b"f1"]).await;
    w.send(CAN_DO_TIMEOUT, &[b"f2", b"1000"]).await;
    w.send(ECHO_REQ, &[b"sync"]).await;
    w.expect(ECHO_RES).await;
    let mut client = server.connect().await;
    client.submit(SUBMIT_JOB_BG, "f1", "", b"x").await;
    let mut admin = server.connect().await;
    // FD IP CLIENT_ID : FUNCTIONS (newest registered first); `-` when no client id.
    assert_eq!(
        listing(&mut admin, "workers").await,
        "1 127.0.0.1 w-1 : f2 f1\n2 127.0.0.1 - :\n3 127.0.0.1 - :\n.\n"
    );
    drop(client);
    w.send(CANT_DO, &[b"f2"]).await;
    w.send(ECHO_REQ, &[b"sync"]).await;
    w.expect(ECHO_RES).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = listing(&mut admin, "workers").await;
        if out == "1 127.0.0.1 w-1 : f1\n3 127.0.0.1 - :\n.\n" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn show_jobs_and_show_unique_jobs_formats() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    assert_eq!(listing(&mut admin, "show jobs").await, ".\n");
    assert_eq!(listing(&mut admin, "show unique jobs").await, ".\n");
    let mut client = server.connect().await;
    let h1 = client.submit(SUBMIT_JOB_BG, "sj", "u-a", b"1").await;
    let h2 = client.submit(SUBMIT_JOB, "sj", "", b"2").await;
    let h3 = client.submit(SUBMIT_JOB_BG, "sj2", "u-b", b"3").await;
    let mut w = worker(&server, &["sj"]).await;
    w.send(GRAB_JOB, &[]).await;
    assert_eq!(w.expect(JOB_ASSIGN).await.arg(0), h1);

    // HANDLE RETRIES IGNORE QUEUED
    assert_eq!(
        listing(&mut admin, "show jobs").await,
        format!("{h1}\t0\t0\t0\n{h2}\t0\t0\t1\n{h3}\t0\t0\t1\n.\n")
    );
    let uniques = listing(&mut admin, "show unique jobs").await;
    let mut lines: Vec<&str> = uniques.lines().collect();
    assert_eq!(lines.pop(), Some("."));
    lines.sort();
    assert_eq!(lines, ["u-a", "u-b"], "{uniques:?}");

    // A worker crash puts the job back with one retry.
    drop(w);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let expected = format!("{h1}\t1\t0\t1\n{h2}\t0\t0\t1\n{h3}\t0\t0\t1\n.\n");
    loop {
        let out = listing(&mut admin, "show jobs").await;
        if out == expected {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The requeued job went to the tail of its priority; running it keeps its retry count.
    let mut w = worker(&server, &["sj"]).await;
    w.send(GRAB_JOB, &[]).await;
    assert_eq!(w.expect(JOB_ASSIGN).await.arg(0), h2);
    w.send(GRAB_JOB, &[]).await;
    assert_eq!(w.expect(JOB_ASSIGN).await.arg(0), h1);
    assert_eq!(
        listing(&mut admin, "show jobs").await,
        format!("{h1}\t1\t0\t0\n{h2}\t0\t0\t0\n{h3}\t0\t0\t1\n.\n")
    );
    server.stop().await;
}

#[tokio::test]
async fn maxqueue_limits_submits_per_priority() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    let mut client = server.connect().await;
    assert_eq!(line(&mut admin, "maxqueue mq 1").await, "OK\r\n");
    client.submit(SUBMIT_JOB_BG, "mq", "first", b"1").await;
    client.send(SUBMIT_JOB_BG, &[b"mq", b"", b"2"]).await;
    assert_eq!(client.expect(ERROR).await.arg(0), "QUEUE_ERROR");
    // A submit that coalesces with a queued job adds nothing and is accepted.
    client.submit(SUBMIT_JOB_BG, "mq", "first", b"1").await;
    // The limit applies to each priority separately.
    client.submit(SUBMIT_JOB_HIGH_BG, "mq", "", b"3").await;
    client.send(SUBMIT_JOB_HIGH, &[b"mq", b"", b"4"]).await;
    assert_eq!(client.expect(ERROR).await.arg(0), "QUEUE_ERROR");
    assert_eq!(
        listing(&mut admin, "prioritystatus").await,
        "mq\t1\t1\t0\t0\n.\n"
    );
    // Once a worker takes a job there is room again.
    let mut w = worker(&server, &["mq"]).await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(JOB_ASSIGN).await;
    client.submit(SUBMIT_JOB_HIGH_BG, "mq", "", b"5").await;

    // HIGH NORMAL LOW form; 0 = no limit.
    assert_eq!(line(&mut admin, "maxqueue mq3 2 1 0").await, "OK\r\n");
    client.submit(SUBMIT_JOB_BG, "mq3", "", b"n").await;
    client.send(SUBMIT_JOB_BG, &[b"mq3", b"", b"n"]).await;
    assert_eq!(client.expect(ERROR).await.arg(0), "QUEUE_ERROR");
    for _ in 0..2 {
        client.submit(SUBMIT_JOB_HIGH_BG, "mq3", "", b"h").await;
    }
    client.send(SUBMIT_JOB_HIGH_BG, &[b"mq3", b"", b"h"]).await;
    assert_eq!(client.expect(ERROR).await.arg(0), "QUEUE_ERROR");
    for _ in 0..5 {
        client.submit(SUBMIT_JOB_LOW_BG, "mq3", "", b"l").await;
    }
    assert_eq!(
        line(&mut admin, "maxqueue").await,
        "ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+maxqueue\r\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_job_removes_a_queued_job_and_fails_its_clients() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    let mut client = server.connect().await;
    let h = client.submit(SUBMIT_JOB, "cx", "c-1", b"x").await;
    let running = client.submit(SUBMIT_JOB_BG, "cy", "", b"y").await;
    let mut w = worker(&server, &["cy"]).await;
    w.send(GRAB_JOB, &[]).await;
    w.expect(JOB_ASSIGN).await;

    assert_eq!(line(&mut admin, &format!("cancel job {h}")).await, "OK\r\n");
    let fail = client.expect(WORK_FAIL).await;
    assert_eq!(&fail.body[..], h.as_bytes());
    assert_eq!(
        listing(&mut admin, "show jobs").await,
        format!("{running}\t0\t0\t0\n.\n")
    );
    assert_eq!(
        line(&mut admin, &format!("cancel job {h}")).await,
        "ERR UNKNOWN_JOB\r\n"
    );
    assert_eq!(
        line(&mut admin, &format!("cancel job {running}")).await,
        "ERR JOB_RUNNING job+is+running+on+a+worker\r\n"
    );
    assert_eq!(
        line(&mut admin, "cancel job").await,
        "ERR INVALID_ARGUMENTS cancel+job+HANDLE\r\n"
    );
    // The unique is free again.
    assert_ne!(client.submit(SUBMIT_JOB_BG, "cx", "c-1", b"x").await, h);
    server.stop().await;
}

#[tokio::test]
async fn create_and_drop_function() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    assert_eq!(line(&mut admin, "create function newf").await, "OK\r\n");
    assert_eq!(listing(&mut admin, "status").await, "newf\t0\t0\t0\n.\n");
    assert_eq!(line(&mut admin, "drop function newf").await, "OK\r\n");
    assert_eq!(listing(&mut admin, "status").await, ".\n");
    assert_eq!(
        line(&mut admin, "drop function missing").await,
        "ERR function not found\r\n"
    );
    let _w = worker(&server, &["busy"]).await;
    assert_eq!(
        line(&mut admin, "drop function busy").await,
        "ERR FUNCTION_IN_USE function+has+jobs+or+workers\r\n"
    );
    assert_eq!(listing(&mut admin, "status").await, "busy\t0\t0\t1\n.\n");
    server.stop().await;
}

#[tokio::test]
async fn getpid_version_and_verbose() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    assert_eq!(
        line(&mut admin, "getpid").await,
        format!("OK {}\n", std::process::id())
    );
    assert_eq!(
        line(&mut admin, "version").await,
        format!("OK {}\n", env!("CARGO_PKG_VERSION"))
    );
    let v = line(&mut admin, "verbose").await;
    let level = v
        .strip_prefix("OK ")
        .and_then(|l| l.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("{v:?}"));
    assert!(
        ["OFF", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
        "{v:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_commands_get_gearmands_error_line() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    assert_eq!(
        line(&mut admin, "frobnicate now").await,
        "ERR UNKNOWN_COMMAND Unknown+server+commandfrobnicate\r\n"
    );
    assert_eq!(
        line(&mut admin, "Frob").await,
        "ERR UNKNOWN_COMMAND Unknown+server+commandFrob\r\n"
    );
    // The connection goes on.
    assert_eq!(listing(&mut admin, "status").await, ".\n");
    server.stop().await;
}

#[tokio::test]
async fn commands_are_case_insensitive() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    let mut client = server.connect().await;
    let h = client.submit(SUBMIT_JOB_BG, "Mixed", "Uniq", b"x").await;
    assert_eq!(line(&mut admin, "CREATE FUNCTION Other").await, "OK\r\n");
    for (upper, lower) in [
        ("STATUS", "status"),
        ("Workers", "workers"),
        ("PRIORITYSTATUS", "prioritystatus"),
        ("SHOW JOBS", "show jobs"),
        ("Show Unique Jobs", "show unique jobs"),
    ] {
        assert_eq!(
            listing(&mut admin, upper).await,
            listing(&mut admin, lower).await
        );
    }
    // Names keep their case.
    assert_eq!(
        listing(&mut admin, "Status").await,
        "Mixed\t1\t0\t0\nOther\t0\t0\t0\n.\n"
    );
    assert_eq!(listing(&mut admin, "SHOW UNIQUE JOBS").await, "Uniq\n.\n");
    assert_eq!(
        line(&mut admin, "GETPID").await,
        format!("OK {}\n", std::process::id())
    );
    assert_eq!(
        line(&mut admin, "Version").await,
        format!("OK {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert!(line(&mut admin, "VERBOSE").await.starts_with("OK "));
    assert_eq!(line(&mut admin, "MaxQueue Mixed 1").await, "OK\r\n");
    client.send(SUBMIT_JOB_BG, &[b"Mixed", b"", b"y"]).await;
    assert_eq!(client.expect(ERROR).await.arg(0), "QUEUE_ERROR");
    assert_eq!(line(&mut admin, &format!("Cancel Job {h}")).await, "OK\r\n");
    assert_eq!(line(&mut admin, "DROP FUNCTION Other").await, "OK\r\n");
    assert_eq!(listing(&mut admin, "status").await, "Mixed\t0\t0\t0\n.\n");
    server.stop().await;
}

#[tokio::test]
async fn admin_lines_and_binary_packets_mix_on_one_connection() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect().await;
    let mut sent = BytesMut::new();
    let req = |b: &mut BytesMut, kind, args: &[&[u8]]| {
        gearhouse::codec::put_packet(b, gearhouse::codec::MAGIC_REQ, kind, args)
    };
    req(&mut sent, ECHO_REQ, &[b"a"]);
    sent.extend_from_slice(b"status\n");
    req(&mut sent, SUBMIT_JOB_BG, &[b"mixf", b"", b"data"]);
    sent.extend_from_slice(b"status\r\n");
    req(&mut sent, ECHO_REQ, &[b"b"]);
    sent.extend_from_slice(b"version\n");
    c.send_raw(&sent).await;

    let mut want = BytesMut::new();
    put_response(&mut want, ECHO_RES, &[b"a"]);
    want.extend_from_slice(b".\n");
    put_response(&mut want, JOB_CREATED, &[b"H:test:1"]);
    want.extend_from_slice(b"mixf\t1\t0\t0\n.\n");
    put_response(&mut want, ECHO_RES, &[b"b"]);
    want.extend_from_slice(format!("OK {}\n", env!("CARGO_PKG_VERSION")).as_bytes());
    let got = read_until(&mut c, |b| b.len() >= want.len()).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    // Still both ways after that.
    c.send(ECHO_REQ, &[b"c"]).await;
    c.expect(ECHO_RES).await;
    assert_eq!(c.admin("status").await, "mixf\t1\t0\t0\n.\n");
    server.stop().await;
}

#[tokio::test]
async fn state_changing_commands_are_refused_outside_admin_networks() {
    // Loopback is not an admin network here.
    let server = TestServer::start(&[("GEARHOUSE_SERVER__ADMIN_NETWORKS", "10.0.0.0/8")]).await;
    let mut client = server.connect().await;
    let h = client.submit(SUBMIT_JOB_BG, "keep", "", b"x").await;
    let mut admin = server.connect().await;
    let denied = |what: &str| {
        format!(
            "ERR PERMISSION_DENIED {}+is+accepted+only+from+server.admin_networks\r\n",
            what.replace(' ', "+")
        )
    };
    assert_eq!(line(&mut admin, "shutdown").await, denied("shutdown"));
    assert_eq!(
        line(&mut admin, "shutdown graceful").await,
        denied("shutdown")
    );
    assert_eq!(
        line(&mut admin, &format!("cancel job {h}")).await,
        denied("cancel job")
    );
    assert_eq!(
        line(&mut admin, "drop function keep").await,
        denied("drop function")
    );
    assert_eq!(
        line(&mut admin, "maxqueue keep 0").await,
        denied("maxqueue")
    );
    assert_eq!(
        line(&mut admin, "create function other").await,
        denied("create function")
    );
    assert_eq!(
        line(&mut admin, "takeover other-node").await,
        denied("takeover")
    );
    // Nothing changed, and read-only commands work.
    assert_eq!(listing(&mut admin, "status").await, "keep\t1\t0\t0\n.\n");
    assert_eq!(
        listing(&mut admin, "show jobs").await,
        format!("{h}\t0\t0\t1\n.\n")
    );
    assert_eq!(
        line(&mut admin, "getpid").await,
        format!("OK {}\n", std::process::id())
    );
    // The server is still up for everyone.
    let mut fresh = server.connect().await;
    fresh.send(ECHO_REQ, &[b"alive"]).await;
    assert_eq!(&fresh.expect(ECHO_RES).await.body[..], b"alive");
    server.stop().await;
}

#[tokio::test]
async fn takeover_says_why_it_cannot_run_without_persistence_or_arguments() {
    let server = TestServer::start(&[]).await;
    let mut admin = server.connect().await;
    assert_eq!(
        line(&mut admin, "takeover").await,
        "ERR INVALID_ARGUMENTS usage:+takeover+<node+id>+[<namespace>+<memcached+host:port,...>]\r\n"
    );
    let answer = line(&mut admin, "takeover gh1").await;
    assert!(
        answer.starts_with("ERR UNKNOWN_OPTION persistence+is+off"),
        "{answer}"
    );
    // The connection goes on.
    assert_eq!(listing(&mut admin, "status").await, ".\n");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_from_loopback_stops_the_server() {
    let mut server = TestServer::start(&[]).await;
    let mut other = server.connect().await;
    other.send(ECHO_REQ, &[b"x"]).await;
    other.expect(ECHO_RES).await;
    let mut admin = server.connect().await;
    assert_eq!(line(&mut admin, "shutdown").await, "OK\r\n");
    assert!(admin.is_closed_within(Duration::from_secs(5)).await);
    assert!(other.is_closed_within(Duration::from_secs(5)).await);
    let done = tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("server did not stop within 5 s");
    assert!(matches!(done, Ok(Ok(()))), "{done:?}");
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "still accepting connections"
    );
}
