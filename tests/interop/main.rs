//! Interoperability: the real Gearman clients, run as child processes against the real
//! `gearhouse` binary. The clients are the ones users run unchanged: the `gearman` CLI and
//! `gearadmin` (libgearman), PHP's GearmanClient/GearmanWorker (pecl-gearman on libgearman), Perl
//! Gearman::Client/Worker (a separate pure-Perl implementation) and Python `gear` (Zuul's
//! library). The scripts they run live in `tests/clients/` and print one JSON object per line;
//! a failing assertion shows the clients' own stdout and stderr (and the server log when the
//! server's state never became what the test waited for).
//!
//! One test binary, one module per client (`php`, `cli`, `perl`, `python`, and `mixed` for the
//! tests that put several implementations on one server). This file holds what they share:
//! launching each client (the process harness itself is `tests/common/process.rs`) and
//! observing the server through the crate's own client (admin `status`, GET_STATUS_UNIQUE).
//! `scripts/install-test-deps.sh` installs the clients.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod mixed;
mod perl;
mod php;
mod python;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::process::{Finished, Proc, T};
use common::BinServer;
use gearhouse::client::{with_timeout, ClientError, Connection};
use serde_json::Value;

const NODE: &str = "interop";

// ---------------------------------------------------------------------------------------------
// The clients.
// ---------------------------------------------------------------------------------------------

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn php_client(port: u16, mode: &str, args: &[&str]) -> Proc {
    let mut a = vec![script("php_client.php"), mode.into(), port.to_string()];
    a.extend(strings(args));
    Proc::spawn("php client", "php", &a)
}

/// `count` 0 = until killed.
fn php_worker(port: u16, count: u32, funcs: &[&str]) -> Proc {
    let mut a = vec![
        script("php_worker.php"),
        port.to_string(),
        count.to_string(),
    ];
    a.extend(strings(funcs));
    Proc::spawn("php worker", "php", &a)
}

fn perl_client(port: u16, mode: &str, args: &[&str]) -> Proc {
    let mut a = vec![script("perl_client.pl"), port.to_string(), mode.into()];
    a.extend(strings(args));
    Proc::spawn("perl client", "perl", &a)
}

fn perl_worker(port: u16, count: u32, funcs: &[&str]) -> Proc {
    let mut a = vec![
        script("perl_worker.pl"),
        port.to_string(),
        count.to_string(),
    ];
    a.extend(strings(funcs));
    Proc::spawn("perl worker", "perl", &a)
}

fn py_client(port: u16, mode: &str, args: &[&str]) -> Proc {
    let mut a = vec![
        script("py_gear.py"),
        port.to_string(),
        "client".into(),
        mode.into(),
    ];
    a.extend(strings(args));
    Proc::spawn("python gear client", "python3", &a)
}

fn py_worker(port: u16, count: u32, funcs: &[&str]) -> Proc {
    let mut a = vec![
        script("py_gear.py"),
        port.to_string(),
        "worker".into(),
        count.to_string(),
    ];
    a.extend(strings(funcs));
    Proc::spawn("python gear worker", "python3", &a)
}

/// The `gearman` CLI (libgearman) against the server.
fn gearman(port: u16, args: &[&str]) -> Proc {
    let mut a = strings(&["-h", "127.0.0.1", "-p", &port.to_string()]);
    a.extend(strings(args));
    Proc::spawn("gearman cli", "gearman", &a)
}

/// A finished `gearadmin OPTION` run (exit status 0 required).
fn gearadmin(port: u16, option: &str) -> Finished {
    let p = Proc::spawn(
        "gearadmin",
        "gearadmin",
        &strings(&["-h", "127.0.0.1", "-p", &port.to_string(), option]),
    );
    p.finish_ok()
}

// ---------------------------------------------------------------------------------------------
// Observing the server through the crate's client.
// ---------------------------------------------------------------------------------------------

fn server() -> BinServer {
    BinServer::start(&["--node-id", NODE], &[])
}

/// Runs `f` (calls of the crate's client) on a runtime of its own: the interop tests are plain
/// threads. Each call gets a 5 s deadline; any failure fails the test with `what`.
fn block_on<R>(what: &str, f: impl std::future::Future<Output = Result<R, ClientError>>) -> R {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(with_timeout(Duration::from_secs(5), f))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `status` row of `func`: (total, running, workers).
fn status_row(port: u16, func: &str) -> Option<(u64, u64, u64)> {
    block_on("admin status", async {
        let mut c = Connection::connect(("127.0.0.1", port)).await?;
        c.function_status(func).await
    })
}

/// Polls `status` until `func`'s row satisfies `cond`.
fn wait_status(srv: &BinServer, func: &str, what: &str, cond: impl Fn((u64, u64, u64)) -> bool) {
    let deadline = Instant::now() + T;
    loop {
        let row = status_row(srv.port, func);
        if row.is_some_and(&cond) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status of {func}: never {what}; last row {row:?}\nserver log:\n{}",
            srv.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Foreground clients waiting on the job with `unique` (GET_STATUS_UNIQUE's last field).
fn waiting_clients(port: u16, unique: &str) -> u64 {
    block_on("GET_STATUS_UNIQUE", async {
        let mut c = Connection::connect(("127.0.0.1", port)).await?;
        c.get_status_unique(unique.as_bytes()).await
    })
    .waiting_clients
}

/// (known, running, numerator, denominator) of a status event; the numbers may be JSON numbers
/// (PHP, Perl) or strings (Python gear).
fn status_fields(v: &Value) -> (bool, bool, i64, i64) {
    let num = |x: &Value| {
        x.as_i64()
            .or_else(|| x.as_str().and_then(|t| t.parse().ok()))
            .unwrap_or_else(|| panic!("not a number: {x} in {v}"))
    };
    let flag = |x: &Value| {
        x.as_bool()
            .unwrap_or_else(|| panic!("not a bool: {x} in {v}"))
    };
    (
        flag(&v["known"]),
        flag(&v["running"]),
        num(&v["num"]),
        num(&v["den"]),
    )
}

/// PHP `jobStatus(handle)`, asked again until `cond` holds (or [`T`] passes); the last answer.
fn php_status_until(
    port: u16,
    handle: &str,
    cond: impl Fn((bool, bool, i64, i64)) -> bool,
) -> Finished {
    let deadline = Instant::now() + T;
    loop {
        let st = php_client(port, "status", &[handle]).finish_ok();
        if cond(status_fields(&st.one("status"))) || Instant::now() >= deadline {
            return st;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn rev(x: &str) -> String {
    x.chars().rev().collect()
}

fn jobs_of(f: &Finished) -> Vec<Value> {
    f.all("job")
}

fn workloads(jobs: &[Value]) -> Vec<String> {
    jobs.iter().map(|j| s(&j["workload"]).to_string()).collect()
}
