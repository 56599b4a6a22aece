//! Bytes ↔ frames: the Gearman binary packet format and the admin text lines that share its port.
//!
//! A frame that starts with a NUL byte is a binary packet (`\0REQ`/`\0RES`, type, length, body);
//! any other first byte starts an admin text line ending in `\n`. The decoder checks every declared
//! length against the configured maximum *before* it reserves memory, and never rescans bytes it
//! has already looked at. Framing errors are fatal to the one connection that sent them; a packet
//! that frames correctly but is invalid is the protocol layer's business (it answers `ERROR`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Size of the fixed packet header: magic, type and body length.
pub const HEADER_LEN: usize = 12;
/// Magic of packets sent to the server.
pub const MAGIC_REQ: [u8; 4] = *b"\0REQ";
/// Magic of packets sent by the server.
pub const MAGIC_RES: [u8; 4] = *b"\0RES";

/// Which way a packet says it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// `\0REQ`: a request, what a server expects.
    Req,
    /// `\0RES`: a response; a server answers it with `ERROR INVALID_MAGIC`.
    Res,
}

macro_rules! packet_types {
    ($($name:ident = $num:literal),* $(,)?) => {
        /// Every packet type of the Gearman protocol, with the spec's names and numbers.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[repr(u32)]
        pub enum PacketType { $($name = $num),* }

        impl TryFrom<u32> for PacketType {
            type Error = u32;
            fn try_from(v: u32) -> Result<Self, u32> {
                match v { $($num => Ok(PacketType::$name),)* other => Err(other) }
            }
        }

        impl PacketType {
            /// The spec's name, as used in logs and metric labels.
            pub fn name(self) -> &'static str {
                match self { $(PacketType::$name => stringify!($name)),* }
            }
        }
    };
}

packet_types! {
    CAN_DO = 1, CANT_DO = 2, RESET_ABILITIES = 3, PRE_SLEEP = 4, UNUSED_5 = 5, NOOP = 6,
    SUBMIT_JOB = 7, JOB_CREATED = 8, GRAB_JOB = 9, NO_JOB = 10, JOB_ASSIGN = 11,
    WORK_STATUS = 12, WORK_COMPLETE = 13, WORK_FAIL = 14, GET_STATUS = 15, ECHO_REQ = 16,
    ECHO_RES = 17, SUBMIT_JOB_BG = 18, ERROR = 19, STATUS_RES = 20, SUBMIT_JOB_HIGH = 21,
    SET_CLIENT_ID = 22, CAN_DO_TIMEOUT = 23, ALL_YOURS = 24, WORK_EXCEPTION = 25,
    OPTION_REQ = 26, OPTION_RES = 27, WORK_DATA = 28, WORK_WARNING = 29, GRAB_JOB_UNIQ = 30,
    JOB_ASSIGN_UNIQ = 31, SUBMIT_JOB_HIGH_BG = 32, SUBMIT_JOB_LOW = 33, SUBMIT_JOB_LOW_BG = 34,
    SUBMIT_JOB_SCHED = 35, SUBMIT_JOB_EPOCH = 36, SUBMIT_REDUCE_JOB = 37,
    SUBMIT_REDUCE_JOB_BACKGROUND = 38, GRAB_JOB_ALL = 39, JOB_ASSIGN_ALL = 40,
    GET_STATUS_UNIQUE = 41, STATUS_RES_UNIQUE = 42,
}

/// One binary packet as received: its body is not yet split into arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub magic: Magic,
    pub kind: PacketType,
    pub body: Bytes,
}

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A binary packet.
    Packet(Packet),
    /// One admin text line, without its `\r\n` or `\n`.
    Admin(Bytes),
}

/// Why a connection's byte stream cannot be framed any further.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("bad magic {0:?}: not a Gearman packet")]
    BadMagic([u8; 4]),
    #[error("unknown packet type {0}")]
    UnknownType(u32),
    #[error(
        "packet body of {len} bytes exceeds the limit of {max} bytes (server.max_packet_size)"
    )]
    TooLarge { len: u64, max: usize },
    #[error("admin line longer than {max} bytes (server.max_admin_line)")]
    AdminLineTooLong { max: usize },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The Gearman error code to send before closing, when the peer deserves one.
    pub fn code(&self) -> &'static str {
        match self {
            CodecError::BadMagic(_) => "INVALID_MAGIC",
            CodecError::UnknownType(_) => "INVALID_COMMAND",
            CodecError::TooLarge { .. } | CodecError::AdminLineTooLong { .. } => {
                "ARGUMENT_TOO_LARGE"
            }
            CodecError::Io(_) => "IO",
        }
    }

    /// Short label for the `protocol errors by kind` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::BadMagic(_) => "bad_magic",
            CodecError::UnknownType(_) => "unknown_type",
            CodecError::TooLarge { .. } => "packet_too_large",
            CodecError::AdminLineTooLong { .. } => "admin_line_too_long",
            CodecError::Io(_) => "io",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Waiting for the first byte of a frame, or for a full header.
    Head,
    /// Header read; waiting for `len` body bytes.
    Body {
        magic: Magic,
        kind: PacketType,
        len: usize,
    },
    /// Inside an admin line; `scanned` bytes are known to hold no `\n`.
    Line { scanned: usize },
}

