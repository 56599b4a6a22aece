//! Real client programs as child processes (the `gearman` CLI, PHP, Perl, Python gear), with
//! bounded waits and their output captured for the failure message.
//!
//! A child's stdout is split into lines as they arrive, so a test can wait for "the worker has
//! taken the job" while the worker still runs; the scripts in `tests/clients/` print one JSON
//! object per line ([`Proc::wait_for`], [`Finished::events`]). Every wait has a deadline, a
//! child that overruns is killed and the test fails with the child's stdout and stderr, and a
//! child still running when its test ends is killed on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Deadline for one client run or one awaited condition.
pub const T: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Captured {
    lines: Vec<String>,
    stderr: String,
    stdout_done: bool,
    stderr_done: bool,
}

type Shared = Arc<(Mutex<Captured>, Condvar)>;

/// A client or worker process. Its stdout is split into lines as they arrive (so a test can
/// wait for "the worker has taken the job" while the worker still runs); it is killed on drop.
pub struct Proc {
    pub label: String,
    pub child: Child,
    out: Shared,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

/// What a finished process printed.
pub struct Finished {
    pub label: String,
    pub status: ExitStatus,
    pub lines: Vec<String>,
    pub stderr: String,
}

pub fn parse_events(label: &str, lines: &[String], stderr: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "{label}: stdout line is not JSON ({e}): {l:?}\n{}",
                    render(label, None, lines, stderr)
                )
            })
        })
        .collect()
}

pub fn render(label: &str, status: Option<ExitStatus>, lines: &[String], stderr: &str) -> String {
    let status = status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "still running".into());
    let mut s = format!("----- {label} [{status}] stdout:\n");
    for l in lines {
        let l: String = l.chars().take(600).collect();
        s.push_str(&l);
        s.push('\n');
    }
    s.push_str(&format!("----- {label} stderr:\n{}\n", stderr.trim_end()));
    s
}

impl Proc {
    pub fn spawn(label: &str, program: &str, args: &[String]) -> Proc {
        Self::spawn_with_input(label, program, args, None)
    }

    /// Like [`Proc::spawn`], writing `input` to the child's stdin and then closing it.
    pub fn spawn_with_input(
        label: &str,
        program: &str,
        args: &[String],
        input: Option<Vec<u8>>,
    ) -> Proc {
        let label = format!("{label} `{program} {}`", args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{label}: cannot start: {e} (scripts/install-test-deps.sh installs it)")
            });
        let mut readers = Vec::new();
        if let Some(input) = input {
            let mut stdin = child.stdin.take().expect("stdin");
            readers.push(thread::spawn(move || {
                let _ = stdin.write_all(&input);
            }));
        }
        let out: Shared = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let o = out.clone();
        let r1 = thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        o.0.lock().unwrap().lines.push(line);
                        o.1.notify_all();
                    }
                }
            }
            o.0.lock().unwrap().stdout_done = true;
            o.1.notify_all();
        });
        let o = out.clone();
        let r2 = thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match stderr.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        o.0.lock()
                            .unwrap()
                            .stderr
                            .push_str(&String::from_utf8_lossy(&chunk[..n]))
                    }
                }
            }
            o.0.lock().unwrap().stderr_done = true;
            o.1.notify_all();
        });
        readers.push(r1);
        readers.push(r2);
        Proc {
            label,
            child,
            out,
            readers,
            status: None,
        }
    }

    pub fn diag(&self) -> String {
        let c = self.out.0.lock().unwrap();
        render(&self.label, self.status, &c.lines, &c.stderr)
    }

    /// Waits until the events printed so far satisfy `cond`; returns them. Fails (with the
    /// process output) if the process ends first or `timeout` passes.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut c = lock.lock().unwrap();
        loop {
            let events = parse_events(&self.label, &c.lines, &c.stderr);
            if cond(&events) {
                return events;
            }
            let now = Instant::now();
            if c.stdout_done || now >= deadline {
                let why = if c.stdout_done { "ended" } else { "timed out" };
                let text = render(&self.label, None, &c.lines, &c.stderr);
                drop(c);
                panic!("{why} waiting for {what}\n{text}");
            }
            c = cv.wait_timeout(c, deadline - now).unwrap().0;
        }
    }

    /// Waits for the first event named `ev` and returns it.
    pub fn wait_event(&self, ev: &str) -> Value {
        let events = self.wait_for(&format!("event {ev:?}"), T, |e| {
            e.iter().any(|v| v["ev"] == ev)
        });
        events.into_iter().find(|v| v["ev"] == ev).unwrap()
    }

    /// Waits (at most `timeout`) for the process to exit; kills it and fails if it does not.
    pub fn finish_within(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                thread::sleep(Duration::from_millis(50));
                panic!("did not finish within {timeout:?}, killed\n{}", self.diag());
            }
            thread::sleep(Duration::from_millis(10));
        };
        self.status = Some(status);
        // Its output ends with it, unless a grandchild (a `gearman -w` command) still holds the
        // pipe: then take what arrived within a few seconds rather than wait for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (lock, cv) = &*self.out;
        let mut c = lock.lock().unwrap();
        while !(c.stdout_done && c.stderr_done) && Instant::now() < deadline {
            c = cv.wait_timeout(c, deadline - Instant::now()).unwrap().0;
        }
        drop(c);
        for r in self.readers.drain(..) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
        let c = std::mem::take(&mut *self.out.0.lock().unwrap());
        Finished {
            label: self.label.clone(),
            status,
            lines: c.lines,
            stderr: c.stderr,
        }
    }

    /// Finishes within [`T`] and requires exit status 0.
    pub fn finish_ok(self) -> Finished {
        let f = self.finish_within(T);
        assert!(f.status.success(), "exited with {}\n{}", f.status, f.diag());
        f
    }

    /// SIGKILL now (a crash), and collect what it printed.
    pub fn kill9(mut self) -> Finished {
        let _ = self.child.kill();
        self.finish_within(T)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Finished {
    pub fn diag(&self) -> String {
        render(&self.label, Some(self.status), &self.lines, &self.stderr)
    }
    pub fn events(&self) -> Vec<Value> {
        parse_events(&self.label, &self.lines, &self.stderr)
    }
    pub fn all(&self, ev: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|v| v["ev"] == ev)
            .collect()
    }
    /// The only event named `ev`.
    pub fn one(&self, ev: &str) -> Value {
        let all = self.all(ev);
        assert_eq!(
            all.len(),
            1,
            "expected exactly one {ev:?} event\n{}",
            self.diag()
        );
        all.into_iter().next().unwrap()
    }
    pub fn stdout(&self) -> String {
        self.lines.join("\n")
    }
}
