//! The load generator's workers: CAN_DO, then GRAB_JOB_UNIQ / WORK_COMPLETE as fast as the
//! server hands out jobs, with `--worker-pipeline` grabs outstanding, sleeping with PRE_SLEEP
//! when there is no job. Each WORK_COMPLETE is queued and flushed with the next grab, one write.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gearhouse::client::{arg_from, first_arg};
use gearhouse::codec::{Packet, PacketType};
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;

use crate::{connect, Args};

/// An ERROR packet's code and text, for messages.
pub fn error_text(p: &Packet) -> String {
    String::from_utf8_lossy(&p.body).replace('\0', " ")
}

/// Counts all workers and clients of a run share.
#[derive(Default)]
pub struct Shared {
    /// WORK_COMPLETE packets written by all workers.
    pub completed: AtomicU64,
    pub errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    /// Counts an error; the first one is printed and kept.
    pub fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            eprintln!("loadgen: {what}");
            *f = Some(what);
        }
    }
}

pub struct WorkerDone {
    completed: u64,
    /// When the server acknowledged this worker's last WORK_COMPLETE.
    acked_at: Instant,
}

/// A worker: CAN_DO, then GRAB_JOB_UNIQ / WORK_COMPLETE until `stop`, sleeping with PRE_SLEEP
/// when there is no job. `target` = total completions (all workers) after which it stops all.
async fn worker(
    args: Arc<Args>,
    shared: Arc<Shared>,
    start: Arc<Barrier>,
    stop: CancellationToken,
    target: u64,
) -> io::Result<WorkerDone> {
    let mut c = connect(&args).await?;
    c.put(PacketType::CAN_DO, &[args.function.as_bytes()]);
    c.put(PacketType::ECHO_REQ, &[b"ready"]);
    c.flush().await?;
    // The echo proves CAN_DO was processed before the run starts.
    loop {
        let p = c.recv().await?;
        if p.kind == PacketType::ECHO_RES {
            break;
        }
    }
    start.wait().await;
    let k = args.worker_pipeline.max(1);
    let fixed_result = args.result.map(|n| vec![b'r'; n]);
    for _ in 0..k {
        c.put(PacketType::GRAB_JOB_UNIQ, &[]);
    }
    c.flush().await?;
    let mut grabs_out = k;
    let mut sleeping = false;
    let mut done = 0u64;
    let mut stopping = false;
    loop {
        let p = if stopping {
            c.recv().await?
        } else {
            tokio::select! {
                biased;
                p = c.recv() => p?,
                _ = stop.cancelled() => {
                    // Acknowledge every WORK_COMPLETE sent: the echo comes back after them.
                    stopping = true;
                    c.put(PacketType::ECHO_REQ, &[b"done"]);
                    c.flush().await?;
                    continue;
                }
            }
        };
        match p.kind {
            PacketType::JOB_ASSIGN_UNIQ | PacketType::JOB_ASSIGN | PacketType::JOB_ASSIGN_ALL => {
                grabs_out -= 1;
                let handle = first_arg(&p.body);
                let nargs = match p.kind {
                    PacketType::JOB_ASSIGN => 2,
                    PacketType::JOB_ASSIGN_UNIQ => 3,
                    _ => 4,
                };
                let data = arg_from(&p.body, nargs);
                let result: &[u8] = fixed_result.as_deref().unwrap_or(&data);
                c.put(PacketType::WORK_COMPLETE, &[&handle, result]);
                done += 1;
                let total = shared.completed.fetch_add(1, Ordering::AcqRel) + 1;
                if total >= target {
                    stop.cancel();
                }
                if !stopping && !stop.is_cancelled() {
                    c.put(PacketType::GRAB_JOB_UNIQ, &[]);
                    grabs_out += 1;
                }
                c.flush().await?;
            }
            PacketType::NO_JOB => {
                grabs_out -= 1;
                if grabs_out == 0 && !stopping {
                    c.put(PacketType::PRE_SLEEP, &[]);
                    c.flush().await?;
                    sleeping = true;
                }
            }
            PacketType::NOOP if sleeping && !stopping => {
                sleeping = false;
                for _ in 0..k {
                    c.put(PacketType::GRAB_JOB_UNIQ, &[]);
                }
                grabs_out = k;
                c.flush().await?;
            }
            PacketType::ECHO_RES if stopping => {
                return Ok(WorkerDone {
                    completed: done,
                    acked_at: Instant::now(),
                });
            }
            PacketType::ERROR => shared.error(format!("worker got ERROR {}", error_text(&p))),
            _ => {}
        }
    }
}

/// Connects `n` workers; returns once all registered their function, with the barrier that
/// releases them.
pub struct Workers {
    handles: Vec<tokio::task::JoinHandle<io::Result<WorkerDone>>>,
    pub start: Arc<Barrier>,
    pub stop: CancellationToken,
}

pub fn spawn_workers(args: &Arc<Args>, shared: &Arc<Shared>, target: u64) -> Workers {
    let n = args.workers;
    let start = Arc::new(Barrier::new(n + 1));
    let stop = CancellationToken::new();
    let handles = (0..n)
        .map(|_| {
            tokio::spawn(worker(
                args.clone(),
                shared.clone(),
                start.clone(),
                stop.clone(),
                target,
            ))
        })
        .collect();
    Workers {
        handles,
        start,
        stop,
    }
}

pub async fn join_workers(w: Workers) -> io::Result<(u64, Option<Instant>)> {
    let mut completed = 0;
    let mut last = None;
    for h in w.handles {
        let d = h.await.map_err(io::Error::other)??;
        completed += d.completed;
        last = last.max(Some(d.acked_at));
    }
    Ok((completed, last))
}
