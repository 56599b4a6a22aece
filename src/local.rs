//! An in-process Gearman client of the engine, for the parts of the server that submit work
//! themselves: HTTP submission, schedules, dead-letter retries. It registers a connection with
//! the engine like a socket would, so these jobs take exactly the path (coalescing, queue
//! limits, the durable write before JOB_CREATED, traces, metrics) that a job from a real client
//! takes; only the socket is missing. The engine's answers arrive as encoded packets, decoded
//! with the server's own codec.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::codec::{split_args, Frame, GearmanCodec, Packet, PacketType};
use crate::engine::{ConnId, Engine, SubmitOutcome};
use crate::protocol::{ErrorCode, ProtocolError, Submit};

/// One in-process connection to the engine; dropping it disconnects (a foreground job that
/// nobody else waits for and that has not started is then cancelled, as for a socket).
pub struct LocalClient {
    engine: Engine,
    conn: ConnId,
    rx: mpsc::Receiver<Bytes>,
    kill: CancellationToken,
    codec: GearmanCodec,
    /// Packets received and not yet consumed.
    buf: BytesMut,
}

/// What a foreground job ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// WORK_COMPLETE with the result.
    Complete(Bytes),
    /// WORK_FAIL.
    Fail,
    /// WORK_EXCEPTION with the exception data.
    Exception(Bytes),
}

/// Why a job submitted in-process got no result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LocalError {
    /// The engine answered ERROR (queue full, not durable, bad argument...).
    #[error("{}: {}", .0.code, .0.text)]
    Refused(ProtocolError),
    /// The engine closed this connection (the server is stopping, or it did not read).
    #[error("the server closed the connection")]
    Closed,
}

impl LocalClient {
    /// Registers a connection; `peer` is who the job is for (an HTTP client's address, or the
    /// server itself), shown in `workers`, traces and logs. `outbound` bounds the packets the
    /// engine may queue for it, as `server.outbound_queue` does for sockets.
    pub fn connect(engine: &Engine, peer: SocketAddr, client_id: &str, outbound: usize) -> Self {
        let client_id = Bytes::copy_from_slice(client_id.as_bytes());
        Self::open(engine, peer, client_id, outbound, false)
    }

    /// [`LocalClient::connect`], asking for WORK_EXCEPTION from the start when `exceptions`
    /// (as [`LocalClient::want_exceptions`] would): one engine lock turn instead of three,
    /// which counts for HTTP, where every request connects.
    pub fn connect_with(
        engine: &Engine,
        peer: SocketAddr,
        client_id: &'static str,
        outbound: usize,
        exceptions: bool,
    ) -> Self {
        let client_id = Bytes::from_static(client_id.as_bytes());
        Self::open(engine, peer, client_id, outbound, exceptions)
    }

    fn open(
        engine: &Engine,
        peer: SocketAddr,
        client_id: Bytes,
        outbound: usize,
        exceptions: bool,
    ) -> Self {
        let (tx, rx) = mpsc::channel(outbound.max(1));
        let kill = CancellationToken::new();
        let conn = engine.connect_client(peer, tx, kill.clone(), client_id, exceptions);
        LocalClient {
            engine: engine.clone(),
            conn,
            rx,
            kill,
            codec: GearmanCodec::new(usize::MAX, 0),
            buf: BytesMut::new(),
        }
    }

    /// Asks for WORK_EXCEPTION (rather than WORK_FAIL) when a worker throws.
    pub fn want_exceptions(&self) {
        let _ = self
            .engine
            .set_option(self.conn, &Bytes::from_static(b"exceptions"));
    }

    /// Submits a job and waits for JOB_CREATED: for a durable background job, that is after
    /// memcached acknowledged it. Returns the job handle.
    pub async fn submit(&mut self, s: Submit) -> Result<Bytes, LocalError> {
        // Created/Refused append their answer to the unread packets; Pending's JOB_CREATED (or
        // ERROR) comes through the channel once the mirror answers. Either way the next packet
        // tells.
        let _: SubmitOutcome = self.engine.submit(self.conn, s, &mut self.buf);
        loop {
            let p = self.next_packet().await?;
            match p.kind {
                PacketType::JOB_CREATED => return Ok(p.body),
                PacketType::ERROR => return Err(LocalError::Refused(error_of(&p.body))),
                // WORK_* of a job joined earlier cannot arrive before JOB_CREATED on this
                // connection: it has only this submit outstanding.
                _ => continue,
            }
        }
    }

    /// Waits for the final result of the foreground job submitted last. WORK_STATUS, WORK_DATA
    /// and WORK_WARNING are skipped.
    pub async fn result(&mut self) -> Result<JobResult, LocalError> {
        loop {
            let p = self.next_packet().await?;
            let rest = || {
                split_args(&p.body, 2)
                    .map(|mut a| a.pop().expect("2 args"))
                    .unwrap_or_default()
            };
            match p.kind {
                PacketType::WORK_COMPLETE => return Ok(JobResult::Complete(rest())),
                PacketType::WORK_FAIL => return Ok(JobResult::Fail),
                PacketType::WORK_EXCEPTION => return Ok(JobResult::Exception(rest())),
                PacketType::ERROR => return Err(LocalError::Refused(error_of(&p.body))),
                _ => continue,
            }
        }
    }

    /// The next packet from the engine, from what was written directly or sent later.
    async fn next_packet(&mut self) -> Result<Packet, LocalError> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(Frame::Packet(p))) => return Ok(p),
                Ok(Some(Frame::Admin(_))) | Err(_) => return Err(LocalError::Closed),
                Ok(None) => {}
            }
            tokio::select! {
                _ = self.kill.cancelled() => return Err(LocalError::Closed),
                pkt = self.rx.recv() => match pkt {
                    Some(b) => self.buf.extend_from_slice(&b),
                    None => return Err(LocalError::Closed),
                },
            }
        }
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.engine.disconnect(self.conn);
    }
}

/// An ERROR packet's code and text.
fn error_of(body: &Bytes) -> ProtocolError {
    let args = split_args(body, 2).unwrap_or_default();
    let text = args
        .get(1)
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default();
    let code = args
        .first()
        .and_then(|c| ErrorCode::from_name(&String::from_utf8_lossy(c)))
        .unwrap_or(ErrorCode::QueueError);
    ProtocolError::new(code, text)
}
