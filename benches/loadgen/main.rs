//! Load generator for gearhouse and gearmand: its own pipelined client and worker connections,
//! speaking raw Gearman packets, so both servers are driven by exactly the same code.
//!
//! Run: `cargo bench --bench loadgen -- --mode background --port 4730 --jobs 100000`.
//! Modes:
//! - `background`: clients submit SUBMIT_JOB_BG (pipelined), workers drain with GRAB_JOB_UNIQ /
//!   WORK_COMPLETE (PRE_SLEEP + NOOP when empty). End-to-end rate from the first submit to the
//!   last WORK_COMPLETE acknowledged by the server (an ECHO_REQ sent after it on the same
//!   connection came back), plus the submit rate.
//! - `foreground`: clients send SUBMIT_JOB and wait for WORK_COMPLETE (`--pipeline 1`, the
//!   default, is one round trip at a time); round trips/s and p50/p99/p999 latency.
//! - `submit-only`: queue background jobs with no worker; submit rate per `--segment` jobs.
//! - `drain`: workers drain what is queued for `--function`; jobs/s.
//! - `otlp-sink`: an HTTP server answering 200 to every POST (an OTLP/HTTP trace receiver that
//!   throws the spans away), counting requests and bytes; `GET /stats` returns the counts.
//!
//! Every run ends with one machine-readable line `RESULT key=value ...` (benches/compare.sh
//! reads it). Workers hold one job at a time unless `--worker-pipeline` says otherwise.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use gearhouse::codec::{put_packet, Frame, GearmanCodec, Packet, PacketType, MAGIC_REQ};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Background,
    Foreground,
    SubmitOnly,
    Drain,
    OtlpSink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum UniqueMode {
    /// Empty unique ids: no coalescing, no unique index.
    None,
    /// A distinct unique id per job (exercises the unique index).
    Random,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "Gearman load generator (gearhouse benchmark)"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 4730)]
    port: u16,
    #[arg(long, value_enum, default_value = "background")]
    mode: Mode,
    /// Jobs in total (split over the clients). Defaults: background 100000, foreground 20000,
    /// submit-only 1000000, drain: the queue depth `status` reports for --function.
    #[arg(long)]
    jobs: Option<u64>,
    /// Payload bytes per job.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Bytes of the WORK_COMPLETE result (default: the job's payload echoed back).
    #[arg(long)]
    result: Option<usize>,
    #[arg(long, default_value_t = 2)]
    clients: usize,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Outstanding submits per client (default: 100 for background/submit-only, 1 for
    /// foreground, i.e. one round trip at a time).
    #[arg(long)]
    pipeline: Option<usize>,
    /// GRAB_JOB_UNIQ requests a worker keeps outstanding (1 = a real one-job-at-a-time worker).
    #[arg(long, default_value_t = 1)]
    worker_pipeline: usize,
    #[arg(long, default_value = "bench")]
    function: String,
    #[arg(long, value_enum, default_value = "none")]
    unique: UniqueMode,
    /// Jobs per segment of the submit-only report.
    #[arg(long, default_value_t = 100_000)]
    segment: u64,
    /// Foreground only: run for this many seconds instead of a job count.
    #[arg(long)]
    duration: Option<f64>,
    /// Server process id: report its VmRSS/VmHWM (from /proc) at the end of the run.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Threads of the load generator's runtime (0 = a single-threaded runtime).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Free text copied into the RESULT line (e.g. the server's name).
    #[arg(long, default_value = "-")]
    label: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let rt = if args.threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let timeout = Duration::from_secs(args.timeout);
    let res = rt.block_on(async move {
        match tokio::time::timeout(timeout, run(args)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "run did not finish within --timeout",
            )),
        }
    });
    if let Err(e) = res {
        eprintln!("loadgen: {e}");
        println!("RESULT error={}", e.to_string().replace(' ', "_"));
        std::process::exit(1);
    }
}

