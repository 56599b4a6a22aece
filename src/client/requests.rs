//! The client side of the protocol: submitting jobs (foreground and background, at any
//! priority, with an epoch or a reducer), asking a job's status, echo and options.
//!
//! Each call sends its request and reads replies until its answer; they assume nothing else is
//! outstanding on the connection. Pipelined callers use [`Connection::put_submit`] and read the
//! replies themselves.

use bytes::Bytes;

use super::{args, first_arg, ClientError, Connection};
use crate::codec::{Packet, PacketType};
use crate::protocol::Priority;

/// A job to submit. Build it with [`Job::new`] and the setters; the packet type follows from
/// the fields (an epoch makes SUBMIT_JOB_EPOCH, a reducer SUBMIT_REDUCE_JOB*).
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The function a worker registered with CAN_DO.
    pub function: &'a [u8],
    /// Empty: never coalesces with another job.
    pub unique: &'a [u8],
    /// The workload, handed to the worker unchanged (NULs included).
    pub data: &'a [u8],
    /// Ignored for jobs with an epoch or a reducer (their packets carry none).
    pub priority: Priority,
    /// Unix time (seconds) before which the job must not run; background only.
    pub epoch: Option<u64>,
    /// Reducer function (SUBMIT_REDUCE_JOB*).
    pub reducer: Option<&'a [u8]>,
}

impl<'a> Job<'a> {
    /// A normal-priority job with no unique id.
    pub fn new<F, D>(function: &'a F, data: &'a D) -> Job<'a>
    where
        F: AsRef<[u8]> + ?Sized,
        D: AsRef<[u8]> + ?Sized,
    {
        Job {
            function: function.as_ref(),
            unique: b"",
            data: data.as_ref(),
            priority: Priority::Normal,
            epoch: None,
            reducer: None,
        }
    }

    /// Sets the unique id (jobs with the same function and unique coalesce).
    pub fn unique<U: AsRef<[u8]> + ?Sized>(mut self, unique: &'a U) -> Job<'a> {
        self.unique = unique.as_ref();
        self
    }

    /// Sets the priority (HIGH, NORMAL or LOW packet variants).
    pub fn priority(mut self, priority: Priority) -> Job<'a> {
        self.priority = priority;
        self
    }

    /// Makes it a SUBMIT_JOB_EPOCH job, due at Unix time `epoch` (seconds).
    pub fn epoch(mut self, epoch: u64) -> Job<'a> {
        self.epoch = Some(epoch);
        self
    }

    /// Makes it a SUBMIT_REDUCE_JOB* job with this reducer.
    pub fn reducer<R: AsRef<[u8]> + ?Sized>(mut self, reducer: &'a R) -> Job<'a> {
        self.reducer = Some(reducer.as_ref());
        self
    }

    /// The packet type that submits this job.
    pub fn packet_type(&self, background: bool) -> Result<PacketType, ClientError> {
        use PacketType::*;
        Ok(
            match (self.epoch, self.reducer, self.priority, background) {
                (Some(_), _, _, true) => SUBMIT_JOB_EPOCH,
                (Some(_), _, _, false) => {
                    return Err(ClientError::Unsupported(
                        "a foreground job with an epoch (SUBMIT_JOB_EPOCH is background only)",
                    ))
                }
                (None, Some(_), _, true) => SUBMIT_REDUCE_JOB_BACKGROUND,
                (None, Some(_), _, false) => SUBMIT_REDUCE_JOB,
                (None, None, Priority::High, true) => SUBMIT_JOB_HIGH_BG,
                (None, None, Priority::Normal, true) => SUBMIT_JOB_BG,
                (None, None, Priority::Low, true) => SUBMIT_JOB_LOW_BG,
                (None, None, Priority::High, false) => SUBMIT_JOB_HIGH,
                (None, None, Priority::Normal, false) => SUBMIT_JOB,
                (None, None, Priority::Low, false) => SUBMIT_JOB_LOW,
            },
        )
    }
}

/// A WORK_* packet a foreground client receives about its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkEvent {
    /// WORK_DATA: partial output.
    Data(Bytes),
    /// WORK_WARNING: a warning with data.
    Warning(Bytes),
    /// WORK_STATUS: progress.
    Status { numerator: u64, denominator: u64 },
    /// WORK_COMPLETE with the result (final).
    Complete(Bytes),
    /// WORK_FAIL (final).
    Fail,
    /// WORK_EXCEPTION with its data, sent only to clients that set OPTION_REQ exceptions (final).
    Exception(Bytes),
}

