//! Packet ↔ request: turns a framed packet into a typed [`Request`], checking argument counts and
//! lengths, and names the errors a client gets back (`ERROR code text`, connection kept open).

use bytes::Bytes;

use crate::codec::{split_args, CodecError, Magic, Packet, PacketType};

/// The three Gearman priorities; `High` is served first, FIFO within each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn from_u8(v: u8) -> Option<Priority> {
        match v {
            0 => Some(Priority::High),
            1 => Some(Priority::Normal),
            2 => Some(Priority::Low),
            _ => None,
        }
    }
}

/// A job submission, whatever packet carried it.
#[derive(Debug, Clone)]
pub struct Submit {
    pub function: Bytes,
    pub unique: Bytes,
    pub data: Bytes,
    pub priority: Priority,
    pub background: bool,
    /// Unix time (seconds) before which the job must not run (SUBMIT_JOB_EPOCH).
    pub epoch: Option<u64>,
    /// Reducer function name (SUBMIT_REDUCE_JOB*).
    pub reducer: Option<Bytes>,
}

/// Which grab packet a worker used; it decides the assignment packet it gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrabKind {
    Plain,
    Uniq,
    All,
}

/// Result packets a worker sends about a job it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkKind {
    Status,
    Data,
    Warning,
    Complete,
    Fail,
    Exception,
}

impl WorkKind {
    pub fn packet_type(self) -> PacketType {
        match self {
            WorkKind::Status => PacketType::WORK_STATUS,
            WorkKind::Data => PacketType::WORK_DATA,
            WorkKind::Warning => PacketType::WORK_WARNING,
            WorkKind::Complete => PacketType::WORK_COMPLETE,
            WorkKind::Fail => PacketType::WORK_FAIL,
            WorkKind::Exception => PacketType::WORK_EXCEPTION,
        }
    }

    /// True for the packets that end a job.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            WorkKind::Complete | WorkKind::Fail | WorkKind::Exception
        )
    }
}

/// A request from a client or a worker.
#[derive(Debug, Clone)]
pub enum Request {
    CanDo {
        function: Bytes,
        timeout_ms: Option<u32>,
    },
    CantDo {
        function: Bytes,
    },
    ResetAbilities,
    PreSleep,
    Submit(Submit),
    Grab(GrabKind),
    /// WORK_* from a worker: `body` is the packet body as sent, forwarded unchanged.
    Work {
        kind: WorkKind,
        handle: Bytes,
        body: Bytes,
    },
    GetStatus {
        handle: Bytes,
    },
    GetStatusUnique {
        unique: Bytes,
    },
    Echo {
        data: Bytes,
    },
    SetClientId {
        id: Bytes,
    },
    Option {
        name: Bytes,
    },
    AllYours,
}

/// The error codes the server sends: in `ERROR code text` packets and in the admin protocol's
/// `ERR CODE text` lines. The wire names are gearmand's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `\0RES` magic (or any magic but `\0REQ`) on a request.
    InvalidMagic,
    /// A known packet type a server does not accept, or an unknown one.
    InvalidCommand,
    /// Fewer arguments than the packet type needs.
    InvalidPacket,
    /// An argument that should be a number is not.
    InvalidArgument,
    /// A client-chosen length over its limit (packet, function name, unique id, admin line).
    ArgumentTooLarge,
    /// OPTION_REQ with an option other than `exceptions`.
    UnknownOption,
    /// A result or `cancel job` for a job that does not exist (or is not this worker's).
    JobNotFound,
    /// `cancel job` of a job a worker is running.
    JobRunning,
    /// The queue refused the job: full, too many functions, or not durable.
    QueueError,
    /// `drop function` of a function the server does not know.
    UnknownFunction,
    /// `drop function` of a function that still has jobs or workers.
    FunctionInUse,
    /// A state-changing admin command from outside `server.admin_networks`.
    PermissionDenied,
    /// An admin command with missing or malformed arguments.
    InvalidArguments,
    /// An admin command the server does not know.
    UnknownCommand,
    /// `cancel job` of a handle the server does not know (gearmand's admin spelling).
    UnknownJob,
    /// The connection's socket failed; never sent, only named.
    Io,
}

