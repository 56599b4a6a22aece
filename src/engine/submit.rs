//! SUBMIT_JOB* and what follows from it: finding (or creating) the function, coalescing on the
//! unique id, the queue limit, the durable write of a background job, and the mirror's answer
//! ([`Engine::persisted`]) that lets a persisted job's JOB_CREATED go out and the job be queued.
//!
//! A background submit is acknowledged only once its record is durable: until then the job is
//! `Persisting`, invisible to workers, and the submitting connections wait in `pending_acks`.

use bytes::{Bytes, BytesMut};

use super::job::{coalesce_key, hash_unique, Function, Job, JobState};
use super::timers::Timer;
use super::{
    put_error, send_each, ConnId, Engine, JobEvent, JobOutcome, JobRecord, MirrorRefused, State,
};
use crate::codec::{put_response, response, PacketType};
use crate::metrics::{RefusalReason, OTHER_FUNCTION};
use crate::protocol::{ErrorCode, ProtocolError, Submit};

/// What a submit turned into, for the connection that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// JOB_CREATED was written to the connection's buffer.
    Created,
    /// JOB_CREATED (or ERROR) will arrive through the outbound channel once the mirror answers.
    Pending,
    /// ERROR was written to the connection's buffer.
    Refused,
}

impl Engine {
    /// Handles a SUBMIT_JOB* request.
    pub fn submit(&self, conn: ConnId, s: Submit, out: &mut BytesMut) -> SubmitOutcome {
        let mut st = self.lock();
        let st = &mut *st;
        if let Some(c) = st.conns.get_mut(&conn) {
            c.is_client = true;
        }
        let func = match self.function_for_submit(st, &s) {
            Ok(f) => f,
            Err(e) => return refuse(out, &e),
        };
        // Coalesce on (function, unique); an empty unique never coalesces.
        let key = coalesce_key(&s.unique, &s.data);
        if !key.is_empty() {
            if let Some(slot) = self.find_unique(st, func, key) {
                return self.join(st, conn, slot, &s, out);
            }
        }
        if let Err(e) = self.check_queue_limit(st, func, &s) {
            return refuse(out, &e);
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let mut job = self.new_job(seq, func, conn, &s);
        let persist = s.background && self.shared.mirror.is_some();
        if persist {
            if let Err(e) = self.write_new_job(st, conn, &s, &mut job) {
                return refuse(out, &e);
            }
        }
        let slot = self.accept(st, conn, job, &s);
        if persist {
            return SubmitOutcome::Pending;
        }
        put_response(out, PacketType::JOB_CREATED, &[&self.handle_of(seq)]);
        self.make_available(st, slot);
        SubmitOutcome::Created
    }

    /// The submit's function, created on first use; refused past `engine.max_functions`.
    fn function_for_submit(&self, st: &mut State, s: &Submit) -> Result<u32, ProtocolError> {
        self.function_id(st, &s.function).inspect_err(|_| {
            self.shared.metrics.refused(
                OTHER_FUNCTION,
                RefusalReason::TooManyFunctions,
                s.priority,
                s.background,
            );
        })
    }

    /// Refuses a submit whose priority queue already holds its limit (`maxqueue`, else
    /// `engine.max_queue_per_function`; 0 = no limit).
    fn check_queue_limit(&self, st: &State, func: u32, s: &Submit) -> Result<(), ProtocolError> {
        let f = &st.functions[func as usize];
        let limit = match f.max_queue {
            Some(l) => l[s.priority as usize],
            None => self.shared.cfg.max_queue_per_function,
        };
        if limit == 0 || f.queued[s.priority as usize] < limit {
            return Ok(());
        }
        self.shared.metrics.refused(
            &f.metrics.label,
            RefusalReason::QueueFull,
            s.priority,
            s.background,
        );
        Err(ProtocolError::new(
            ErrorCode::QueueError,
            format!(
                "queue of {} at priority {} is full ({limit} jobs)",
                String::from_utf8_lossy(&s.function),
                s.priority.as_str()
            ),
        ))
    }

    /// The job a fresh submit creates; a foreground submitter waits on it.
    fn new_job(&self, seq: u64, func: u32, conn: ConnId, s: &Submit) -> Job {
        let mut job = Job::new(
            seq,
            func,
            s.priority,
            s.background,
            0,
            &s.unique,
            &s.data,
            self.now_ns(),
        );
        if s.reducer.is_some() || s.epoch.is_some() || !s.background {
            let e = job.extra();
            e.reducer = s.reducer.clone();
            e.epoch = s.epoch;
            if !s.background {
                e.waiters.push(conn);
            }
        }
        job
    }

    /// Hands a new background job to the mirror; it stays `Persisting` (and `conn` waits for
    /// its JOB_CREATED) until [`Engine::persisted`] reports the write.
    fn write_new_job(
        &self,
        st: &State,
        conn: ConnId,
        s: &Submit,
        job: &mut Job,
    ) -> Result<(), ProtocolError> {
        let record = JobRecord {
            seq: job.seq,
            function: s.function.clone(),
            unique: s.unique.clone(),
            data: s.data.clone(),
            priority: s.priority,
            epoch: s.epoch,
            reducer: s.reducer.clone(),
            attempts: 0,
            handle: None,
        };
        if let Err(why) = self.mirror_write(record) {
            self.shared.metrics.refused(
                &st.functions[job.func as usize].metrics.label,
                RefusalReason::NotDurable,
                s.priority,
                s.background,
            );
            return Err(not_durable(why));
        }
        job.persisted = true;
        job.state = JobState::Persisting;
        job.extra().pending_acks.push(conn);
        Ok(())
    }

    /// Stores an accepted job: counted, indexed, waited on by a foreground submitter, and
    /// reported to the observer. Returns its slot.
    fn accept(&self, st: &mut State, conn: ConnId, job: Job, s: &Submit) -> u32 {
        let (seq, func) = (job.seq, job.func);
        st.functions[func as usize].metrics.submitted[s.priority as usize][s.background as usize]
            .inc();
        let slot = self.insert_job(st, job);
        if !s.background {
            if let Some(c) = st.conns.get_mut(&conn) {
                c.waiting.push((slot, seq));
            }
        }
        if let Some(o) = &self.shared.observer {
            let handle = self.handle_of(seq);
            o.submitted(&JobEvent {
                seq,
                handle: &handle,
                function: &s.function,
                unique: &s.unique,
                priority: s.priority,
                background: s.background,
                client: st.conns.get(&conn).map(|c| super::peer_info(conn, c)),
            });
        }
        slot
    }

    /// A submit whose unique id matches a live job joins it.
    fn join(
        &self,
        st: &mut State,
        conn: ConnId,
        slot: u32,
        s: &Submit,
        out: &mut BytesMut,
    ) -> SubmitOutcome {
        let job = &mut st.jobs[slot as usize];
        let seq = job.seq;
        st.functions[job.func as usize]
            .metrics
            .coalesced
            .inc(s.priority, s.background);
        if !s.background {
            job.extra().waiters.push(conn);
            if let Some(c) = st.conns.get_mut(&conn) {
                c.waiting.push((slot, seq));
            }
        }
        let job = &mut st.jobs[slot as usize];
        // A background submit makes the job survive its foreground clients, and durable.
        if s.background && !job.background {
            job.background = true;
            if self.shared.mirror.is_some() && !job.persisted {
                return self.make_joined_job_durable(st, conn, slot, out);
            }
        }
        let job = &mut st.jobs[slot as usize];
        let acked_later = job
            .extra
            .as_ref()
            .is_some_and(|e| !e.pending_acks.is_empty())
            || job.state == JobState::Persisting;
        if acked_later {
            job.extra().pending_acks.push(conn);
            return SubmitOutcome::Pending;
        }
        put_response(out, PacketType::JOB_CREATED, &[&self.handle_of(seq)]);
        SubmitOutcome::Created
    }

    /// A background submit joined a foreground job that has no durable record: write one, and
    /// acknowledge the submit once it is written.
    fn make_joined_job_durable(
        &self,
        st: &mut State,
        conn: ConnId,
        slot: u32,
        out: &mut BytesMut,
    ) -> SubmitOutcome {
        let record = self.record_of(st, slot);
        let job = &mut st.jobs[slot as usize];
        if let Err(why) = self.mirror_write(record) {
            job.background = false;
            return refuse(out, &not_durable(why));
        }
        job.persisted = true;
        job.extra().pending_acks.push(conn);
        SubmitOutcome::Pending
    }

    fn mirror_write(&self, record: JobRecord) -> Result<(), MirrorRefused> {
        match &self.shared.mirror {
            Some(m) => m.write(record),
            None => Ok(()),
        }
    }

    /// The id of function `name`, created on first use; refused past `engine.max_functions`.
    pub(super) fn function_id(&self, st: &mut State, name: &Bytes) -> Result<u32, ProtocolError> {
        if let Some(&id) = st.function_ids.get(name) {
            return Ok(id);
        }
        if st.functions.len() >= self.shared.cfg.max_functions {
            return Err(ProtocolError::new(
                ErrorCode::QueueError,
                format!(
                    "the server already knows {} functions (engine.max_functions)",
                    st.functions.len()
                ),
            ));
        }
        let metrics = self.shared.metrics.for_function(name);
        let mut f = Function::new(name.clone(), metrics);
        if let Some(s) = self.initial_settings(st, name) {
            self.configure(&mut f, &s);
        }
        let id = st.functions.insert(f) as u32;
        st.function_ids.insert(name.clone(), id);
        Ok(id)
    }

    /// The job of `func` whose [`coalesce_key`] is `key`.
    pub(super) fn find_unique(&self, st: &State, func: u32, key: &[u8]) -> Option<u32> {
        let h = hash_unique(&st.hasher, func, key);
        st.uniques
            .find(h, |&slot| {
                let j = &st.jobs[slot as usize];
                j.func == func && j.coalesce_key() == key
            })
            .copied()
    }

    /// The durable record of a live job.
    pub(super) fn record_of(&self, st: &State, slot: u32) -> JobRecord {
        let j = &st.jobs[slot as usize];
        JobRecord {
            seq: j.seq,
            function: st.functions[j.func as usize].name.clone(),
            unique: Bytes::copy_from_slice(j.unique()),
            data: Bytes::copy_from_slice(j.data()),
            priority: j.priority,
            epoch: j.epoch(),
            reducer: j.reducer().cloned(),
            attempts: j.attempts,
            handle: self.kept_handle(j.seq),
        }
    }

    /// Stores a job in the slab and indexes it by sequence number and coalescing key.
    pub(super) fn insert_job(&self, st: &mut State, job: Job) -> u32 {
        let seq = job.seq;
        let func = job.func;
        let has_unique = !job.coalesce_key().is_empty();
        let slot = st.jobs.insert(job) as u32;
        st.by_seq.insert(seq, slot);
        if has_unique {
            let h = hash_unique(&st.hasher, func, st.jobs[slot as usize].coalesce_key());
            let (jobs, hasher) = (&st.jobs, &st.hasher);
            st.uniques.insert_unique(h, slot, |&s| {
                let j = &jobs[s as usize];
                hash_unique(hasher, j.func, j.coalesce_key())
            });
        }
        slot
    }

    /// Puts a job where workers can get it: the queue, or the timer heap for a future epoch.
    pub(super) fn make_available(&self, st: &mut State, slot: u32) {
        let clock = &self.shared.clock;
        let now_ns = clock.now_ns();
        let job = &mut st.jobs[slot as usize];
        if let Some(epoch) = job.epoch().filter(|&e| e > clock.unix_secs()) {
            job.state = JobState::Scheduled;
            let seq = job.seq;
            st.functions[job.func as usize].scheduled += 1;
            self.add_timer(st, clock.ns_at_unix(epoch), Timer::EpochDue { slot, seq });
            return;
        }
        self.enqueue(st, slot, now_ns);
    }

    /// Called by the mirror when a write completed (`Ok`) or failed for good (`Err(reason)`).
    pub fn persisted(&self, seq: u64, result: Result<(), MirrorRefused>) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(slot) = st.by_seq.get(seq) else {
            // Finished or cancelled while the write was in flight: make sure it is not resurrected.
            if result.is_ok() {
                if let Some(m) = &self.shared.mirror {
                    m.delete(seq);
                }
            }
            return;
        };
        let acks = take_pending_acks(&mut st.jobs[slot as usize]);
        match result {
            Ok(()) => self.acknowledge(st, slot, &acks),
            Err(why) => self.refuse_after_write(st, slot, &acks, why),
        }
    }

