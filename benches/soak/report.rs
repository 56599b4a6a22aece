//! What a soak run found, and how it is judged: the per-window table (jobs, foreground latency,
//! the server's memory and descriptors), the memcached restarts with their repair times, the
//! ledger's tally, and the pass/fail rules.
//!
//! The rules are stated here once, so the bench's exit code, its summary and the short test
//! agree: no acknowledged job lost; the run drained; the server still alive; and, when the run is
//! long enough (three windows or more), no growth: the last window's RSS at most `rss_factor`
//! times the second window's (the first is warm-up: allocator arenas, buffers sized by the first
//! bursts), and its open descriptors at most `fd_slack` above the second window's (connections
//! come and go with churning clients and crashing workers, so a count, not a ratio).

use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::Footprint;
use crate::ledger::Tally;

/// One window of the run (a minute in the benchmark).
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// 1-based window number.
    pub index: usize,
    /// Seconds since the start at the window's end.
    pub end_s: f64,
    /// Background jobs acknowledged in the window.
    pub acked: u64,
    /// Jobs workers received (background and foreground, crashes' repeats included).
    pub runs: u64,
    /// Foreground jobs completed.
    pub fg_done: u64,
    /// Foreground round trips (submit to WORK_COMPLETE), milliseconds; `None` without any.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// The server's footprint at the window's last sample.
    pub footprint: Option<Footprint>,
    /// Worker crashes, memcached restarts and client-side errors in the window.
    pub crashes: u64,
    pub restarts: u64,
    pub errors: u64,
    /// The window holds the end of the load and the drain (shorter than the others).
    pub is_drain: bool,
}

impl Row {
    /// The table's header line.
    pub fn header() -> String {
        format!(
            "{:>4} {:>7} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>8} {:>6}",
            "win",
            "end_s",
            "acked",
            "runs",
            "fg_done",
            "p50_ms",
            "p99_ms",
            "max_ms",
            "rss_mib",
            "fds",
            "crashes",
            "restarts",
            "errors"
        )
    }

    /// One line of the table.
    pub fn line(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let (rss, fds) = match self.footprint {
            Some(f) => (
                format!("{:.1}", f.rss_kib as f64 / 1024.0),
                f.fds.to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        format!(
            "{:>4} {:>7.0} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>8} {:>6}{}",
            self.index,
            self.end_s,
            self.acked,
            self.runs,
            self.fg_done,
            ms(self.p50_ms),
            ms(self.p99_ms),
            ms(self.max_ms),
            rss,
            fds,
            self.crashes,
            self.restarts,
            self.errors,
            if self.is_drain { "  (drain)" } else { "" }
        )
    }
}

/// One memcached restart: which node, when, and how long until the server had every job at
/// its full replica count again.
#[derive(Debug, Clone)]
pub struct Restart {
    pub node: usize,
    pub at_s: f64,
    /// `None`: not repaired within the wait (the next restart waited anyway).
    pub repaired_after_s: Option<f64>,
}

/// Totals over the run (the counters behind the table).
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub acked: u64,
    /// Background submits the server refused (ERROR), with the last refusal in `last_refusal`.
    pub refused: u64,
    pub runs: u64,
    pub fg_done: u64,
    /// Foreground jobs that ended in WORK_FAIL/EXCEPTION.
    pub fg_failed: u64,
    /// Connections that broke or timed out on the client side (the server never should).
    pub errors: u64,
    pub crashes: u64,
    /// Crashes that held a background job (each must be followed by another run of that id).
    pub crashes_bg: u64,
    /// Connections opened and closed by the churning clients.
    pub churn_connections: u64,
    /// Job payloads a worker could not map to an issued id (must be 0).
    pub foreign: u64,
}

/// Everything a run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub elapsed: Duration,
    pub tally: Tally,
    pub totals: Totals,
    pub last_refusal: Option<String>,
    /// Acknowledged ids that never ran (a sample, when `tally.lost > 0`).
    pub lost_sample: Vec<u64>,
    pub rows: Vec<Row>,
    /// Every 10-second (`sample_every`) reading: seconds since the start and the footprint.
    pub samples: Vec<(f64, Footprint)>,
    pub restarts: Vec<Restart>,
    /// The drain ended with nothing acknowledged left unrun and empty queues.
    pub drained: bool,
    /// The server process was alive at the end.
    pub server_alive: bool,
    /// The server's log (when the soak started the server).
    pub server_log: Option<PathBuf>,
}

/// The growth bounds (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub rss_factor: f64,
    pub fd_slack: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            rss_factor: 1.5,
            fd_slack: 20,
        }
    }
}

