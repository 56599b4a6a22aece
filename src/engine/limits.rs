//! Per-function rate and concurrency limits, as the grab path applies them.
//!
//! A function with `rate` (and `burst`) or `max_running` gets a [`Limits`] box; functions without
//! limits carry `None` and pay one `Option` check per grab. A grab skips a function whose running
//! count is at `max_running` or whose token bucket is empty: its job stays at the head of its
//! queue (FIFO holds), the worker gets NO_JOB for it (other functions are still served), and the
//! sleeping workers are woken with NOOP when the limit allows the next job: by a
//! [`Timer::RateRefill`](super::timers::Timer) at the moment the bucket has a token again (no
//! polling), or by a running job of the function ending. Each start of a limited function wakes
//! two more sleepers, since jobs queued while a limit held them woke nobody.
//!
//! A grab refused only by a rate whose token is due within [`PARK_MAX_NS`] is parked instead of
//! answered NO_JOB: the refill timer answers it with the job (through the worker's outbound
//! channel) when the token comes. Measured on a loaded 2-core machine (load 15), 200 jobs at
//! `rate = 50, burst = 1` took 5 to 6 s when every token waited for a woken worker's GRAB, and
//! 4.01 s with parking (tests/limits.rs).
//!
//! The bucket is the `governor` crate's GCRA limiter (a token bucket measured in arrival times:
//! one atomic word, no refill task), read on the engine's [`Clock`] so tests that pause tokio's
//! clock drive it too. governor is the well-kept choice (used by tower-governor and many
//! servers, `no_std`-capable, its only dependencies here are four small crates); its
//! [`NotUntil`](governor::NotUntil) tells exactly when the next token comes, which is what the
//! refill timer needs. A refusal does not consume a token, and a token is taken only once a live
//! job is at hand.
//!
//! A job costs two cells of a bucket that holds `2 * burst + 1`: a start may come half a period
//! early on its schedule, so a late one does not push the schedule back. With a bucket of exactly
//! `burst` jobs, every start that comes late (the refill timer firing, its NOOP reaching the
//! worker, the worker's GRAB coming back: 5 to 7 ms on a loaded 2-core machine) was lost from
//! every interval, and `rate = 50, burst = 1` ran 200 jobs in 5.4 s instead of 4. The price: after
//! an idle spell the job after the first `burst` may start half a period later instead of a
//! whole one; over any window of `w` seconds at most `rate * w + burst + 0.5` jobs start.
//!
//! Metrics (registered on the server's registry, one series per function label that has limits):
//! `gearhouse_job_limit_wait_seconds{function}` (how long each job of a limited function was
//! held at the head of its queue by the limits, 0 when it was not held),
//! `gearhouse_job_limit_refusals_total{function,limit}` (grabs that found the function's next
//! job held back, `limit` = `rate` or `max_running`) and `gearhouse_function_setting{function,
//! setting}` (the settings in force).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::BytesMut;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry,
};

use super::clock::{secs_between, Clock};
use super::job::Function;
use super::timers::Timer;
use super::{send, ConnId, Engine, State};
use crate::functions::FunctionSettings;
use crate::metrics::LATENCY_BUCKETS;
use crate::protocol::GrabKind;

/// The engine clock as governor's time source: instants are durations since the engine started.
#[derive(Debug, Clone, Copy)]
pub(super) struct EngineClock(pub(super) Clock);

impl governor::clock::Clock for EngineClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.now_ns())
    }
}

type Bucket = RateLimiter<NotKeyed, InMemoryState, EngineClock, NoOpMiddleware<Duration>>;

/// Which limit held a job back (the `limit` label of the refusals counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    Rate,
    MaxRunning,
}

/// The metrics of every function's limits, registered once per server.
pub(super) struct LimitMetrics {
    wait: HistogramVec,
    refusals: IntCounterVec,
    settings: GaugeVec,
}

