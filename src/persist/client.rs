//! A small memcached client for what the mirror needs: pipelined meta commands (`ms`, `md`,
//! `mg`) whose replies are read in order, so every write is acknowledged by memcached and each
//! reply is matched to its request by position, plus `stats` and `add` for probing and locks.
//!
//! A connection is a plain `TcpStream`. A request and its replies form one exchange, written
//! and read concurrently (a long pipeline cannot deadlock on full socket buffers) under one
//! deadline. Any error or timeout leaves the connection out of step with the server: the
//! caller must throw it away (every method takes `self` by `&mut` and the pool drops a
//! connection whose exchange failed).

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why an exchange with a memcached node failed. The connection is unusable afterwards.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("did not answer within {0} ms")]
    Timeout(u64),
    #[error("connection error: {0}")]
    Io(String),
    #[error("closed the connection")]
    Closed,
    #[error("sent a reply gearhouse does not understand: {0:?}")]
    Protocol(String),
}

/// One reply line (and value) from memcached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `HD`: stored / deleted.
    Stored,
    /// `NS`: not stored (an `add` of an existing key).
    NotStored,
    /// `EX`: compare-and-swap mismatch.
    Exists,
    /// `NF`: not found (delete of a missing key).
    NotFound,
    /// `EN`: miss (mg).
    Miss,
    /// `VA <len>`: a value.
    Value(Bytes),
    /// `MN`: the no-op that ends a pipeline.
    NoOp,
    /// `SERVER_ERROR <text>`.
    ServerError(String),
    /// `CLIENT_ERROR <text>` or `ERROR`.
    ClientError(String),
}

/// Appends `ms <key> <len> T0\r\n<value>\r\n` (store, no expiry, reply expected).
pub fn put_set(buf: &mut BytesMut, key: &[u8], value: &[u8]) {
    put_store(buf, key, value, 0, false);
}

/// Appends `ms <key> <len> T0 ME\r\n<value>\r\n`: store only if the key does not exist (add).
pub fn put_add(buf: &mut BytesMut, key: &[u8], value: &[u8]) {
    put_store(buf, key, value, 0, true);
}

/// Appends `ms <key> <len> T<ttl_s>[ ME]\r\n<value>\r\n`: a store (or, with `add`, a store
/// only if the key does not exist) that memcached expires after `ttl_s` seconds (0 = never).
pub fn put_store(buf: &mut BytesMut, key: &[u8], value: &[u8], ttl_s: u32, add: bool) {
    buf.reserve(key.len() + value.len() + 40);
    buf.extend_from_slice(b"ms ");
    buf.extend_from_slice(key);
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(itoa::Buffer::new().format(value.len()).as_bytes());
    buf.extend_from_slice(b" T");
    buf.extend_from_slice(itoa::Buffer::new().format(ttl_s).as_bytes());
    if add {
        buf.extend_from_slice(b" ME");
    }
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `md <key>\r\n` (reply expected: HD or NF).
pub fn put_delete(buf: &mut BytesMut, key: &[u8]) {
    buf.extend_from_slice(b"md ");
    buf.extend_from_slice(key);
    buf.extend_from_slice(b"\r\n");
}

/// Appends `md <key> q\r\n`: a quiet delete, answered only when it fails.
pub fn put_quiet_delete(buf: &mut BytesMut, key: &[u8]) {
    buf.extend_from_slice(b"md ");
    buf.extend_from_slice(key);
    buf.extend_from_slice(b" q\r\n");
}

/// Appends `mn\r\n`, answered `MN` after everything before it.
pub fn put_noop(buf: &mut BytesMut) {
    buf.extend_from_slice(b"mn\r\n");
}

/// Appends `mg <key> v\r\n` (reply: VA or EN).
pub fn put_get(buf: &mut BytesMut, key: &[u8]) {
    buf.extend_from_slice(b"mg ");
    buf.extend_from_slice(key);
    buf.extend_from_slice(b" v\r\n");
}

/// A key memcached accepts: 1 to 250 bytes, no spaces or control characters.
pub fn is_valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= 250 && key.iter().all(|&b| b > b' ' && b != 0x7f)
}

