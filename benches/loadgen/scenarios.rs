//! The modes that drive a Gearman server: background (submit and drain at once), foreground
//! (round trips and latency), submit-only and drain. Each prints a human summary and one
//! RESULT line.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clients::{bg_client, connect_clients, fg_client, per_client, unique_prefix, Progress};
use crate::conn::Conn;
use crate::report::{errors_field, rss};
use crate::stats::{rate, CpuMeter};
use crate::workers::{join_workers, spawn_workers, Shared};
use crate::{queue_depth, Args};

pub async fn background(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = args.jobs.unwrap_or(100_000);
    let shared = Arc::new(Shared::default());
    let workers = spawn_workers(&args, &shared, n);
    workers.start.wait().await;
    let prefix = Arc::new(unique_prefix());
    let progress = Arc::new(Progress::new(args.segment));
    let conns = connect_clients(&args).await?;
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let submitted_at = run_bg_clients(&args, conns, n, &progress, &shared, &prefix, t0).await?;
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

pub async fn foreground(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = args.jobs.unwrap_or(20_000);
    let shared = Arc::new(Shared::default());
    let workers = spawn_workers(&args, &shared, u64::MAX);
    workers.start.wait().await;
    let prefix = Arc::new(unique_prefix());
    let conns = connect_clients(&args).await?;
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let deadline = args.duration.map(|s| t0 + Duration::from_secs_f64(s));
    let clients: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(fg_client(
                c,
                args.clone(),
                i,
                per_client(n, args.clients, i),
                deadline,
                shared.clone(),
                prefix.clone(),
            ))
        })
        .collect();
    crate::report::round_trips(
        "foreground",
        "round trips",
        &args,
        &shared,
        clients,
        workers,
        t0,
        cpu,
    )
    .await
}

pub async fn submit_only(args: &Args) -> io::Result<()> {
    let args = Arc::new(args.clone());
    let n = args.jobs.unwrap_or(1_000_000);
    let shared = Arc::new(Shared::default());
    let prefix = Arc::new(unique_prefix());
    let progress = Arc::new(Progress::new(args.segment));
    let conns = connect_clients(&args).await?;
    let cpu = CpuMeter::start(args.server_pid);
    let t0 = Instant::now();
    let end = run_bg_clients(&args, conns, n, &progress, &shared, &prefix, t0).await?;
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

pub async fn drain(args: &Args) -> io::Result<()> {
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

/// Runs a background submitter on each of `conns` (one per `--clients`), sharing `n` jobs;
/// returns when the last one has all its JOB_CREATED (or `t0` if none ran).
async fn run_bg_clients(
    args: &Arc<Args>,
    conns: Vec<Conn>,
    n: u64,
    progress: &Arc<Progress>,
    shared: &Arc<Shared>,
    prefix: &Arc<String>,
    t0: Instant,
) -> io::Result<Instant> {
    let clients: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(bg_client(
                c,
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
    Ok(end)
}