impl LimitMetrics {
    /// Creates the metrics and registers them on `registry` (a second engine on the same
    /// registry, as in some tests, keeps its own unexported copies).
    pub(super) fn new(registry: &Registry) -> LimitMetrics {
        let m = LimitMetrics {
            wait: HistogramVec::new(
                HistogramOpts::new(
                    "gearhouse_job_limit_wait_seconds",
                    "Time each job of a function with rate or max_running limits spent at the head of its queue held back by them (0 when not held)",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["function"],
            )
            .expect("valid metric"),
            refusals: IntCounterVec::new(
                Opts::new(
                    "gearhouse_job_limit_refusals_total",
                    "Grabs that found a function's next job held back by its limits",
                ),
                &["function", "limit"],
            )
            .expect("valid metric"),
            settings: GaugeVec::new(
                Opts::new(
                    "gearhouse_function_setting",
                    "Per-function settings in force (0 = unlimited or off; max_queue 0 = engine.max_queue_per_function)",
                ),
                &["function", "setting"],
            )
            .expect("valid metric"),
        };
        let _ = registry.register(Box::new(m.wait.clone()));
        let _ = registry.register(Box::new(m.refusals.clone()));
        let _ = registry.register(Box::new(m.settings.clone()));
        m
    }

    /// Publishes the settings of a function (under its metrics label).
    pub(super) fn publish(&self, label: &str, f: &Function) {
        let g = |setting: &str| -> Gauge { self.settings.with_label_values(&[label, setting]) };
        let (rate, burst) = f.limits.as_ref().and_then(|l| l.rate).unwrap_or((0.0, 0));
        g("rate").set(rate);
        g("burst").set(burst as f64);
        g("max_running").set(f.limits.as_ref().map_or(0, |l| l.max_running) as f64);
        g("max_queue").set(f.max_queue.map_or(0, |q| q[1]) as f64);
        g("cache_ttl_s").set(f.cache_ttl_s as f64);
        g("dead_letter").set(f.dead_letter as u8 as f64);
    }
}

/// A function's limits and what the grab path knows about them.
pub(super) struct Limits {
    /// (jobs per second, burst); `None` = no rate limit.
    rate: Option<(f64, u32)>,
    bucket: Option<Bucket>,
    /// 0 = no concurrency limit.
    max_running: u32,
    /// Before this clock reading the bucket is known to be empty (learnt from its last refusal,
    /// so sleeping workers are not woken only to be refused).
    next_token_ns: u64,
    /// Deadline of the pending refill timer, if one is pending.
    refill_due: Option<u64>,
    /// Grabs waiting for the next token, oldest first (see [`PARK_MAX_NS`]).
    parked: VecDeque<(ConnId, GrabKind)>,
    /// When the job now at the head of the function's queues was first held back.
    held_since_ns: Option<u64>,
    wait: Histogram,
    refused_rate: IntCounter,
    refused_running: IntCounter,
}

impl Limits {
    /// Limits for `s`, or `None` when it sets none (the function then pays nothing).
    fn new(s: &FunctionSettings, clock: Clock, m: &LimitMetrics, label: &str) -> Option<Limits> {
        let rate = s.rate_limit();
        let max_running = s.running_limit().unwrap_or(0);
        if rate.is_none() && max_running == 0 {
            return None;
        }
        Some(Limits {
            rate,
            bucket: rate.map(|(r, b)| bucket(r, b, clock)),
            max_running,
            next_token_ns: 0,
            refill_due: None,
            parked: VecDeque::new(),
            held_since_ns: None,
            wait: m.wait.with_label_values(&[label]),
            refused_rate: m.refusals.with_label_values(&[label, "rate"]),
            refused_running: m.refusals.with_label_values(&[label, "max_running"]),
        })
    }

    /// The limit that holds the function's next job back now, if one does. Takes no token: a
    /// rate is known to hold only after the bucket refused (see [`Limits::try_start`]).
    pub(super) fn holds(&self, running: u32, now_ns: u64) -> Option<Hold> {
        if self.max_running > 0 && running >= self.max_running {
            return Some(Hold::MaxRunning);
        }
        (now_ns < self.next_token_ns).then_some(Hold::Rate)
    }

    /// Takes a token for a job about to start. `Err(due)`: the bucket is empty until `due`
    /// (a clock reading); the job stays where it is.
    pub(super) fn try_start(&mut self, now_ns: u64) -> Result<(), u64> {
        if let Some(b) = &self.bucket {
            let cells = b
                .check_n(CELLS_PER_JOB)
                .expect("the bucket holds at least one job");
            if let Err(not_until) = cells {
                let due = not_until.earliest_possible().as_nanos() as u64;
                self.next_token_ns = due;
                return Err(due);
            }
        }
        let since = self.held_since_ns.take().unwrap_or(now_ns);
        self.wait.observe(secs_between(since, now_ns));
        Ok(())
    }

