//! The worker side of the protocol: announcing functions, grabbing jobs, sleeping until a NOOP,
//! and sending a job's WORK_* packets.
//!
//! Results are queued and flushed at once, like every request; a worker that wants to batch
//! several (the load generator) uses `put` and `flush` directly.

use bytes::Bytes;

use super::{args, ClientError, Connection};
use crate::codec::{Packet, PacketType};
use crate::protocol::{GrabKind, WorkKind};

/// A job handed to this worker by JOB_ASSIGN, JOB_ASSIGN_UNIQ or JOB_ASSIGN_ALL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub handle: Bytes,
    pub function: Bytes,
    /// Empty for JOB_ASSIGN (it carries none).
    pub unique: Bytes,
    /// Only JOB_ASSIGN_ALL carries one, and only for a job submitted with a reducer.
    pub reducer: Option<Bytes>,
    pub data: Bytes,
}

impl Assignment {
    /// Reads a JOB_ASSIGN* packet; `None` for any other type.
    pub fn from_packet(p: &Packet) -> Result<Option<Assignment>, ClientError> {
        let a = match p.kind {
            PacketType::JOB_ASSIGN => {
                let [handle, function, data] =
                    <[Bytes; 3]>::try_from(args(p.kind, &p.body, 3)?).expect("3 args");
                Assignment {
                    handle,
                    function,
                    unique: Bytes::new(),
                    reducer: None,
                    data,
                }
            }
            PacketType::JOB_ASSIGN_UNIQ => {
                let [handle, function, unique, data] =
                    <[Bytes; 4]>::try_from(args(p.kind, &p.body, 4)?).expect("4 args");
                Assignment {
                    handle,
                    function,
                    unique,
                    reducer: None,
                    data,
                }
            }
            PacketType::JOB_ASSIGN_ALL => {
                let [handle, function, unique, reducer, data] =
                    <[Bytes; 5]>::try_from(args(p.kind, &p.body, 5)?).expect("5 args");
                Assignment {
                    handle,
                    function,
                    unique,
                    reducer: (!reducer.is_empty()).then_some(reducer),
                    data,
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(a))
    }
}

impl Connection {
    /// CAN_DO (no reply).
    pub async fn can_do(&mut self, function: &[u8]) -> Result<(), ClientError> {
        self.send(PacketType::CAN_DO, &[function]).await
    }

    /// CAN_DO_TIMEOUT: the server takes the job back after `ms` milliseconds (no reply).
    pub async fn can_do_timeout(&mut self, function: &[u8], ms: u32) -> Result<(), ClientError> {
        let ms = ms.to_string();
        self.send(PacketType::CAN_DO_TIMEOUT, &[function, ms.as_bytes()])
            .await
    }

    /// CANT_DO (no reply).
    pub async fn cant_do(&mut self, function: &[u8]) -> Result<(), ClientError> {
        self.send(PacketType::CANT_DO, &[function]).await
    }

    /// Asks for a job with GRAB_JOB, GRAB_JOB_UNIQ or GRAB_JOB_ALL; `None` on NO_JOB. NOOPs that
    /// arrive first (wake-ups from an earlier PRE_SLEEP) are skipped.
    pub async fn grab(&mut self, kind: GrabKind) -> Result<Option<Assignment>, ClientError> {
        let packet = match kind {
            GrabKind::Plain => PacketType::GRAB_JOB,
            GrabKind::Uniq => PacketType::GRAB_JOB_UNIQ,
            GrabKind::All => PacketType::GRAB_JOB_ALL,
        };
        self.send(packet, &[]).await?;
        let p = self.recv_skipping_noop().await?;
        match p.kind {
            PacketType::NO_JOB => Ok(None),
            PacketType::ERROR => Err(ClientError::server(&p.body)),
            other => Assignment::from_packet(&p)?.map(Some).ok_or_else(|| {
                ClientError::Protocol(format!("{} in answer to {}", other.name(), packet.name()))
            }),
        }
    }

    /// PRE_SLEEP: the server will send a NOOP when there may be work (no reply until then).
    pub async fn pre_sleep(&mut self) -> Result<(), ClientError> {
        self.send(PacketType::PRE_SLEEP, &[]).await
    }

    /// Waits for the NOOP that wakes a sleeping worker.
    pub async fn wait_noop(&mut self) -> Result<(), ClientError> {
        let p = self.recv().await?;
        match p.kind {
            PacketType::NOOP => Ok(()),
            PacketType::ERROR => Err(ClientError::server(&p.body)),
            other => Err(ClientError::Protocol(format!(
                "{} while asleep (only NOOP is sent to a sleeping worker)",
                other.name()
            ))),
        }
    }

    /// Sends one WORK_* packet about `handle`; `data` is the rest of its arguments (none for
    /// WORK_FAIL, `[num, den]` for WORK_STATUS, the data otherwise). No reply unless the server
    /// refuses it (ERROR JOB_NOT_FOUND), which the next `recv` returns.
    pub async fn work(
        &mut self,
        kind: WorkKind,
        handle: &[u8],
        data: &[&[u8]],
    ) -> Result<(), ClientError> {
        let mut a: Vec<&[u8]> = Vec::with_capacity(1 + data.len());
        a.push(handle);
        a.extend_from_slice(data);
        self.send(kind.packet_type(), &a).await
    }

    /// WORK_COMPLETE with the result.
    pub async fn complete(&mut self, handle: &[u8], result: &[u8]) -> Result<(), ClientError> {
        self.work(WorkKind::Complete, handle, &[result]).await
    }

    /// WORK_FAIL.
    pub async fn fail(&mut self, handle: &[u8]) -> Result<(), ClientError> {
        self.work(WorkKind::Fail, handle, &[]).await
    }

    /// WORK_EXCEPTION with its data.
    pub async fn exception(&mut self, handle: &[u8], data: &[u8]) -> Result<(), ClientError> {
        self.work(WorkKind::Exception, handle, &[data]).await
    }

    /// WORK_STATUS `numerator/denominator`.
    pub async fn status(
        &mut self,
        handle: &[u8],
        numerator: u64,
        denominator: u64,
    ) -> Result<(), ClientError> {
        let (n, d) = (numerator.to_string(), denominator.to_string());
        self.work(WorkKind::Status, handle, &[n.as_bytes(), d.as_bytes()])
            .await
    }
}