/// The Gearman frame codec, with its limits.
#[derive(Debug, Clone)]
pub struct GearmanCodec {
    max_packet: usize,
    max_line: usize,
    state: State,
}

impl GearmanCodec {
    /// A codec refusing bodies over `max_packet` bytes and admin lines over `max_line` bytes.
    pub fn new(max_packet: usize, max_line: usize) -> Self {
        GearmanCodec {
            max_packet,
            max_line,
            state: State::Head,
        }
    }

    /// True while a frame has begun but is not complete (used for the slow-sender timeout).
    pub fn is_mid_frame(&self, buf: &BytesMut) -> bool {
        !matches!(self.state, State::Head) || !buf.is_empty()
    }
}

impl Decoder for GearmanCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        loop {
            match self.state {
                State::Head => {
                    let Some(&first) = src.first() else {
                        return Ok(None);
                    };
                    if first != 0 {
                        self.state = State::Line { scanned: 0 };
                        continue;
                    }
                    if src.len() < HEADER_LEN {
                        // Reject bad magic as soon as it is visible, not after 12 bytes.
                        let seen = src.len().min(4);
                        if !MAGIC_REQ.starts_with(&src[..seen])
                            && !MAGIC_RES.starts_with(&src[..seen])
                        {
                            let mut m = [0u8; 4];
                            m[..seen].copy_from_slice(&src[..seen]);
                            return Err(CodecError::BadMagic(m));
                        }
                        return Ok(None);
                    }
                    let magic_bytes: [u8; 4] = src[0..4].try_into().expect("4 bytes");
                    let magic = match magic_bytes {
                        MAGIC_REQ => Magic::Req,
                        MAGIC_RES => Magic::Res,
                        other => return Err(CodecError::BadMagic(other)),
                    };
                    let num = u32::from_be_bytes(src[4..8].try_into().expect("4 bytes"));
                    let kind = PacketType::try_from(num).map_err(CodecError::UnknownType)?;
                    let len32 = u32::from_be_bytes(src[8..12].try_into().expect("4 bytes"));
                    let len = usize::try_from(len32).unwrap_or(usize::MAX);
                    if len > self.max_packet {
                        return Err(CodecError::TooLarge {
                            len: len32 as u64,
                            max: self.max_packet,
                        });
                    }
                    src.advance(HEADER_LEN);
                    // The length is within the limit: reserve once for the whole body.
                    src.reserve(len.saturating_sub(src.len()));
                    self.state = State::Body { magic, kind, len };
                }
                State::Body { magic, kind, len } => {
                    if src.len() < len {
                        return Ok(None);
                    }
                    let body = src.split_to(len).freeze();
                    self.state = State::Head;
                    return Ok(Some(Frame::Packet(Packet { magic, kind, body })));
                }
                State::Line { scanned } => {
                    let limit = src.len().min(self.max_line + 1);
                    if let Some(pos) = src[scanned..limit].iter().position(|&b| b == b'\n') {
                        let end = scanned + pos;
                        let mut line = src.split_to(end + 1);
                        line.truncate(end);
                        if line.last() == Some(&b'\r') {
                            line.truncate(end - 1);
                        }
                        self.state = State::Head;
                        return Ok(Some(Frame::Admin(line.freeze())));
                    }
                    if src.len() > self.max_line {
                        return Err(CodecError::AdminLineTooLong { max: self.max_line });
                    }
                    self.state = State::Line { scanned: src.len() };
                    return Ok(None);
                }
            }
        }
    }
}

/// Outbound frames are encoded by the engine (once, even when sent to many connections), so the
/// encoder only appends them.
impl Encoder<Bytes> for GearmanCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// Appends a `\0RES` packet of `kind` whose arguments are joined by NUL.
pub fn put_response(dst: &mut BytesMut, kind: PacketType, args: &[&[u8]]) {
    put_packet(dst, MAGIC_RES, kind, args)
}

/// Appends a packet with the given magic (clients and the benchmark send `\0REQ`).
pub fn put_packet(dst: &mut BytesMut, magic: [u8; 4], kind: PacketType, args: &[&[u8]]) {
    let len: usize = args.iter().map(|a| a.len()).sum::<usize>() + args.len().saturating_sub(1);
    dst.reserve(HEADER_LEN + len);
    dst.put_slice(&magic);
    dst.put_u32(kind as u32);
    dst.put_u32(u32::try_from(len).expect("packet body fits u32"));
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            dst.put_u8(0);
        }
        dst.put_slice(a);
    }
}