    /// Records that a grab found the next job held back by `why`.
    pub(super) fn held(&mut self, now_ns: u64, why: Hold) {
        self.held_since_ns.get_or_insert(now_ns);
        match why {
            Hold::Rate => self.refused_rate.inc(),
            Hold::MaxRunning => self.refused_running.inc(),
        }
    }

    /// True when a refill timer for `due` must be added (none is pending that fires sooner).
    pub(super) fn wants_refill_at(&mut self, due: u64) -> bool {
        if self.refill_due.is_some_and(|d| d <= due) {
            return false;
        }
        self.refill_due = Some(due);
        true
    }

    /// The configured rate and burst, if any.
    pub(super) fn rate(&self) -> Option<(f64, u32)> {
        self.rate
    }

    /// The configured concurrency limit (0 = none).
    pub(super) fn max_running(&self) -> u32 {
        self.max_running
    }

    /// Jobs observed and seconds they were held, from the wait histogram.
    pub(super) fn waited(&self) -> (u64, f64) {
        (self.wait.get_sample_count(), self.wait.get_sample_sum())
    }

    /// Grabs refused by the rate and by max_running.
    pub(super) fn refusals(&self) -> (u64, u64) {
        (self.refused_rate.get(), self.refused_running.get())
    }
}

/// A grab refused only by a rate whose next token is at most this far off is parked: answered
/// by the refill timer at the token's time instead of NO_JOB now. The token is then taken at
/// the server's time, not when a woken worker's GRAB comes back (on a loaded machine tens of
/// milliseconds later, lost from every interval); the worker waits at most this long, so its
/// other functions are not kept from it.
const PARK_MAX_NS: u64 = 25_000_000;

/// Cells a job takes from its bucket (see the module doc: half-period tolerance).
const CELLS_PER_JOB: std::num::NonZeroU32 = std::num::NonZeroU32::new(2).expect("non-zero");

/// A GCRA bucket allowing `burst` jobs at once and one more every `1 / rate` seconds, each job
/// taking [`CELLS_PER_JOB`] cells and the bucket holding one cell more than `burst` jobs.
fn bucket(rate: f64, burst: u32, clock: Clock) -> Bucket {
    let cells = CELLS_PER_JOB.get();
    let period = Duration::from_secs_f64(1.0 / rate / cells as f64).max(Duration::from_nanos(1));
    let capacity = burst.max(1).saturating_mul(cells).saturating_add(1);
    let quota = Quota::with_period(period)
        .expect("a non-zero period")
        .allow_burst(std::num::NonZeroU32::new(capacity).expect("at least 1"));
    RateLimiter::direct_with_clock(quota, EngineClock(clock))
}

/// Installs the limits of settings `s` on `f`. A bucket whose rate and burst did not change is
/// kept, so changing `max_running` does not hand out a fresh burst.
pub(super) fn update(f: &mut Function, s: &FunctionSettings, clock: Clock, m: &LimitMetrics) {
    let same_rate = f.limits.as_ref().map(|l| l.rate) == Some(s.rate_limit());
    let mut new = Limits::new(s, clock, m, &f.metrics.label).map(Box::new);
    if let (Some(new), Some(old)) = (new.as_deref_mut(), f.limits.as_deref_mut()) {
        new.held_since_ns = old.held_since_ns;
        new.refill_due = old.refill_due;
        new.parked = std::mem::take(&mut old.parked);
        if same_rate {
            new.bucket = old.bucket.take();
            new.next_token_ns = old.next_token_ns;
        }
    }
    f.limits = new;
}

impl Engine {
    /// A refill timer fired: the bucket of `func` has a token again, so two sleeping workers
    /// are woken for it (the first to answer takes it, the other is refused and sleeps: on a
    /// loaded machine one woken process can take longer than the half period a start may be
    /// late, and that time would be lost from the rate). If a grab took that token first (and a later refusal learnt a later
    /// deadline while this timer was pending), the timer is set again for that deadline:
    /// otherwise the sleepers would wait for some worker to grab on its own.
    pub(super) fn rate_refill(&self, st: &mut State, func: u32, due: u64) {
        let Some(l) = st
            .functions
            .get_mut(func as usize)
            .and_then(|f| f.limits.as_deref_mut())
        else {
            return;
        };
        if l.refill_due != Some(due) {
            // A later refusal asked for an earlier refill, or the function was replaced.
            return;
        }
        l.refill_due = None;
        let next = l.next_token_ns;
        if self.now_ns() < next {
            if l.wants_refill_at(next) {
                self.add_timer(st, next, Timer::RateRefill { func });
            }
            return;
        }
        // Parked grabs in order, until one is refused again (the token went to an earlier one):
        // that refusal sets the next timer, and the rest keep their place.
        let mut parked = std::mem::take(&mut l.parked);
        let served = !parked.is_empty();
        while let Some((conn, kind)) = parked.pop_front() {
            if self.answer_parked(st, conn, kind) {
                break;
            }
        }
        if let Some(l) = st
            .functions
            .get_mut(func as usize)
            .and_then(|f| f.limits.as_deref_mut())
        {
            parked.extend(l.parked.drain(..));
            l.parked = parked;
        }
        if !served {
            self.wake(st, func, 2);
        }
    }

