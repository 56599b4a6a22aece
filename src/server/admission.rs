//! Who gets in and what they may ask, before a request reaches the engine: the TLS handshake and
//! the identity it gives (access rules), refusals while start-up recovery runs, refusals the
//! access rules make, and refusals while a graceful shutdown drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::ServerConfig;
use crate::access::Permissions;
use crate::codec::{put_response, PacketType};
use crate::engine::{put_error, Engine};
use crate::protocol::{ErrorCode, ProtocolError, Request};

/// Runs a TLS handshake within `server.tls_handshake_timeout_ms`, and decides what the peer may
/// do from its certificate's common name (or its address, without a certificate). `None` when
/// the handshake failed (logged and counted).
pub(super) async fn handshake(
    tls: &crate::tls::Tls,
    stream: TcpStream,
    peer: SocketAddr,
    engine: &Engine,
    cfg: &ServerConfig,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Arc<Permissions>)> {
    let metrics = engine.metrics();
    let accept = tls.acceptor().accept(stream);
    let stream = match tokio::time::timeout(cfg.tls_handshake_timeout, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.tls_handshakes.with_label_values(&["failed"]).inc();
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            metrics.tls_handshakes.with_label_values(&["timeout"]).inc();
            tracing::info!(%peer, "TLS handshake not completed within server.tls_handshake_timeout_ms");
            return None;
        }
    };
    metrics.tls_handshakes.with_label_values(&["ok"]).inc();
    let cn = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::tls::common_name);
    let perms = cfg.access.permissions(cn.as_deref(), peer.ip());
    tracing::debug!(%peer, identity = cn.as_deref().unwrap_or("-"), rule = %perms.rule, "TLS connection");
    Some((stream, perms))
}

/// Most connections answered at once while the queue is being recovered; more wait in the
/// listen backlog until one of these finishes.
const MAX_REFUSING: usize = 256;

/// Answers every connection on `listener` with a refusal until the future is dropped: used
/// while start-up recovery reads the queue back from memcached, so clients are told at once
/// (and libgearman fails over to its next server) instead of hanging in the listen backlog.
/// A binary request gets `ERROR QUEUE_ERROR`, an admin line `ERR RECOVERING`; then the
/// connection closes. Each answer waits at most 2 s for the peer's first byte.
pub async fn refuse_while_recovering(
    listener: &TcpListener,
    engine: &Engine,
) -> std::convert::Infallible {
    let slots = Arc::new(Semaphore::new(MAX_REFUSING));
    let metrics = engine.metrics().clone();
    loop {
        // The semaphore is never closed.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            continue;
        };
        let Ok((mut stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        metrics.connections_refused.inc();
        tracing::debug!(%peer, "refusing connection: the queue is still being recovered");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut first = [0u8; 1];
            let read = stream.read(&mut first);
            let binary = match tokio::time::timeout(Duration::from_secs(2), read).await {
                Ok(Ok(1)) => first[0] == 0,
                _ => true,
            };
            let mut out = BytesMut::new();
            if binary {
                put_error(
                    &mut out,
                    &ProtocolError::new(
                        ErrorCode::QueueError,
                        "gearhouse is recovering its queue from memcached: retry shortly or use another server",
                    ),
                );
            } else {
                out.extend_from_slice(
                    b"ERR RECOVERING gearhouse+is+recovering+its+queue+from+memcached\r\n",
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&out)).await;
            let _ = stream.shutdown().await;
            // Read what the peer already sent before closing: closing with unread bytes
            // resets the connection, and the reset can destroy the answer in flight.
            let mut sink = [0u8; 4096];
            let drain = async {
                let mut left: usize = 64 * 1024;
                while left > 0 {
                    match stream.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            drop(permit);
        });
    }
}

/// Refuses a submit or CAN_DO the access rules do not allow, with `ERROR PERMISSION_DENIED`
/// naming the function and the rule. Returns whether `req` was answered here.
pub(super) fn refuse_by_access(
    req: &Request,
    perms: &Permissions,
    engine: &Engine,
    out: &mut BytesMut,
) -> bool {
    let (action, function) = match req {
        Request::Submit(s) if !perms.may_submit(&s.function) => ("submit", &s.function),
        Request::CanDo { function, .. } if !perms.may_register(function) => ("register", function),
        _ => return false,
    };
    engine
        .metrics()
        .access_denied
        .with_label_values(&[action])
        .inc();
    put_error(
        out,
        &ProtocolError::new(
            ErrorCode::PermissionDenied,
            format!(
                "{action} {:?} is not allowed for this connection ({}; access.rules)",
                String::from_utf8_lossy(function),
                perms.rule
            ),
        ),
    );
    true
}

/// While a graceful shutdown drains, new jobs are refused (the client can submit to another
/// server) and workers are handed no more work; results, status and the rest go on. Returns
/// whether `req` was answered here.
pub(super) fn refuse_while_draining(req: &Request, out: &mut BytesMut) -> bool {
    match req {
        Request::Submit(_) => {
            put_error(
                out,
                &ProtocolError::new(
                    ErrorCode::QueueError,
                    "server is shutting down: submit the job to another server",
                ),
            );
            true
        }
        Request::Grab(_) => {
            put_response(out, PacketType::NO_JOB, &[]);
            true
        }
        // A sleeping worker stays asleep: a NOOP would only bring it back for NO_JOB.
        Request::PreSleep => true,
        _ => false,
    }
}
