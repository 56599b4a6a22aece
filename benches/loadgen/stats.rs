//! Rates, percentiles and CPU accounting (from /proc) of a run.

use std::time::Duration;

pub fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
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
pub struct CpuMeter {
    pid: Option<u32>,
    server0: Option<f64>,
    self0: Option<f64>,
}

impl CpuMeter {
    pub fn start(pid: Option<u32>) -> Self {
        CpuMeter {
            pid,
            server0: pid.and_then(|p| cpu_seconds(&p.to_string())),
            self0: cpu_seconds("self"),
        }
    }

    /// A human line and the ` server_cpu_s=.. loadgen_cpu_s=..` fields; `jobs` gives CPU per job.
    pub fn report(&self, jobs: u64) -> (String, String) {
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

/// The value at quantile `p` (0..=1) of sorted nanosecond samples, in milliseconds.
pub fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}