    /// Parks a grab that found nothing but a rate-limited job whose token is due within
    /// [`PARK_MAX_NS`]; true when parked (nothing is answered now).
    pub(super) fn park(
        &self,
        st: &mut State,
        conn: ConnId,
        kind: GrabKind,
        now: u64,
        refusals: &[(u32, u64, bool)],
    ) -> bool {
        let Some(&(func, due, _)) = refusals.iter().min_by_key(|r| r.1) else {
            return false;
        };
        if due.saturating_sub(now) > PARK_MAX_NS {
            return false;
        }
        let Some(l) = st
            .functions
            .get_mut(func as usize)
            .and_then(|f| f.limits.as_deref_mut())
        else {
            return false;
        };
        // The refusal left a refill timer pending at or before `due`; it answers the grab.
        l.parked.push_back((conn, kind));
        if let Some(c) = st.conns.get_mut(&conn) {
            c.parked = true;
        }
        true
    }

    /// Answers a parked grab (if its worker is still there and still waiting): the job, NO_JOB,
    /// or parked again if another grab took the token. True when parked again.
    fn answer_parked(&self, st: &mut State, conn: ConnId, kind: GrabKind) -> bool {
        if !st.conns.get(&conn).is_some_and(|c| c.parked) {
            return false;
        }
        let mut out = BytesMut::new();
        self.grab_locked(st, conn, kind, &mut out);
        let Some(c) = st.conns.get(&conn) else {
            return false;
        };
        if out.is_empty() {
            return c.parked;
        }
        send(
            c,
            out.freeze(),
            false,
            &self.shared.metrics,
            &mut st.deferred,
        );
        false
    }

    /// Adds the refill timers a grab's refusals asked for: (function, due, timer needed).
    pub(super) fn add_refill_timers(&self, st: &mut State, refusals: &[(u32, u64, bool)]) {
        for &(func, due, needed) in refusals {
            if needed {
                self.add_timer(st, due, Timer::RateRefill { func });
            }
        }
    }