    /// The write is durable: the waiting submitters get JOB_CREATED, and a job that waited
    /// for it becomes available.
    fn acknowledge(&self, st: &mut State, slot: u32, acks: &[ConnId]) {
        let seq = st.jobs[slot as usize].seq;
        let pkt = response(PacketType::JOB_CREATED, &[&self.handle_of(seq)]);
        send_each(
            &st.conns,
            acks,
            &pkt,
            &self.shared.metrics,
            &mut st.deferred,
        );
        if st.jobs[slot as usize].state == JobState::Persisting {
            self.make_available(st, slot);
        }
    }

    /// The write failed for good: the waiting submitters get ERROR QUEUE_ERROR, and a job that
    /// existed only for them is removed.
    fn refuse_after_write(&self, st: &mut State, slot: u32, acks: &[ConnId], why: MirrorRefused) {
        let job = &st.jobs[slot as usize];
        let metrics = &self.shared.metrics;
        let label = &st.functions[job.func as usize].metrics.label;
        for _ in acks {
            metrics.refused(label, RefusalReason::NotDurable, job.priority, true);
        }
        let mut b = BytesMut::new();
        put_error(&mut b, &not_durable(why));
        send_each(&st.conns, acks, &b.freeze(), metrics, &mut st.deferred);
        if job.state == JobState::Persisting {
            self.remove_job(st, slot, JobOutcome::Refused);
        } else {
            // It was already durable-less foreground work joined by a background submit.
            st.jobs[slot as usize].persisted = false;
        }
    }
}

/// Writes the refusal and says so.
fn refuse(out: &mut BytesMut, e: &ProtocolError) -> SubmitOutcome {
    put_error(out, e);
    SubmitOutcome::Refused
}

fn not_durable(why: MirrorRefused) -> ProtocolError {
    ProtocolError::new(ErrorCode::QueueError, why.0)
}

/// Takes the connections waiting for the job's JOB_CREATED. A plain background job needed
/// `extra` only for them: it is freed (about 200 bytes a job, which doubled the memory of a
/// durable queue).
fn take_pending_acks(job: &mut Job) -> Vec<ConnId> {
    let acks = job
        .extra
        .as_mut()
        .map(|e| std::mem::take(&mut e.pending_acks))
        .unwrap_or_default();
    if job.extra.as_ref().is_some_and(|e| e.is_empty()) {
        job.extra = None;
    }
    acks
}
