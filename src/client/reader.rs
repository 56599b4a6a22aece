//! The read half of a client: a buffer decoded with the server's own [`GearmanCodec`], reading
//! from any `AsyncRead`. It does not own the socket, so a test can keep its raw `TcpStream` (to
//! write odd bytes or read what the server sends unframed) and still read packets through it.
//!
//! Every read is cancel-safe: bytes already read stay in the buffer, so a `select!` or a
//! `timeout` around [`PacketReader::read_packet`] loses nothing.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::Decoder;

use super::ClientError;
use crate::codec::{Frame, GearmanCodec, Magic, Packet};

/// A read buffer and the frame decoder (see the module doc).
#[derive(Debug)]
pub struct PacketReader {
    buf: BytesMut,
    codec: GearmanCodec,
}

impl Default for PacketReader {
    fn default() -> Self {
        PacketReader::new(super::MAX_PACKET, super::MAX_LINE)
    }
}

impl PacketReader {
    /// A reader refusing packets over `max_packet` bytes and text lines over `max_line` bytes.
    pub fn new(max_packet: usize, max_line: usize) -> Self {
        PacketReader {
            buf: BytesMut::with_capacity(64 * 1024),
            codec: GearmanCodec::new(max_packet, max_line),
        }
    }

    /// A packet already in the buffer, if a whole one is there; never reads.
    pub fn try_packet(&mut self) -> Result<Option<Packet>, ClientError> {
        match self.codec.decode(&mut self.buf) {
            Ok(Some(Frame::Packet(p))) if p.magic == Magic::Res => Ok(Some(p)),
            Ok(Some(Frame::Packet(p))) => Err(ClientError::Protocol(format!(
                "{} with \\0REQ magic: servers answer with \\0RES",
                p.kind.name()
            ))),
            Ok(Some(Frame::Admin(l))) => Err(ClientError::Protocol(format!(
                "text {:?} where a packet was expected",
                String::from_utf8_lossy(&l)
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    /// The next packet, reading from `r` as needed.
    pub async fn read_packet<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Packet, ClientError> {
        loop {
            if let Some(p) = self.try_packet()? {
                return Ok(p);
            }
            self.fill(r).await?;
        }
    }

    /// The answer to an admin command, as text with its line ends: up to and including a line
    /// `.` when `listing`, else one line. An `ERR ...` line ends a listing too (it is the
    /// server's refusal). Text only: call it when no packet reply is pending.
    pub async fn read_admin<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        listing: bool,
    ) -> Result<String, ClientError> {
        let mut scanned = 0;
        loop {
            let mut end = None;
            while let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let line_start = scanned;
                scanned += pos + 1;
                let line = &self.buf[line_start..scanned];
                let line = line.strip_suffix(b"\n").unwrap_or(line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !listing || line == b"." || (line_start == 0 && line.starts_with(b"ERR")) {
                    end = Some(scanned);
                    break;
                }
            }
            if let Some(end) = end {
                let text = self.buf.split_to(end);
                return Ok(String::from_utf8_lossy(&text).into_owned());
            }
            self.fill(r).await?;
        }
    }

    /// Bytes read but not yet decoded.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<(), ClientError> {
        if r.read_buf(&mut self.buf).await? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{put_response, PacketType};

    #[tokio::test]
    async fn reads_packets_split_anywhere_and_admin_listings() {
        let mut wire = BytesMut::new();
        put_response(&mut wire, PacketType::JOB_CREATED, &[b"H:x:1"]);
        wire.extend_from_slice(b"f\t1\t0\t0\r\n.\n");
        wire.extend_from_slice(b"OK\n");
        let (mut a, mut b) = tokio::io::duplex(4);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in wire.chunks(3) {
                a.write_all(chunk).await.unwrap();
            }
        });
        let mut r = PacketReader::default();
        let p = r.read_packet(&mut b).await.unwrap();
        assert_eq!(
            (p.kind, &p.body[..]),
            (PacketType::JOB_CREATED, &b"H:x:1"[..])
        );
        assert_eq!(
            r.read_admin(&mut b, true).await.unwrap(),
            "f\t1\t0\t0\r\n.\n"
        );
        assert_eq!(r.read_admin(&mut b, false).await.unwrap(), "OK\n");
        writer.await.unwrap();
        assert!(matches!(
            r.read_packet(&mut b).await,
            Err(ClientError::Closed)
        ));
    }

    #[tokio::test]
    async fn request_magic_from_a_server_is_a_protocol_violation() {
        let mut wire = BytesMut::new();
        crate::codec::put_packet(&mut wire, crate::codec::MAGIC_REQ, PacketType::NOOP, &[]);
        let mut r = PacketReader::default();
        let mut src = &wire[..];
        assert!(matches!(
            r.read_packet(&mut src).await,
            Err(ClientError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn an_err_line_ends_a_listing() {
        let mut r = PacketReader::default();
        let mut src = &b"ERR UNKNOWN_COMMAND Unknown+server+command\n"[..];
        let text = r.read_admin(&mut src, true).await.unwrap();
        assert!(text.starts_with("ERR UNKNOWN_COMMAND"), "{text}");
    }
}
