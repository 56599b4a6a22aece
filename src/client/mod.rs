//! A small Gearman client over tokio: the one the server's own tools (`gearhouse recover
//! --from-node`), the integration tests and the load generator speak the protocol with.
//!
//! It reuses the server's framing ([`crate::codec`]: the same decoder with its size limits, the
//! same `put_packet` encoder) and packet types, so there is exactly one encoder and one decoder
//! of the wire format in the crate. The layers:
//! - [`PacketReader`]: a read buffer and the codec; reads packets and admin answers from any
//!   `AsyncRead`. Tests that keep the raw socket in their own hands use it alone.
//! - [`Connection`]: a socket, a `PacketReader` and a write buffer that is flushed explicitly.
//!   `put` queues a request, `flush` writes everything queued in one syscall, `recv` reads one
//!   reply: pipelining (many requests before any reply) is how the load generator drives
//!   ~1M submits/s, and the convenience methods are built on the same three calls.
//! - Convenience requests, each a short `impl Connection` block: [`submit`](Connection::submit),
//!   [`submit_background`](Connection::submit_background), status and echo (`requests.rs`),
//!   the worker side (`worker.rs`) and the admin text protocol (`admin.rs`).
//!
//! A request that the server refuses is [`ClientError::Server`] with the server's code and text;
//! anything that breaks the connection's framing or the protocol's order is
//! [`ClientError::Protocol`] and the connection should be dropped.

mod admin;
mod connection;
mod reader;
mod requests;
mod worker;

use std::time::Duration;

use bytes::Bytes;

pub use admin::is_listing;
pub use connection::Connection;
pub use reader::PacketReader;
pub use requests::{Job, JobOutcome, JobStatus, UniqueStatus, WorkEvent};
pub use worker::Assignment;

/// Default limits for what a client accepts from a server: 64 MiB packets, 1 MiB admin lines.
/// Larger than the server's own defaults, so the client never refuses what a server sends.
pub const MAX_PACKET: usize = 64 << 20;
/// See [`MAX_PACKET`].
pub const MAX_LINE: usize = 1 << 20;

/// Why a client call did not get the answer it asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed (connect, read or write).
    #[error("i/o with the Gearman server: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection before the answer arrived.
    #[error("the Gearman server closed the connection")]
    Closed,
    /// The server answered `ERROR code text`.
    #[error("the Gearman server refused the request: {code} {text}")]
    Server { code: String, text: String },
    /// The server sent something this client cannot frame or did not expect at this point.
    #[error("protocol violation by the Gearman server: {0}")]
    Protocol(String),
    /// The caller asked for something the protocol cannot express.
    #[error("the Gearman protocol has no request for {0}")]
    Unsupported(&'static str),
    /// No answer within the deadline the caller gave.
    #[error("no answer from the Gearman server within {} ms", .0.as_millis())]
    Timeout(Duration),
}

impl ClientError {
    /// `ERROR code text` as sent by the server.
    pub(crate) fn server(body: &Bytes) -> ClientError {
        let (code, text) = match body.iter().position(|&b| b == 0) {
            Some(i) => (&body[..i], &body[i + 1..]),
            None => (&body[..], &b""[..]),
        };
        ClientError::Server {
            code: String::from_utf8_lossy(code).into_owned(),
            text: String::from_utf8_lossy(text).into_owned(),
        }
    }

    /// True when the connection can still be used (the server refused one request only).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Server { .. })
    }
}

/// Lets tools whose own error type is `io::Error` (the load generator) use `?` on client calls.
impl From<ClientError> for std::io::Error {
    fn from(e: ClientError) -> std::io::Error {
        match e {
            ClientError::Io(e) => e,
            ClientError::Closed => std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e),
            ClientError::Timeout(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, e),
            other => std::io::Error::other(other),
        }
    }
}

/// Runs `fut` with a deadline of `t`, turning the elapsed deadline into [`ClientError::Timeout`].
pub async fn with_timeout<T>(
    t: Duration,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(t, fut)
        .await
        .map_err(|_| ClientError::Timeout(t))?
}

/// The first argument of a packet body (the handle of WORK_*, JOB_ASSIGN*, ...).
pub fn first_arg(body: &Bytes) -> Bytes {
    match body.iter().position(|&b| b == 0) {
        Some(p) => body.slice(..p),
        None => body.clone(),
    }
}

/// The argument at index `n` of a packet body, running to the end of the body (the data of a
/// packet with `n + 1` arguments). Empty when the body has fewer than `n` separators.
pub fn arg_from(body: &Bytes, n: usize) -> Bytes {
    let mut start = 0;
    for _ in 0..n {
        match body[start..].iter().position(|&b| b == 0) {
            Some(p) => start += p + 1,
            None => return Bytes::new(),
        }
    }
    body.slice(start..)
}

/// Splits a body into exactly `n` arguments (the last runs to the end), or explains the mismatch.
pub(crate) fn args(
    kind: crate::codec::PacketType,
    body: &Bytes,
    n: usize,
) -> Result<Vec<Bytes>, ClientError> {
    crate::codec::split_args(body, n).ok_or_else(|| {
        ClientError::Protocol(format!(
            "{} with fewer than {n} NUL-separated arguments",
            kind.name()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_helpers_keep_nuls_in_the_data() {
        let body = Bytes::from_static(b"H:x:1\0f\0da\0ta");
        assert_eq!(&first_arg(&body)[..], b"H:x:1");
        assert_eq!(&arg_from(&body, 2)[..], b"da\0ta");
        assert!(arg_from(&Bytes::from_static(b"a"), 2).is_empty());
    }

    #[test]
    fn server_errors_split_code_and_text() {
        let e = ClientError::server(&Bytes::from_static(b"JOB_NOT_FOUND\0no such job"));
        assert!(
            matches!(&e, ClientError::Server { code, text } if code == "JOB_NOT_FOUND" && text == "no such job")
        );
        assert!(e.is_refusal());
        assert!(!ClientError::Closed.is_refusal());
    }
}
