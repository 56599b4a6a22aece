//! The engine's seams: what it hands to durable storage ([`Mirror`]) and to whoever follows jobs
//! ([`JobObserver`]), and the plain values that cross them. They are traits so the engine never
//! names memcached or OpenTelemetry; both are called with the engine lock held, so they only
//! record and hand work to a task.

use std::net::SocketAddr;

use bytes::Bytes;

use super::ConnId;
use crate::protocol::Priority;

/// A background job as the durable mirror stores it, and as recovery hands it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub seq: u64,
    pub function: Bytes,
    pub unique: Bytes,
    pub data: Bytes,
    pub priority: Priority,
    pub epoch: Option<u64>,
    pub reducer: Option<Bytes>,
    pub attempts: u32,
    /// The handle clients know the job by when it is not `H:<this node>:<seq>`: a job taken
    /// over from another node keeps the one its first server gave it.
    pub handle: Option<Bytes>,
}

/// Why the mirror would not take a write.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct MirrorRefused(pub String);

/// The seam to durable storage. Calls never block: the mirror queues the work and reports a
/// write's outcome with [`Engine::persisted`](super::Engine::persisted).
pub trait Mirror: Send + Sync + 'static {
    /// Queues a durable write of a background job.
    fn write(&self, record: JobRecord) -> Result<(), MirrorRefused>;
    /// Queues the removal of a job's record (it completed, failed or was cancelled).
    fn delete(&self, seq: u64);
}

/// How a job ended, for observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Complete,
    Fail,
    Exception,
    /// Cancelled by `cancel job`, or a foreground job whose clients all left before it ran.
    Cancelled,
    /// Dropped after `engine.job_retries` attempts.
    Dropped,
    /// Its durable write failed: the client got ERROR QUEUE_ERROR.
    Refused,
    /// Its worker passed its CAN_DO_TIMEOUT: the clients got WORK_FAIL.
    TimedOut,
}

impl JobOutcome {
    /// The outcome's name in spans and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Complete => "complete",
            JobOutcome::Fail => "fail",
            JobOutcome::Exception => "exception",
            JobOutcome::Cancelled => "cancelled",
            JobOutcome::Dropped => "dropped",
            JobOutcome::Refused => "refused",
            JobOutcome::TimedOut => "timed_out",
        }
    }
}

/// A connection as observers see it.
#[derive(Debug, Clone, Copy)]
pub struct PeerInfo<'a> {
    pub conn: ConnId,
    pub peer: SocketAddr,
    /// SET_CLIENT_ID value, `-` when none was set.
    pub client_id: &'a [u8],
}

/// A new job, as observers see it.
#[derive(Debug, Clone, Copy)]
pub struct JobEvent<'a> {
    pub seq: u64,
    pub handle: &'a [u8],
    pub function: &'a [u8],
    pub unique: &'a [u8],
    pub priority: Priority,
    pub background: bool,
    pub client: Option<PeerInfo<'a>>,
}

/// A job that has ended with a result, a failure or a drop, as the [`OutcomeSink`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct EndedJob<'a> {
    pub seq: u64,
    pub handle: &'a [u8],
    pub function: &'a [u8],
    pub unique: &'a [u8],
    pub data: &'a [u8],
    pub priority: Priority,
    pub background: bool,
    /// Attempts made, counting the last one.
    pub attempts: u32,
    /// Complete, Fail, Exception, Dropped or TimedOut (never Cancelled or Refused).
    pub outcome: JobOutcome,
    /// WORK_COMPLETE's result, or WORK_EXCEPTION's exception data; empty otherwise.
    pub result: &'a [u8],
    /// The worker of the last attempt (its address and SET_CLIENT_ID), when known.
    pub worker: Option<(SocketAddr, &'a [u8])>,
    /// The function's `cache_ttl_s` setting (0 = results are not cached).
    pub cache_ttl_s: u32,
    /// The function's `dead_letter` setting: failed and excepted background jobs are kept.
    pub dead_letter: bool,
}

/// The seam to what outlives a job: the result cache and the dead-letter store. Called with the
/// engine lock held for every job that ends with a worker's final answer, a CAN_DO_TIMEOUT or a
/// drop after its retries: implementations decide what to keep, copy it and hand it to a task.
pub trait OutcomeSink: Send + Sync + 'static {
    fn ended(&self, job: &EndedJob<'_>);
}

/// The seam to where run-time settings changes are kept (their memcached mirror). Called after
/// the engine lock is released; implementations read the new values with
/// [`Engine::runtime_function_settings`](super::Engine::runtime_function_settings) and must not
/// block (hand the write to a task).
pub trait SettingsSink: Send + Sync + 'static {
    /// The run-time settings of `function` changed.
    fn changed(&self, function: &str);
}

/// Follows each job through its life (the tracing layer implements it). Called with the engine
/// lock held: implementations must only record and hand work to a task, never block.
pub trait JobObserver: Send + Sync + 'static {
    /// A new job was accepted (coalesced submits join an existing job and are not reported).
    fn submitted(&self, job: &JobEvent<'_>);
    /// The job entered a queue, where workers can take it (after its durable write, its epoch,
    /// or a requeue).
    fn queued(&self, seq: u64);
    /// A worker took the job; `attempt` counts from 1.
    fn assigned(&self, seq: u64, attempt: u32, worker: &PeerInfo<'_>);
    /// The attempt in progress ended without a result; the job goes back to the queue or is
    /// dropped (then `finished(Dropped)` follows).
    fn requeued(&self, seq: u64, reason: &str);
    /// The job is gone.
    fn finished(&self, seq: u64, outcome: JobOutcome);
}
