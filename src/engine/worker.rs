//! The worker side: abilities (CAN_DO, CANT_DO, RESET_ABILITIES), sleeping and waking
//! (PRE_SLEEP, NOOP), taking a job (GRAB_JOB*), results (WORK_*), and the two ways a job leaves
//! a worker without a result: back to its queue ([`Engine::requeue`]) or gone
//! ([`Engine::remove_job`]).
//!
//! Priority is per function, as in gearmand 1.1.x: a grab takes the highest priority that any
//! of the worker's functions has queued, FIFO within it, starting from a rotating function so
//! functions of one priority share workers. A function held back by its rate or concurrency
//! limit ([`limits`](super::limits)) is skipped: "work is waiting" means waiting and allowed.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use slab::Slab;

use super::clock::secs_between;
use super::job::{Function, Job, JobState, QueueRef};
use super::timers::Timer;
use super::{
    peer_info, put_error, send, send_each, Ability, Conn, ConnId, Deferred, EndedJob, Engine,
    JobOutcome, RequeueReason, State,
};
use crate::codec::{put_response, response, split_args, PacketType, HEADER_LEN};
use crate::protocol::{ErrorCode, GrabKind, Priority, ProtocolError, WorkKind};

impl Engine {
    /// Handles PRE_SLEEP: an immediate NOOP if work is waiting, else the worker sleeps.
    pub fn pre_sleep(&self, conn: ConnId, out: &mut BytesMut) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        let now = self.now_ns();
        let has_work = c.abilities.iter().any(|a| {
            st.functions
                .get(a.func as usize)
                .is_some_and(|f| f.total_queued() > 0 && !is_held(f, now))
        });
        if has_work {
            put_response(out, PacketType::NOOP, &[]);
            return;
        }
        c.sleeping = true;
        c.sleep_gen = c.sleep_gen.wrapping_add(1);
        let gen = c.sleep_gen;
        let funcs: Vec<u32> = c.abilities.iter().map(|a| a.func).collect();
        for func in funcs {
            if let Some(f) = st.functions.get_mut(func as usize) {
                // Drop stale entries once they clearly outnumber the live ones.
                if f.sleepers.len() > 64 && f.sleepers.len() > 4 * f.workers as usize {
                    let conns = &st.conns;
                    f.sleepers.retain(|(id, g)| {
                        conns
                            .get(id)
                            .is_some_and(|c| c.sleeping && c.sleep_gen == *g)
                            || *id == conn
                    });
                }
                f.sleepers.push((conn, gen));
            }
        }
    }

    /// Sends NOOP to up to `n` sleeping workers of `func` (0 = all), if it has queued jobs.
    pub(super) fn wake(&self, st: &mut State, func: u32, n: u32) {
        let Some(f) = st.functions.get_mut(func as usize) else {
            return;
        };
        if f.total_queued() == 0 || is_held(f, self.now_ns()) {
            // Held by a limit: the refill timer or the end of a running job wakes them.
            return;
        }
        let mut woken = 0;
        while let Some((cid, gen)) = f.sleepers.pop() {
            let Some(c) = st.conns.get_mut(&cid) else {
                continue;
            };
            if !c.sleeping || c.sleep_gen != gen {
                continue;
            }
            c.sleeping = false;
            send(
                c,
                response(PacketType::NOOP, &[]),
                true,
                &self.shared.metrics,
                &mut st.deferred,
            );
            woken += 1;
            if n != 0 && woken >= n {
                break;
            }
        }
    }

    /// Puts a job at the tail of its priority queue and wakes workers for it.
    pub(super) fn enqueue(&self, st: &mut State, slot: u32, now_ns: u64) {
        let job = &mut st.jobs[slot as usize];
        job.state = JobState::Queued;
        job.since_ns = now_ns;
        let (func, p, tag) = (job.func, job.priority as usize, job.seq as u32);
        let f = &mut st.functions[func as usize];
        f.queues[p].push_back(QueueRef { slot, tag });
        f.queued[p] += 1;
        if let Some(o) = &self.shared.observer {
            o.queued(st.jobs[slot as usize].seq);
        }
        self.wake(st, func, self.shared.cfg.worker_wakeup);
    }

    /// Handles CAN_DO and CAN_DO_TIMEOUT.
    pub fn can_do(
        &self,
        conn: ConnId,
        function: &Bytes,
        timeout_ms: Option<u32>,
    ) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        let st = &mut *st;
        let func = self.function_id(st, function)?;
        let Some(c) = st.conns.get_mut(&conn) else {
            return Ok(());
        };
        // A timeout of 0 means none, whether the function is new or registered again. Like
        // gearmand 1.1.20, anything under 1000 ms counts as 1000 ms: libgearman, PHP, Perl and
        // Python document this number in seconds, so `addFunction(f, cb, ctx, 30)` must not
        // take jobs away from their worker after 30 ms.
        let timeout_ms = timeout_ms.filter(|&t| t > 0).map(|t| t.max(1000));
        if let Some(a) = c.abilities.iter_mut().find(|a| a.func == func) {
            a.timeout_ms = timeout_ms;
            return Ok(());
        }
        // Newest registered first, as gearmand scans them.
        c.abilities.insert(0, Ability { func, timeout_ms });
        st.functions[func as usize].workers += 1;
        Ok(())
    }

    /// Handles CANT_DO: the worker's jobs of that function go back to the queue.
    pub fn cant_do(&self, conn: ConnId, function: &Bytes) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(&func) = st.function_ids.get(function) else {
            return;
        };
        self.drop_abilities(st, conn, |f| f == func);
    }

    /// Handles RESET_ABILITIES.
    pub fn reset_abilities(&self, conn: ConnId) {
        let mut st = self.lock();
        self.drop_abilities(&mut st, conn, |_| true);
    }

    fn drop_abilities(&self, st: &mut State, conn: ConnId, which: impl Fn(u32) -> bool) {
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        let mut dropped = Vec::new();
        c.abilities.retain(|a| {
            let d = which(a.func);
            if d {
                dropped.push(a.func);
            }
            !d
        });
        let jobs = &st.jobs;
        let mut requeue = Vec::new();
        c.holding.retain(|&(slot, seq)| {
            let give_back = jobs
                .get(slot as usize)
                .is_some_and(|j| j.seq == seq && dropped.contains(&j.func));
            if give_back {
                requeue.push((slot, seq));
            }
            !give_back
        });
        for f in &dropped {
            if let Some(f) = st.functions.get_mut(*f as usize) {
                f.workers = f.workers.saturating_sub(1);
            }
        }
        let now = self.now_ns();
        let worker = st.conns.get(&conn).map(|c| (c.peer, c.client_id.clone()));
        for (slot, seq) in requeue {
            self.requeue(st, slot, seq, now, RequeueReason::GaveUpFunction, &worker);
        }
    }

    /// Handles GRAB_JOB, GRAB_JOB_UNIQ and GRAB_JOB_ALL.
    pub fn grab(&self, conn: ConnId, kind: GrabKind, out: &mut BytesMut) {
        let mut st = self.lock();
        self.grab_locked(&mut st, conn, kind, out);
    }

    /// A grab, under the lock: the assignment or NO_JOB in `out`, or nothing when the grab is
    /// parked until a rate-limited function's token comes (answered then by the refill timer).
    pub(super) fn grab_locked(
        &self,
        st: &mut State,
        conn: ConnId,
        kind: GrabKind,
        out: &mut BytesMut,
    ) {
        let now = self.now_ns();
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        c.sleeping = false;
        c.parked = false;
        let fenced = self.is_fenced();
        let mut refills = Vec::new();
        let next = pop_next_job(c, &mut st.functions, &st.jobs, fenced, now, &mut refills);
        let Some((slot, timeout_ms)) = next else {
            if !self.park(st, conn, kind, now, &refills) {
                put_response(out, PacketType::NO_JOB, &[]);
            }
            self.add_refill_timers(st, &refills);
            return;
        };
        let job = &mut st.jobs[slot as usize];
        let func = job.func;
        let f = &mut st.functions[func as usize];
        f.running += 1;
        // Jobs queued while a limit held them woke nobody: each start of a limited function
        // passes the turn to one more sleeper (refused, it gets the refill timer).
        let pass_on = f.limits.is_some() && f.total_queued() > 0;
        f.metrics
            .queued_seconds
            .observe(secs_between(job.since_ns, now));
        job.state = JobState::Running(conn);
        job.attempts += 1;
        job.since_ns = now;
        let (seq, attempt) = (job.seq, job.attempts);
        c.holding.push((slot, seq));
        if let Some(o) = &self.shared.observer {
            o.assigned(seq, attempt, &peer_info(conn, c));
        }
        put_assignment(out, kind, &self.handle_of(seq), &f.name, job);
        if let Some(ms) = timeout_ms {
            let due = now + ms as u64 * 1_000_000;
            self.add_timer(st, due, Timer::WorkTimeout { slot, seq, attempt });
        }
        if !refills.is_empty() {
            self.add_refill_timers(st, &refills);
        }
        if pass_on {
            // Two: a woken worker whose grab comes early is parked for the next token.
            self.wake(st, func, 2);
        }
    }

    /// Handles WORK_* from a worker: forwards it to the job's clients and ends the job on a
    /// final result. `body` is the packet body as the worker sent it.
    pub fn work(
        &self,
        conn: ConnId,
        kind: WorkKind,
        handle: &Bytes,
        body: &Bytes,
        out: &mut BytesMut,
    ) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some((slot, seq)) = self.held_job(st, conn, handle) else {
            put_error(
                out,
                &ProtocolError::new(
                    ErrorCode::JobNotFound,
                    format!(
                        "this connection holds no job {}",
                        String::from_utf8_lossy(handle)
                    ),
                ),
            );
            return;
        };
        if kind == WorkKind::Status {
            if let Some(a) = split_args(body, 3) {
                st.jobs[slot as usize].extra().status = Some((a[1].clone(), a[2].clone()));
            }
        }
        if kind.is_final() {
            // The outcome sink (the result cache) takes the result before any client sees it:
            // a client that submits the same unique again as soon as it has its answer finds
            // it cached.
            self.report_final(st, conn, slot, kind, body);
        }
        self.forward_to_waiters(st, slot, kind, handle, body);
        if kind.is_final() {
            self.finish(st, conn, slot, seq, kind);
        }
    }

    /// Reports a worker's final WORK_* (the job's outcome and result) to the outcome sink.
    fn report_final(&self, st: &State, conn: ConnId, slot: u32, kind: WorkKind, body: &Bytes) {
        // The body is "handle\0result": the result is everything after the first NUL.
        let result = body
            .iter()
            .position(|&b| b == 0)
            .map_or(&[][..], |i| &body[i + 1..]);
        let worker = st.conns.get(&conn).map(|c| (c.peer, c.client_id.clone()));
        self.report_end(st, slot, outcome_of(kind), result, &worker);
    }

    /// The slot and sequence number of the job `handle` names, if `conn` runs it.
    fn held_job(&self, st: &State, conn: ConnId, handle: &[u8]) -> Option<(u32, u64)> {
        let seq = self.seq_of(handle)?;
        let slot = st.by_seq.get(seq)?;
        (st.jobs[slot as usize].state == JobState::Running(conn)).then_some((slot, seq))
    }

    /// Sends a worker's WORK_* packet to every client waiting on the job; WORK_EXCEPTION
    /// becomes WORK_FAIL for clients that did not ask for exceptions.
    fn forward_to_waiters(
        &self,
        st: &mut State,
        slot: u32,
        kind: WorkKind,
        handle: &Bytes,
        body: &Bytes,
    ) {
        let job = &st.jobs[slot as usize];
        if job.waiters().is_empty() {
            return;
        }
        let metrics = &self.shared.metrics;
        let pkt = forward_packet(kind.packet_type(), body);
        let fail =
            (kind == WorkKind::Exception).then(|| response(PacketType::WORK_FAIL, &[handle]));
        for w in job.waiters() {
            let Some(c) = st.conns.get(w) else { continue };
            match &fail {
                Some(fail) if !c.exceptions => {
                    send(c, fail.clone(), false, metrics, &mut st.deferred)
                }
                _ => send(c, pkt.clone(), false, metrics, &mut st.deferred),
            }
        }
    }

    /// Ends a job on its worker's final result: counts it, releases the worker, removes it.
    fn finish(&self, st: &mut State, conn: ConnId, slot: u32, seq: u64, kind: WorkKind) {
        let now = self.now_ns();
        let job = &st.jobs[slot as usize];
        let func = job.func;
        let f = &mut st.functions[func as usize];
        f.running = f.running.saturating_sub(1);
        f.metrics
            .running_seconds
            .observe(secs_between(job.since_ns, now));
        let outcome = outcome_of(kind);
        let counter = match outcome {
            JobOutcome::Complete => &f.metrics.completed,
            JobOutcome::Fail => &f.metrics.failed,
            _ => &f.metrics.exceptions,
        };
        counter.inc(job.priority, job.background);
        if let Some(c) = st.conns.get_mut(&conn) {
            if let Some(i) = c.holding.iter().position(|&(s, q)| s == slot && q == seq) {
                c.holding.swap_remove(i);
            }
        }
        self.remove_job(st, slot, outcome);
        self.released(st, func);
    }

    /// Hands an ended job to the [`OutcomeSink`](super::OutcomeSink) (result cache, dead
    /// letters), if the server has one.
    pub(super) fn report_end(
        &self,
        st: &State,
        slot: u32,
        outcome: JobOutcome,
        result: &[u8],
        worker: &Option<(SocketAddr, Bytes)>,
    ) {
        let Some(sink) = self.shared.outcomes.get() else {
            return;
        };
        let job = &st.jobs[slot as usize];
        let f = &st.functions[job.func as usize];
        sink.ended(&EndedJob {
            seq: job.seq,
            handle: &self.handle_of(job.seq),
            function: &f.name,
            unique: job.unique(),
            data: job.data(),
            priority: job.priority,
            background: job.background,
            attempts: job.attempts,
            outcome,
            result,
            worker: worker.as_ref().map(|(a, id)| (*a, &id[..])),
            cache_ttl_s: f.cache_ttl_s,
            dead_letter: f.dead_letter,
        });
    }

    /// Removes a job everywhere (its queue entry is skipped lazily, or dropped by
    /// [`super::job::Function::compact_queue`] once stale entries outnumber live ones).
    pub(super) fn remove_job(&self, st: &mut State, slot: u32, outcome: JobOutcome) {
        let job = st.jobs.remove(slot as usize);
        if let Some(o) = &self.shared.observer {
            o.finished(job.seq, outcome);
        }
        st.by_seq.remove(job.seq);
        self.alias_ended(st, job.seq);
        if !job.coalesce_key().is_empty() {
            let h = super::job::hash_unique(&st.hasher, job.func, job.coalesce_key());
            if let Ok(e) = st.uniques.find_entry(h, |&s| s == slot) {
                e.remove();
            }
        }
        let f = &mut st.functions[job.func as usize];
        match job.state {
            JobState::Queued => {
                f.queued[job.priority as usize] -= 1;
                f.compact_queue(job.priority as usize, &st.jobs, job.func);
            }
            JobState::Scheduled => f.scheduled -= 1,
            _ => {}
        }
        if let Some(e) = &job.extra {
            for w in &e.waiters {
                if let Some(c) = st.conns.get_mut(w) {
                    if let Some(i) = c
                        .waiting
                        .iter()
                        .position(|&(s, q)| s == slot && q == job.seq)
                    {
                        c.waiting.swap_remove(i);
                    }
                }
            }
            // Background submits that joined this job while its durable write was in flight
            // still need their answer: the job they asked for was accepted and has ended.
            if !e.pending_acks.is_empty() {
                let pkt = response(PacketType::JOB_CREATED, &[&self.handle_of(job.seq)]);
                send_each(
                    &st.conns,
                    &e.pending_acks,
                    &pkt,
                    &self.shared.metrics,
                    &mut st.deferred,
                );
            }
        }
        if job.persisted {
            if let Some(m) = &self.shared.mirror {
                m.delete(job.seq);
            }
        }
    }

    /// Puts a running job back at the tail of its priority, or drops it with WORK_FAIL once it
    /// has used `job_retries` attempts.
    pub(super) fn requeue(
        &self,
        st: &mut State,
        slot: u32,
        seq: u64,
        now: u64,
        why: RequeueReason,
        worker: &Option<(SocketAddr, Bytes)>,
    ) {
        let Some(job) = st.jobs.get_mut(slot as usize).filter(|j| j.seq == seq) else {
            return;
        };
        if !job.is_running() {
            return;
        }
        if let Some(o) = &self.shared.observer {
            o.requeued(seq, why.as_str());
        }
        let func = job.func;
        let f = &mut st.functions[func as usize];
        f.running = f.running.saturating_sub(1);
        if f.limits.is_some() {
            // Whatever follows (retry, drop), a slot under max_running is free.
            self.released(st, func);
        }
        let Some(job) = st.jobs.get_mut(slot as usize) else {
            return;
        };
        let f = &mut st.functions[func as usize];
        let retries = self.shared.cfg.job_retries;
        if retries > 0 && job.attempts >= retries {
            let attempts = job.attempts;
            st.deferred
                .push(Deferred::RetriesExhausted { seq, attempts, why });
            f.metrics.failed.inc(job.priority, job.background);
            let pkt = response(PacketType::WORK_FAIL, &[&self.handle_of(seq)]);
            let metrics = &self.shared.metrics;
            send_each(&st.conns, job.waiters(), &pkt, metrics, &mut st.deferred);
            self.report_end(st, slot, JobOutcome::Dropped, &[], worker);
            // Still marked Running (its running count already released): remove_job leaves the
            // queue counters alone.
            self.remove_job(st, slot, JobOutcome::Dropped);
            return;
        }
        if !job.background && job.waiters().is_empty() {
            // A foreground job whose clients all left while it ran: nobody would get its
            // result, so it is not run again (gearmand's ignore_job).
            Deferred::debug(&mut st.deferred, Deferred::Abandoned { seq, why });
            self.remove_job(st, slot, JobOutcome::Cancelled);
            return;
        }
        f.metrics.retried.inc(job.priority, job.background);
        // The next attempt starts from scratch: GET_STATUS must not report the lost worker's
        // progress (gearmand resets it to 0/0 on requeue too).
        if let Some(e) = job.extra.as_mut() {
            e.status = None;
        }
        Deferred::debug(&mut st.deferred, Deferred::Requeued { seq, why });
        self.enqueue(st, slot, now);
    }
}

