//! `gearhouse import` against real gearmand 1.1.20 queue stores: jobs are queued in a real
//! gearmand (with the real `gearman` CLI, or the crate's client for an epoch job), gearmand is
//! stopped, and the real `gearhouse` binary imports them into a running gearhouse. A worker
//! then drains gearhouse and must see every job, in priority order, with its unique and payload.
//! Needs gearmand, gearman-tools, sqlite3 and redis-server (`scripts/install-test-deps.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{binary, free_port, BinServer};
use gearhouse::client::{Connection, Job};
use gearhouse::protocol::GrabKind;

const GEARMAND: &str = "/usr/sbin/gearmand";

/// A scratch directory per test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gearhouse-import-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real gearmand 1.1.20 with a persistent queue; stopped with SIGTERM.
struct Gearmand {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Gearmand {
    fn start(dir: &Path, queue: &[&str]) -> Gearmand {
        assert!(
            Path::new(GEARMAND).exists(),
            "{GEARMAND} missing: run scripts/install-test-deps.sh"
        );
        let port = free_port();
        let log = dir.join("gearmand.log");
        let mut cmd = Command::new(GEARMAND);
        cmd.args(["-p", &port.to_string(), "-L", "127.0.0.1", "-l"])
            .arg(&log)
            .args(queue)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // gearmand refuses to run as root without a user to switch to.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "root"]);
        }
        let child = cmd.spawn().expect("spawn gearmand");
        wait_port(port, "gearmand");
        Gearmand { child, port, log }
    }

    /// Queues a background job with the real `gearman` CLI (`flags`: `-I` high, `-L` low).
    fn queue(&self, flags: &[&str], function: &str, unique: Option<&str>, payload: &str) {
        let mut cmd = Command::new("gearman");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-b"])
            .args(flags)
            .args(["-f", function]);
        if let Some(u) = unique {
            cmd.args(["-u", u]);
        }
        let out = cmd.arg(payload).output().expect("run gearman");
        assert!(out.status.success(), "gearman: {out:?}");
    }

    /// Queues a job due at `epoch` (SUBMIT_JOB_EPOCH: the CLI has no flag for it).
    fn queue_epoch(&self, function: &str, unique: &str, payload: &str, epoch: u64) {
        let port = self.port;
        rt().block_on(async {
            let mut c = Connection::connect(("127.0.0.1", port)).await.unwrap();
            let job = Job::new(function, payload).unique(unique).epoch(epoch);
            c.submit_background(&job).await.unwrap();
        });
    }

    fn stop(mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "gearmand ignored SIGTERM: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gearmand {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real redis-server on a free port, no persistence; killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server missing: run scripts/install-test-deps.sh");
        wait_port(port, "redis-server");
        Redis { child, port }
    }

    fn con(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut self.con()).unwrap();
        keys.sort();
        keys
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `gearhouse import ARGS --server ADDR`.
fn import(server: &BinServer, args: &[&str]) -> Output {
    let out = Command::new(binary())
        .arg("import")
        .args(args)
        .args(["--server", &server.addr().to_string()])
        .output()
        .expect("run gearhouse import");
    eprintln!(
        "gearhouse import {args:?}: {}\nstdout: {}stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Everything a worker can grab now for `function`, in the order gearhouse hands it out, as
/// (unique, payload); each is completed.
fn drain(server: &BinServer, function: &str) -> Vec<(String, String)> {
    let addr = server.addr();
    rt().block_on(async {
        let mut w = Connection::connect(addr).await.unwrap();
        w.can_do(function.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        while let Some(a) = w.grab(GrabKind::Uniq).await.unwrap() {
            got.push((
                String::from_utf8_lossy(&a.unique).into_owned(),
                String::from_utf8_lossy(&a.data).into_owned(),
            ));
            w.complete(&a.handle, b"").await.unwrap();
        }
        got
    })
}

/// The admin `status` total of `function` (0 when not listed).
fn queued(server: &BinServer, function: &str) -> u64 {
    let addr = server.addr();
    rt().block_on(async {
        let mut c = Connection::connect(addr).await.unwrap();
        c.function_status(function)
            .await
            .unwrap()
            .map_or(0, |s| s.0)
    })
}

/// Jobs of `function` waiting for their epoch, from the JSON status API.
fn scheduled(server: &BinServer, function: &str) -> u64 {
    let http = server.http_addr();
    let (code, body) = rt()
        .block_on(common::http_get(http, "/api/v1/status"))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == function)
        .map_or(0, |f| f["scheduled"].as_u64().unwrap())
}

fn admin(server: &BinServer, command: &str) -> String {
    let addr = server.addr();
    rt().block_on(async {
        let mut c = Connection::connect(addr).await.unwrap();
        c.admin(command).await.unwrap()
    })
}

fn sqlite_rows(db: &Path) -> Vec<(String, String, i64, Vec<u8>, i64)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("SELECT function_name, unique_key, priority, data, when_to_run FROM gearman_queue ORDER BY function_name, unique_key")
        .unwrap();
    s.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(u, d)| (u.to_string(), d.to_string()))
        .collect()
}

