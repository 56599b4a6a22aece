//! Fields of the RESULT line shared by every mode (errors, the server's memory); the format is
//! what benches/compare.sh parses, so it does not change.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::task::JoinHandle;

use crate::stats::{percentile_ms, rate, CpuMeter};
use crate::workers::{join_workers, Shared, Workers};
use crate::Args;

/// The server's VmRSS/VmHWM: printed as a human line, returned as ` rss_kb=.. hwm_kb=..`.
pub fn rss(pid: Option<u32>) -> String {
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

pub fn errors_field(shared: &Shared) -> String {
    format!(" errors={}", shared.errors.load(Ordering::Relaxed))
}

/// Ends a round-trip scenario (`foreground` over Gearman, `http-foreground`): collects each
/// client's latencies (ns), stops the workers, and prints the report and the RESULT line of
/// `mode` (`what` names the round trips in the first line).
#[allow(clippy::too_many_arguments)]
pub async fn round_trips(
    mode: &str,
    what: &str,
    args: &Args,
    shared: &Shared,
    clients: Vec<JoinHandle<io::Result<Vec<u64>>>>,
    workers: Workers,
    t0: Instant,
    cpu: CpuMeter,
) -> io::Result<()> {
    let mut lat = Vec::new();
    for c in clients {
        lat.extend(c.await.map_err(io::Error::other)??);
    }
    let elapsed = t0.elapsed();
    workers.stop.cancel();
    join_workers(workers).await?;
    lat.sort_unstable();
    let pct = |p: f64| percentile_ms(&lat, p);
    let done = lat.len() as u64;
    let (cpu_line, cpu) = cpu.report(done);
    println!(
        "{mode}: {done} {what} of {} bytes, {} clients (pipeline {}), {} workers",
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
        "RESULT mode={mode} label={} jobs={done} seconds={:.4} rt_per_s={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3}{cpu}{}{}",
        args.label,
        elapsed.as_secs_f64(),
        rate(done, elapsed),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0),
        errors_field(shared),
        rss(args.server_pid)
    );
    Ok(())
}