/// True while a limit holds the function's next job back (known without taking a token).
fn is_held(f: &Function, now: u64) -> bool {
    f.limits
        .as_ref()
        .is_some_and(|l| l.holds(f.running, now).is_some())
}

/// Takes the next live job for a worker off its functions' queues: highest priority first,
/// starting from a function that rotates with each grab, skipping functions held back by their
/// limits (their rate refusals go to `refills` as (function, due clock reading, whether a refill
/// timer must be added)). Returns the
/// job's slot and the worker's CAN_DO_TIMEOUT for its function.
fn pop_next_job(
    c: &mut Conn,
    functions: &mut Slab<Function>,
    jobs: &Slab<Job>,
    fenced: bool,
    now: u64,
    refills: &mut Vec<(u32, u64, bool)>,
) -> Option<(u32, Option<u32>)> {
    let n = c.abilities.len();
    let start = c.rotate;
    c.rotate = c.rotate.wrapping_add(1);
    for p in Priority::ALL {
        for i in 0..n {
            let a = &c.abilities[(start + i) % n];
            let Some(f) = functions.get_mut(a.func as usize) else {
                continue;
            };
            if f.queued[p as usize] == 0 {
                continue;
            }
            // One refusal per grab and function, at its highest queued priority.
            let first = f.queued[..p as usize].iter().all(|&q| q == 0);
            if let Some(l) = f.limits.as_deref_mut() {
                if let Some(why) = l.holds(f.running, now) {
                    if first {
                        l.held(now, why);
                    }
                    continue;
                }
            }
            // Entries of cancelled jobs (or of reused slots) are skipped and dropped here.
            while let Some(r) = f.queues[p as usize].pop_front() {
                let job = jobs.get(r.slot as usize).filter(|j| {
                    j.seq as u32 == r.tag && j.state == JobState::Queued && j.func == a.func
                });
                if fenced && job.is_some_and(|j| j.persisted) {
                    // A fenced server keeps its durable jobs where they are (FIFO order holds:
                    // nothing behind this one is handed out either).
                    f.queues[p as usize].push_front(r);
                    break;
                }
                if job.is_some() {
                    if let Some(l) = f.limits.as_deref_mut() {
                        if let Err(due) = l.try_start(now) {
                            // The bucket is empty: the job keeps its place at the head.
                            f.queues[p as usize].push_front(r);
                            if first {
                                l.held(now, super::limits::Hold::Rate);
                            }
                            refills.push((a.func, due, l.wants_refill_at(due)));
                            break;
                        }
                    }
                    f.queued[p as usize] -= 1;
                    return Some((r.slot, a.timeout_ms));
                }
            }
        }
    }
    None
}

