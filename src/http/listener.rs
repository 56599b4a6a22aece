//! The HTTP listener's bound on open connections (`http.max_connections`), as
//! `server.max_connections` bounds the Gearman port's: every kept-alive connection holds hyper's
//! buffers and, after a job request, possibly an engine connection, so a peer that opens
//! connections and keeps them must meet a limit.
//!
//! A connection beyond the bound is accepted and closed at once (counted in
//! `gearhouse_http_connections_refused_total`), rather than left in the kernel's backlog where
//! it would wait without an answer. The count of open connections is the gauge
//! `gearhouse_http_connections`. The place of a connection is held by its stream ([`Counted`]),
//! so it is given back whenever hyper drops the connection, however it ends.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::serve::Listener;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::slot::{self, Slot};

/// A TCP listener that hands out at most `max` open connections, with `TCP_NODELAY` set
/// (answers are written whole, but a pipelining client, or a kept-alive one whose ACK is
/// delayed, would otherwise wait for Nagle's timer behind a small write).
pub struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    open: IntGauge,
    refused: IntCounter,
}

impl Bounded {
    /// Bounds `inner` to `max` open connections; the metrics go on `registry` (when they are
    /// already there, as in tests that start several listeners, the new ones stay unexported).
    pub fn new(inner: TcpListener, max: usize, registry: &Registry) -> Bounded {
        let open = IntGauge::new(
            "gearhouse_http_connections",
            "Open connections on the HTTP listener (at most http.max_connections)",
        )
        .expect("valid metric");
        let refused = IntCounter::new(
            "gearhouse_http_connections_refused_total",
            "HTTP connections closed at once because http.max_connections were open",
        )
        .expect("valid metric");
        for m in [
            Box::new(open.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(refused.clone()),
        ] {
            if let Err(e) = registry.register(m) {
                tracing::warn!(error = %e, "HTTP listener metrics already registered; these are not exported");
            }
        }
        Bounded {
            inner,
            slots: slot::places(max),
            max,
            open,
            refused,
        }
    }
}

impl Listener for Bounded {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        loop {
            // axum's own accept: it logs and retries accept errors (a descriptor limit waits 1 s).
            let (stream, peer) = Listener::accept(&mut self.inner).await;
            match Slot::take(&self.slots, &self.open) {
                Some(slot) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        Counted {
                            stream,
                            _slot: slot,
                        },
                        peer,
                    );
                }
                None => {
                    self.refused.inc();
                    tracing::debug!(%peer, max = self.max, "closing HTTP connection: http.max_connections are open");
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection holding its place among the `http.max_connections`.
pub struct Counted {
    stream: TcpStream,
    _slot: Slot,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
