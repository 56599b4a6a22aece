//! Shared test harness: start gearhouse in-process or as the real binary on free ports, speak
//! raw Gearman bytes, and run real memcached processes. Each test binary uses only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gearhouse::codec::{put_packet, Frame, GearmanCodec, Magic, PacketType, MAGIC_REQ};
use gearhouse::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

/// A server running inside the test process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), gearhouse::app::AppError>>,
}

impl TestServer {
    /// Starts with defaults; `env` are `GEARHOUSE_*` settings as they would come from the
    /// environment (e.g. `("GEARHOUSE_ENGINE__JOB_RETRIES", "2")`).
    pub async fn start(env: &[(&str, &str)]) -> TestServer {
        let mut vars: Vec<(String, String)> =
            vec![("GEARHOUSE_ENGINE__NODE_ID".into(), "test".into())];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let cfg = Config::load_with_env(None, &[], vars).expect("config");
        let gearman = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gearman.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gearhouse::app::run(cfg, gearman, http, shutdown.clone()));
        wait_ready(http_addr).await;
        TestServer {
            addr,
            http: http_addr,
            shutdown,
            task,
        }
    }

    pub async fn connect(&self) -> Conn {
        Conn::connect(self.addr).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Waits until `/readyz` answers 200.
pub async fn wait_ready(http: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(body) = http_get(http, "/readyz").await {
            if body.0 == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "server at {http} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A raw Gearman connection.
pub struct Conn {
    pub stream: TcpStream,
    buf: BytesMut,
    codec: GearmanCodec,
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

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: BytesMut::new(),
            codec: GearmanCodec::new(64 << 20, 1 << 20),
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
        let deadline = tokio::time::Instant::now() + t;
        loop {
            if let Some(f) = self
                .codec
                .decode(&mut self.buf)
                .expect("server sent a bad frame")
            {
                match f {
                    Frame::Packet(p) => {
                        assert_eq!(p.magic, Magic::Res, "server packets use \\0RES");
                        return Some(Reply {
                            kind: p.kind,
                            body: p.body,
                        });
                    }
                    Frame::Admin(l) => panic!("expected a packet, got text {l:?}"),
                }
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match n {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
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
        let listing = !(line.starts_with("maxqueue")
            || line.starts_with("cancel")
            || line.starts_with("create")
            || line.starts_with("drop")
            || line.starts_with("getpid")
            || line.starts_with("version")
            || line.starts_with("verbose")
            || line.starts_with("shutdown"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            let done = if listing {
                text == ".\n" || text.ends_with("\n.\n") || text.starts_with("ERR")
            } else {
                text.ends_with('\n')
            };
            if done && !text.is_empty() {
                self.buf.clear();
                return text;
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => panic!("no complete admin answer to {line:?}; got {text:?}"),
            }
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

/// Path of the built `gearhouse` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gearhouse"))
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real `gearhouse` binary as a child process; killed on drop.
pub struct BinServer {
    pub child: Child,
    pub port: u16,
    pub http_port: u16,
    pub log: PathBuf,
}

impl BinServer {
    /// Starts `gearhouse serve` with `extra` arguments and `env`, and waits until it is ready.
    pub fn start(extra: &[&str], env: &[(&str, &str)]) -> BinServer {
        Self::start_on(free_port(), free_port(), extra, env)
    }

    pub fn start_on(port: u16, http_port: u16, extra: &[&str], env: &[(&str, &str)]) -> BinServer {
        let dir = std::env::temp_dir().join(format!("gearhouse-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("server-{port}.log"));
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--http")
            .arg(format!("127.0.0.1:{http_port}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn gearhouse");
        let mut s = BinServer {
            child,
            port,
            http_port,
            log,
        };
        s.wait_ready(Duration::from_secs(60));
        s
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn http_addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.http_port).parse().unwrap()
    }

    /// Blocks until `/readyz` says ready (panics with the server log if it exits or times out).
    pub fn wait_ready(&mut self, t: Duration) {
        let deadline = Instant::now() + t;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("gearhouse exited with {status}: {}", self.log_text());
            }
            if blocking_http_status(self.http_addr(), "/readyz") == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gearhouse not ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn blocking_http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split(' ').nth(1)?.parse().ok()
}

/// A real memcached process on a free loopback port; killed on drop.
pub struct Memcached {
    pub child: Child,
    pub port: u16,
    pub args: Vec<String>,
}

impl Memcached {
    /// Starts memcached with `-M` (no eviction) and `mem_mb` of memory, plus `extra` flags.
    pub fn start(mem_mb: u32, extra: &[&str]) -> Memcached {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "-l".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-U".into(),
            "0".into(),
            "-m".into(),
            mem_mb.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(port, args)
    }

    fn start_with(port: u16, args: Vec<String>) -> Memcached {
        let mut cmd = Command::new("memcached");
        cmd.args(&args).stdout(Stdio::null()).stderr(Stdio::null());
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .spawn()
            .expect("memcached must be installed (scripts/install-test-deps.sh)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "memcached did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Memcached { child, port, args }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the process (node loss).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh, empty memcached on the same port with the same flags.
    pub fn restart_empty(&mut self) {
        self.kill();
        let fresh = Self::start_with(self.port, self.args.clone());
        drop(std::mem::replace(self, fresh));
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
