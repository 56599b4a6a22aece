//! An in-process Gearman client of the engine, for the parts of the server that submit work
//! themselves: HTTP submission, schedules, dead-letter retries. It registers a connection with
//! the engine like a socket would, so these jobs take exactly the path (coalescing, queue
//! limits, the durable write before JOB_CREATED, traces, metrics) that a job from a real client
//! takes; only the socket is missing. The engine's answers arrive as encoded packets, decoded
//! with the server's own codec. What it receives on is a [`Line`], which a caller that connects
//! often (HTTP, once per request) can keep and hand to its next connection.

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
    /// Always there until [`LocalClient::release`] takes it.
    line: Option<Line>,
}

/// What an in-process connection receives on: the engine's channel, the kill token and the
/// unread packets. A connection registers and unregisters with the engine in one lock turn
/// each; these are the allocations around that, which HTTP, connecting once per request, keeps
/// in a pool ([`LocalClient::release`] gives them back when they can carry another request).
/// An idle `Line` is not registered anywhere: the engine, `workers` and the metrics do not
/// see it.
pub struct Line {
    /// Our own sender, so the channel outlives a registration; the engine holds a clone only
    /// while connected ([`Line::is_quiet`] checks that nobody else holds one).
    tx: mpsc::Sender<Bytes>,
    rx: mpsc::Receiver<Bytes>,
    kill: CancellationToken,
    codec: GearmanCodec,
    /// Packets received and not yet consumed.
    buf: BytesMut,
}

impl Line {
    /// A new line; `outbound` bounds the packets the engine may queue on it, as
    /// `server.outbound_queue` does for sockets.
    pub fn new(outbound: usize) -> Line {
        let (tx, rx) = mpsc::channel(outbound.max(1));
        Line {
            tx,
            rx,
            kill: CancellationToken::new(),
            codec: GearmanCodec::new(usize::MAX, 0),
            buf: BytesMut::new(),
        }
    }

    /// True when nothing of a past connection can reach the next one: nothing unread, no
    /// sender but ours (the engine dropped its clone on disconnect), not killed.
    fn is_quiet(&mut self) -> bool {
        self.is_drained() && self.tx.strong_count() == 1
    }

    /// Nothing unread, nothing more on its way, not killed by the engine.
    fn is_drained(&self) -> bool {
        self.buf.is_empty() && self.rx.is_empty() && !self.kill.is_cancelled()
    }
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
        Self::open(engine, peer, client_id, Line::new(outbound), false)
    }

    /// [`LocalClient::connect`] on `line` (new, or given back by [`LocalClient::release`]),
    /// asking for WORK_EXCEPTION from the start when `exceptions` (as
    /// [`LocalClient::want_exceptions`] would): one engine lock turn instead of three, which
    /// counts for HTTP, where every request connects.
    pub fn connect_with(
        engine: &Engine,
        peer: SocketAddr,
        client_id: &'static str,
        line: Line,
        exceptions: bool,
    ) -> Self {
        let client_id = Bytes::from_static(client_id.as_bytes());
        Self::open(engine, peer, client_id, line, exceptions)
    }

    fn open(
        engine: &Engine,
        peer: SocketAddr,
        client_id: Bytes,
        mut line: Line,
        exceptions: bool,
    ) -> Self {
        // A fresh decoder: nothing of the last connection's framing carries over.
        line.codec = GearmanCodec::new(usize::MAX, 0);
        let conn = engine.connect_client(
            peer,
            line.tx.clone(),
            line.kill.clone(),
            client_id,
            exceptions,
        );
        LocalClient {
            engine: engine.clone(),
            conn,
            line: Some(line),
        }
    }

    /// Disconnects, and gives the line back when another connection can use it: the exchange
    /// ended (every packet read) and nothing else can still send on it. A client left half-way
    /// (a timeout, a hang-up) is dropped instead, never released.
    pub fn release(mut self) -> Option<Line> {
        let mut line = self.line.take()?;
        self.engine.disconnect(self.conn);
        line.is_quiet().then_some(line)
    }

    /// True when the connection can carry another request as it is: every packet read,
    /// nothing more on its way, not killed by the engine. A foreground job's exchange ends with
    /// its result and a background one's with JOB_CREATED, after which the engine sends it
    /// nothing more.
    pub fn is_idle(&self) -> bool {
        self.line.as_ref().is_some_and(Line::is_drained)
    }

    fn line(&mut self) -> &mut Line {
        self.line.as_mut().expect("a line until released")
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
        let line = self.line.as_mut().expect("a line until released");
        let _: SubmitOutcome = self.engine.submit(self.conn, s, &mut line.buf);
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
        let line = self.line();
        loop {
            match line.codec.decode(&mut line.buf) {
                Ok(Some(Frame::Packet(p))) => return Ok(p),
                Ok(Some(Frame::Admin(_))) | Err(_) => return Err(LocalError::Closed),
                Ok(None) => {}
            }
            tokio::select! {
                _ = line.kill.cancelled() => return Err(LocalError::Closed),
                pkt = line.rx.recv() => match pkt {
                    Some(b) => line.buf.extend_from_slice(&b),
                    None => return Err(LocalError::Closed),
                },
            }
        }
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        if self.line.is_some() {
            self.engine.disconnect(self.conn);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::EngineConfig;
    use crate::metrics::Metrics;
    use crate::protocol::Priority;

    fn engine() -> Engine {
        Engine::new(
            EngineConfig::default(),
            Arc::new(Metrics::new(100)),
            None,
            None,
        )
    }

    fn background(data: &'static [u8]) -> Submit {
        Submit {
            function: Bytes::from_static(b"f"),
            unique: Bytes::new(),
            data: Bytes::from_static(data),
            priority: Priority::Normal,
            background: true,
            epoch: None,
            reducer: None,
        }
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[tokio::test]
    async fn a_released_line_carries_the_next_connection_and_is_registered_nowhere() {
        let e = engine();
        let mut c = LocalClient::connect_with(&e, peer(), "http", Line::new(4), false);
        let first = c.submit(background(b"1")).await.unwrap();
        assert_eq!(e.totals().connections, 1);
        let line = c
            .release()
            .expect("a finished exchange gives its line back");
        assert_eq!(e.totals().connections, 0, "an idle line is no connection");
        let mut c = LocalClient::connect_with(&e, peer(), "http", line, false);
        let second = c.submit(background(b"2")).await.unwrap();
        assert_ne!(
            first, second,
            "the second submit is answered with its own handle"
        );
        assert_eq!(e.totals().connections, 1);
        drop(c);
        assert_eq!(e.totals().connections, 0);
    }

    #[tokio::test]
    async fn a_line_something_could_still_reach_is_not_given_back() {
        let e = engine();
        let open = || LocalClient::connect_with(&e, peer(), "http", Line::new(4), false);

        let mut c = open();
        c.submit(background(b"a")).await.unwrap();
        let stray = Bytes::from_static(b"\0RES\0\0\0\x06\0\0\0\0");
        c.line().tx.try_send(stray).unwrap();
        assert!(c.release().is_none(), "an unread packet");

        let mut c = open();
        c.submit(background(b"b")).await.unwrap();
        let _other_sender = c.line().tx.clone();
        assert!(c.release().is_none(), "someone else holds a sender");

        let mut c = open();
        c.submit(background(b"c")).await.unwrap();
        c.line().kill.cancel();
        assert!(c.release().is_none(), "killed by the engine");
        assert_eq!(
            e.totals().connections,
            0,
            "each was disconnected all the same"
        );
    }
}