impl WorkEvent {
    /// Reads a WORK_* packet: `(handle, event)`, or `None` for any other packet type.
    pub fn from_packet(p: &Packet) -> Result<Option<(Bytes, WorkEvent)>, ClientError> {
        use PacketType::*;
        let two = |p: &Packet| -> Result<(Bytes, Bytes), ClientError> {
            let [h, d] = <[Bytes; 2]>::try_from(args(p.kind, &p.body, 2)?).expect("2 args");
            Ok((h, d))
        };
        Ok(Some(match p.kind {
            WORK_DATA => two(p).map(|(h, d)| (h, WorkEvent::Data(d)))?,
            WORK_WARNING => two(p).map(|(h, d)| (h, WorkEvent::Warning(d)))?,
            WORK_COMPLETE => two(p).map(|(h, d)| (h, WorkEvent::Complete(d)))?,
            WORK_EXCEPTION => two(p).map(|(h, d)| (h, WorkEvent::Exception(d)))?,
            WORK_FAIL => (first_arg(&p.body), WorkEvent::Fail),
            WORK_STATUS => {
                let [h, n, d] = <[Bytes; 3]>::try_from(args(p.kind, &p.body, 3)?).expect("3");
                let numerator = number(p.kind, &n)?;
                let denominator = number(p.kind, &d)?;
                (
                    h,
                    WorkEvent::Status {
                        numerator,
                        denominator,
                    },
                )
            }
            _ => return Ok(None),
        }))
    }

    /// True for the events that end a job.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            WorkEvent::Complete(_) | WorkEvent::Fail | WorkEvent::Exception(_)
        )
    }
}

/// What a foreground submit received: its handle and every WORK_* event, the final one last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub handle: Bytes,
    pub events: Vec<WorkEvent>,
}

impl JobOutcome {
    /// The WORK_COMPLETE data, if the job completed.
    pub fn result(&self) -> Option<&Bytes> {
        match self.events.last() {
            Some(WorkEvent::Complete(d)) => Some(d),
            _ => None,
        }
    }
}

/// STATUS_RES: what the server knows about a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobStatus {
    pub known: bool,
    pub running: bool,
    pub numerator: u64,
    pub denominator: u64,
}

/// STATUS_RES_UNIQUE: [`JobStatus`] plus the foreground clients waiting on the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniqueStatus {
    pub status: JobStatus,
    pub waiting_clients: u64,
}

fn number(kind: PacketType, v: &[u8]) -> Result<u64, ClientError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            ClientError::Protocol(format!(
                "{} carries {:?} where a number belongs",
                kind.name(),
                String::from_utf8_lossy(v)
            ))
        })
}

fn flag(v: &[u8]) -> bool {
    v == b"1"
}

/// Fails with the server's refusal on ERROR, with a protocol violation on anything but `want`.
fn expect(p: Packet, want: PacketType) -> Result<Packet, ClientError> {
    match p.kind {
        k if k == want => Ok(p),
        PacketType::ERROR => Err(ClientError::server(&p.body)),
        other => Err(ClientError::Protocol(format!(
            "{} where {} was expected",
            other.name(),
            want.name()
        ))),
    }
}

impl Connection {
    /// Queues the packet that submits `job`; nothing is written before `flush`.
    pub fn put_submit(&mut self, job: &Job<'_>, background: bool) -> Result<(), ClientError> {
        let kind = job.packet_type(background)?;
        match (job.epoch, job.reducer) {
            (Some(epoch), _) => {
                let epoch = epoch.to_string();
                self.put(
                    kind,
                    &[job.function, job.unique, epoch.as_bytes(), job.data],
                );
            }
            (None, Some(reducer)) => {
                self.put(kind, &[job.function, job.unique, reducer, job.data]);
            }
            (None, None) => self.put(kind, &[job.function, job.unique, job.data]),
        }
        Ok(())
    }

    /// Submits a background job; returns its handle (from JOB_CREATED).
    pub async fn submit_background(&mut self, job: &Job<'_>) -> Result<Bytes, ClientError> {
        self.put_submit(job, true)?;
        self.flush().await?;
        Ok(expect(self.recv().await?, PacketType::JOB_CREATED)?.body)
    }

