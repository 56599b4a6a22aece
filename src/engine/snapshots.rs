//! Read-only views of the engine (GET_STATUS, the admin text commands, metrics at scrape time,
//! the JSON API) and the admin commands that change it (`maxqueue`, `create function`,
//! `drop function`, `cancel job`). Views copy what they need under the lock and return owned
//! values, so formatting and I/O happen after it is released.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};

use super::job::Job;
use super::{send_each, ConnId, Engine, JobOutcome};
use crate::codec::{put_response, response, PacketType};
use crate::protocol::{ErrorCode, ProtocolError};

/// A snapshot of one function for `status`, metrics and the JSON API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FunctionStat {
    pub name: String,
    #[serde(skip)]
    pub name_bytes: Bytes,
    #[serde(skip)]
    pub label: String,
    pub queued: [u32; 3],
    pub running: u32,
    pub scheduled: u32,
    pub workers: u32,
    /// The settings in force (limits, queue limit, cache, dead letters).
    pub settings: super::SettingsView,
}

/// A snapshot of one connection for the `workers` admin command.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: ConnId,
    pub peer: SocketAddr,
    pub client_id: Bytes,
    pub functions: Vec<Bytes>,
}

/// A snapshot of one job for `show jobs`.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub handle: Bytes,
    pub attempts: u32,
    pub queued: bool,
}

/// Totals for metrics and health.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub jobs: usize,
    pub epoch_waiting: u64,
    /// Entries in the functions' priority queues, live or stale (see
    /// `Function::compact_queue`): stays within about twice the queued jobs.
    pub queue_entries: u64,
    pub clients: u64,
    pub workers: u64,
    pub connections: u64,
}

impl Engine {
    /// Handles GET_STATUS.
    pub fn get_status(&self, handle: &Bytes, out: &mut BytesMut) {
        let st = self.lock();
        let job = self
            .seq_of(handle)
            .and_then(|seq| st.by_seq.get(seq))
            .map(|s| &st.jobs[s as usize]);
        let (known, running, num, den) = status_fields(job);
        put_response(
            out,
            PacketType::STATUS_RES,
            &[handle, known, running, &num, &den],
        );
    }

    /// Handles GET_STATUS_UNIQUE (the unique id is looked up in every function).
    pub fn get_status_unique(&self, unique: &Bytes, out: &mut BytesMut) {
        let st = self.lock();
        let job = if unique.is_empty() {
            None
        } else {
            st.functions
                .iter()
                .find_map(|(id, _)| self.find_unique(&st, id as u32, unique))
                .map(|s| &st.jobs[s as usize])
        };
        let (known, running, num, den) = status_fields(job);
        let waiting = job.map(|j| j.waiters().len()).unwrap_or(0).to_string();
        put_response(
            out,
            PacketType::STATUS_RES_UNIQUE,
            &[unique, known, running, &num, &den, waiting.as_bytes()],
        );
    }

    /// Per-function counts, sorted by name.
    pub fn function_stats(&self) -> Vec<FunctionStat> {
        let st = self.lock();
        let mut v: Vec<FunctionStat> = st.functions.iter().map(|(_, f)| self.stat_of(f)).collect();
        v.sort_by(|a, b| a.name_bytes.cmp(&b.name_bytes));
        v
    }

    /// One function's snapshot (under the lock).
    pub(super) fn stat_of(&self, f: &super::job::Function) -> FunctionStat {
        FunctionStat {
            name: String::from_utf8_lossy(&f.name).into_owned(),
            name_bytes: f.name.clone(),
            label: f.metrics.label.clone(),
            queued: f.queued,
            running: f.running,
            scheduled: f.scheduled,
            workers: f.workers,
            settings: self.view_of(f),
        }
    }

    /// Totals for metrics.
    pub fn totals(&self) -> Totals {
        let st = self.lock();
        let mut t = Totals {
            jobs: st.jobs.len(),
            ..Default::default()
        };
        for (_, f) in st.functions.iter() {
            t.epoch_waiting += f.scheduled as u64;
            t.queue_entries += f.queue_entries() as u64;
        }
        for c in st.conns.values() {
            t.connections += 1;
            if !c.abilities.is_empty() {
                t.workers += 1;
            }
            if c.is_client {
                t.clients += 1;
            }
        }
        t
    }