/// A `\0RES` packet as its own buffer, for sending to other connections.
pub fn response(kind: PacketType, args: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::new();
    put_response(&mut b, kind, args);
    b.freeze()
}

/// Splits a packet body into exactly `n` arguments; the last one runs to the end of the body.
/// Returns `None` when the body holds fewer than `n - 1` separators.
pub fn split_args(body: &Bytes, n: usize) -> Option<Vec<Bytes>> {
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for _ in 1..n {
        let pos = body[start..].iter().position(|&b| b == 0)? + start;
        out.push(body.slice(start..pos));
        start = pos + 1;
    }
    if n > 0 {
        out.push(body.slice(start..));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: PacketType, args: &[&[u8]]) -> BytesMut {
        let mut b = BytesMut::new();
        put_packet(&mut b, MAGIC_REQ, kind, args);
        b
    }

    #[test]
    fn decodes_a_packet_fed_one_byte_at_a_time() {
        let whole = req(PacketType::SUBMIT_JOB, &[b"reverse", b"u1", b"hello"]);
        let mut codec = GearmanCodec::new(1024, 64);
        let mut buf = BytesMut::new();
        for (i, b) in whole.iter().enumerate() {
            buf.put_u8(*b);
            let got = codec.decode(&mut buf).unwrap();
            if i + 1 < whole.len() {
                assert!(got.is_none(), "frame too early at byte {i}");
            } else {
                let Some(Frame::Packet(p)) = got else {
                    panic!("no packet")
                };
                assert_eq!(p.kind, PacketType::SUBMIT_JOB);
                assert_eq!(p.magic, Magic::Req);
                assert_eq!(&p.body[..], b"reverse\0u1\0hello");
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn decodes_back_to_back_packets_and_admin_lines() {
        let mut buf = req(PacketType::ECHO_REQ, &[b"a"]);
        buf.extend_from_slice(b"status\r\n");
        buf.extend_from_slice(&req(PacketType::PRE_SLEEP, &[]));
        buf.extend_from_slice(b"workers\n");
        let mut codec = GearmanCodec::new(1024, 64);
        let mut frames = vec![];
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            frames.push(f);
        }
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[1], Frame::Admin(Bytes::from_static(b"status")));
        assert!(
            matches!(&frames[2], Frame::Packet(p) if p.kind == PacketType::PRE_SLEEP && p.body.is_empty())
        );
        assert_eq!(frames[3], Frame::Admin(Bytes::from_static(b"workers")));
    }

    #[test]
    fn refuses_a_header_claiming_4_gib_before_allocating() {
        let mut buf = BytesMut::new();
        buf.put_slice(&MAGIC_REQ);
        buf.put_u32(7);
        buf.put_u32(u32::MAX);
        let mut codec = GearmanCodec::new(10 << 20, 64);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { len, .. } if len == u32::MAX as u64));
        assert!(
            buf.capacity() < 1 << 20,
            "buffer grew to {}",
            buf.capacity()
        );
    }

    #[test]
    fn bad_magic_is_seen_on_the_first_bytes() {
        let mut codec = GearmanCodec::new(1024, 64);
        let mut buf = BytesMut::from(&b"\0XY"[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::BadMagic(_))
        ));
    }

    #[test]
    fn unknown_types_are_framing_errors() {
        for t in [0u32, 43, 1000] {
            let mut buf = BytesMut::new();
            buf.put_slice(&MAGIC_REQ);
            buf.put_u32(t);
            buf.put_u32(0);
            let mut codec = GearmanCodec::new(1024, 64);
            assert!(matches!(codec.decode(&mut buf), Err(CodecError::UnknownType(x)) if x == t));
        }
    }

    #[test]
    fn res_magic_is_framed_for_the_protocol_layer_to_refuse() {
        let mut buf = BytesMut::new();
        put_packet(&mut buf, MAGIC_RES, PacketType::ECHO_REQ, &[b"x"]);
        let mut codec = GearmanCodec::new(1024, 64);
        let Some(Frame::Packet(p)) = codec.decode(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(p.magic, Magic::Res);
    }

    #[test]
    fn overlong_admin_line_is_refused_without_growing() {
        let mut codec = GearmanCodec::new(1024, 16);
        let mut buf = BytesMut::from(&b"statusstatusstat"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"us");
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::AdminLineTooLong { .. })
        ));
    }

    #[test]
    fn split_args_keeps_nuls_in_the_last_argument() {
        let body = Bytes::from_static(b"f\0u\0da\0ta");
        let args = split_args(&body, 3).unwrap();
        assert_eq!(&args[2][..], b"da\0ta");
        assert!(split_args(&Bytes::from_static(b"f"), 3).is_none());
        assert_eq!(split_args(&Bytes::new(), 1).unwrap(), vec![Bytes::new()]);
    }
}