/// Writes the assignment packet the grab asked for: JOB_ASSIGN for GRAB_JOB, JOB_ASSIGN_ALL for
/// a reduce job taken with GRAB_JOB_ALL, JOB_ASSIGN_UNIQ otherwise.
fn put_assignment(out: &mut BytesMut, kind: GrabKind, handle: &[u8], fname: &[u8], job: &Job) {
    match (kind, job.reducer()) {
        (GrabKind::Plain, _) => {
            put_response(out, PacketType::JOB_ASSIGN, &[handle, fname, job.data()])
        }
        (GrabKind::All, Some(r)) => put_response(
            out,
            PacketType::JOB_ASSIGN_ALL,
            &[handle, fname, job.unique(), r, job.data()],
        ),
        _ => put_response(
            out,
            PacketType::JOB_ASSIGN_UNIQ,
            &[handle, fname, job.unique(), job.data()],
        ),
    }
}

/// Re-frames a worker's WORK_* body as a response packet for clients.
/// The outcome a worker's final WORK_* gives its job.
fn outcome_of(kind: WorkKind) -> JobOutcome {
    match kind {
        WorkKind::Complete => JobOutcome::Complete,
        WorkKind::Fail => JobOutcome::Fail,
        _ => JobOutcome::Exception,
    }
}

fn forward_packet(kind: PacketType, body: &Bytes) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + body.len());
    put_response(&mut b, kind, &[body]);
    b.freeze()
}