impl Report {
    /// Why the run failed; empty when it passed.
    pub fn failures(&self, bounds: Bounds) -> Vec<String> {
        let mut f = Vec::new();
        if self.tally.lost > 0 {
            f.push(format!(
                "{} acknowledged jobs never ran (e.g. ids {:?})",
                self.tally.lost, self.lost_sample
            ));
        }
        if !self.drained {
            f.push("the queues did not drain within the drain timeout".into());
        }
        if !self.server_alive {
            f.push("the server process died during the run".into());
        }
        if self.totals.foreign > 0 {
            f.push(format!(
                "{} jobs carried ids no producer issued",
                self.totals.foreign
            ));
        }
        f.extend(self.growth(bounds).err());
        f
    }

    /// `Ok(description)` when the footprint stayed within the bounds or the run was too short
    /// to judge, `Err(what grew)` otherwise.
    pub fn growth(&self, bounds: Bounds) -> Result<String, String> {
        let with_fp: Vec<(usize, Footprint)> = self
            .rows
            .iter()
            .filter_map(|r| Some((r.index, r.footprint?)))
            .collect();
        if with_fp.len() < 3 {
            return Ok("not judged: fewer than 3 windows with samples".into());
        }
        let (ref_win, reference) = with_fp[1];
        let (last_win, last) = with_fp[with_fp.len() - 1];
        let rss_limit = reference.rss_kib as f64 * bounds.rss_factor;
        let fd_limit = reference.fds + bounds.fd_slack;
        let text = format!(
            "RSS window {last_win} {} KiB vs window {ref_win} {} KiB (limit {:.0} = x{}); fds {} vs {} (limit {fd_limit} = +{})",
            last.rss_kib, reference.rss_kib, rss_limit, bounds.rss_factor, last.fds, reference.fds, bounds.fd_slack
        );
        if last.rss_kib as f64 > rss_limit || last.fds > fd_limit {
            Err(format!("the server grew: {text}"))
        } else {
            Ok(text)
        }
    }

    /// The summary printed at the end of a run.
    pub fn summary(&self, bounds: Bounds) -> String {
        let t = &self.tally;
        let s = &self.totals;
        let mut out = String::new();
        let mut line = |l: String| {
            out.push_str(&l);
            out.push('\n');
        };
        line(format!(
            "SOAK SUMMARY after {:.0} s",
            self.elapsed.as_secs_f64()
        ));
        line(format!(
            "background: issued {} acknowledged {} refused {} lost {} duplicated {} (extra runs {}) ran-unacknowledged {}",
            t.issued, t.acked, s.refused, t.lost, t.duplicated, t.extra_runs, t.ran_unacked
        ));
        if let Some(r) = &self.last_refusal {
            line(format!("last refusal: {r}"));
        }
        line(format!(
            "foreground: completed {} failed {}; jobs received by workers {}; worker crashes {} ({} holding a background job); churned connections {}; client errors {}",
            s.fg_done, s.fg_failed, s.runs, s.crashes, s.crashes_bg, s.churn_connections, s.errors
        ));
        let restarts: Vec<String> = self
            .restarts
            .iter()
            .map(|r| {
                format!(
                    "node {} at {:.0}s repaired {}",
                    r.node,
                    r.at_s,
                    r.repaired_after_s
                        .map_or("never".into(), |s| format!("after {s:.1}s"))
                )
            })
            .collect();
        line(format!(
            "memcached restarts: {} [{}]",
            self.restarts.len(),
            restarts.join("; ")
        ));
        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            let max_rss = self.samples.iter().map(|s| s.1.rss_kib).max().unwrap_or(0);
            let max_fds = self.samples.iter().map(|s| s.1.fds).max().unwrap_or(0);
            line(format!(
                "server RSS KiB: first {} last {} max {}; open fds: first {} last {} max {} ({} samples)",
                first.1.rss_kib, last.1.rss_kib, max_rss, first.1.fds, last.1.fds, max_fds,
                self.samples.len()
            ));
        }
        let p99: Vec<String> = self
            .rows
            .iter()
            .map(|r| r.p99_ms.map_or("-".into(), |v| format!("{v:.2}")))
            .collect();
        line(format!("p99 ms per window: {}", p99.join(" ")));
        line(format!(
            "growth: {}",
            match self.growth(bounds) {
                Ok(t) | Err(t) => t,
            }
        ));
        let failures = self.failures(bounds);
        line(if failures.is_empty() {
            "RESULT pass".into()
        } else {
            format!("RESULT FAIL: {}", failures.join("; "))
        });
        if let Some(log) = &self.server_log {
            line(format!("server log: {}", log.display()));
        }
        out
    }
}

/// The nearest-rank percentile `q` (0..=1) of sorted microseconds, in milliseconds.
pub fn percentile_ms(sorted_us: &[u32], q: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    Some(f64::from(sorted_us[rank - 1]) / 1000.0)
}