/// One connection to one memcached node.
pub struct Connection {
    stream: TcpStream,
    rbuf: BytesMut,
}

impl Connection {
    /// Connects within `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Connection, ClientError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ClientError::Connect(e.to_string())),
            Err(_) => {
                return Err(ClientError::Connect(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// Sends `request` (a pipeline of commands) and reads `replies` replies in order, all
    /// within `timeout`. Replies are handed to `on_reply` as they are parsed (index, reply).
    pub async fn exchange(
        &mut self,
        request: &[u8],
        replies: usize,
        timeout: Duration,
        on_reply: impl FnMut(usize, Reply),
    ) -> Result<(), ClientError> {
        self.exchange_then_noop(request, replies, false, timeout, on_reply)
            .await
    }

    /// As [`Connection::exchange`]; with `until_noop`, keeps reading after the `replies`
    /// counted replies until `MN` (quiet commands at the end of the pipeline answer only when
    /// they fail; those error lines and the final `MN` go to `on_reply` too).
    pub async fn exchange_then_noop(
        &mut self,
        request: &[u8],
        replies: usize,
        until_noop: bool,
        timeout: Duration,
        mut on_reply: impl FnMut(usize, Reply),
    ) -> Result<(), ClientError> {
        let ms = timeout.as_millis() as u64;
        let (mut rd, mut wr) = self.stream.split();
        let rbuf = &mut self.rbuf;
        let work = async {
            let write = async {
                wr.write_all(request)
                    .await
                    .map_err(|e| ClientError::Io(e.to_string()))
            };
            let read = async {
                let mut n = 0;
                let mut done = replies == 0 && !until_noop;
                while !done {
                    match parse_reply(rbuf)? {
                        Some(r) => {
                            let noop = r == Reply::NoOp;
                            on_reply(n, r);
                            n += 1;
                            done = if until_noop {
                                n > replies && noop
                            } else {
                                n >= replies
                            };
                        }
                        None => {
                            if rbuf.capacity() - rbuf.len() < 16 * 1024 {
                                rbuf.reserve(64 * 1024);
                            }
                            let got = rd
                                .read_buf(rbuf)
                                .await
                                .map_err(|e| ClientError::Io(e.to_string()))?;
                            if got == 0 {
                                return Err(ClientError::Closed);
                            }
                        }
                    }
                }
                Ok(())
            };
            let (w, r) = tokio::join!(write, read);
            w.and(r)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(ms)),
        }
    }

    /// Runs `stats` (or `stats <group>` such as `settings`) and returns its name/value pairs.
    pub async fn stats(
        &mut self,
        group: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<(String, String)>, ClientError> {
        let cmd = match group {
            Some(g) => format!("stats {g}\r\n"),
            None => "stats\r\n".to_string(),
        };
        let ms = timeout.as_millis() as u64;
        let work = async {
            self.stream
                .write_all(cmd.as_bytes())
                .await
                .map_err(|e| ClientError::Io(e.to_string()))?;
            let mut out = Vec::new();
            loop {
                if let Some(pos) = self.rbuf.windows(2).position(|w| w == b"\r\n") {
                    let line = self.rbuf.split_to(pos + 2);
                    let line = String::from_utf8_lossy(&line[..pos]).into_owned();
                    if line == "END" {
                        return Ok(out);
                    }
                    let mut parts = line.splitn(3, ' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some("STAT"), Some(k), v) => {
                            out.push((k.to_string(), v.unwrap_or("").to_string()))
                        }
                        _ => return Err(ClientError::Protocol(line)),
                    }
                    continue;
                }
                let got = self
                    .stream
                    .read_buf(&mut self.rbuf)
                    .await
                    .map_err(|e| ClientError::Io(e.to_string()))?;
                if got == 0 {
                    return Err(ClientError::Closed);
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(ms)),
        }
    }
}

/// Largest value a reply may announce: memcached's own item size ceiling (`-I` at most 1 GiB) is
/// far above anything gearhouse stores (a job is at most `server.max_packet_size` plus its
/// header), so 256 MiB rejects nonsense without refusing real data.
pub const MAX_VALUE: usize = 256 << 20;

/// Parses one reply from the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_reply(buf: &mut BytesMut) -> Result<Option<Reply>, ClientError> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > 8192 {
            return Err(ClientError::Protocol(
                String::from_utf8_lossy(&buf[..64]).into_owned(),
            ));
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    let word_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let reply = match &line[..word_end] {
        b"HD" => Reply::Stored,
        b"NS" => Reply::NotStored,
        b"EX" => Reply::Exists,
        b"NF" => Reply::NotFound,
        b"EN" => Reply::Miss,
        b"MN" => Reply::NoOp,
        b"VA" => {
            let rest = &line[word_end..];
            let len_str = rest
                .split(|&b| b == b' ')
                .find(|s| !s.is_empty())
                .unwrap_or(b"");
            let len: usize = std::str::from_utf8(len_str)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ClientError::Protocol(String::from_utf8_lossy(line).into_owned()))?;
            if len > MAX_VALUE {
                return Err(ClientError::Protocol(format!(
                    "a value of {len} bytes (more than the {MAX_VALUE} gearhouse reads)"
                )));
            }
            let total = eol + 2 + len + 2;
            if buf.len() < total {
                // Not reserved from the announced length: the buffer grows with the bytes that
                // actually arrive, so a lying length cannot size an allocation.
                return Ok(None);
            }
            buf.advance(eol + 2);
            let value = buf.split_to(len).freeze();
            if &buf[..2] != b"\r\n" {
                return Err(ClientError::Protocol("value not followed by CRLF".into()));
            }
            buf.advance(2);
            return Ok(Some(Reply::Value(value)));
        }
        b"SERVER_ERROR" => Reply::ServerError(text_after(line, word_end)),
        b"CLIENT_ERROR" => Reply::ClientError(text_after(line, word_end)),
        b"ERROR" => Reply::ClientError("unknown command".into()),
        _ => {
            return Err(ClientError::Protocol(
                String::from_utf8_lossy(line).into_owned(),
            ))
        }
    };
    buf.advance(eol + 2);
    Ok(Some(reply))
}

fn text_after(line: &[u8], at: usize) -> String {
    String::from_utf8_lossy(line.get(at + 1..).unwrap_or(b"")).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Vec<Reply> {
        let mut b = BytesMut::from(bytes);
        let mut v = Vec::new();
        while let Some(r) = parse_reply(&mut b).unwrap() {
            v.push(r);
        }
        assert!(b.is_empty(), "left over: {b:?}");
        v
    }

    #[test]
    fn parses_the_replies_memcached_sends_in_order() {
        let v = parse_all(
            b"HD\r\nSERVER_ERROR object too large for cache\r\nNF\r\nVA 2 k1\r\nhi\r\nEN\r\nNS\r\nMN\r\n",
        );
        assert_eq!(
            v,
            vec![
                Reply::Stored,
                Reply::ServerError("object too large for cache".into()),
                Reply::NotFound,
                Reply::Value(Bytes::from_static(b"hi")),
                Reply::Miss,
                Reply::NotStored,
                Reply::NoOp,
            ]
        );
    }

    #[test]
    fn a_value_split_across_reads_waits_for_its_bytes() {
        let full = b"VA 5\r\nab\r\nc\r\nHD\r\n";
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            let first = parse_reply(&mut b).unwrap();
            if cut < 13 {
                assert_eq!(first, None, "cut {cut}");
            }
            b.extend_from_slice(&full[cut..]);
            let mut got = Vec::new();
            if let Some(r) = first {
                got.push(r);
            }
            while let Some(r) = parse_reply(&mut b).unwrap() {
                got.push(r);
            }
            assert_eq!(
                got,
                vec![Reply::Value(Bytes::from_static(b"ab\r\nc")), Reply::Stored]
            );
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let mut b = BytesMut::from(&b"WAT\r\n"[..]);
        assert!(parse_reply(&mut b).is_err());
    }

    #[test]
    fn keys_are_checked() {
        assert!(is_valid_key(b"gearhouse:n1:j:1"));
        assert!(!is_valid_key(b"has space"));
        assert!(!is_valid_key(b""));
        assert!(!is_valid_key(&[b'a'; 251]));
    }
}
