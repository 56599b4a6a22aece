//! The processes a soak runs against: three memcached nodes that can be restarted empty one at a
//! time, the gearhouse binary as a child process, and the `/proc` readings (resident memory, open
//! descriptors) that show whether the server leaks.
//!
//! Everything here is blocking (process spawn, `/proc` reads, a short connect loop) and is called
//! through `spawn_blocking` from the scenario, so the load keeps running while a node restarts.
//! The soak owns real processes, not mocks: a restart is a SIGKILL and a fresh, empty memcached
//! on the same port, which is exactly the failure the server's repairer exists for.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a process of the soak could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The program is missing or could not be executed.
    #[error("cannot start {program}: {source} (memcached comes from scripts/install-test-deps.sh; the server binary from `cargo build --release`)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// The process did not accept connections (or become ready) in time.
    #[error("{what} did not come up within {secs} s{log}")]
    NotReady {
        what: String,
        secs: u64,
        log: String,
    },
}

/// One memcached node, started as `memcached -M -m MB -U 0` on a loopback port; killed on drop.
pub struct Memcached {
    child: Child,
    port: u16,
    mem_mb: u32,
}

impl Memcached {
    /// Starts a node on a free port with `mem_mb` of memory and eviction off (`-M`).
    pub fn start(mem_mb: u32) -> Result<Memcached, ClusterError> {
        Self::start_on(free_port(), mem_mb)
    }

    fn start_on(port: u16, mem_mb: u32) -> Result<Memcached, ClusterError> {
        let mut cmd = Command::new("memcached");
        cmd.args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0", "-M"])
            .args(["-m", &mem_mb.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // memcached refuses to run as root without -u.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd.spawn().map_err(|source| ClusterError::Spawn {
            program: "memcached".into(),
            source,
        })?;
        let mut m = Memcached {
            child,
            port,
            mem_mb,
        };
        wait_port(port, Duration::from_secs(10)).map_err(|secs| {
            let _ = m.child.kill();
            ClusterError::NotReady {
                what: format!("memcached on port {port}"),
                secs,
                log: String::new(),
            }
        })?;
        Ok(m)
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then a fresh, empty memcached on the same port with the same flags: the node
    /// lost everything, as after a host reboot.
    pub fn restart_empty(&mut self) -> Result<(), ClusterError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::start_on(self.port, self.mem_mb)?;
        Ok(())
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts on `127.0.0.1:port`; `Err(seconds waited)` on timeout.
fn wait_port(port: u16, t: Duration) -> Result<(), u64> {
    let deadline = Instant::now() + t;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(t.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The gearhouse binary as a child process with its log in a file; SIGKILLed on drop.
pub struct Server {
    child: Child,
    /// The Gearman port.
    pub addr: SocketAddr,
    /// The HTTP port (`/readyz`, `/api/v1/status`).
    pub http: SocketAddr,
    /// Where its stderr (the log) goes.
    pub log: PathBuf,
}

impl Server {
    /// Starts `binary serve --config config --memcached nodes` with two replicas per job and
    /// waits until `/readyz` answers 200 (recovery done, enough memcached nodes up).
    pub async fn start(
        binary: &Path,
        config: &Path,
        nodes: &[String],
        log_dir: &Path,
    ) -> Result<Server, ClusterError> {
        let (port, http_port) = (free_port(), free_port());
        let log = log_dir.join(format!("soak-server-{port}.log"));
        let stderr = std::fs::File::create(&log).map_err(|source| ClusterError::Spawn {
            program: format!("a log file at {}", log.display()),
            source,
        })?;
        let child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .args(["--node-id", "soak", "--log-level", "warn"])
            .args(["--memcached", &nodes.join(",")])
            .env("GEARHOUSE_PERSISTENCE__REPLICAS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| ClusterError::Spawn {
                program: binary.display().to_string(),
                source,
            })?;
        let mut s = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            http: SocketAddr::from(([127, 0, 0, 1], http_port)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(s.not_ready(format!("gearhouse (exited with {status})"), 0));
            }
            if matches!(http_get(s.http, "/readyz").await, Ok((200, _))) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(s.not_ready("gearhouse".into(), 60));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn not_ready(&self, what: String, secs: u64) -> ClusterError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        ClusterError::NotReady {
            what,
            secs,
            log: format!("; its log ({}):\n{log}", self.log.display()),
        }
    }

    /// The process id (for the `/proc` samples).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One reading of a process's footprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// VmRSS from `/proc/<pid>/status`, in KiB.
    pub rss_kib: u64,
    /// Entries of `/proc/<pid>/fd`.
    pub fds: u64,
}

/// Reads `pid`'s resident memory and open descriptors; `None` once the process is gone.
pub fn footprint(pid: u32) -> Option<Footprint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Footprint { rss_kib, fds })
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
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

/// True when the server reports every job at its full replica count and memcached node `node`
/// up (`/api/v1/status`, `persistence` section): the repairer has rewritten what a restart lost.
pub async fn is_repaired(http: SocketAddr, node: usize) -> bool {
    let Ok((200, body)) = http_get(http, "/api/v1/status").await else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return false;
    };
    let p = &v["persistence"];
    p["replicas_below_target"] == 0 && p["nodes"][node]["up"] == true
}