impl ErrorCode {
    /// The codes a request that frames correctly can be refused with by [`Request::parse`]
    /// (the protocol-error metric starts each of them at 0).
    pub const PARSE: [ErrorCode; 5] = [
        ErrorCode::InvalidMagic,
        ErrorCode::InvalidCommand,
        ErrorCode::InvalidPacket,
        ErrorCode::InvalidArgument,
        ErrorCode::ArgumentTooLarge,
    ];

    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::InvalidMagic,
        ErrorCode::InvalidCommand,
        ErrorCode::InvalidPacket,
        ErrorCode::InvalidArgument,
        ErrorCode::ArgumentTooLarge,
        ErrorCode::UnknownOption,
        ErrorCode::JobNotFound,
        ErrorCode::JobRunning,
        ErrorCode::QueueError,
        ErrorCode::UnknownFunction,
        ErrorCode::FunctionInUse,
        ErrorCode::PermissionDenied,
        ErrorCode::InvalidArguments,
        ErrorCode::UnknownCommand,
        ErrorCode::UnknownJob,
        ErrorCode::Io,
    ];

    /// The code a wire name stands for (the inverse of [`ErrorCode::as_str`]).
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The code as the wire spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMagic => "INVALID_MAGIC",
            ErrorCode::InvalidCommand => "INVALID_COMMAND",
            ErrorCode::InvalidPacket => "INVALID_PACKET",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::ArgumentTooLarge => "ARGUMENT_TOO_LARGE",
            ErrorCode::UnknownOption => "UNKNOWN_OPTION",
            ErrorCode::JobNotFound => "JOB_NOT_FOUND",
            ErrorCode::JobRunning => "JOB_RUNNING",
            ErrorCode::QueueError => "QUEUE_ERROR",
            ErrorCode::UnknownFunction => "UNKNOWN_FUNCTION",
            ErrorCode::FunctionInUse => "FUNCTION_IN_USE",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::InvalidArguments => "INVALID_ARGUMENTS",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::UnknownJob => "UNKNOWN_JOB",
            ErrorCode::Io => "IO",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The code a framing error is answered with before the connection closes.
impl From<&CodecError> for ErrorCode {
    fn from(e: &CodecError) -> ErrorCode {
        match e {
            CodecError::BadMagic(_) => ErrorCode::InvalidMagic,
            CodecError::UnknownType(_) => ErrorCode::InvalidCommand,
            CodecError::TooLarge { .. } | CodecError::AdminLineTooLong { .. } => {
                ErrorCode::ArgumentTooLarge
            }
            CodecError::Io(_) => ErrorCode::Io,
        }
    }
}

/// A request that frames correctly but cannot be served; the client gets `ERROR code text`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {text}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub text: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        ProtocolError {
            code,
            text: text.into(),
        }
    }
}

/// Limits on client-chosen argument lengths.
#[derive(Debug, Clone, Copy)]
pub struct ArgLimits {
    pub max_function: usize,
    pub max_unique: usize,
    pub max_client_id: usize,
}

fn check(what: &str, v: &Bytes, max: usize) -> Result<(), ProtocolError> {
    if v.len() > max {
        return Err(ProtocolError::new(
            ErrorCode::ArgumentTooLarge,
            format!("{what} is {} bytes, the limit is {max}", v.len()),
        ));
    }
    Ok(())
}

fn args(p: &Packet, n: usize) -> Result<Vec<Bytes>, ProtocolError> {
    split_args(&p.body, n).ok_or_else(|| {
        ProtocolError::new(
            ErrorCode::InvalidPacket,
            format!("{} needs {n} NUL-separated arguments", p.kind.name()),
        )
    })
}

fn parse_u64(what: &str, v: &[u8]) -> Result<u64, ProtocolError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::InvalidArgument,
                format!("{what} is not a number"),
            )
        })
}

