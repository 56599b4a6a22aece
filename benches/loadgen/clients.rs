//! The load generator's clients: background submitters with `--pipeline` submits outstanding
//! (queued with `put`, written by one `flush`, answers read as they come), and foreground
//! clients timing each job from SUBMIT_JOB to WORK_COMPLETE. Their connections are opened by
//! [`connect_clients`] before a run's clock starts: a TCP connect or TLS handshake is not a job.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use gearhouse::client::first_arg;
use gearhouse::codec::PacketType;

use crate::conn::Conn;
use crate::workers::{error_text, Shared};
use crate::{connect, Args, UniqueMode};

/// Unique ids that never repeat within a run and differ between runs.
pub fn unique_prefix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{:x}{:x}",
        t.as_secs(),
        t.subsec_nanos() ^ std::process::id()
    )
}

fn make_unique(args: &Args, prefix: &str, client: usize, i: u64, buf: &mut String) {
    buf.clear();
    if args.unique == UniqueMode::Random {
        use std::fmt::Write;
        let _ = write!(buf, "{prefix}-{client}-{i}");
    }
}

/// Marks of the global JOB_CREATED count, for per-segment rates.
pub struct Progress {
    pub created: AtomicU64,
    segment: u64,
    pub marks: Mutex<Vec<(u64, Instant)>>,
}

impl Progress {
    pub fn new(segment: u64) -> Self {
        Progress {
            created: AtomicU64::new(0),
            segment: segment.max(1),
            marks: Mutex::new(Vec::new()),
        }
    }
    pub fn created(&self) {
        let c = self.created.fetch_add(1, Ordering::AcqRel) + 1;
        if c.is_multiple_of(self.segment) {
            self.marks.lock().unwrap().push((c, Instant::now()));
        }
    }
}

/// Opens `--clients` connections at once, for the clients of one run.
pub async fn connect_clients(args: &Args) -> io::Result<Vec<Conn>> {
    futures::future::try_join_all((0..args.clients).map(|_| connect(args))).await
}

/// A client submitting `n` background jobs with up to `pipeline` unanswered; returns the time
/// its last JOB_CREATED arrived.
pub async fn bg_client(
    mut c: Conn,
    args: Arc<Args>,
    id: usize,
    n: u64,
    progress: Arc<Progress>,
    shared: Arc<Shared>,
    prefix: Arc<String>,
) -> io::Result<Instant> {
    let payload = vec![b'x'; args.payload];
    let pipeline = args.pipeline.unwrap_or(100).max(1) as u64;
    let (mut sent, mut answered, mut out) = (0u64, 0u64, 0u64);
    let mut uniq = String::new();
    while answered < n {
        while out < pipeline && sent < n {
            make_unique(&args, &prefix, id, sent, &mut uniq);
            c.put(
                PacketType::SUBMIT_JOB_BG,
                &[args.function.as_bytes(), uniq.as_bytes(), &payload],
            );
            sent += 1;
            out += 1;
        }
        c.flush().await?;
        let mut p = Some(c.recv().await?);
        while let Some(pk) = p {
            match pk.kind {
                PacketType::JOB_CREATED => {
                    progress.created();
                    answered += 1;
                    out -= 1;
                }
                PacketType::ERROR => {
                    shared.error(format!("submit got ERROR {}", error_text(&pk)));
                    answered += 1;
                    out -= 1;
                }
                _ => {}
            }
            p = c.try_recv()?;
        }
    }
    Ok(Instant::now())
}

/// A foreground client: SUBMIT_JOB, wait for WORK_COMPLETE, with up to `pipeline` jobs in
/// flight; returns the latencies in nanoseconds.
pub async fn fg_client(
    mut c: Conn,
    args: Arc<Args>,
    id: usize,
    n: u64,
    deadline: Option<Instant>,
    shared: Arc<Shared>,
    prefix: Arc<String>,
) -> io::Result<Vec<u64>> {
    let payload = vec![b'x'; args.payload];
    let pipeline = args.pipeline.unwrap_or(1).max(1) as u64;
    let mut lat = Vec::with_capacity(n.min(10_000_000) as usize);
    let mut awaiting_created: VecDeque<Instant> = VecDeque::new();
    let mut running: HashMap<Bytes, Instant> = HashMap::new();
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut uniq = String::new();
    let more = |sent: u64| match deadline {
        Some(d) => Instant::now() < d,
        None => sent < n,
    };
    loop {
        while ((sent - answered) < pipeline) && more(sent) {
            make_unique(&args, &prefix, id, sent, &mut uniq);
            c.put(
                PacketType::SUBMIT_JOB,
                &[args.function.as_bytes(), uniq.as_bytes(), &payload],
            );
            awaiting_created.push_back(Instant::now());
            sent += 1;
        }
        if answered == sent {
            break;
        }
        c.flush().await?;
        let mut p = Some(c.recv().await?);
        while let Some(pk) = p {
            match pk.kind {
                PacketType::JOB_CREATED => {
                    let t = awaiting_created
                        .pop_front()
                        .expect("JOB_CREATED without submit");
                    running.insert(pk.body.clone(), t);
                }
                PacketType::WORK_COMPLETE | PacketType::WORK_FAIL | PacketType::WORK_EXCEPTION => {
                    let h = first_arg(&pk.body);
                    if let Some(t) = running.remove(&h) {
                        lat.push(t.elapsed().as_nanos() as u64);
                        answered += 1;
                        if pk.kind != PacketType::WORK_COMPLETE {
                            shared.error(format!("job {} got {}", error_text(&pk), pk.kind.name()));
                        }
                    }
                }
                PacketType::ERROR => {
                    shared.error(format!("submit got ERROR {}", error_text(&pk)));
                    awaiting_created.pop_front();
                    answered += 1;
                }
                _ => {}
            }
            p = c.try_recv()?;
        }
    }
    Ok(lat)
}

pub fn per_client(total: u64, clients: usize, i: usize) -> u64 {
    let c = clients as u64;
    total / c + u64::from((i as u64) < total % c)
}
