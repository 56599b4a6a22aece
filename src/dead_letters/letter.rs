//! One dead letter: a job the server gave up on, with what it takes to understand and retry it.
//! Stored in memcached in a small binary form (payloads are arbitrary bytes), versioned by its
//! first byte so a later layout can still read older letters.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::engine::JobOutcome;
use crate::protocol::Priority;

/// Why a job became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Dropped after `engine.job_retries` attempts (its workers kept disconnecting).
    Dropped,
    /// A background job of a `dead_letter` function ended in WORK_FAIL.
    Fail,
    /// ... in WORK_EXCEPTION.
    Exception,
    /// ... its worker passed its CAN_DO_TIMEOUT.
    TimedOut,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Dropped,
        Reason::Fail,
        Reason::Exception,
        Reason::TimedOut,
    ];

    /// The reason for a job that ended with `outcome`, if such jobs can be dead letters.
    pub fn of(outcome: JobOutcome) -> Option<Reason> {
        match outcome {
            JobOutcome::Dropped => Some(Reason::Dropped),
            JobOutcome::Fail => Some(Reason::Fail),
            JobOutcome::Exception => Some(Reason::Exception),
            JobOutcome::TimedOut => Some(Reason::TimedOut),
            _ => None,
        }
    }

    /// The name in the API, `show dead` and the `reason` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Dropped => "retries_exhausted",
            Reason::Fail => "fail",
            Reason::Exception => "exception",
            Reason::TimedOut => "timed_out",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> Option<Reason> {
        Reason::ALL.get(c as usize).copied()
    }
}

/// A dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Letter {
    /// Increasing per node; the id in the API.
    pub id: u64,
    pub function: Bytes,
    /// The job's handle when it died.
    pub handle: Bytes,
    pub unique: Bytes,
    pub payload: Bytes,
    pub priority: Priority,
    pub background: bool,
    /// Attempts made, counting the last one.
    pub attempts: u32,
    /// The last worker: its address and client id (`-` when none was set).
    pub worker: Option<String>,
    pub reason: Reason,
    /// WORK_EXCEPTION's data, for `Reason::Exception`; empty otherwise.
    pub exception: Bytes,
    /// When it died, unix seconds.
    pub at_unix: u64,
}

const VERSION: u8 = 1;

impl Letter {
    /// Bytes it is charged in the store's `max_bytes` (its variable parts plus a fixed share).
    pub fn size(&self) -> usize {
        self.function.len()
            + self.handle.len()
            + self.unique.len()
            + self.payload.len()
            + self.exception.len()
            + self.worker.as_ref().map_or(0, String::len)
            + 128
    }

    /// The stored form.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.size());
        b.put_u8(VERSION);
        b.put_u64(self.id);
        b.put_u64(self.at_unix);
        b.put_u32(self.attempts);
        b.put_u8(self.priority as u8);
        b.put_u8(self.background as u8);
        b.put_u8(self.reason.code());
        let worker = self.worker.as_deref().unwrap_or("");
        for part in [
            &self.function[..],
            &self.handle,
            &self.unique,
            worker.as_bytes(),
            &self.exception,
            &self.payload,
        ] {
            b.put_u32(part.len() as u32);
            b.put_slice(part);
        }
        b.freeze()
    }

    /// Reads the stored form back; `None` for anything that is not a letter of this layout.
    pub fn decode(mut v: Bytes) -> Option<Letter> {
        if v.remaining() < 1 + 8 + 8 + 4 + 3 || v.get_u8() != VERSION {
            return None;
        }
        let id = v.get_u64();
        let at_unix = v.get_u64();
        let attempts = v.get_u32();
        let priority = Priority::from_u8(v.get_u8())?;
        let background = v.get_u8() != 0;
        let reason = Reason::from_code(v.get_u8())?;
        let mut part = || -> Option<Bytes> {
            if v.remaining() < 4 {
                return None;
            }
            let n = v.get_u32() as usize;
            (v.remaining() >= n).then(|| v.split_to(n))
        };
        let function = part()?;
        let handle = part()?;
        let unique = part()?;
        let worker = part()?;
        let exception = part()?;
        let payload = part()?;
        Some(Letter {
            id,
            function,
            handle,
            unique,
            payload,
            priority,
            background,
            attempts,
            worker: (!worker.is_empty()).then(|| String::from_utf8_lossy(&worker).into_owned()),
            reason,
            exception,
            at_unix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> Letter {
        Letter {
            id: 7,
            function: Bytes::from_static(b"mail"),
            handle: Bytes::from_static(b"H:n:12"),
            unique: Bytes::from_static(b"u-1"),
            payload: Bytes::from_static(b"\0binary\xff"),
            priority: Priority::Low,
            background: true,
            attempts: 3,
            worker: Some("127.0.0.1:5000 w1".into()),
            reason: Reason::Exception,
            exception: Bytes::from_static(b"boom"),
            at_unix: 1_800_000_000,
        }
    }

    #[test]
    fn letters_round_trip() {
        let l = letter();
        assert_eq!(Letter::decode(l.encode()), Some(l.clone()));
        let none = Letter { worker: None, ..l };
        assert_eq!(Letter::decode(none.encode()), Some(none));
    }

    #[test]
    fn truncated_or_foreign_values_are_refused() {
        let e = letter().encode();
        for n in 0..e.len() {
            assert_eq!(Letter::decode(e.slice(..n)), None, "cut at {n}");
        }
        let mut other = e.to_vec();
        other[0] = 9;
        assert_eq!(Letter::decode(Bytes::from(other)), None);
    }
}
