//! Graceful shutdown of the real binary: SIGTERM (and Ctrl-C) exit 0 promptly while clients are
//! connected, and replies the server already owes its clients are written before it exits.

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

    let (status, took) = signal_and_wait(&mut server, libc::SIGTERM, Duration::from_secs(10));
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
