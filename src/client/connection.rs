//! One Gearman connection: the socket, a [`PacketReader`] and a write buffer.
//!
//! Requests are queued with [`Connection::put`] and written by [`Connection::flush`], so a
//! caller can pipeline as many as it likes into one write; [`Connection::send`] is put + flush
//! for one request. Replies come back in order with [`Connection::recv`]
//! (or [`Connection::try_recv`] for what is already buffered). Nothing here interprets replies:
//! the request methods in the sibling files do.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, ToSocketAddrs};

use super::{ClientError, PacketReader};
use crate::codec::{put_packet, Packet, PacketType, MAGIC_REQ};

/// A client (or worker) connection to a Gearman server (see the module doc).
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    reader: PacketReader,
    wbuf: BytesMut,
}

impl Connection {
    /// Connects with TCP_NODELAY: requests are coalesced by the write buffer, not by Nagle.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Connection, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        Connection::from_stream(stream)
    }

    /// Wraps a socket connected by the caller (e.g. one with a small receive buffer).
    pub fn from_stream(stream: TcpStream) -> Result<Connection, ClientError> {
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            reader: PacketReader::default(),
            wbuf: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// The server's address.
    pub fn peer_addr(&self) -> Result<SocketAddr, ClientError> {
        Ok(self.stream.peer_addr()?)
    }

    /// Queues a `\0REQ` packet; nothing is written before [`flush`](Connection::flush).
    pub fn put(&mut self, kind: PacketType, args: &[&[u8]]) {
        put_packet(&mut self.wbuf, MAGIC_REQ, kind, args);
    }

    /// Queues bytes as they are (odd packets, admin lines).
    pub fn put_raw(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// Writes everything queued, in one write when the socket takes it.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Queues one request and writes everything queued.
    pub async fn send(&mut self, kind: PacketType, args: &[&[u8]]) -> Result<(), ClientError> {
        self.put(kind, args);
        self.flush().await
    }

    /// Writes bytes as they are, after anything queued.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.put_raw(bytes);
        self.flush().await
    }

    /// The next packet from the server; cancel-safe.
    pub async fn recv(&mut self) -> Result<Packet, ClientError> {
        self.reader.read_packet(&mut self.stream).await
    }

    /// A packet already read and buffered, without waiting for the socket.
    pub fn try_recv(&mut self) -> Result<Option<Packet>, ClientError> {
        self.reader.try_packet()
    }

    /// The next packet that is not a NOOP (a wake-up a sleeping worker may get at any time).
    pub(crate) async fn recv_skipping_noop(&mut self) -> Result<Packet, ClientError> {
        loop {
            let p = self.recv().await?;
            if p.kind != PacketType::NOOP {
                return Ok(p);
            }
        }
    }

    /// Reads an admin answer (see [`PacketReader::read_admin`]).
    pub(crate) async fn read_admin(&mut self, listing: bool) -> Result<String, ClientError> {
        self.reader.read_admin(&mut self.stream, listing).await
    }

    /// Closes the write side (the server sees EOF after what was sent).
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        self.flush().await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}
