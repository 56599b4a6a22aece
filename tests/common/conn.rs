//! A raw Gearman connection for tests that speak packet by packet: it keeps the socket in its
//! own hands (`stream`, for odd bytes, raw reads and half-closes) and reads packets and admin
//! answers with the crate's client ([`gearhouse::client::PacketReader`]). Every call panics on
//! failure with what was expected, so tests read as a script.
//!
//! Tests that want typed calls (submit and wait for the result, grab a job, ...) open a
//! [`gearhouse::client::Connection`] with [`client`] instead.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gearhouse::client::{is_listing, ClientError, Connection, PacketReader};
use gearhouse::codec::{put_packet, PacketType, MAGIC_REQ};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw Gearman connection (see the module doc).
pub struct Conn {
    /// The socket; bytes read from it directly skip the packet reader.
    pub stream: TcpStream,
    reader: PacketReader,
}

/// A packet received from the server: type and NUL-split arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: PacketType,
    pub body: Bytes,
}

impl Reply {
    pub fn args(&self) -> Vec<Bytes> {
        self.body
            .split(|&b| b == 0)
            .map(Bytes::copy_from_slice)
            .collect()
    }
    pub fn arg(&self, i: usize) -> String {
        String::from_utf8_lossy(&self.args()[i]).into_owned()
    }
}

/// A typed client connection to `addr` (the crate's [`Connection`]).
pub async fn client(addr: SocketAddr) -> Connection {
    Connection::connect(addr).await.expect("connect")
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            reader: PacketReader::default(),
        }
    }

    pub async fn send(&mut self, kind: PacketType, args: &[&[u8]]) {
        let mut b = BytesMut::new();
        put_packet(&mut b, MAGIC_REQ, kind, args);
        self.stream.write_all(&b).await.expect("send");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send raw");
    }

    /// The next packet, or panics after 5 s.
    pub async fn recv(&mut self) -> Reply {
        self.recv_timeout(Duration::from_secs(5))
            .await
            .expect("no packet within 5 s")
    }

    /// The next packet within `t`, or `None` (also `None` when the server closed).
    pub async fn recv_timeout(&mut self, t: Duration) -> Option<Reply> {
        let read = self.reader.read_packet(&mut self.stream);
        match tokio::time::timeout(t, read).await {
            Ok(Ok(p)) => Some(Reply {
                kind: p.kind,
                body: p.body,
            }),
            Ok(Err(ClientError::Protocol(e))) => panic!("server sent a bad frame: {e}"),
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// Expects a packet of `kind` and returns it.
    pub async fn expect(&mut self, kind: PacketType) -> Reply {
        let r = self.recv().await;
        assert_eq!(
            r.kind,
            kind,
            "got {:?} {:?}",
            r.kind,
            String::from_utf8_lossy(&r.body)
        );
        r
    }

    /// True when the server closed the connection (reads EOF within `t`).
    pub async fn is_closed_within(&mut self, t: Duration) -> bool {
        let mut scratch = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + t;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Sends an admin line and reads its answer: up to a line `.` for listing commands, else
    /// one line.
    pub async fn admin(&mut self, line: &str) -> String {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        let read = self.reader.read_admin(&mut self.stream, is_listing(line));
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(text)) => text,
            other => panic!(
                "no complete admin answer to {line:?} ({other:?}); got {:?}",
                String::from_utf8_lossy(self.reader.buffered())
            ),
        }
    }

    /// Submits a job and returns its handle (expects JOB_CREATED).
    pub async fn submit(
        &mut self,
        kind: PacketType,
        func: &str,
        unique: &str,
        data: &[u8],
    ) -> String {
        self.send(kind, &[func.as_bytes(), unique.as_bytes(), data])
            .await;
        self.expect(PacketType::JOB_CREATED).await.arg(0)
    }
}

/// A worker on the crate's client that answers `n` jobs of `function` with WORK_FAIL, then
/// returns (between jobs it sleeps with PRE_SLEEP and waits for NOOP).
pub async fn fail_jobs(addr: SocketAddr, function: &str, n: usize) {
    let mut w = Connection::connect(addr).await.unwrap();
    w.can_do(function.as_bytes()).await.unwrap();
    let mut done = 0;
    while done < n {
        match w.grab(gearhouse::protocol::GrabKind::Uniq).await.unwrap() {
            Some(a) => {
                w.fail(&a.handle).await.unwrap();
                done += 1;
            }
            None => {
                w.pre_sleep().await.unwrap();
                // A NOOP may never come if the job went elsewhere: look again now and then.
                let _ = tokio::time::timeout(Duration::from_millis(200), w.wait_noop()).await;
            }
        }
    }
}