    /// Submits a foreground job and waits for it to end: every WORK_* packet about it, in
    /// order, the final WORK_COMPLETE, WORK_FAIL or WORK_EXCEPTION last.
    pub async fn submit(&mut self, job: &Job<'_>) -> Result<JobOutcome, ClientError> {
        self.put_submit(job, false)?;
        self.flush().await?;
        let handle = expect(self.recv().await?, PacketType::JOB_CREATED)?.body;
        let mut events = Vec::new();
        loop {
            let p = self.recv().await?;
            if p.kind == PacketType::ERROR {
                return Err(ClientError::server(&p.body));
            }
            // Other packets (a NOOP, replies to another handle) are not this job's business.
            if let Some((h, ev)) = WorkEvent::from_packet(&p)? {
                if h == handle {
                    let done = ev.is_final();
                    events.push(ev);
                    if done {
                        return Ok(JobOutcome { handle, events });
                    }
                }
            }
        }
    }

    /// GET_STATUS of a handle.
    pub async fn get_status(&mut self, handle: &[u8]) -> Result<JobStatus, ClientError> {
        self.send(PacketType::GET_STATUS, &[handle]).await?;
        let p = expect(self.recv().await?, PacketType::STATUS_RES)?;
        let a = args(p.kind, &p.body, 5)?;
        Ok(JobStatus {
            known: flag(&a[1]),
            running: flag(&a[2]),
            numerator: number(p.kind, &a[3])?,
            denominator: number(p.kind, &a[4])?,
        })
    }

    /// GET_STATUS_UNIQUE of a unique id.
    pub async fn get_status_unique(&mut self, unique: &[u8]) -> Result<UniqueStatus, ClientError> {
        self.send(PacketType::GET_STATUS_UNIQUE, &[unique]).await?;
        let p = expect(self.recv().await?, PacketType::STATUS_RES_UNIQUE)?;
        let a = args(p.kind, &p.body, 6)?;
        Ok(UniqueStatus {
            status: JobStatus {
                known: flag(&a[1]),
                running: flag(&a[2]),
                numerator: number(p.kind, &a[3])?,
                denominator: number(p.kind, &a[4])?,
            },
            waiting_clients: number(p.kind, &a[5])?,
        })
    }

    /// ECHO_REQ; returns the echoed data. Also proves that everything sent before it was
    /// processed, since a server answers in order.
    pub async fn echo(&mut self, data: &[u8]) -> Result<Bytes, ClientError> {
        self.send(PacketType::ECHO_REQ, &[data]).await?;
        Ok(expect(self.recv_skipping_noop().await?, PacketType::ECHO_RES)?.body)
    }

    /// OPTION_REQ (e.g. `exceptions`); Ok once the server answered OPTION_RES.
    pub async fn option(&mut self, name: &[u8]) -> Result<(), ClientError> {
        self.send(PacketType::OPTION_REQ, &[name]).await?;
        expect(self.recv().await?, PacketType::OPTION_RES).map(|_| ())
    }

    /// SET_CLIENT_ID (no reply).
    pub async fn set_client_id(&mut self, id: &[u8]) -> Result<(), ClientError> {
        self.send(PacketType::SET_CLIENT_ID, &[id]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_type_follows_the_job() {
        use PacketType::*;
        let j = Job::new("f", "d");
        assert_eq!(j.packet_type(false).unwrap(), SUBMIT_JOB);
        assert_eq!(
            j.priority(Priority::Low).packet_type(true).unwrap(),
            SUBMIT_JOB_LOW_BG
        );
        assert_eq!(j.epoch(5).packet_type(true).unwrap(), SUBMIT_JOB_EPOCH);
        assert!(matches!(
            j.epoch(5).packet_type(false),
            Err(ClientError::Unsupported(_))
        ));
        assert_eq!(
            j.reducer("r").packet_type(false).unwrap(),
            SUBMIT_REDUCE_JOB
        );
    }

    #[test]
    fn work_status_numbers_are_parsed_and_checked() {
        let p = |body: &'static [u8]| Packet {
            magic: crate::codec::Magic::Res,
            kind: PacketType::WORK_STATUS,
            body: Bytes::from_static(body),
        };
        let (h, ev) = WorkEvent::from_packet(&p(b"H:x:1\x001\x004"))
            .unwrap()
            .unwrap();
        assert_eq!(&h[..], b"H:x:1");
        assert_eq!(
            ev,
            WorkEvent::Status {
                numerator: 1,
                denominator: 4
            }
        );
        assert!(matches!(
            WorkEvent::from_packet(&p(b"H:x:1\x00one\x004")),
            Err(ClientError::Protocol(_))
        ));
    }
}
