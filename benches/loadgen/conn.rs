//! The load generator's Gearman connection, over plain TCP or TLS (`--tls-ca`): one type for
//! both, so the clients and workers in `clients.rs` and `workers.rs` run the same code whichever
//! listener they measure, and a TLS-vs-plain comparison differs only in the transport.
//!
//! It is `gearhouse::client`'s pieces over a boxed stream: the crate's [`PacketReader`] (the
//! server's own decoder with its limits) and `put_packet` encoder, and the same discipline as
//! `gearhouse::client::Connection` (`put` queues, one `flush` writes everything queued, `recv`
//! reads in order). That `Connection` owns a `TcpStream`, so it cannot carry a TLS session;
//! boxing the stream here costs one indirect call per read or write, the same for both
//! transports.
//!
//! TLS is rustls with ring through tokio-rustls, as in the server, its PEM files read by the
//! server's own `gearhouse::tls::{certs, key}`: the server's certificate must
//! chain to `--tls-ca` and name `--tls-server-name` (default `--host`); `--tls-cert`/`--tls-key`
//! present a client certificate (for a server with `server.tls_client_ca`).

use std::fmt;
use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use gearhouse::client::PacketReader;
use gearhouse::codec::{put_packet, Packet, PacketType, MAGIC_REQ};
use gearhouse::tls;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::Args;

/// Any byte stream a connection can run over (a `TcpStream` or a TLS session on one).
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Why the TLS options could not be turned into a client configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file named by a flag (the server's own PEM reading, errors naming the flag).
    #[error(transparent)]
    File(#[from] gearhouse::tls::TlsError),
    #[error("--tls-cert and --tls-key go together (both or neither)")]
    HalfClientCert,
    #[error("--tls-cert, --tls-key and --tls-server-name need --tls-ca (the CA the server's certificate chains to)")]
    NoCa,
    #[error("--tls-server-name {0:?} is not a DNS name or an IP address")]
    ServerName(String),
    #[error("TLS client configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// How to reach the server: TLS settings when `--tls-ca` is given (shared by every connection
/// of the run; built once, before any clock starts).
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish()
    }
}

impl Tls {
    /// The TLS settings the command line asks for; `None` for plain TCP.
    pub fn from_args(args: &Args) -> Result<Option<Tls>, TlsSetupError> {
        let Some(ca) = &args.tls_ca else {
            return if args.tls_cert.is_some() || args.tls_server_name.is_some() {
                Err(TlsSetupError::NoCa)
            } else {
                Ok(None)
            };
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in tls::certs("--tls-ca", ca)? {
            roots.add(c)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let cfg = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => builder.with_client_auth_cert(
                tls::certs("--tls-cert", cert)?,
                tls::key("--tls-key", key)?,
            )?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsSetupError::HalfClientCert),
        };
        let name = args.tls_server_name.as_deref().unwrap_or(&args.host);
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| TlsSetupError::ServerName(name.to_string()))?;
        Ok(Some(Tls {
            connector: TlsConnector::from(Arc::new(cfg)),
            name,
        }))
    }
}

/// One Gearman connection of the load generator (see the module doc).
pub struct Conn {
    stream: Box<dyn Stream>,
    reader: PacketReader,
    wbuf: BytesMut,
}

impl Conn {
    /// Connects to `--host`/`--port` with TCP_NODELAY (requests are coalesced by the write
    /// buffer, not by Nagle) and, with `--tls-ca`, completes the TLS handshake.
    pub async fn connect(args: &Args) -> io::Result<Conn> {
        let addr = format!("{}:{}", args.host, args.port);
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("connect to {addr}: {e}")))?;
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Stream> = match &args.tls {
            None => Box::new(tcp),
            Some(tls) => Box::new(tls.connector.connect(tls.name.clone(), tcp).await.map_err(
                |e| {
                    io::Error::new(
                        e.kind(),
                        format!("TLS handshake with {addr}: {e} (--tls-ca, --tls-server-name)"),
                    )
                },
            )?),
        };
        Ok(Conn {
            stream,
            reader: PacketReader::default(),
            wbuf: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// Queues a `\0REQ` packet; nothing is written before [`flush`](Conn::flush).
    pub fn put(&mut self, kind: PacketType, args: &[&[u8]]) {
        put_packet(&mut self.wbuf, MAGIC_REQ, kind, args);
    }

    /// Writes everything queued: one write call, so over TLS one batch of records.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            // A TLS stream holds what it encrypted until flushed; TCP's flush does nothing.
            self.stream.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// The next packet from the server; cancel-safe (workers select on it).
    pub async fn recv(&mut self) -> io::Result<Packet> {
        Ok(self.reader.read_packet(&mut self.stream).await?)
    }

    /// A packet already read and buffered, without waiting for the socket.
    pub fn try_recv(&mut self) -> io::Result<Option<Packet>> {
        Ok(self.reader.try_packet()?)
    }

    /// Queue depth (TOTAL, running included) of `function` from the admin `status` listing.
    pub async fn queue_depth(&mut self, function: &str) -> io::Result<u64> {
        self.wbuf.extend_from_slice(b"status\r\n");
        self.flush().await?;
        let text = self.reader.read_admin(&mut self.stream, true).await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(f, _)| *f == function)
            .and_then(|(_, rest)| rest.split('\t').next()?.parse().ok())
            .unwrap_or(0))
    }
}
