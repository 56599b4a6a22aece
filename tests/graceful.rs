//! Graceful shutdown of the real binary: a first SIGTERM (or admin `shutdown graceful`) stops
//! taking connections and jobs but lets running jobs finish and their results reach their
//! clients, up to `server.shutdown_timeout_ms`; a second SIGTERM (or plain `shutdown`) stops at
//! once.

mod common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{BinServer, Conn};
use gearhouse::codec::PacketType::*;
use tokio::net::TcpStream;

fn start(timeout_ms: &str) -> BinServer {
    BinServer::start(
        &[],
        &[
            ("GEARHOUSE_ENGINE__NODE_ID", "gs"),
            ("GEARHOUSE_SERVER__SHUTDOWN_TIMEOUT_MS", timeout_ms),
        ],
    )
}

fn signal(server: &BinServer, signal: i32) {
    unsafe {
        libc::kill(server.child.id() as i32, signal);
    }
}

/// The exit status once the process ends, or `None` if it still runs after `limit`.
fn exited_within(server: &mut BinServer, limit: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A worker for `function` holding one foreground job that `client` waits for.
async fn running_job(addr: std::net::SocketAddr, function: &str) -> (Conn, Conn, String) {
    let mut worker = Conn::connect(addr).await;
    worker.send(CAN_DO, &[function.as_bytes()]).await;
    let mut client = Conn::connect(addr).await;
    let handle = client.submit(SUBMIT_JOB, function, "", b"payload").await;
    worker.send(GRAB_JOB, &[]).await;
    assert_eq!(worker.expect(JOB_ASSIGN).await.arg(0), handle);
    (worker, client, handle)
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish_and_its_result_reach_the_client() {
    let mut server = start("10000");
    let addr = server.addr();
    let (mut worker, mut client, handle) = running_job(addr, "resize").await;
    let mut other = Conn::connect(addr).await;
    let mut idle_worker = Conn::connect(addr).await;
    idle_worker.send(CAN_DO, &[b"resize"]).await;
    let mut queued = Conn::connect(addr).await;
    queued.submit(SUBMIT_JOB_BG, "resize", "", b"later").await;

    signal(&server, libc::SIGTERM);
    // Draining: the server is still up for the job in progress...
    assert!(exited_within(&mut server, Duration::from_millis(500)).is_none());
    // ...but takes no new connection, no new job, and hands out no more work.
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    other.send(SUBMIT_JOB, &[b"resize", b"", b"new"]).await;
    let refused = other.expect(ERROR).await;
    assert_eq!(refused.arg(0), "QUEUE_ERROR");
    assert!(
        refused.arg(1).contains("shutting down"),
        "{}",
        refused.arg(1)
    );
    idle_worker.send(GRAB_JOB, &[]).await;
    idle_worker.expect(NO_JOB).await;

    // The job finishes; its result reaches the client, then the server exits.
    let sent = Instant::now();
    worker
        .send(WORK_COMPLETE, &[handle.as_bytes(), b"resized"])
        .await;
    let done = client.expect(WORK_COMPLETE).await;
    assert_eq!(done.args()[1].as_ref(), b"resized");
    let status = exited_within(&mut server, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running after the job ended: {}", server.log_text()));
    assert!(status.success(), "exit {status}: {}", server.log_text());
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "{:?}",
        sent.elapsed()
    );
    let log = server.log_text();
    assert!(log.contains("draining"), "{log}");
    assert!(
        log.contains("exiting with 1 jobs in the in-memory queue"),
        "{log}"
    );
}

#[tokio::test]
async fn the_drain_ends_at_the_shutdown_timeout() {
    let mut server = start("800");
    let (_worker, mut client, _) = running_job(server.addr(), "slow").await;
    let sent = Instant::now();
    signal(&server, libc::SIGTERM);
    let status = exited_within(&mut server, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running: {}", server.log_text()));
    let took = sent.elapsed();
    assert!(status.success(), "exit {status}: {}", server.log_text());
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "exited after {took:?} with server.shutdown_timeout_ms = 800"
    );
    assert!(client.is_closed_within(Duration::from_secs(2)).await);
    assert!(server.log_text().contains("deadline reached"));
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once() {
    let mut server = start("30000");
    let (_worker, mut client, _) = running_job(server.addr(), "slow").await;
    signal(&server, libc::SIGTERM);
    assert!(exited_within(&mut server, Duration::from_millis(300)).is_none());
    let sent = Instant::now();
    signal(&server, libc::SIGTERM);
    let status = exited_within(&mut server, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running: {}", server.log_text()));
    assert!(status.success(), "exit {status}: {}", server.log_text());
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert!(client.is_closed_within(Duration::from_secs(2)).await);
    assert!(server.log_text().contains("again: stopping at once"));
}

#[tokio::test]
async fn admin_shutdown_graceful_drains_and_plain_shutdown_does_not() {
    // graceful: waits for the running job.
    let mut server = start("30000");
    let addr = server.addr();
    let (mut worker, mut client, handle) = running_job(addr, "report").await;
    let mut admin = Conn::connect(addr).await;
    assert_eq!(admin.admin("shutdown graceful").await.trim(), "OK");
    assert!(exited_within(&mut server, Duration::from_millis(500)).is_none());
    worker
        .send(WORK_COMPLETE, &[handle.as_bytes(), b"ok"])
        .await;
    client.expect(WORK_COMPLETE).await;
    let status = exited_within(&mut server, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running: {}", server.log_text()));
    assert!(status.success());

    // plain: exits at once although a job runs.
    let mut server = start("30000");
    let addr = server.addr();
    let (_worker, mut client, _) = running_job(addr, "report").await;
    let mut admin = Conn::connect(addr).await;
    let sent = Instant::now();
    assert_eq!(admin.admin("shutdown").await.trim(), "OK");
    let status = exited_within(&mut server, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running: {}", server.log_text()));
    assert!(status.success());
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert!(client.is_closed_within(Duration::from_secs(2)).await);
}