impl Request {
    /// Parses a framed packet. `\0RES` magic and packets only a server sends are refused.
    pub fn parse(p: &Packet, limits: &ArgLimits) -> Result<Request, ProtocolError> {
        use PacketType::*;
        if p.magic != Magic::Req {
            return Err(ProtocolError::new(
                ErrorCode::InvalidMagic,
                "packets to the server use \\0REQ",
            ));
        }
        let submit = |priority, background| -> Result<Request, ProtocolError> {
            let a = args(p, 3)?;
            let [function, unique, data] = <[Bytes; 3]>::try_from(a).expect("3 args");
            check("function name", &function, limits.max_function)?;
            check("unique id", &unique, limits.max_unique)?;
            Ok(Request::Submit(Submit {
                function,
                unique,
                data,
                priority,
                background,
                epoch: None,
                reducer: None,
            }))
        };
        let work = |kind: WorkKind| -> Result<Request, ProtocolError> {
            let handle = args(p, 1)?.remove(0);
            let handle = match handle.iter().position(|&b| b == 0) {
                Some(i) => handle.slice(..i),
                None => handle,
            };
            Ok(Request::Work {
                kind,
                handle,
                body: p.body.clone(),
            })
        };
        let req = match p.kind {
            CAN_DO => {
                let function = p.body.clone();
                check("function name", &function, limits.max_function)?;
                Request::CanDo {
                    function,
                    timeout_ms: None,
                }
            }
            CAN_DO_TIMEOUT => {
                let [function, t] = <[Bytes; 2]>::try_from(args(p, 2)?).expect("2 args");
                check("function name", &function, limits.max_function)?;
                let t = parse_u64("timeout", &t)?;
                Request::CanDo {
                    function,
                    timeout_ms: Some(t.min(u32::MAX as u64) as u32),
                }
            }
            CANT_DO => Request::CantDo {
                function: p.body.clone(),
            },
            RESET_ABILITIES => Request::ResetAbilities,
            PRE_SLEEP => Request::PreSleep,
            SUBMIT_JOB => submit(Priority::Normal, false)?,
            SUBMIT_JOB_BG => submit(Priority::Normal, true)?,
            SUBMIT_JOB_HIGH => submit(Priority::High, false)?,
            SUBMIT_JOB_HIGH_BG => submit(Priority::High, true)?,
            SUBMIT_JOB_LOW => submit(Priority::Low, false)?,
            SUBMIT_JOB_LOW_BG => submit(Priority::Low, true)?,
            SUBMIT_JOB_EPOCH => {
                let [function, unique, epoch, data] =
                    <[Bytes; 4]>::try_from(args(p, 4)?).expect("4 args");
                check("function name", &function, limits.max_function)?;
                check("unique id", &unique, limits.max_unique)?;
                let epoch = parse_u64("epoch", &epoch)?;
                Request::Submit(Submit {
                    function,
                    unique,
                    data,
                    priority: Priority::Normal,
                    background: true,
                    epoch: Some(epoch),
                    reducer: None,
                })
            }
            SUBMIT_REDUCE_JOB | SUBMIT_REDUCE_JOB_BACKGROUND => {
                let [function, unique, reducer, data] =
                    <[Bytes; 4]>::try_from(args(p, 4)?).expect("4 args");
                check("function name", &function, limits.max_function)?;
                check("unique id", &unique, limits.max_unique)?;
                check("reducer name", &reducer, limits.max_function)?;
                Request::Submit(Submit {
                    function,
                    unique,
                    data,
                    priority: Priority::Normal,
                    background: p.kind == SUBMIT_REDUCE_JOB_BACKGROUND,
                    epoch: None,
                    reducer: Some(reducer),
                })
            }
            SUBMIT_JOB_SCHED => {
                // The next UTC time matching the fields becomes an epoch job: exactly as
                // durable, and as cheap while it waits.
                let [function, unique, minute, hour, mday, month, wday, data] =
                    <[Bytes; 8]>::try_from(args(p, 8)?).expect("8 args");
                check("function name", &function, limits.max_function)?;
                check("unique id", &unique, limits.max_unique)?;
                let fields = [&minute[..], &hour[..], &mday[..], &month[..], &wday[..]];
                let now = crate::schedule::cron::now_unix();
                let epoch = crate::schedule::cron::next_sched_epoch(fields, now)
                    .map_err(|e| ProtocolError::new(ErrorCode::InvalidArgument, e.to_string()))?;
                Request::Submit(Submit {
                    function,
                    unique,
                    data,
                    priority: Priority::Normal,
                    background: true,
                    epoch: Some(epoch),
                    reducer: None,
                })
            }
            GRAB_JOB => Request::Grab(GrabKind::Plain),
            GRAB_JOB_UNIQ => Request::Grab(GrabKind::Uniq),
            GRAB_JOB_ALL => Request::Grab(GrabKind::All),
            WORK_STATUS => work(WorkKind::Status)?,
            WORK_DATA => work(WorkKind::Data)?,
            WORK_WARNING => work(WorkKind::Warning)?,
            WORK_COMPLETE => work(WorkKind::Complete)?,
            WORK_FAIL => work(WorkKind::Fail)?,
            WORK_EXCEPTION => work(WorkKind::Exception)?,
            GET_STATUS => Request::GetStatus {
                handle: p.body.clone(),
            },
            GET_STATUS_UNIQUE => Request::GetStatusUnique {
                unique: p.body.clone(),
            },
            ECHO_REQ => Request::Echo {
                data: p.body.clone(),
            },
            SET_CLIENT_ID => {
                let id = p.body.clone();
                check("client id", &id, limits.max_client_id)?;
                Request::SetClientId { id }
            }
            OPTION_REQ => Request::Option {
                name: p.body.clone(),
            },
            ALL_YOURS => Request::AllYours,
            other => {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidCommand,
                    format!("{} is not a request a server accepts", other.name()),
                ))
            }
        };
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ArgLimits = ArgLimits {
        max_function: 8,
        max_unique: 4,
        max_client_id: 4,
    };

    fn pkt(kind: PacketType, body: &'static [u8]) -> Packet {
        Packet {
            magic: Magic::Req,
            kind,
            body: Bytes::from_static(body),
        }
    }

    #[test]
    fn parses_submits_with_priority_and_background() {
        let Request::Submit(s) =
            Request::parse(&pkt(PacketType::SUBMIT_JOB_LOW_BG, b"f\0u\0x\0y"), &LIMITS).unwrap()
        else {
            panic!()
        };
        assert_eq!((s.priority, s.background), (Priority::Low, true));
        assert_eq!(&s.data[..], b"x\0y");
        let Request::Submit(e) = Request::parse(
            &pkt(PacketType::SUBMIT_JOB_EPOCH, b"f\0\x001700000000\0d"),
            &LIMITS,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(e.epoch, Some(1_700_000_000));
        assert!(e.unique.is_empty());
    }

    #[test]
    fn refuses_long_arguments_wrong_magic_and_server_packets() {
        let e = Request::parse(&pkt(PacketType::SUBMIT_JOB, b"f\0uuuuu\0d"), &LIMITS).unwrap_err();
        assert_eq!(e.code, ErrorCode::ArgumentTooLarge);
        let mut p = pkt(PacketType::ECHO_REQ, b"x");
        p.magic = Magic::Res;
        assert_eq!(
            Request::parse(&p, &LIMITS).unwrap_err().code,
            ErrorCode::InvalidMagic
        );
        let e = Request::parse(&pkt(PacketType::NOOP, b""), &LIMITS).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidCommand);
        let e = Request::parse(&pkt(PacketType::SUBMIT_JOB, b"f"), &LIMITS).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidPacket);
    }

    #[test]
    fn framing_errors_keep_the_codec_s_wire_codes() {
        let errors = [
            CodecError::BadMagic(*b"HTTP"),
            CodecError::UnknownType(99),
            CodecError::TooLarge { len: 9, max: 1 },
            CodecError::AdminLineTooLong { max: 1 },
            CodecError::Io(std::io::Error::other("reset")),
        ];
        for e in &errors {
            assert_eq!(ErrorCode::from(e).as_str(), e.code(), "{e}");
        }
        let e = ProtocolError::new(ErrorCode::JobNotFound, "no such job");
        assert_eq!(e.to_string(), "JOB_NOT_FOUND: no such job");
    }

    #[test]
    fn work_packets_keep_their_body_for_forwarding() {
        let Request::Work { kind, handle, body } =
            Request::parse(&pkt(PacketType::WORK_COMPLETE, b"H:x:1\0result"), &LIMITS).unwrap()
        else {
            panic!()
        };
        assert_eq!(kind, WorkKind::Complete);
        assert_eq!(&handle[..], b"H:x:1");
        assert_eq!(&body[..], b"H:x:1\0result");
    }
}
