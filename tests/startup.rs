//! Start-up with a durable queue: while recovery waits for memcached, clients are refused at
//! once (binary requests get `ERROR`, admin lines `ERR RECOVERING`) instead of hanging in the
//! listen backlog; once the queue is back the same port serves normally. Real binary, real
//! memcached, real `gearman` and `gearadmin`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Conn, Memcached};
use gearhouse::codec::PacketType::*;

struct Server {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Server {
    fn spawn(memcached: &str) -> Server {
        let (port, http) = (free_port(), free_port());
        let log = std::env::temp_dir().join(format!("gearhouse-startup-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_gearhouse"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args(["--memcached", memcached, "--node-id", "startup"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn gearhouse");
        Server { child, port, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log says `what` (panics with the log after `limit`).
    fn wait_log(&self, what: &str, limit: Duration) {
        let until = Instant::now() + limit;
        while !self.log_text().contains(what) {
            assert!(
                Instant::now() < until,
                "no {what:?} in: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client command with a hard limit; returns (exit success, output, time taken).
fn run(cmd: &mut Command, limit: Duration) -> (bool, String, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            return (out.status.success(), text, started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{cmd:?} still running after {limit:?}: it hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn clients_are_refused_at_once_while_recovery_waits_for_memcached() {
    let mut mc = Memcached::start(64, &[]);
    mc.kill();
    let server = Server::spawn(&mc.addr());
    server.wait_log("cannot recover the queue", Duration::from_secs(20));
    let addr = format!("127.0.0.1:{}", server.port).parse().unwrap();

    // A raw binary request: ERROR at once, then the connection closes.
    let mut c = Conn::connect(addr).await;
    let asked = Instant::now();
    c.send(ECHO_REQ, &[b"hello"]).await;
    let e = c.expect(ERROR).await;
    assert_eq!(e.arg(0), "QUEUE_ERROR");
    assert!(e.arg(1).contains("recovering"), "{}", e.arg(1));
    assert!(c.is_closed_within(Duration::from_secs(2)).await);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );

    // The real clients return promptly instead of hanging.
    let port = server.port.to_string();
    let (ok, out, took) = run(
        Command::new("gearadmin").args(["-h", "127.0.0.1", "-p", &port, "--status"]),
        Duration::from_secs(10),
    );
    assert!(
        took < Duration::from_secs(3),
        "gearadmin took {took:?}: {out}"
    );
    assert!(!ok || out.contains("RECOVERING"), "{out}");
    let (_, out, took) = run(
        Command::new("gearman").args(["-h", "127.0.0.1", "-p", &port, "-b", "-f", "resize", "x"]),
        Duration::from_secs(10),
    );
    assert!(
        took < Duration::from_secs(3),
        "gearman -b took {took:?}: {out}"
    );
    // (the CLI exits 0 even so; it prints the server's error)
    assert!(
        out.contains("QUEUE_ERROR") && out.contains("recovering"),
        "a background submit was not refused during recovery: {out}"
    );

    // memcached comes back (empty): recovery finishes and the same port serves.
    mc.restart_empty();
    server.wait_log("recovery done", Duration::from_secs(20));
    let mut c = Conn::connect(addr).await;
    c.send(ECHO_REQ, &[b"back"]).await;
    assert_eq!(&c.expect(ECHO_RES).await.body[..], b"back");
    let h = c.submit(SUBMIT_JOB_BG, "resize", "", b"x").await;
    assert!(h.starts_with("H:startup:"), "{h}");
}
