//! HTTP job submission against gearhouse's HTTP listener (`POST /jobs/{function}`), for the
//! side-by-side with the Gearman protocol on the same server:
//! - `http-foreground`: each client sends a foreground request on its kept-alive connection and
//!   waits for the 200 (workers are Gearman workers, as in `foreground`); round trips/s and
//!   latency.
//! - `http-submit-only`: `X-Gearman-Background: true` requests, no worker; submits/s.
//!
//! `--pipeline` requests are written back to back on a connection before their answers are
//! read (HTTP/1.1 pipelining; 1, the default, is one request at a time, as HTTP clients do).
//! The client is a minimal HTTP/1.1 writer and reader over one `TcpStream` per client (requests
//! are preformatted once; answers are read by `Content-Length`), so the load generator's cost
//! stays small next to the server's, as with the Gearman client it is compared with.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clients::{per_client, Progress};
use crate::report::{errors_field, rss};
use crate::stats::{percentile_ms, rate, CpuMeter};
use crate::workers::{spawn_workers, Shared};
use crate::Args;

/// One kept-alive HTTP/1.1 connection.
struct HttpConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl HttpConn {
    async fn connect(args: &Args) -> io::Result<HttpConn> {
        let port = args.http_port.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "HTTP modes need --http-port (the server's HTTP listener)",
            )
        })?;
        let stream = TcpStream::connect((args.host.as_str(), port)).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// Reads one answer: its status (the body is read and dropped).
    async fn read_answer(&mut self) -> io::Result<u16> {
        loop {
            if let Some((status, len)) = parse_answer(&self.buf)? {
                self.buf.advance(len);
                return Ok(status);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the HTTP connection",
                ));
            }
        }
    }
}

/// A complete answer at the start of `b`: (status, its length in bytes), or `None` if more
/// bytes are needed.
fn parse_answer(b: &[u8]) -> io::Result<Option<(u16, usize)>> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&b[..end])
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "answer head is not text"))?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {head}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .map_err(|_| bad("bad Content-Length"))?
        .ok_or_else(|| bad("no Content-Length"))?;
    let total = end + 4 + len;
    Ok((b.len() >= total).then_some((status, total)))
}

/// The request every client sends, formatted once.
fn request(args: &Args, background: bool) -> Vec<u8> {
    let payload = vec![b'x'; args.payload];
    let mut r = format!(
        "POST /jobs/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
        args.function,
        args.host,
        payload.len()
    );
    if background {
        r.push_str("X-Gearman-Background: true\r\n");
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(&payload);
    r
}

/// A client sending `n` requests (or until `deadline`) with up to `pipeline` unanswered;
/// returns each request's latency in nanoseconds.
async fn client(
    args: Arc<Args>,
    n: u64,
    deadline: Option<Instant>,
    background: bool,
    progress: Option<Arc<Progress>>,
    shared: Arc<Shared>,
) -> io::Result<Vec<u64>> {
    let mut c = HttpConn::connect(&args).await?;
    let req = request(&args, background);
    let expect = if background { 202 } else { 200 };
    let pipeline = args.pipeline.unwrap_or(1).max(1) as u64;
    let mut lat = Vec::with_capacity(n.min(10_000_000) as usize);
    let mut sent_at: VecDeque<Instant> = VecDeque::new();
    let (mut sent, mut answered) = (0u64, 0u64);
    let more = |sent: u64| match deadline {
        Some(d) => Instant::now() < d,
        None => sent < n,
    };
    let mut out = Vec::with_capacity(req.len() * pipeline as usize);
    loop {
        out.clear();
        while sent - answered < pipeline && more(sent) {
            out.extend_from_slice(&req);
            sent_at.push_back(Instant::now());
            sent += 1;
        }
        if !out.is_empty() {
            c.stream.write_all(&out).await?;
        }
        if answered == sent {
            break;
        }
        let status = c.read_answer().await?;
        let t = sent_at.pop_front().expect("an answer to a request sent");
        lat.push(t.elapsed().as_nanos() as u64);
        answered += 1;
        if status == expect {
            if let Some(p) = &progress {
                p.created();
            }
        } else {
            shared.error(format!("HTTP request answered {status}, not {expect}"));
        }
    }
    Ok(lat)
}

/// `http-foreground`: Gearman workers, HTTP clients waiting for each result.
pub async fn foreground(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = args.jobs.unwrap_or(20_000);
    let shared = Arc::new(Shared::default());
    let workers = spawn_workers(&args, &shared, u64::MAX);
    workers.start.wait().await;
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let deadline = args.duration.map(|s| t0 + Duration::from_secs_f64(s));
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            tokio::spawn(client(
                args.clone(),
                per_client(n, args.clients, i),
                deadline,
                false,
                None,
                shared.clone(),
            ))
        })
        .collect();
    crate::report::round_trips(
        "http-foreground",
        "HTTP round trips",
        &args,
        &shared,
        clients,
        workers,
        t0,
        cpu,
    )
    .await
}

/// `http-submit-only`: background requests, no worker.
pub async fn submit_only(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = args.jobs.unwrap_or(200_000);
    let shared = Arc::new(Shared::default());
    let progress = Arc::new(Progress::new(args.segment));
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            tokio::spawn(client(
                args.clone(),
                per_client(n, args.clients, i),
                None,
                true,
                Some(progress.clone()),
                shared.clone(),
            ))
        })
        .collect();
    let mut lat = Vec::new();
    for c in clients {
        lat.extend(c.await.map_err(io::Error::other)??);
    }
    let total = t0.elapsed();
    let created = progress.created.load(Ordering::Acquire);
    lat.sort_unstable();
    let (cpu_line, cpu) = cpu.report(created);
    println!(
        "http-submit-only: {n} background HTTP requests of {} bytes, {} clients (pipeline {}), no worker",
        args.payload,
        args.clients,
        args.pipeline.unwrap_or(1)
    );
    println!(
        "  all {created} in {:.3} s: {:.0} submits/s; latency ms p50 {:.3} p99 {:.3}",
        total.as_secs_f64(),
        rate(created, total),
        percentile_ms(&lat, 0.5),
        percentile_ms(&lat, 0.99)
    );
    print!("{cpu_line}");
    println!(
        "RESULT mode=http-submit-only label={} jobs={n} created={created} seconds={:.4} submit_per_s={:.0} p50_ms={:.3} p99_ms={:.3}{cpu}{}{}",
        args.label,
        total.as_secs_f64(),
        rate(created, total),
        percentile_ms(&lat, 0.5),
        percentile_ms(&lat, 0.99),
        errors_field(&shared),
        rss(args.server_pid)
    );
    Ok(())
}
