//! Deadlines: epoch jobs waiting for their unix time, CAN_DO_TIMEOUT on a running attempt, and
//! the moment a rate-limited function's bucket has a token again.
//! They sit in one min-heap of (deadline, timer) on the engine [`clock`](super::clock); an
//! entry whose job has since finished, moved on or been retried is recognised and skipped when
//! it fires, so nothing is ever removed from the heap early. [`Engine::run_timers`] is the only
//! task that sleeps; [`Engine::fire_timers`] is the synchronous step tests drive.

use std::cmp::Reverse;

use tokio_util::sync::CancellationToken;

use super::clock::secs_between;
use super::job::JobState;
use super::{send_each, Deferred, Engine, JobOutcome, State};
use crate::codec::{response, PacketType};

/// What happens at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// The epoch job in `slot` (if it is still job `seq`) may run.
    EpochDue { slot: u32, seq: u64 },
    /// Attempt `attempt` of job `seq` passed its worker's CAN_DO_TIMEOUT.
    WorkTimeout { slot: u32, seq: u64, attempt: u32 },
    /// The rate-limit bucket of function `func` has a token again: wake a sleeping worker.
    RateRefill { func: u32 },
}

impl Engine {
    /// Adds a deadline (nanoseconds on the engine clock), waking the timer task when it is
    /// the earliest.
    pub(super) fn add_timer(&self, st: &mut State, due_ns: u64, t: Timer) {
        let earliest = st.timers.peek().map(|Reverse((d, _))| *d);
        st.timers.push(Reverse((due_ns, t)));
        if earliest.is_none_or(|e| due_ns < e) {
            self.shared.timer_wake.notify_one();
        }
    }

    /// The earliest timer deadline, if any (nanoseconds on the engine clock).
    fn next_deadline(&self) -> Option<u64> {
        self.lock().timers.peek().map(|Reverse((d, _))| *d)
    }

    /// Fires due timers: epoch jobs become queued, timed-out jobs are requeued.
    pub fn fire_timers(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        let now = self.now_ns();
        while let Some(&Reverse((due, t))) = st.timers.peek() {
            if due > now {
                break;
            }
            st.timers.pop();
            match t {
                Timer::EpochDue { slot, seq } => self.epoch_due(st, slot, seq, now),
                Timer::WorkTimeout { slot, seq, attempt } => {
                    self.work_timed_out(st, slot, seq, attempt, now)
                }
                Timer::RateRefill { func } => self.rate_refill(st, func, due),
            }
        }
    }

    /// A scheduled epoch job enters its queue.
    fn epoch_due(&self, st: &mut State, slot: u32, seq: u64, now: u64) {
        let Some(job) = st.jobs.get(slot as usize).filter(|j| j.seq == seq) else {
            return;
        };
        if job.state == JobState::Scheduled {
            st.functions[job.func as usize].scheduled -= 1;
            self.enqueue(st, slot, now);
        }
    }

    /// The worker running this attempt passed its CAN_DO_TIMEOUT. As the protocol text says,
    /// the job fails and its clients get WORK_FAIL; its late result gets JOB_NOT_FOUND.
    /// (gearmand 1.1 requeues it instead, so a worker slower than its own timeout takes the
    /// same job again and again, its attempts climbing without end.) Workers that disconnect
    /// or crash still have their jobs requeued, under `engine.job_retries`.
    fn work_timed_out(&self, st: &mut State, slot: u32, seq: u64, attempt: u32, now: u64) {
        let Some(job) = st.jobs.get(slot as usize).filter(|j| j.seq == seq) else {
            return;
        };
        let JobState::Running(worker) = job.state else {
            return;
        };
        if job.attempts != attempt {
            return;
        }
        if let Some(c) = st.conns.get_mut(&worker) {
            c.holding.retain(|&(s, q)| !(s == slot && q == seq));
        }
        let func = job.func;
        let f = &mut st.functions[func as usize];
        f.running = f.running.saturating_sub(1);
        f.metrics
            .running_seconds
            .observe(secs_between(job.since_ns, now));
        f.metrics.failed.inc(job.priority, job.background);
        f.metrics.timed_out.inc();
        st.deferred.push(Deferred::TimedOut {
            seq,
            attempts: job.attempts,
        });
        let pkt = response(PacketType::WORK_FAIL, &[&self.handle_of(seq)]);
        let metrics = &self.shared.metrics;
        send_each(&st.conns, job.waiters(), &pkt, metrics, &mut st.deferred);
        let worker = st.conns.get(&worker).map(|c| (c.peer, c.client_id.clone()));
        self.report_end(st, slot, JobOutcome::TimedOut, &[], &worker);
        // Still marked Running (its running count already released): remove_job leaves the
        // queue counters alone.
        self.remove_job(st, slot, JobOutcome::TimedOut);
        self.released(st, func);
    }

    /// Runs the timer loop (epoch jobs, worker timeouts) until `shutdown`.
    pub async fn run_timers(self, shutdown: CancellationToken) {
        loop {
            let next = self.next_deadline();
            let sleep = async {
                match next {
                    Some(d) => tokio::time::sleep_until(self.shared.clock.instant_at(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.shared.timer_wake.notified() => continue,
                _ = sleep => self.fire_timers(),
            }
        }
    }
}