    /// A running job of `func` ended (or went back to its queue): under `max_running`, a
    /// sleeping worker may now take the next one.
    pub(super) fn released(&self, st: &mut State, func: u32) {
        let limited = st
            .functions
            .get(func as usize)
            .and_then(|f| f.limits.as_ref())
            .is_some_and(|l| l.max_running > 0);
        if limited {
            self.wake(st, func, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{can_do, connect, created, engine_with, grab, job, work, Peer, Pkt};
    use super::super::EngineConfig;
    use crate::codec::PacketType;
    use crate::functions::FunctionSettings;
    use crate::protocol::{Priority, WorkKind};
    use bytes::Bytes;

    /// A client with three queued background jobs of `f` (their handles, in order) and two
    /// workers of `f`.
    fn two_workers_three_jobs(e: &super::super::Engine) -> (Peer, Peer, Peer, Vec<Bytes>) {
        let c = connect(e);
        let a = connect(e);
        let b = connect(e);
        can_do(e, &a, "f", None);
        can_do(e, &b, "f", None);
        let h = (0..3)
            .map(|i| {
                created(
                    e,
                    &c,
                    job("f", &format!("{i}"), "x", Priority::Normal, true),
                )
            })
            .collect();
        (c, a, b, h)
    }

    fn limited(name: &str, s: FunctionSettings) -> super::super::Engine {
        let mut cfg = EngineConfig::default();
        cfg.functions.insert(name.into(), s);
        engine_with(cfg, None)
    }

    fn handle(p: &Option<Pkt>) -> Vec<u8> {
        let p = p.as_ref().expect("a job");
        assert_eq!(p.kind, PacketType::JOB_ASSIGN_UNIQ);
        p.arg(0).to_vec()
    }

    /// NOOPs the engine sent to `w` since the last call.
    fn noops(w: &mut super::super::tests::Peer) -> usize {
        w.received()
            .iter()
            .filter(|p| p.kind == PacketType::NOOP)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_spaces_job_starts_keeps_fifo_and_wakes_sleepers_when_a_token_is_due() {
        let e = limited(
            "resize",
            FunctionSettings {
                rate: Some(10.0),
                burst: Some(2),
                ..Default::default()
            },
        );
        let c = connect(&e);
        let mut w = connect(&e);
        can_do(&e, &w, "resize", None);
        let handles: Vec<_> = (0..5)
            .map(|i| {
                created(
                    &e,
                    &c,
                    job("resize", &format!("u{i}"), "x", Priority::Normal, true),
                )
            })
            .collect();
        // A burst of 2, then nothing until the next token: 100 ms at 10/s, less the half period
        // a start may come early.
        assert_eq!(handle(&grab(&e, &w)), handles[0]);
        assert_eq!(handle(&grab(&e, &w)), handles[1]);
        assert!(grab(&e, &w).is_none(), "NO_JOB");
        // Work is queued but held: PRE_SLEEP gets no immediate NOOP, the worker sleeps.
        let mut out = bytes::BytesMut::new();
        e.pre_sleep(w.id, &mut out);
        assert!(out.is_empty(), "no NOOP while the rate holds the job");
        noops(&mut w);
        tokio::time::advance(Duration::from_millis(49)).await;
        e.fire_timers();
        assert_eq!(noops(&mut w), 0, "woken before the token is due");
        tokio::time::advance(Duration::from_millis(1)).await;
        e.fire_timers();
        assert_eq!(noops(&mut w), 1, "woken when the token is due");
        assert_eq!(handle(&grab(&e, &w)), handles[2], "FIFO holds");
        assert!(grab(&e, &w).is_none(), "NO_JOB");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(handle(&grab(&e, &w)), handles[3]);
        // The third was held 50 ms (refused at 0, taken at 50 ms), the fourth 100 ms (refused at
        // 50 ms, taken at 150 ms: one period after the third); the first two were not held.
        let st = e.lock();
        let f = &st.functions[0];
        let l = f.limits.as_ref().unwrap();
        assert_eq!(l.waited().0, 4);
        assert!((l.waited().1 - 0.15).abs() < 1e-6, "{:?}", l.waited());
        assert_eq!(l.refusals(), (2, 0));
    }

    /// A grab that takes the token before the refill timer fires, and a refusal after it, must
    /// not leave the sleepers without a timer for the next token.
    #[tokio::test(start_paused = true)]
    async fn a_token_taken_before_its_timer_fires_sets_the_timer_again() {
        let e = limited(
            "f",
            FunctionSettings {
                rate: Some(10.0),
                ..Default::default()
            },
        );
        let (_client, a, mut b, h) = two_workers_three_jobs(&e);
        assert_eq!(handle(&grab(&e, &a)), h[0]);
        assert!(grab(&e, &b).is_none(), "refused: refill timer at 50 ms");
        tokio::time::advance(Duration::from_millis(50)).await;
        // The timer task is late: a grabs the 50 ms token, b is refused (next at 150 ms).
        assert_eq!(handle(&grab(&e, &a)), h[1]);
        assert!(grab(&e, &b).is_none());
        let mut out = bytes::BytesMut::new();
        e.pre_sleep(b.id, &mut out);
        assert!(out.is_empty());
        noops(&mut b);
        e.fire_timers();
        assert_eq!(noops(&mut b), 0, "no token yet at 50 ms");
        tokio::time::advance(Duration::from_millis(100)).await;
        e.fire_timers();
        assert_eq!(noops(&mut b), 1, "woken at 150 ms");
        assert_eq!(handle(&grab(&e, &b)), h[2]);
    }

    /// A grab refused by a rate whose token is due soon waits for it: the worker gets the job
    /// at the token's time, without a NOOP/GRAB round trip.
    #[tokio::test(start_paused = true)]
    async fn a_grab_just_before_the_next_token_is_answered_when_it_comes() {
        use crate::protocol::GrabKind;
        let e = limited(
            "f",
            FunctionSettings {
                rate: Some(50.0),
                ..Default::default()
            },
        );
        let (_client, a, mut b, h) = two_workers_three_jobs(&e);
        assert_eq!(handle(&grab(&e, &a)), h[0]);
        b.received();
        let mut out = bytes::BytesMut::new();
        e.grab(b.id, GrabKind::Uniq, &mut out);
        assert!(out.is_empty(), "parked, not NO_JOB");
        tokio::time::advance(Duration::from_millis(9)).await;
        e.fire_timers();
        assert!(b.received().is_empty(), "not before the token");
        tokio::time::advance(Duration::from_millis(1)).await;
        e.fire_timers();
        let got = b.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].kind, PacketType::JOB_ASSIGN_UNIQ);
        assert_eq!(got[0].arg(0), &h[1][..]);
        // One period after that start, the next: a grabs now (10 ms) and waits 20 ms.
        let mut out = bytes::BytesMut::new();
        e.grab(a.id, GrabKind::Uniq, &mut out);
        assert!(out.is_empty());
        let mut a = a;
        tokio::time::advance(Duration::from_millis(20)).await;
        e.fire_timers();
        let got = a.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].arg(0), &h[2][..]);
    }