/// Queues the same mixed-priority set in any gearmand: HIGH before NORMAL before LOW must come
/// out of gearhouse whatever order they were stored in.
fn queue_mixed(g: &Gearmand) {
    g.queue(&[], "fa", Some("n1"), "normal-1");
    g.queue(&["-L"], "fa", Some("l1"), "low-1");
    g.queue(&["-I"], "fa", Some("h1"), "high-1");
    g.queue(&[], "fa", Some("n2"), "normal-2");
    g.queue(&["-I"], "fa", Some("h2"), "high-2");
}

fn mixed_in_priority_order() -> Vec<(String, String)> {
    pairs(&[
        ("h1", "high-1"),
        ("h2", "high-2"),
        ("n1", "normal-1"),
        ("n2", "normal-2"),
        ("l1", "low-1"),
    ])
}

#[test]
fn sqlite_queue_moves_with_priority_unique_and_epoch_and_a_rerun_doubles_nothing() {
    let dir = scratch("sqlite");
    let db = dir.join("queue.db");
    let g = Gearmand::start(
        &dir,
        &["-q", "libsqlite3", "--libsqlite3-db", db.to_str().unwrap()],
    );
    queue_mixed(&g);
    g.queue(&[], "fb", None, "no-unique");
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    g.queue_epoch("fe", "e1", "later", epoch);
    g.stop();

    let rows = sqlite_rows(&db);
    assert_eq!(rows.len(), 7, "gearmand stored {rows:?}");
    assert!(rows
        .iter()
        .any(|r| r.0 == "fe" && r.4 == epoch as i64 && r.3 == b"later"));
    let fb_unique = rows.iter().find(|r| r.0 == "fb").unwrap().1.clone();
    let before = std::fs::read(&db).unwrap();

    let server = BinServer::start(&[], &[]);
    let out = import(&server, &["sqlite", db.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "moved 7, skipped 0, left 0");
    assert!(sqlite_rows(&db).is_empty(), "the source is empty");

    // An import that stopped after gearhouse's acks but before the deletes leaves the rows in
    // place: rerunning it moves them again, and gearhouse coalesces them with the queued jobs.
    std::fs::write(&db, &before).unwrap();
    let out = import(&server, &["sqlite", db.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "moved 7, skipped 0, left 0");
    assert!(sqlite_rows(&db).is_empty());
    let out = import(&server, &["sqlite", db.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "moved 0, skipped 0, left 0");

    assert_eq!(queued(&server, "fa"), 5, "no job doubled");
    assert_eq!(
        scheduled(&server, "fe"),
        1,
        "the epoch job waits for its time"
    );
    assert_eq!(drain(&server, "fa"), mixed_in_priority_order());
    assert_eq!(
        drain(&server, "fb"),
        vec![(fb_unique.clone(), "no-unique".to_string())]
    );
    assert_eq!(fb_unique.len(), 36, "gearmand's generated UUID is kept");
    // The epoch came along: due in an hour, the job is queued but not handed out yet.
    assert!(drain(&server, "fe").is_empty());
    assert_eq!(scheduled(&server, "fe"), 1);
}

#[test]
fn refused_jobs_stay_in_the_source_and_a_rerun_moves_them() {
    let dir = scratch("refused");
    let db = dir.join("queue.db");
    let g = Gearmand::start(
        &dir,
        &["-q", "libsqlite3", "--libsqlite3-db", db.to_str().unwrap()],
    );
    for i in 1..=5 {
        g.queue(&[], "fq", Some(&format!("q{i}")), &format!("job-{i}"));
    }
    g.stop();
    assert_eq!(sqlite_rows(&db).len(), 5);

    let server = BinServer::start(&[], &[]);
    assert!(admin(&server, "maxqueue fq 2").starts_with("OK"));
    let out = import(&server, &["sqlite", db.to_str().unwrap()]);
    assert!(!out.status.success(), "refusals make the exit status fail");
    let line = stdout(&out);
    assert!(
        line.starts_with("moved 2, skipped 3, left 3; 3 refused: "),
        "{line}"
    );
    assert_eq!(sqlite_rows(&db).len(), 3, "refused jobs stay in the source");
    assert_eq!(queued(&server, "fq"), 2);

    assert!(admin(&server, "maxqueue fq").starts_with("OK"));
    let out = import(&server, &["sqlite", db.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "moved 3, skipped 0, left 0");
    assert!(sqlite_rows(&db).is_empty());
    let mut got = drain(&server, "fq");
    got.sort();
    let want: Vec<(String, String)> = (1..=5)
        .map(|i| (format!("q{i}"), format!("job-{i}")))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn redis_queue_moves_with_priority_and_unique_and_a_rerun_moves_nothing() {
    let dir = scratch("redis");
    let redis = Redis::start();
    let g = Gearmand::start(
        &dir,
        &[
            "-q",
            "redis",
            "--redis-server",
            "127.0.0.1",
            "--redis-port",
            &redis.port.to_string(),
        ],
    );
    queue_mixed(&g);
    // gearmand's key is prefix-function-unique and it splits on the first '-': this job comes
    // back as function "f", unique "b-u3", from gearmand's own replay and from the import.
    g.queue(&[], "f-b", Some("u3"), "dashed");
    g.stop();
    assert_eq!(redis.keys().len(), 6, "gearmand stored {:?}", redis.keys());
    assert!(redis.keys().contains(&"_gear_-f-b-u3".to_string()));

    let server = BinServer::start(&[], &[]);
    let addr = format!("127.0.0.1:{}", redis.port);
    let out = import(&server, &["redis", &addr]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "moved 6, skipped 0, left 0");
    assert!(redis.keys().is_empty(), "the source is empty");
    let out = import(&server, &["redis", &addr]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "moved 0, skipped 0, left 0");

    assert_eq!(queued(&server, "fa"), 5, "no job doubled");
    assert_eq!(drain(&server, "fa"), mixed_in_priority_order());
    assert_eq!(drain(&server, "f"), pairs(&[("b-u3", "dashed")]));
}

/// The raw `get` answer for `keys` from the memcached at `addr`.
fn memcached_get(addr: &str, keys: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "get {}\r\n", keys.join(" ")).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(b"END\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "memcached closed");
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn memcached_queue_moves_what_it_lists_and_says_the_listing_may_be_incomplete() {
    let dir = scratch("memcached");
    let mc = common::Memcached::start(64, &[]);
    let g = Gearmand::start(
        &dir,
        &[
            "-q",
            "libmemcached",
            &format!("--libmemcached-servers={}", mc.addr()),
        ],
    );
    queue_mixed(&g);
    g.queue(&[], "f-b", Some("u3"), "dashed");
    g.stop();
    let keys = [
        "gear_fa-n1",
        "gear_fa-n2",
        "gear_fa-h1",
        "gear_fa-h2",
        "gear_fa-l1",
        "gear_f-b-u3",
    ];
    let stored = memcached_get(&mc.addr(), &keys);
    assert_eq!(
        stored.matches("VALUE ").count(),
        6,
        "gearmand stored {stored}"
    );
    assert!(
        stored.contains("VALUE gear_fa-h1 0 6\r\nhigh-1\r\n"),
        "{stored}"
    );

    let server = BinServer::start(&[], &[]);
    let note = "memcached listing may be incomplete: run again until it finds none";
    let out = import(&server, &["memcached", &mc.addr()]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), format!("moved 6, skipped 0, left 0; {note}"));
    assert_eq!(
        memcached_get(&mc.addr(), &keys),
        "END\r\n",
        "the source is empty"
    );
    let out = import(&server, &["memcached", &mc.addr()]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), format!("moved 0, skipped 0, left 0; {note}"));

    assert_eq!(queued(&server, "fa"), 5, "no job doubled");
    assert_eq!(drain(&server, "fa"), mixed_in_priority_order());
    assert_eq!(drain(&server, "f"), pairs(&[("b-u3", "dashed")]));
}
