//! Tail sampling: the server sees each job whole before it exports its trace, so it keeps every
//! job worth looking at (failed, exception, retried, dropped, refused, slow) and only thins out
//! the jobs that went well, at the configured ratio.
//!
//! The ratio decision is the one OpenTelemetry's TraceIdRatioBased sampler makes (the low 63
//! bits of the trace id below `ratio * 2^63`), so it is stable per trace id. Decisions are
//! counted in `gearhouse_trace_jobs_sampled_total{decision, reason}`, every label pair created
//! at 0 so `increase()` sees the first one.

use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::engine::JobOutcome;

use super::settings::Sampling;

/// Why a job's trace is kept (or, for `Ratio`, why it may not be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Failed,
    Exception,
    Requeued,
    Dropped,
    Refused,
    Slow,
    /// Nothing remarkable: the ratio decides.
    Ratio,
}

impl Reason {
    const ALL: [Reason; 7] = [
        Reason::Failed,
        Reason::Exception,
        Reason::Requeued,
        Reason::Dropped,
        Reason::Refused,
        Reason::Slow,
        Reason::Ratio,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reason::Failed => "failed",
            Reason::Exception => "exception",
            Reason::Requeued => "requeued",
            Reason::Dropped => "dropped",
            Reason::Refused => "refused",
            Reason::Slow => "slow",
            Reason::Ratio => "ratio",
        }
    }
}

/// What the sampler needs to know about a finished job.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finished {
    pub outcome: JobOutcome,
    pub attempts: usize,
    /// Its longest single wait in a queue and longest attempt, in nanoseconds.
    pub longest_wait_ns: u64,
    pub longest_run_ns: u64,
}

/// Decides, per finished job, whether its trace is exported.
pub(crate) struct TailSampler {
    /// Low 63 bits of the trace id below this keep an ordinary job; `u64::MAX` = all.
    bound: u64,
    slow_ns: u64,
    kept: [IntCounter; 7],
    skipped: IntCounter,
}

impl TailSampler {
    /// Registers its counter on `registry` (already registered: counts go to a detached
    /// counter, e.g. a second server in one test process).
    pub(crate) fn new(sampling: Sampling, slow: Duration, registry: &Registry) -> TailSampler {
        let bound = match sampling {
            Sampling::All => u64::MAX,
            Sampling::Tail { ratio } => (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64,
        };
        let vec = IntCounterVec::new(
            Opts::new(
                "gearhouse_trace_jobs_sampled_total",
                "Finished jobs by tail-sampling decision (kept/dropped) and reason: failed, exception, requeued, dropped, refused, slow (tracing.slow_ms) are always kept; ratio = an ordinary job, kept at tracing.sample_ratio",
            ),
            &["decision", "reason"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(vec.clone()));
        TailSampler {
            bound,
            slow_ns: slow.as_nanos().min(u64::MAX as u128) as u64,
            kept: Reason::ALL.map(|r| vec.with_label_values(&["kept", r.as_str()])),
            skipped: vec.with_label_values(&["dropped", "ratio"]),
        }
    }

    /// Why the job is remarkable, if it is.
    pub(crate) fn reason(&self, f: &Finished) -> Reason {
        match f.outcome {
            JobOutcome::Fail | JobOutcome::TimedOut => Reason::Failed,
            JobOutcome::Exception => Reason::Exception,
            JobOutcome::Dropped => Reason::Dropped,
            JobOutcome::Refused => Reason::Refused,
            _ if f.attempts > 1 => Reason::Requeued,
            _ if f.longest_wait_ns >= self.slow_ns || f.longest_run_ns >= self.slow_ns => {
                Reason::Slow
            }
            _ => Reason::Ratio,
        }
    }

    /// Keep the trace of this job (with trace id `trace_id`)? Counts the decision.
    pub(crate) fn keep(&self, trace_id: u128, f: &Finished) -> bool {
        let reason = self.reason(f);
        let keep = reason != Reason::Ratio
            || self.bound == u64::MAX
            || ((trace_id as u64) >> 1) < self.bound;
        if keep {
            self.kept[reason as usize].inc();
        } else {
            self.skipped.inc();
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(outcome: JobOutcome, attempts: usize, wait_ms: u64, run_ms: u64) -> Finished {
        Finished {
            outcome,
            attempts,
            longest_wait_ns: wait_ms * 1_000_000,
            longest_run_ns: run_ms * 1_000_000,
        }
    }

    #[test]
    fn remarkable_jobs_are_kept_at_ratio_zero() {
        let r = Registry::new();
        let s = TailSampler::new(
            Sampling::Tail { ratio: 0.0 },
            Duration::from_millis(100),
            &r,
        );
        let tid = u128::MAX;
        assert!(s.keep(tid, &job(JobOutcome::Fail, 1, 0, 0)));
        assert!(s.keep(tid, &job(JobOutcome::TimedOut, 1, 0, 0)));
        assert!(s.keep(tid, &job(JobOutcome::Exception, 1, 0, 0)));
        assert!(s.keep(tid, &job(JobOutcome::Dropped, 3, 0, 0)));
        assert!(s.keep(tid, &job(JobOutcome::Refused, 0, 0, 0)));
        assert!(s.keep(tid, &job(JobOutcome::Complete, 2, 0, 0)));
        assert!(s.keep(tid, &job(JobOutcome::Complete, 1, 100, 0)));
        assert!(s.keep(tid, &job(JobOutcome::Complete, 1, 0, 150)));
        assert!(!s.keep(tid, &job(JobOutcome::Complete, 1, 99, 99)));
        assert!(!s.keep(0, &job(JobOutcome::Complete, 1, 0, 0)));
        let text = {
            let mut buf = Vec::new();
            prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut buf)
                .unwrap();
            String::from_utf8(buf).unwrap()
        };
        assert!(
            text.contains(
                r#"gearhouse_trace_jobs_sampled_total{decision="dropped",reason="ratio"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"gearhouse_trace_jobs_sampled_total{decision="kept",reason="slow"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gearhouse_trace_jobs_sampled_total{decision="kept",reason="ratio"} 0"#
            ),
            "{text}"
        );
    }

    #[test]
    fn the_ratio_thins_ordinary_jobs_by_trace_id() {
        let s = TailSampler::new(
            Sampling::Tail { ratio: 0.25 },
            Duration::from_secs(1),
            &Registry::new(),
        );
        let keys = std::collections::hash_map::RandomState::new();
        let kept = (0..10_000u64)
            .filter(|&seq| {
                s.keep(
                    super::super::spans::trace_id(&keys, seq),
                    &job(JobOutcome::Complete, 1, 0, 0),
                )
            })
            .count();
        assert!((2_200..2_800).contains(&kept), "{kept}");
        let all = TailSampler::new(Sampling::All, Duration::from_secs(1), &Registry::new());
        assert!(all.keep(u128::MAX, &job(JobOutcome::Complete, 1, 0, 0)));
    }
}
