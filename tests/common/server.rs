//! gearhouse under test: in-process ([`TestServer`], on port 0 with its own shutdown token) or
//! as the real binary ([`BinServer`], a child process killed on drop), both waited for through
//! `/readyz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gearhouse::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{free_port, Conn};

/// A server running inside the test process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub http: SocketAddr,
    /// The server's stop: tests end it at once ([`TestServer::stop`]); the graceful drain is
    /// tested on the real binary (tests/shutdown.rs).
    pub shutdown: gearhouse::server::Shutdown,
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
        let shutdown = gearhouse::server::Shutdown::default();
        let task = tokio::spawn(gearhouse::app::run_with(
            cfg,
            gearman,
            http,
            shutdown.clone(),
        ));
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
        self.shutdown.now();
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
    http_request(addr, "GET", path, "").await
}

/// A minimal HTTP/1.1 request with a JSON body (none when empty) on its own connection:
/// (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
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

/// Path of the built `gearhouse` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gearhouse"))
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
        cmd.arg("serve");
        // A test that brings its own config file (`--config` in `extra`) gets it instead.
        if !extra.contains(&"--config") {
            cmd.arg("--config")
                .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"));
        }
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--http")
            .arg(format!("127.0.0.1:{http_port}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // A port taken anyway (the tests' ports are picked below the ephemeral range, so only
        // by a process outside them) fails at once, not after the server's bind retries.
        cmd.env("GEARHOUSE_SERVER__BIND_RETRY_MS", "0");
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