    /// One connection's snapshot (under the lock; `id` is a live connection).
    pub(super) fn conn_info(&self, st: &super::State, id: ConnId) -> ConnInfo {
        let c = &st.conns[&id];
        ConnInfo {
            id,
            peer: c.peer,
            client_id: c.client_id.clone(),
            functions: c
                .abilities
                .iter()
                .filter_map(|a| st.functions.get(a.func as usize).map(|f| f.name.clone()))
                .collect(),
        }
    }

    /// Every live job, page by page (see [`Engine::jobs_page`]: the lock is taken per page).
    pub fn jobs(&self) -> Vec<JobInfo> {
        let mut v = Vec::new();
        let mut from = Some(0);
        while let Some(f) = from {
            let page = self.jobs_page(f);
            v.extend(page.items);
            from = page.next;
        }
        v
    }

    /// Unique ids of live jobs, page by page (see [`Engine::uniques_page`]).
    pub fn uniques(&self) -> Vec<Bytes> {
        let mut v = Vec::new();
        let mut from = Some(0);
        while let Some(f) = from {
            let page = self.uniques_page(f);
            v.extend(page.items);
            from = page.next;
        }
        v
    }

    /// `maxqueue`: sets per-priority limits for a function (creating it if needed).
    /// Uniform limits are recorded as the function's `max_queue` setting (kept across
    /// restarts with the other run-time settings).
    pub fn set_max_queue(&self, function: &Bytes, limits: [u32; 3]) -> Result<(), ProtocolError> {
        let recorded = {
            let mut st = self.lock();
            let id = self.function_id(&mut st, function)?;
            st.functions[id as usize].max_queue = Some(limits);
            self.record_max_queue(&mut st, id, limits)
        };
        if recorded {
            self.settings_changed(&String::from_utf8_lossy(function));
        }
        Ok(())
    }

    /// `create function`.
    pub fn create_function(&self, function: &Bytes) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        self.function_id(&mut st, function).map(|_| ())
    }

    /// `drop function`: only a function with no jobs and no workers.
    pub fn drop_function(&self, function: &Bytes) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        let Some(&id) = st.function_ids.get(function) else {
            return Err(ProtocolError::new(
                ErrorCode::UnknownFunction,
                "no such function",
            ));
        };
        if st.functions[id as usize].is_in_use() {
            return Err(ProtocolError::new(
                ErrorCode::FunctionInUse,
                "function has jobs or workers",
            ));
        }
        let has_jobs = st.jobs.iter().any(|(_, j)| j.func == id);
        if has_jobs {
            return Err(ProtocolError::new(
                ErrorCode::FunctionInUse,
                "function has jobs",
            ));
        }
        st.functions.remove(id as usize);
        st.function_ids.remove(function);
        Ok(())
    }

    /// `cancel job`: removes a queued (not running) job; its clients get WORK_FAIL.
    pub fn cancel_job(&self, handle: &Bytes) -> Result<(), ProtocolError> {
        let mut st = self.lock();
        let st = &mut *st;
        let slot = self
            .seq_of(handle)
            .and_then(|seq| st.by_seq.get(seq))
            .ok_or_else(|| ProtocolError::new(ErrorCode::JobNotFound, "no such job"))?;
        let job = &st.jobs[slot as usize];
        if job.is_running() {
            return Err(ProtocolError::new(
                ErrorCode::JobRunning,
                "job is running on a worker",
            ));
        }
        let pkt = response(PacketType::WORK_FAIL, &[handle]);
        send_each(
            &st.conns,
            job.waiters(),
            &pkt,
            &self.shared.metrics,
            &mut st.deferred,
        );
        self.remove_job(st, slot, JobOutcome::Cancelled);
        Ok(())
    }
}

/// GET_STATUS fields: known, running, numerator, denominator.
fn status_fields(job: Option<&Job>) -> (&'static [u8], &'static [u8], Bytes, Bytes) {
    let zero = || Bytes::from_static(b"0");
    match job {
        None => (b"0", b"0", zero(), zero()),
        Some(j) => {
            let running: &'static [u8] = if j.is_running() { b"1" } else { b"0" };
            let (n, d) = j
                .extra
                .as_ref()
                .and_then(|e| e.status.clone())
                .unwrap_or_else(|| (zero(), zero()));
            (b"1", running, n, d)
        }
    }
}