async fn run(args: Args) -> io::Result<()> {
    match args.mode {
        Mode::Background => background(&args).await,
        Mode::Foreground => foreground(&args).await,
        Mode::SubmitOnly => submit_only(&args).await,
        Mode::Drain => drain(&args).await,
        Mode::OtlpSink => otlp_sink(&args).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

/// One Gearman connection: a read buffer decoded with gearhouse's codec and a write buffer
/// flushed explicitly, so many packets go out in one write.
struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    codec: GearmanCodec,
}

impl Conn {
    async fn connect(args: &Args) -> io::Result<Conn> {
        let stream = TcpStream::connect((args.host.as_str(), args.port)).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            codec: GearmanCodec::new(64 << 20, 1 << 20),
        })
    }

    fn put(&mut self, kind: PacketType, args: &[&[u8]]) {
        put_packet(&mut self.wbuf, MAGIC_REQ, kind, args);
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// A packet already in the read buffer, if a whole one is there.
    fn try_packet(&mut self) -> io::Result<Option<Packet>> {
        match self.codec.decode(&mut self.rbuf) {
            Ok(Some(Frame::Packet(p))) => Ok(Some(p)),
            Ok(Some(Frame::Admin(l))) => Err(io::Error::other(format!(
                "unexpected text from server: {:?}",
                String::from_utf8_lossy(&l)
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }

    /// The next packet; cancel-safe (bytes read stay in the buffer).
    async fn packet(&mut self) -> io::Result<Packet> {
        loop {
            if let Some(p) = self.try_packet()? {
                return Ok(p);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
        }
    }

    /// Sends an admin command and returns its lines up to the closing `.`.
    async fn admin(&mut self, cmd: &str) -> io::Result<Vec<String>> {
        self.stream.write_all(format!("{cmd}\n").as_bytes()).await?;
        let mut lines = Vec::new();
        loop {
            while let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
                let line = self.rbuf.split_to(pos + 1);
                let s = String::from_utf8_lossy(&line).trim_end().to_string();
                if s == "." {
                    return Ok(lines);
                }
                lines.push(s);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(io::Error::other("server closed the admin connection"));
            }
        }
    }
}

/// Queue depth (TOTAL, running included) of `function` from the admin `status` command.
async fn queue_depth(args: &Args, function: &str) -> io::Result<u64> {
    let mut c = Conn::connect(args).await?;
    let lines = c.admin("status").await?;
    Ok(lines
        .iter()
        .filter_map(|l| {
            let mut f = l.split('\t');
            (f.next()? == function).then(|| f.next()?.parse::<u64>().ok())?
        })
        .next()
        .unwrap_or(0))
}

fn first_arg(body: &Bytes) -> Bytes {
    match body.iter().position(|&b| b == 0) {
        Some(p) => body.slice(..p),
        None => body.clone(),
    }
}

/// The last argument of a packet with `n` arguments (the data).
fn nth_arg(body: &Bytes, n: usize) -> Bytes {
    let mut start = 0;
    for _ in 0..n {
        match body[start..].iter().position(|&b| b == 0) {
            Some(p) => start += p + 1,
            None => return Bytes::new(),
        }
    }
    body.slice(start..)
}

fn error_text(p: &Packet) -> String {
    String::from_utf8_lossy(&p.body).replace('\0', " ")
}

// ---------------------------------------------------------------------------------------------
// Workers

#[derive(Default)]
struct Shared {
    /// WORK_COMPLETE packets written by all workers.
    completed: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            eprintln!("loadgen: {what}");
            *f = Some(what);
        }
    }
}

struct WorkerDone {
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
    let mut c = Conn::connect(&args).await?;
    c.put(PacketType::CAN_DO, &[args.function.as_bytes()]);
    c.put(PacketType::ECHO_REQ, &[b"ready"]);
    c.flush().await?;
    // The echo proves CAN_DO was processed before the run starts.
    loop {
        let p = c.packet().await?;
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
            c.packet().await?
        } else {
            tokio::select! {
                biased;
                p = c.packet() => p?,
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
                let data = nth_arg(&p.body, nargs);
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
struct Workers {
    handles: Vec<tokio::task::JoinHandle<io::Result<WorkerDone>>>,
    start: Arc<Barrier>,
    stop: CancellationToken,
}

fn spawn_workers(args: &Arc<Args>, shared: &Arc<Shared>, target: u64) -> Workers {
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

async fn join_workers(w: Workers) -> io::Result<(u64, Option<Instant>)> {
    let mut completed = 0;
    let mut last = None;
    for h in w.handles {
        let d = h.await.map_err(io::Error::other)??;
        completed += d.completed;
        last = last.max(Some(d.acked_at));
    }
    Ok((completed, last))
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Unique ids that never repeat within a run and differ between runs.
fn unique_prefix() -> String {
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
struct Progress {
    created: AtomicU64,
    segment: u64,
    marks: Mutex<Vec<(u64, Instant)>>,
}

impl Progress {
    fn new(segment: u64) -> Self {
        Progress {
            created: AtomicU64::new(0),
            segment: segment.max(1),
            marks: Mutex::new(Vec::new()),
        }
    }
    fn created(&self) {
        let c = self.created.fetch_add(1, Ordering::AcqRel) + 1;
        if c % self.segment == 0 {
            self.marks.lock().unwrap().push((c, Instant::now()));
        }
    }
}

/// A client submitting `n` background jobs with up to `pipeline` unanswered; returns the time
/// its last JOB_CREATED arrived.
async fn bg_client(
    args: Arc<Args>,
    id: usize,
    n: u64,
    progress: Arc<Progress>,
    shared: Arc<Shared>,
    prefix: Arc<String>,
) -> io::Result<Instant> {
    let mut c = Conn::connect(&args).await?;
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
        let mut p = Some(c.packet().await?);
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
            p = c.try_packet()?;
        }
    }
    Ok(Instant::now())
}

/// A foreground client: SUBMIT_JOB, wait for WORK_COMPLETE, with up to `pipeline` jobs in
/// flight; returns the latencies in nanoseconds.
async fn fg_client(
    args: Arc<Args>,
    id: usize,
    n: u64,
    deadline: Option<Instant>,
    shared: Arc<Shared>,
    prefix: Arc<String>,
) -> io::Result<Vec<u64>> {
    let mut c = Conn::connect(&args).await?;
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
        let mut p = Some(c.packet().await?);
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
            p = c.try_packet()?;
        }
    }
    Ok(lat)
}

fn per_client(total: u64, clients: usize, i: usize) -> u64 {
    let c = clients as u64;
    total / c + u64::from((i as u64) < total % c)
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn rss(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return String::new();
    };
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return " rss_kb=NA".into();
    };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("NA")
            .to_string()
    };
    let (r, h) = (field("VmRSS:"), field("VmHWM:"));
    println!(
        "server pid {pid}: VmRSS {} MiB, VmHWM {} MiB",
        r.parse::<f64>()
            .map(|k| format!("{:.1}", k / 1024.0))
            .unwrap_or(r.clone()),
        h.parse::<f64>()
            .map(|k| format!("{:.1}", k / 1024.0))
            .unwrap_or(h.clone())
    );
    format!(" rss_kb={r} hwm_kb={h}")
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// CPU time used by the server (when its pid is known) and by this load generator during a run.
struct CpuMeter {
    pid: Option<u32>,
    server0: Option<f64>,
    self0: Option<f64>,
}

impl CpuMeter {
    fn start(pid: Option<u32>) -> Self {
        CpuMeter {
            pid,
            server0: pid.and_then(|p| cpu_seconds(&p.to_string())),
            self0: cpu_seconds("self"),
        }
    }

    /// A human line and the ` server_cpu_s=.. loadgen_cpu_s=..` fields; `jobs` gives CPU per job.
    fn report(&self, jobs: u64) -> (String, String) {
        let server = self
            .pid
            .and_then(|p| cpu_seconds(&p.to_string()))
            .zip(self.server0)
            .map(|(a, b)| a - b);
        let me = cpu_seconds("self").zip(self.self0).map(|(a, b)| a - b);
        let mut out = String::new();
        let mut line = String::new();
        if let Some(s) = server {
            line = format!(
                "  server CPU {:.2} s ({:.2} us/job); load generator CPU {:.2} s\n",
                s,
                s * 1e6 / jobs.max(1) as f64,
                me.unwrap_or(f64::NAN)
            );
            out.push_str(&format!(" server_cpu_s={s:.2}"));
        }
        if let Some(m) = me {
            out.push_str(&format!(" loadgen_cpu_s={m:.2}"));
        }
        (line, out)
    }
}

fn errors_field(shared: &Shared) -> String {
    format!(" errors={}", shared.errors.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Modes

async fn background(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = args.jobs.unwrap_or(100_000);
    let shared = Arc::new(Shared::default());
    let workers = spawn_workers(&args, &shared, n);
    workers.start.wait().await;
    let prefix = Arc::new(unique_prefix());
    let progress = Arc::new(Progress::new(args.segment));
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            tokio::spawn(bg_client(
                args.clone(),
                i,
                per_client(n, args.clients, i),
                progress.clone(),
                shared.clone(),
                prefix.clone(),
            ))
        })
        .collect();
    let mut submitted_at = t0;
    for c in clients {
        submitted_at = submitted_at.max(c.await.map_err(io::Error::other)??);
    }
    let created = progress.created.load(Ordering::Acquire);
    let stop = workers.stop.clone();
    let watch = {
        let shared = shared.clone();
        tokio::spawn(async move {
            // Refused submits: finish once every accepted job completed.
            while !stop.is_cancelled() {
                if shared.completed.load(Ordering::Acquire) >= created {
                    stop.cancel();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let (completed, last) = join_workers(workers).await?;
    watch.abort();
    let end = last.unwrap_or_else(Instant::now);
    let e2e = end - t0;
    let sub = submitted_at - t0;
    let (cpu_line, cpu) = cpu.report(completed);
    let left = queue_depth(&args, &args.function).await.unwrap_or(u64::MAX);
    println!(
        "background: {n} jobs of {} bytes, {} clients (pipeline {}), {} workers",
        args.payload,
        args.clients,
        args.pipeline.unwrap_or(100),
        args.workers
    );
    println!(
        "  submitted in {:.3} s: {:.0} submits/s",
        sub.as_secs_f64(),
        rate(created, sub)
    );
    println!(
        "  end to end {:.3} s: {:.0} jobs/s ({completed} completed, {left} left in queue)",
        e2e.as_secs_f64(),
        rate(completed, e2e)
    );
    print!("{cpu_line}");
    println!(
        "RESULT mode=background label={} jobs={n} created={created} completed={completed} left={left} seconds={:.4} jobs_per_s={:.0} submit_per_s={:.0}{cpu}{}{}",
        args.label,
        e2e.as_secs_f64(),
        rate(completed, e2e),
        rate(created, sub),
        errors_field(&shared),
        rss(args.server_pid)
    );
    Ok(())
}

async fn foreground(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = args.jobs.unwrap_or(20_000);
    let shared = Arc::new(Shared::default());
    let workers = spawn_workers(&args, &shared, u64::MAX);
    workers.start.wait().await;
    let prefix = Arc::new(unique_prefix());
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let deadline = args.duration.map(|s| t0 + Duration::from_secs_f64(s));
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            tokio::spawn(fg_client(
                args.clone(),
                i,
                per_client(n, args.clients, i),
                deadline,
                shared.clone(),
                prefix.clone(),
            ))
        })
        .collect();
    let mut lat = Vec::new();
    for c in clients {
        lat.extend(c.await.map_err(io::Error::other)??);
    }
    let elapsed = t0.elapsed();
    workers.stop.cancel();
    join_workers(workers).await?;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1e6
    };
    let done = lat.len() as u64;
    let (cpu_line, cpu) = cpu.report(done);
    println!(
        "foreground: {done} round trips of {} bytes, {} clients (pipeline {}), {} workers",
        args.payload,
        args.clients,
        args.pipeline.unwrap_or(1),
        args.workers
    );
    println!(
        "  {:.3} s: {:.0} round trips/s; latency ms p50 {:.3} p99 {:.3} p999 {:.3} max {:.3}",
        elapsed.as_secs_f64(),
        rate(done, elapsed),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    print!("{cpu_line}");
    println!(
        "RESULT mode=foreground label={} jobs={done} seconds={:.4} rt_per_s={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3}{cpu}{}{}",
        args.label,
        elapsed.as_secs_f64(),
        rate(done, elapsed),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0),
        errors_field(&shared),
        rss(args.server_pid)
    );
    Ok(())
}

async fn submit_only(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = args.jobs.unwrap_or(1_000_000);
    let shared = Arc::new(Shared::default());
    let prefix = Arc::new(unique_prefix());
    let progress = Arc::new(Progress::new(args.segment));
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            tokio::spawn(bg_client(
                args.clone(),
                i,
                per_client(n, args.clients, i),
                progress.clone(),
                shared.clone(),
                prefix.clone(),
            ))
        })
        .collect();
    let mut end = t0;
    for c in clients {
        end = end.max(c.await.map_err(io::Error::other)??);
    }
    let created = progress.created.load(Ordering::Acquire);
    let total = end - t0;
    let (cpu_line, cpu) = cpu.report(created);
    println!(
        "submit-only: {n} background jobs of {} bytes, {} clients (pipeline {}), no worker",
        args.payload,
        args.clients,
        args.pipeline.unwrap_or(100)
    );
    let marks = progress.marks.lock().unwrap().clone();
    let mut prev = (0u64, t0);
    let mut rates = Vec::new();
    for (c, t) in marks {
        let r = rate(c - prev.0, t - prev.1);
        println!("  jobs {:>8}..{:<8} {:>9.0} submits/s", prev.0, c, r);
        rates.push(format!("{r:.0}"));
        prev = (c, t);
    }
    println!(
        "  all {created} in {:.3} s: {:.0} submits/s",
        total.as_secs_f64(),
        rate(created, total)
    );
    let first = rates.first().cloned().unwrap_or_default();
    let last = rates.last().cloned().unwrap_or_default();
    print!("{cpu_line}");
    println!(
        "RESULT mode=submit-only label={} jobs={n} created={created} seconds={:.4} submit_per_s={:.0} first_segment={first} last_segment={last} segments={}{cpu}{}{}",
        args.label,
        total.as_secs_f64(),
        rate(created, total),
        rates.join(","),
        errors_field(&shared),
        rss(args.server_pid)
    );
    Ok(())
}

async fn drain(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = match args.jobs {
        Some(n) => n,
        None => queue_depth(&args, &args.function).await?,
    };
    if n == 0 {
        println!("drain: nothing queued for {}", args.function);
        println!("RESULT mode=drain label={} jobs=0", args.label);
        return Ok(());
    }
    let shared = Arc::new(Shared::default());
    let workers = spawn_workers(&args, &shared, n);
    workers.start.wait().await;
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let (completed, last) = join_workers(workers).await?;
    let e = last.unwrap_or_else(Instant::now) - t0;
    let (cpu_line, cpu) = cpu.report(completed);
    println!(
        "drain: {completed} jobs by {} workers in {:.3} s: {:.0} jobs/s",
        args.workers,
        e.as_secs_f64(),
        rate(completed, e)
    );
    print!("{cpu_line}");
    println!(
        "RESULT mode=drain label={} jobs={completed} seconds={:.4} jobs_per_s={:.0}{cpu}{}{}",
        args.label,
        e.as_secs_f64(),
        rate(completed, e),
        errors_field(&shared),
        rss(args.server_pid)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// OTLP sink

#[derive(Default)]
struct SinkStats {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// An HTTP/1.1 server that answers every POST with 200 and an empty body (an empty protobuf
/// ExportTraceServiceResponse, or `{}` for JSON), so an OTLP/HTTP exporter sees success.
async fn otlp_sink(args: &Args) -> io::Result<()> {
    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    let addr = listener.local_addr()?;
    println!("otlp-sink listening on http://{addr} (POST any path; GET /stats)");
    let stats = Arc::new(SinkStats::default());
    let report = stats.clone();
    let accept = async move {
        loop {
            let (s, _) = listener.accept().await?;
            let stats = stats.clone();
            tokio::spawn(async move {
                if let Err(e) = sink_conn(s, stats).await {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        eprintln!("otlp-sink: connection: {e}");
                    }
                }
            });
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let r: io::Result<()> = tokio::select! {
        r = accept => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    println!(
        "RESULT mode=otlp-sink requests={} bytes={}",
        report.requests.load(Ordering::Relaxed),
        report.bytes.load(Ordering::Relaxed)
    );
    r
}

async fn sink_conn(mut s: TcpStream, stats: Arc<SinkStats>) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        // Headers.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 64 * 1024 {
                return Err(io::Error::other("headers too long"));
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.advance(head_end);
        let mut lines = head.split("\r\n");
        let request = lines.next().unwrap_or("").to_string();
        let (mut len, mut chunked, mut json, mut close) = (0usize, false, false, false);
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => len = v.parse().unwrap_or(0),
                "transfer-encoding" => chunked = v.contains("chunked"),
                "content-type" => json = v.contains("json"),
                "connection" => close = v == "close",
                _ => {}
            }
        }
        let body_len = if chunked {
            read_chunked(&mut s, &mut buf).await?
        } else {
            while buf.len() < len {
                if s.read_buf(&mut buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            buf.advance(len);
            len
        };
        let body: String = if request.starts_with("GET /stats") {
            format!(
                "requests={} bytes={}\n",
                stats.requests.load(Ordering::Relaxed),
                stats.bytes.load(Ordering::Relaxed)
            )
        } else {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            stats.bytes.fetch_add(body_len as u64, Ordering::Relaxed);
            if json {
                "{}".into()
            } else {
                String::new()
            }
        };
        let ctype = if json {
            "application/json"
        } else {
            "application/x-protobuf"
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// Consumes a chunked body from `buf`/`s`; returns its length.
async fn read_chunked(s: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let mut total = 0;
    loop {
        let line_end = loop {
            if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                break p;
            }
            if s.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::other("bad chunk size"))?;
        buf.advance(line_end + 2);
        while buf.len() < size + 2 {
            if s.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        buf.advance(size + 2);
        total += size;
        if size == 0 {
            return Ok(total);
        }
    }
}
