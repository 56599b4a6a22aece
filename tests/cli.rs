//! The real binary's command line: gearmand's options (also under the name `gearmand`),
//! refusals, log levels, `gearhouse config`, bind retry, pid file and daemon mode, error
//! output, and the systemd unit in `deploy/`. Each test runs the built binary as a child
//! process on free ports, as an operator's unit file or init script would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gearhouse");

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

/// Runs the binary to completion (for commands that exit by themselves).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap()
}

/// A server child process whose stderr is collected as it arrives; killed when dropped.
struct Proc {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn start(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_for_stderr(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return (s, self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "did not stop:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn terminate(pid: u32) {
    // SAFETY: sending a signal to a process this test started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

fn is_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Waits until `cond` holds, for up to 20 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw ECHO_REQ/ECHO_RES round trip: the server speaks Gearman on `addr`. Tried again for up
/// to 10 s while the answer is ERROR (a durable server still recovering its queue) or the
/// connection fails (a freed port can briefly be someone else's ephemeral port).
fn echo(addr: SocketAddr) {
    let body = b"hello gearmand users";
    let once = || -> std::io::Result<(u32, Vec<u8>)> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = b"\0REQ".to_vec();
        req.extend(16u32.to_be_bytes());
        req.extend((body.len() as u32).to_be_bytes());
        req.extend(body);
        s.write_all(&req)?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        assert_eq!(&head[..4], b"\0RES");
        let kind = u32::from_be_bytes(head[4..8].try_into().unwrap());
        let len = u32::from_be_bytes(head[8..12].try_into().unwrap()) as usize;
        let mut res = vec![0u8; len];
        s.read_exact(&mut res)?;
        Ok((kind, res))
    };
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = once();
        let retry = !matches!(got, Ok((17, _)));
        if retry && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let (kind, res) = got.expect("an answer to ECHO_REQ");
        assert_eq!(kind, 17, "ECHO_RES expected");
        assert_eq!(&res[..], body);
        return;
    }
}

fn wait_listening(addr: SocketAddr) {
    eventually(&format!("{addr} to accept"), || {
        TcpStream::connect(addr).is_ok()
    });
}

/// `gearadmin --status` against the server: the real gearmand admin client.
fn gearadmin_status(port: u16) -> String {
    let out = Command::new("gearadmin")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--status"])
        .output()
        .expect("gearadmin (gearman-tools, scripts/install-test-deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "gearadmin: {out:?}");
    text
}

/// A memcached on a free port, killed when dropped.
struct Memcached(Child, u16);

impl Memcached {
    fn start() -> Memcached {
        let port = free_port();
        let child = Command::new("memcached")
            .args([
                "-l",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "0",
                "-u",
                "root",
                "-M",
            ])
            .spawn()
            .expect("memcached (scripts/install-test-deps.sh)");
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
        Memcached(child, port)
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_gearmand_command_line_starts_detaches_and_serves() {
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let log = dir.path().join("gearmand.log");
    let pid = dir.path().join("gearmand.pid");
    let mc_servers = format!("--libmemcached-servers=127.0.0.1:{}", mc.1);
    let p = port.to_string();
    let line = [
        "serve",
        "-p",
        &p,
        "-L",
        "127.0.0.1",
        "-t",
        "4",
        "-j",
        "3",
        "--verbose",
        "WARNING",
        "-l",
        log.to_str().unwrap(),
        "-P",
        pid.to_str().unwrap(),
        "-d",
        "-q",
        "libmemcached",
        &mc_servers,
        // Not gearmand's: keeps the HTTP listener off the default port other tests may hold.
        "--http",
        &format!("127.0.0.1:{http}"),
        "--node-id",
        "clitest",
    ];
    // -d: the parent exits 0 once the listeners are bound; the server lives on detached.
    let out = run(&line, &[]);
    assert!(out.status.success(), "{out:?}");
    eventually("the pid file", || pid.exists());
    let server_pid: u32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(is_alive(server_pid));
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    echo(SocketAddr::from(([127, 0, 0, 1], port)));
    let status = gearadmin_status(port);
    assert!(status.trim_end().ends_with('.'), "{status}");

    // The same line shows what it configured.
    let shown = run(&[&["config"], &line[1..]].concat(), &[]);
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    for want in [
        "engine.job_retries = 3",
        "server.worker_threads = 4",
        "log.level = \"warn\"",
        &format!("server.listen = \"127.0.0.1:{port}\""),
        &format!("persistence.memcached = [\"127.0.0.1:{}\"]", mc.1),
    ] {
        assert!(shown.contains(want), "no {want:?} in:\n{shown}");
    }

    terminate(server_pid);
    eventually("the pid file to be removed", || !pid.exists());
    eventually("the server to exit", || !is_alive(server_pid));
    // The log file was written to (stderr went there), at WARNING: no info lines.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains(" INFO "), "{logged}");
}

#[test]
fn started_as_gearmand_it_reads_gearmands_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let gearmand = dir.path().join("gearmand");
    std::os::unix::fs::symlink(BIN, &gearmand).unwrap();
    let (port, http) = (free_port(), free_port());
    let pid = dir.path().join("g.pid");
    let p = Proc::start(
        &gearmand,
        &[
            "-p",
            &port.to_string(),
            "-L",
            "127.0.0.1",
            "--verbose",
            "INFO",
            "-l",
            "stderr",
            "-P",
            pid.to_str().unwrap(),
            "-r",
            "http",
            "--http-port",
            &http.to_string(),
            "-R",
            "-w",
            "0",
            "--keepalive",
            "--keepalive-idle",
            "-1",
        ],
        &[],
    );
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    echo(SocketAddr::from(([127, 0, 0, 1], port)));
    // -r http --http-port: the HTTP listener (health, metrics) is on that port.
    let mut h = TcpStream::connect(("127.0.0.1", http)).unwrap();
    h.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    h.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );
    let written: u32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(written, p.child.id());
    p.wait_for_stderr("-R/--round-robin");
    let (status, err) = p.stop();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(!pid.exists(), "the pid file is removed at exit");
}

#[test]
fn options_without_an_equivalent_are_refused_by_name() {
    let p = free_port().to_string();
    for (args, named) in [
        (&["--syslog"][..], "--syslog"),
        (
            &["-q", "libsqlite3", "--libsqlite3-db", "/tmp/q.db"][..],
            "--libsqlite3-db",
        ),
        (&["-q", "redis"][..], "-q redis"),
        (&["-q", "MySQL"][..], "-q mysql"),
        (&["-f", "1000"][..], "-f"),
        (&["--coredump"][..], "--coredump"),
        (&["--hashtable-buckets", "991"][..], "--hashtable-buckets"),
        (&["--job-handle-prefix", "H:x"][..], "--job-handle-prefix"),
        (&["-r", "redis"][..], "-r redis"),
    ] {
        let out = run(&[&["serve", "-p", &p], args].concat(), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with(&format!("gearhouse: {named}: not supported")),
            "{args:?}: {err}"
        );
        assert!(err.contains(" instead") || err.contains(": "), "{err}");
    }
}

/// Holds the Gearman port, starts the server with `level_args`, frees the port once the
/// server logged a retry, and returns what it logged by the time it stopped.
fn retry_bind_and_log(level_args: &[&str]) -> String {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let listen = addr.to_string();
    let p = Proc::start(
        Path::new(BIN),
        &[
            &["serve", "--listen", &listen, "--http", "127.0.0.1:0"],
            level_args,
        ]
        .concat(),
        &[("GEARHOUSE_SERVER__BIND_RETRY_MS", "20000")],
    );
    p.wait_for_stderr("address in use");
    drop(holder);
    wait_listening(addr);
    echo(addr);
    let (status, err) = p.stop();
    assert!(status.success(), "{status:?}\n{err}");
    err
}

#[test]
fn a_held_port_is_retried_and_warning_levels_log_warnings_only() {
    for level in [
        &["--verbose", "WARNING"][..],
        &["--log-level", "warning"][..],
    ] {
        let err = retry_bind_and_log(level);
        assert!(err.contains(" WARN "), "{level:?}: {err}");
        assert!(!err.contains(" INFO "), "{level:?}: {err}");
    }
    // The same start at info level does log info lines (so the check above can fail).
    let err = retry_bind_and_log(&["--verbose", "info"]);
    assert!(err.contains(" WARN ") && err.contains(" INFO "), "{err}");
}

#[test]
fn a_port_held_past_the_retry_window_fails_with_exit_1() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = holder.local_addr().unwrap().to_string();
    let started = Instant::now();
    let out = run(
        &["serve", "--listen", &listen, "--http", "127.0.0.1:0"],
        &[("GEARHOUSE_SERVER__BIND_RETRY_MS", "600")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "retried for the window"
    );
    assert!(
        err.contains(&format!("gearhouse: cannot listen on {listen}")),
        "{err}"
    );
}

#[test]
fn bad_levels_and_bad_configuration_print_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad_file = dir.path().join("bad.toml");
    std::fs::write(&bad_file, "[server]\nlisten_port = 1\n").unwrap();
    for (args, needle) in [
        (
            vec!["serve", "--log-level", "loud"],
            "\"loud\" is not a log level",
        ),
        (
            vec!["serve", "--verbose", "WARNINGS"],
            "\"WARNINGS\" is not a log level",
        ),
        (
            vec!["serve", "--config", bad_file.to_str().unwrap()],
            "listen_port",
        ),
        (
            vec!["config", "--config", "/nonexistent/g.toml"],
            "/nonexistent/g.toml",
        ),
    ] {
        let out = run(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line:\n{err}");
        assert!(err.starts_with("gearhouse: "), "{err}");
        assert_eq!(err.matches(needle).count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn gearhouse_config_shows_every_key_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("g.toml");
    std::fs::write(&file, "[server]\nmax_connections = 123\n").unwrap();
    let out = run(
        &[
            "config",
            "--config",
            file.to_str().unwrap(),
            "-p",
            "5999",
            "--exceptions",
        ],
        &[("GEARHOUSE_ENGINE__JOB_RETRIES", "4")],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let source_of = |key: &str| {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"));
        line.split_once("  # ").unwrap().1.to_string()
    };
    assert!(text.starts_with(&format!("# configuration file: {}", file.display())));
    assert_eq!(
        source_of("server.max_connections"),
        format!("file {}", file.display())
    );
    assert_eq!(
        source_of("engine.job_retries"),
        "environment GEARHOUSE_ENGINE__JOB_RETRIES"
    );
    assert_eq!(source_of("server.listen"), "flag -L/-p");
    assert_eq!(source_of("engine.exceptions"), "flag --exceptions");
    assert_eq!(source_of("log.level"), "default");
    assert!(text.contains("server.listen = \"0.0.0.0:5999\""), "{text}");
    assert!(text.contains("engine.exceptions = true"), "{text}");
    // Every key of the shipped defaults is listed.
    let keys = gearhouse::config::DEFAULTS_TOML
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
        .count();
    assert_eq!(
        text.lines().filter(|l| l.contains("  # ")).count(),
        keys,
        "{text}"
    );
}

/// The unit file passes `systemd-analyze verify`, with ExecStart pointed at the built binary
/// (verify checks that the executable exists).
#[test]
fn the_systemd_unit_verifies() {
    let Ok(v) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(v.status.success());
    let unit = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/gearhouse.service"),
    )
    .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/gearhouse serve --config /etc/gearhouse/gearhouse.toml")
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("gearhouse.service");
    std::fs::write(&copy, unit.replace("/usr/bin/gearhouse", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Lines about gearhouse.service are ours; verify also reports on the host's own units.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("gearhouse")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "{:?}\n{err}",
        out.status
    );
}

/// Under `Type=notify`, READY=1 reaches `$NOTIFY_SOCKET` once the server accepts clients.
#[test]
fn systemd_hears_ready_once_clients_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "-p",
            &port.to_string(),
            "-L",
            "127.0.0.1",
            "--http",
            "127.0.0.1:0",
        ])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1"), "{msg}");
    // By then the Gearman listener answers.
    echo(SocketAddr::from(([127, 0, 0, 1], port)));
    terminate(child.id());
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// `-u USER`: the server runs as that user once its ports are bound (needs root; skipped
/// otherwise); an unknown user is a configuration error.
#[test]
fn dash_u_switches_user_after_binding() {
    let out = run(
        &[
            "serve",
            "-u",
            "no-such-user-gh",
            "--http",
            "127.0.0.1:0",
            "-p",
            "1",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    // Port 1 is bound before the switch (root may), so the failure is the user's.
    if out.status.code() == Some(1) {
        eprintln!("skipped: not root ({err})");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"no-such-user-gh\"") && err.contains("no such user"),
        "{err}"
    );

    let port = free_port();
    let p = Proc::start(
        Path::new(BIN),
        &[
            "serve",
            "-u",
            "nobody",
            "-p",
            &port.to_string(),
            "-L",
            "127.0.0.1",
            "--http",
            "127.0.0.1:0",
        ],
        &[],
    );
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    echo(SocketAddr::from(([127, 0, 0, 1], port)));
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid}"
    );
    let (st, err) = p.stop();
    assert!(st.success(), "{err}");
}