    #[tokio::test(start_paused = true)]
    async fn max_running_holds_the_next_job_until_one_ends_and_other_functions_run_meanwhile() {
        let e = limited(
            "mail",
            FunctionSettings {
                max_running: Some(2),
                ..Default::default()
            },
        );
        let c = connect(&e);
        let workers: Vec<_> = (0..3).map(|_| connect(&e)).collect();
        let mut third = connect(&e);
        for w in workers.iter().chain([&third]) {
            can_do(&e, w, "mail", None);
        }
        can_do(&e, &third, "other", None);
        let mail: Vec<_> = (0..4)
            .map(|i| {
                created(
                    &e,
                    &c,
                    job("mail", &format!("m{i}"), "x", Priority::High, true),
                )
            })
            .collect();
        let other = created(&e, &c, job("other", "o", "x", Priority::Low, true));
        let h0 = handle(&grab(&e, &workers[0]));
        assert_eq!(handle(&grab(&e, &workers[1])), mail[1]);
        assert!(grab(&e, &workers[2]).is_none(), "NO_JOB");
        // A worker of both functions gets the unlimited one's job, HIGH mail notwithstanding.
        assert_eq!(handle(&grab(&e, &third)), other);
        assert_eq!(e.function_stats()[0].running, 2);
        let mut out = bytes::BytesMut::new();
        e.pre_sleep(third.id, &mut out);
        assert!(out.is_empty());
        noops(&mut third);
        // One ends: one sleeper is woken and the next job in order starts.
        work(&e, &workers[0], WorkKind::Complete, &h0, b"done");
        assert_eq!(noops(&mut third), 1);
        assert_eq!(handle(&grab(&e, &third)), mail[2]);
        assert!(grab(&e, &workers[0]).is_none(), "NO_JOB");
        assert_eq!(mail[0], h0);
    }

    #[tokio::test(start_paused = true)]
    async fn run_time_changes_apply_to_a_live_function_and_zero_lifts_a_limit() {
        let e = limited("f", FunctionSettings::default());
        let c = connect(&e);
        let w = connect(&e);
        can_do(&e, &w, "f", None);
        let h: Vec<_> = (0..3)
            .map(|i| {
                created(
                    &e,
                    &c,
                    job("f", &format!("{i}"), "x", Priority::Normal, true),
                )
            })
            .collect();
        let s = FunctionSettings {
            max_running: Some(1),
            ..Default::default()
        };
        e.set_function_settings("f", &s).unwrap();
        assert_eq!(handle(&grab(&e, &w)), h[0]);
        let mut w2 = connect(&e);
        can_do(&e, &w2, "f", None);
        assert!(grab(&e, &w2).is_none(), "NO_JOB");
        let mut out = bytes::BytesMut::new();
        e.pre_sleep(w2.id, &mut out);
        assert!(out.is_empty());
        let lift = FunctionSettings {
            max_running: Some(0),
            ..Default::default()
        };
        let now = e.set_function_settings("f", &lift).unwrap();
        assert_eq!(now.max_running, 0);
        assert_eq!(noops(&mut w2), 1, "a lifted limit wakes the sleepers");
        assert_eq!(handle(&grab(&e, &w2)), h[1]);
        assert_eq!(handle(&grab(&e, &w)), h[2]);
        assert!(e.lock().functions[0].limits.is_none(), "no limits, no box");
        assert_eq!(e.runtime_function_settings("f"), Some(lift));
        let bad = FunctionSettings {
            rate: Some(-2.0),
            ..Default::default()
        };
        assert!(e.set_function_settings("f", &bad).is_err());
    }
}
