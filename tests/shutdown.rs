//! Shutdown of the real binary. A first SIGTERM (or Ctrl-C, or admin `shutdown graceful`) stops
//! taking connections and jobs but lets running jobs finish and their results reach their
//! clients, up to `server.shutdown_timeout_ms`; a second SIGTERM (or plain `shutdown`) stops at
//! once. Either way it exits 0, and replies the server already owes its clients are written
//! before it exits.

mod common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{BinServer, Conn};
use gearhouse::client::{ClientError, Connection};
use gearhouse::codec::{PacketType, PacketType::*};
use tokio::net::{TcpSocket, TcpStream};

fn start() -> BinServer {
    BinServer::start(&[], &[("GEARHOUSE_ENGINE__NODE_ID", "sd")])
}

/// Sends `signal` and waits up to `limit` for the exit status (SIGKILL and panic past it).
fn signal_and_wait(server: &mut BinServer, signal: i32, limit: Duration) -> (ExitStatus, Duration) {
    let sent = Instant::now();
    unsafe {
        libc::kill(server.child.id() as i32, signal);
    }
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return (status, sent.elapsed());
        }
        if sent.elapsed() > limit {
            server.kill9();
            panic!(
                "gearhouse still running {limit:?} after signal {signal}: {}",
                server.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A client whose socket has a tiny receive buffer, so the server's writes to it back up.
struct SlowReader(Connection);

impl SlowReader {
    async fn connect(addr: std::net::SocketAddr) -> SlowReader {
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let stream = sock.connect(addr).await.unwrap();
        SlowReader(Connection::from_stream(stream).unwrap())
    }

    async fn send(&mut self, kind: PacketType, args: &[&[u8]]) {
        self.0.send(kind, args).await.unwrap();
    }

    /// The next packet, or `None` at EOF (panics after 10 s).
    async fn recv(&mut self) -> Option<(PacketType, bytes::Bytes)> {
        match tokio::time::timeout(Duration::from_secs(10), self.0.recv()).await {
            Ok(Ok(p)) => Some((p.kind, p.body)),
            Ok(Err(ClientError::Closed | ClientError::Io(_))) => None,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("no packet and no EOF within 10 s"),
        }
    }
}

async fn echo(c: &mut Conn, tag: &str) {
    c.send(ECHO_REQ, &[tag.as_bytes()]).await;
    assert_eq!(&c.expect(ECHO_RES).await.body[..], tag.as_bytes());
}

#[tokio::test]
async fn sigterm_exits_zero_promptly_while_clients_are_connected() {
    let mut server = start();
    let addr = server.addr();
    let mut idle = Conn::connect(addr).await;
    echo(&mut idle, "idle").await;
    let mut sleeper = Conn::connect(addr).await;
    sleeper.send(CAN_DO, &[b"nap"]).await;
    sleeper.send(PRE_SLEEP, &[]).await;
    echo(&mut sleeper, "sleeping").await;
    let mut waiting = Conn::connect(addr).await;
    let h = waiting.submit(SUBMIT_JOB, "busy", "", b"x").await;
    let mut holder = Conn::connect(addr).await;
    holder.send(CAN_DO, &[b"busy"]).await;
    holder.send(GRAB_JOB, &[]).await;
    assert_eq!(holder.expect(JOB_ASSIGN).await.arg(0), h);
    let mut queued = Conn::connect(addr).await;
    queued.submit(SUBMIT_JOB_BG, "nobody", "", b"y").await;
    // Half a packet in flight.
    let mut partial = Conn::connect(addr).await;
    partial.send_raw(b"\0REQ\0\0\0\x10\0\0\0\x20half").await;

    // The running job may finish: its worker completes it after the signal, the waiting client
    // gets the result, and then the server exits at once.
    signal(&server, libc::SIGTERM);
    holder.send(WORK_COMPLETE, &[h.as_bytes(), b"done"]).await;
    assert_eq!(waiting.expect(WORK_COMPLETE).await.arg(1), "done");
    let (status, took) = signal_and_wait(&mut server, 0, Duration::from_secs(10));
    assert!(status.success(), "exit {status}: {}", server.log_text());
    assert!(took < Duration::from_secs(2), "took {took:?} to exit");
    for c in [
        &mut idle,
        &mut sleeper,
        &mut waiting,
        &mut holder,
        &mut queued,
        &mut partial,
    ] {
        assert!(c.is_closed_within(Duration::from_secs(2)).await);
    }
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    assert!(
        server.log_text().contains("SIGTERM"),
        "{}",
        server.log_text()
    );
}

#[tokio::test]
async fn ctrl_c_exits_zero() {
    let mut server = start();
    let mut c = Conn::connect(server.addr()).await;
    echo(&mut c, "before").await;
    let (status, took) = signal_and_wait(&mut server, libc::SIGINT, Duration::from_secs(10));
    assert!(status.success(), "exit {status}: {}", server.log_text());
    assert!(took < Duration::from_secs(2), "took {took:?} to exit");
    assert!(c.is_closed_within(Duration::from_secs(2)).await);
}

#[tokio::test]
async fn replies_already_owed_are_flushed_before_exit() {
    let mut server = start();
    let addr = server.addr();
    let mut worker = Conn::connect(addr).await;
    worker.send(CAN_DO, &[b"big"]).await;
    echo(&mut worker, "ready").await;

    // Clients that read slowly: their server tasks block writing a large result.
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut c = SlowReader::connect(addr).await;
        c.send(SUBMIT_JOB, &[b"big", b"", format!("job-{i}").as_bytes()])
            .await;
        let (kind, handle) = c.recv().await.expect("JOB_CREATED");
        assert_eq!(kind, JOB_CREATED);
        worker.send(GRAB_JOB, &[]).await;
        assert_eq!(&worker.expect(JOB_ASSIGN).await.args()[0], &handle);
        clients.push((c, handle));
    }
    let big = vec![b'b'; 8 << 20];
    for (_, h) in &clients {
        worker.send(WORK_DATA, &[h, &big]).await;
    }
    echo(&mut worker, "data sent").await;
    // Give the slow clients' tasks time to take the data and block writing it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, (_, h)) in clients.iter().enumerate() {
        worker
            .send(WORK_COMPLETE, &[h, format!("done-{i}").as_bytes()])
            .await;
    }
    // The server has handled every WORK_COMPLETE: the results are owed to the clients.
    echo(&mut worker, "complete sent").await;

    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    for (i, (c, h)) in clients.iter_mut().enumerate() {
        let (kind, body) = c.recv().await.expect("WORK_DATA");
        assert_eq!(kind, WORK_DATA);
        assert_eq!(body.len(), h.len() + 1 + big.len());
        let got = c.recv().await;
        let want = format!("{}\0done-{i}", String::from_utf8_lossy(h));
        assert_eq!(
            got.as_ref()
                .map(|(k, b)| (*k, String::from_utf8_lossy(b).into_owned())),
            Some((WORK_COMPLETE, want)),
            "client {i} lost its result at shutdown"
        );
        assert!(c.recv().await.is_none(), "expected EOF after the result");
    }
    let (status, _) = signal_and_wait(&mut server, 0, Duration::from_secs(10));
    assert!(status.success(), "exit {status}: {}", server.log_text());
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_hold_shutdown_forever() {
    // server.shutdown_timeout_ms bounds how long a closing connection may spend writing.
    let mut server = BinServer::start(
        &[],
        &[
            ("GEARHOUSE_ENGINE__NODE_ID", "sd"),
            ("GEARHOUSE_SERVER__SHUTDOWN_TIMEOUT_MS", "1500"),
        ],
    );
    let addr = server.addr();
    let mut worker = Conn::connect(addr).await;
    worker.send(CAN_DO, &[b"deaf"]).await;
    echo(&mut worker, "ready").await;
    let mut deaf = SlowReader::connect(addr).await;
    deaf.send(SUBMIT_JOB, &[b"deaf", b"", b"x"]).await;
    let (_, h) = deaf.recv().await.expect("JOB_CREATED");
    worker.send(GRAB_JOB, &[]).await;
    worker.expect(JOB_ASSIGN).await;
    let big = vec![b'd'; 12 << 20];
    worker.send(WORK_DATA, &[&h, &big]).await;
    echo(&mut worker, "sent").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The deaf client never reads again; shutdown may wait a bounded time for it.
    let (status, took) = signal_and_wait(&mut server, libc::SIGTERM, Duration::from_secs(12));
    assert!(status.success(), "exit {status}: {}", server.log_text());
    assert!(took < Duration::from_secs(4), "took {took:?} to exit");
    drop(deaf);
}

// ---- graceful: running jobs finish ----

fn start_with_timeout(timeout_ms: &str) -> BinServer {
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
    let mut server = start_with_timeout("10000");
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
    let mut server = start_with_timeout("800");
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
    let mut server = start_with_timeout("30000");
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
    let mut server = start_with_timeout("30000");
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
    let mut server = start_with_timeout("30000");
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
