//! Bad input and limits: each offending connection gets ERROR or is closed, while another
//! connection opened before it keeps working (an echo round trip after the offence), and the
//! server's memory stays bounded.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{BinServer, Conn, TestServer};
use gearhouse::codec::{put_packet, PacketType::*, MAGIC_REQ, MAGIC_RES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// An echo round trip: proves `c` and the server are fine.
async fn echo_ok(c: &mut Conn, tag: &str) {
    c.send(ECHO_REQ, &[tag.as_bytes()]).await;
    let r = c.expect(ECHO_RES).await;
    assert_eq!(&r.body[..], tag.as_bytes());
}

/// The offender gets `ERROR code` and then the server closes it.
async fn error_then_closed(c: &mut Conn, code: &str) {
    let e = c.expect(ERROR).await;
    assert_eq!(e.arg(0), code, "{:?}", String::from_utf8_lossy(&e.body));
    assert!(
        c.is_closed_within(Duration::from_secs(3)).await,
        "connection left open after {code}"
    );
}

fn header(magic: &[u8; 4], kind: u32, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(magic);
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Connections the server lists in `workers` (each line but the final `.`).
async fn connection_count(admin: &mut Conn) -> usize {
    admin.admin("workers").await.lines().count() - 1
}

async fn wait_connection_count(admin: &mut Conn, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = connection_count(admin).await;
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server still lists {got} connections, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn garbage_bytes_after_a_nul_are_bad_magic() {
    let server = TestServer::start(&[]).await;
    let mut bystander = server.connect().await;
    let mut bad = server.connect().await;
    bad.send_raw(b"\0\xde\xad\xbe\xef garbage garbage").await;
    error_then_closed(&mut bad, "INVALID_MAGIC").await;
    echo_ok(&mut bystander, "after garbage").await;
    server.stop().await;
}

#[tokio::test]
async fn random_garbage_never_hurts_other_connections() {
    // A short frame timeout, so a connection left inside a half frame is closed too.
    let server = TestServer::start(&[("GEARHOUSE_SERVER__FRAME_TIMEOUT_MS", "300")]).await;
    let mut bystander = server.connect().await;
    // Deterministic pseudo-random bytes (xorshift), with NULs and newlines among them.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..4 {
        let mut junk = Vec::with_capacity(64 * 1024);
        for _ in 0..64 * 1024 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            junk.push((x >> 24) as u8);
        }
        let mut bad = server.connect().await;
        // The server may close the connection before it has read everything.
        let _ = bad.stream.write_all(&junk).await;
        assert!(
            bad.is_closed_within(Duration::from_secs(3)).await,
            "round {round}: connection left open after garbage"
        );
        echo_ok(&mut bystander, &format!("round {round}")).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn text_garbage_is_an_unknown_admin_command_and_the_connection_stays() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect().await;
    c.send_raw(b"\x7fhello \xff\xfe world\r\n").await;
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let mut b = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), c.stream.read(&mut b))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed");
        got.extend_from_slice(&b[..n]);
    }
    assert!(
        got.starts_with(b"ERR UNKNOWN_COMMAND Unknown+server+command"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    echo_ok(&mut c, "still here").await;
    server.stop().await;
}

#[tokio::test]
async fn bad_magic_closes_the_connection() {
    let server = TestServer::start(&[]).await;
    let mut bystander = server.connect().await;
    let mut bad = server.connect().await;
    let mut p = header(b"\0REX", ECHO_REQ as u32, 1);
    p.push(b'x');
    bad.send_raw(&p).await;
    error_then_closed(&mut bad, "INVALID_MAGIC").await;
    echo_ok(&mut bystander, "after bad magic").await;
    server.stop().await;
}

#[tokio::test]
async fn res_magic_on_a_request_gets_invalid_magic_and_the_connection_stays() {
    let server = TestServer::start(&[]).await;
    let mut bystander = server.connect().await;
    let mut c = server.connect().await;
    let mut b = BytesMut::new();
    put_packet(&mut b, MAGIC_RES, ECHO_REQ, &[b"x"]);
    put_packet(&mut b, MAGIC_RES, SUBMIT_JOB_BG, &[b"f", b"", b"d"]);
    c.send_raw(&b).await;
    for _ in 0..2 {
        assert_eq!(c.expect(ERROR).await.arg(0), "INVALID_MAGIC");
    }
    echo_ok(&mut c, "same connection").await;
    // The refused submit queued nothing.
    assert_eq!(c.admin("status").await, ".\n");
    echo_ok(&mut bystander, "other connection").await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_packet_types_close_the_connection() {
    let server = TestServer::start(&[]).await;
    let mut bystander = server.connect().await;
    for kind in [0u32, 43, 0xffff_ffff] {
        let mut bad = server.connect().await;
        bad.send_raw(&header(&MAGIC_REQ, kind, 0)).await;
        error_then_closed(&mut bad, "INVALID_COMMAND").await;
        echo_ok(&mut bystander, &format!("after type {kind}")).await;
    }
    // A known type a server never accepts is refused, but the connection stays.
    let mut c = server.connect().await;
    c.send(JOB_ASSIGN, &[b"H:x:1", b"f", b"d"]).await;
    assert_eq!(c.expect(ERROR).await.arg(0), "INVALID_COMMAND");
    echo_ok(&mut c, "kept").await;
    server.stop().await;
}

#[tokio::test]
async fn a_truncated_packet_then_close_is_cleaned_up() {
    let server = TestServer::start(&[]).await;
    let mut bystander = server.connect().await;
    let mut bad = server.connect().await;
    echo_ok(&mut bad, "before").await;
    assert_eq!(connection_count(&mut bystander).await, 2);
    let mut p = header(&MAGIC_REQ, SUBMIT_JOB as u32, 100);
    p.extend_from_slice(b"trunc\0\0only ten");
    bad.send_raw(&p).await;
    bad.stream.shutdown().await.unwrap();
    drop(bad);
    wait_connection_count(&mut bystander, 1).await;
    assert_eq!(bystander.admin("status").await, ".\n");
    echo_ok(&mut bystander, "after truncation").await;
    server.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn a_header_claiming_4_gib_is_refused_without_allocating() {
    let server = BinServer::start(&[], &[("GEARHOUSE_ENGINE__NODE_ID", "bin")]);
    let pid = server.child.id();
    let mut bystander = Conn::connect(server.addr()).await;
    echo_ok(&mut bystander, "warm up").await;
    let before = rss_kib(pid);
    for kind in [SUBMIT_JOB, ECHO_REQ, WORK_DATA, CAN_DO] {
        let mut bad = Conn::connect(server.addr()).await;
        let mut p = header(&MAGIC_REQ, kind as u32, u32::MAX);
        p.extend_from_slice(b"a few bytes of the body");
        bad.send_raw(&p).await;
        error_then_closed(&mut bad, "ARGUMENT_TOO_LARGE").await;
    }
    let after = rss_kib(pid);
    assert!(
        after < before + 16 * 1024,
        "server RSS grew from {before} KiB to {after} KiB"
    );
    echo_ok(&mut bystander, "after 4 GiB headers").await;
}

#[tokio::test]
async fn a_packet_over_max_packet_size_is_refused_before_its_body() {
    let server = TestServer::start(&[("GEARHOUSE_SERVER__MAX_PACKET_SIZE", "1024")]).await;
    let mut bystander = server.connect().await;
    // Exactly the limit is fine.
    let big = vec![b'z'; 1024];
    bystander.send(ECHO_REQ, &[&big]).await;
    assert_eq!(bystander.expect(ECHO_RES).await.body.len(), 1024);
    let mut bad = server.connect().await;
    // Only the header: the server must answer without waiting for the body.
    bad.send_raw(&header(&MAGIC_REQ, ECHO_REQ as u32, 1025))
        .await;
    error_then_closed(&mut bad, "ARGUMENT_TOO_LARGE").await;
    echo_ok(&mut bystander, "after oversized").await;
    server.stop().await;
}

#[tokio::test]
async fn an_overlong_admin_line_closes_the_connection() {
    let server = TestServer::start(&[("GEARHOUSE_SERVER__MAX_ADMIN_LINE", "256")]).await;
    let mut bystander = server.connect().await;
    // Within the limit: answered.
    let ok_line = format!("frob{}\n", "x".repeat(200));
    bystander.send_raw(ok_line.as_bytes()).await;
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let mut b = [0u8; 512];
        let n = bystander.stream.read(&mut b).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&b[..n]);
    }
    assert!(got.starts_with(b"ERR UNKNOWN_COMMAND"));
    let mut bad = server.connect().await;
    bad.send_raw("s".repeat(300).as_bytes()).await; // no newline at all
    error_then_closed(&mut bad, "ARGUMENT_TOO_LARGE").await;
    echo_ok(&mut bystander, "after long line").await;
    server.stop().await;
}

#[tokio::test]
async fn too_long_function_unique_and_client_id_get_argument_too_large() {
    let server = TestServer::start(&[
        ("GEARHOUSE_SERVER__MAX_FUNCTION_LEN", "16"),
        ("GEARHOUSE_SERVER__MAX_UNIQUE_LEN", "8"),
        ("GEARHOUSE_SERVER__MAX_CLIENT_ID_LEN", "4"),
    ])
    .await;
    let mut bystander = server.connect().await;
    let mut c = server.connect().await;
    let f16 = "f".repeat(16);
    let f17 = "f".repeat(17);
    let cases: Vec<(gearhouse::codec::PacketType, Vec<Vec<u8>>)> = vec![
        (
            SUBMIT_JOB,
            vec![f17.clone().into(), b"u".to_vec(), b"d".to_vec()],
        ),
        (
            SUBMIT_JOB_BG,
            vec![b"f".to_vec(), b"123456789".to_vec(), b"d".to_vec()],
        ),
        (
            SUBMIT_JOB_EPOCH,
            vec![
                f17.clone().into(),
                b"".to_vec(),
                b"1".to_vec(),
                b"d".to_vec(),
            ],
        ),
        (
            SUBMIT_REDUCE_JOB,
            vec![
                b"f".to_vec(),
                b"u".to_vec(),
                f17.clone().into(),
                b"d".to_vec(),
            ],
        ),
        (CAN_DO, vec![f17.clone().into()]),
        (CAN_DO_TIMEOUT, vec![f17.clone().into(), b"10".to_vec()]),
        (SET_CLIENT_ID, vec![b"12345".to_vec()]),
    ];
    for (kind, args) in &cases {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        c.send(*kind, &args).await;
        let e = c.expect(ERROR).await;
        assert_eq!(e.arg(0), "ARGUMENT_TOO_LARGE", "{kind:?}");
    }
    // The connection stays, limits are inclusive, and nothing was queued by the refusals.
    echo_ok(&mut c, "kept").await;
    c.submit(SUBMIT_JOB_BG, &f16, "12345678", b"d").await;
    assert_eq!(c.admin("status").await, format!("{f16}\t1\t0\t0\n.\n"));
    echo_ok(&mut bystander, "bystander").await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_dripping_bytes_is_closed_after_the_frame_timeout() {
    let server = TestServer::start(&[("GEARHOUSE_SERVER__FRAME_TIMEOUT_MS", "300")]).await;
    let mut bystander = server.connect().await;
    let mut idle = server.connect().await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let mut packet = BytesMut::new();
    put_packet(&mut packet, MAGIC_REQ, ECHO_REQ, &[&[b'd'; 40]]);
    let started = Instant::now();
    let drip = tokio::spawn(async move {
        for b in packet.iter() {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(4), async {
        let mut b = [0u8; 256];
        loop {
            match rd.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
    })
    .await;
    let took = started.elapsed();
    drip.abort();
    assert!(
        closed.is_ok(),
        "a dripping client was not closed within 4 s"
    );
    // The frame's time starts with its first byte: closed at 300 ms plus scheduling, not after
    // a whole extra period.
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(900),
        "closed after {took:?} with server.frame_timeout_ms = 300"
    );
    assert!(got.is_empty(), "the dripped packet was answered: {got:?}");
    // A connection that is merely idle (no frame started) is left alone.
    echo_ok(&mut idle, "idle but fine").await;
    echo_ok(&mut bystander, "after drip").await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_whose_writes_end_mid_packet_but_keep_completing_frames_is_not_closed() {
    let server = TestServer::start(&[("GEARHOUSE_SERVER__FRAME_TIMEOUT_MS", "300")]).await;
    let mut c = server.connect().await;
    let mut all = BytesMut::new();
    let n = 30;
    for i in 0..n {
        put_packet(
            &mut all,
            MAGIC_REQ,
            ECHO_REQ,
            &[format!("echo-{i:03}").as_bytes()],
        );
    }
    let len = all.len() / n;
    // Every write completes the previous packet and starts the next: each frame takes 40 ms,
    // but the server never sees an empty buffer for 1.2 s.
    let mut start = 0;
    for k in 0..n {
        let end = ((k + 1) * len + len / 2).min(all.len());
        c.send_raw(&all[start..end]).await;
        start = end;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for i in 0..n {
        let r = c
            .recv_timeout(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("closed or silent before echo {i}"));
        assert_eq!(r.kind, ECHO_RES);
        assert_eq!(&r.body[..], format!("echo-{i:03}").as_bytes());
    }
    echo_ok(&mut c, "still open").await;
    server.stop().await;
}

#[tokio::test]
async fn max_connections_refuses_the_fourth() {
    let server = TestServer::start(&[("GEARHOUSE_SERVER__MAX_CONNECTIONS", "3")]).await;
    let mut conns = Vec::new();
    for i in 0..3 {
        let mut c = server.connect().await;
        echo_ok(&mut c, &format!("conn {i}")).await;
        conns.push(c);
    }
    let mut fourth = server.connect().await;
    assert!(
        fourth.is_closed_within(Duration::from_secs(3)).await,
        "the 4th connection was accepted"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        echo_ok(c, &format!("still {i}")).await;
    }
    // Once one leaves, a new connection is accepted again.
    conns.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = server.connect().await;
        c.send(ECHO_REQ, &[b"again"]).await;
        if let Some(r) = c.recv_timeout(Duration::from_millis(500)).await {
            assert_eq!(r.kind, ECHO_RES);
            break;
        }
        assert!(Instant::now() < deadline, "no room after a connection left");
    }
    server.stop().await;
}

#[tokio::test]
async fn max_connections_holds_under_a_burst_of_connects() {
    let server = TestServer::start(&[("GEARHOUSE_SERVER__MAX_CONNECTIONS", "3")]).await;
    let addr = server.addr;
    let mut burst = futures::future::join_all((0..10).map(|_| Conn::connect(addr))).await;
    let mut working = 0;
    for c in burst.iter_mut() {
        c.send_raw(&{
            let mut b = BytesMut::new();
            put_packet(&mut b, MAGIC_REQ, ECHO_REQ, &[b"burst"]);
            b
        })
        .await;
    }
    for c in burst.iter_mut() {
        if let Some(r) = c.recv_timeout(Duration::from_millis(1000)).await {
            assert_eq!(r.kind, ECHO_RES);
            working += 1;
        }
    }
    assert!(
        working <= 3,
        "{working} connections served with max_connections = 3"
    );
    assert!(working >= 1, "no connection served at all");
    server.stop().await;
}

#[tokio::test]
async fn max_queue_per_function_refuses_submits_past_it() {
    let server = TestServer::start(&[("GEARHOUSE_ENGINE__MAX_QUEUE_PER_FUNCTION", "2")]).await;
    let mut bystander = server.connect().await;
    let mut c = server.connect().await;
    c.submit(SUBMIT_JOB_BG, "full", "", b"1").await;
    c.submit(SUBMIT_JOB_BG, "full", "", b"2").await;
    c.send(SUBMIT_JOB_BG, &[b"full", b"", b"3"]).await;
    assert_eq!(c.expect(ERROR).await.arg(0), "QUEUE_ERROR");
    c.send(SUBMIT_JOB, &[b"full", b"", b"4"]).await;
    assert_eq!(c.expect(ERROR).await.arg(0), "QUEUE_ERROR");
    // Other priorities and functions have their own room.
    c.submit(SUBMIT_JOB_HIGH_BG, "full", "", b"5").await;
    c.submit(SUBMIT_JOB_BG, "other", "", b"6").await;
    assert_eq!(
        c.admin("prioritystatus").await,
        "full\t1\t2\t0\t0\nother\t0\t1\t0\t0\n.\n"
    );
    echo_ok(&mut bystander, "bystander").await;
    server.stop().await;
}

/// A raw client socket with a tiny receive buffer, so the server's writes to it back up fast.
async fn non_reading_client(addr: std::net::SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let s = sock.connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_without_hurting_others() {
    let server = TestServer::start(&[("GEARHOUSE_SERVER__OUTBOUND_QUEUE", "4")]).await;
    let mut admin = server.connect().await;
    let mut other = server.connect().await;
    let mut w = server.connect().await;
    w.send(CAN_DO, &[b"flood"]).await;
    w.send(CAN_DO, &[b"calm"]).await;

    let mut deaf = non_reading_client(server.addr).await;
    let mut b = BytesMut::new();
    put_packet(&mut b, MAGIC_REQ, SUBMIT_JOB, &[b"flood", b"", b"x"]);
    deaf.write_all(&b).await.unwrap();
    w.send(GRAB_JOB, &[]).await;
    let flood = w.expect(JOB_ASSIGN).await.arg(0);
    let calm = other.submit(SUBMIT_JOB, "calm", "", b"y").await;
    w.send(GRAB_JOB, &[]).await;
    assert_eq!(w.expect(JOB_ASSIGN).await.arg(0), calm);
    assert_eq!(connection_count(&mut admin).await, 4);

    // 10 MiB of results for a client that reads none of them, one packet at a time, so the
    // server's task for that client is already stuck writing when its queue overflows.
    let chunk = vec![b'r'; 256 * 1024];
    for i in 0..40 {
        w.send(WORK_DATA, &[flood.as_bytes(), &chunk]).await;
        echo_ok(&mut w, &format!("worker not blocked {i}")).await;
    }
    wait_connection_count(&mut admin, 3).await;

    // Everyone else is served as before.
    w.send(WORK_COMPLETE, &[calm.as_bytes(), b"fine"]).await;
    let r = other.expect(WORK_COMPLETE).await;
    assert_eq!(&r.body[..], format!("{calm}\0fine").as_bytes());
    w.send(WORK_COMPLETE, &[flood.as_bytes(), b"nobody"]).await;
    echo_ok(&mut w, "worker").await;
    echo_ok(&mut other, "other").await;
    assert_eq!(admin.admin("show jobs").await, ".\n");

    // The deaf client finds its connection closed once it reads.
    let mut sink = vec![0u8; 1 << 20];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match deaf.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the deaf client's connection is still open");
    server.stop().await;
}
