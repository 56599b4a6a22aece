//! Keys and the binary value of a job record.
//!
//! Keys are enumerable by design, so recovery never lists memcached's keys:
//! - `<namespace>:<node_id>:j:<seq>`: one job record;
//! - `<namespace>:<node_id>:m:<conn>`: the sequence watermarks `<low> <high>`, written at the
//!   head of every batch sent on writer connection `<conn>` (one key per connection, so two
//!   connections can never overwrite a newer watermark with an older one);
//! - `<namespace>:<node_id>:takeover`: the lock a server takes before moving a dead node's queue.
//!
//! Value (little-endian), version 1 or 2:
//! `[version][priority][flags][seq u64][attempts u32][function_len u32][unique_len u32]`
//! `[data_len u32] function unique [epoch u64 if flags&1] [reducer_len u32, reducer if flags&2]`
//! `[origin_node_len u16, origin_node, origin_seq u64 if flags&4]`
//! `[handle_len u16, handle if flags&8] data`.
//! Lengths make every field binary-safe: a function with `-`, an empty unique, any payload.
//!
//! The origin is where the record was copied from (the node taken over and its sequence number
//! there: what an interrupted takeover skips); the handle is what clients know the job by when
//! it is not `H:<this node>:<seq>` (kept from the first node through every takeover). Version 2
//! is written only for records with a handle, so a server that reads version 1 only still reads
//! every other record, and says "record version 2" rather than misreading one that has it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::engine::JobRecord;
use crate::protocol::Priority;

const VERSION: u8 = 1;
/// The version of records that carry a handle (`HAS_HANDLE`).
const VERSION_WITH_HANDLE: u8 = 2;
const HAS_EPOCH: u8 = 1;
const HAS_REDUCER: u8 = 2;
const HAS_ORIGIN: u8 = 4;
const HAS_HANDLE: u8 = 8;

/// Where a job taken over from another node came from: `(node_id, seq)` there.
pub type Origin = (String, u64);

/// Key of job `seq` of node `node`.
pub fn job_key(ns: &str, node: &str, seq: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(ns.len() + node.len() + 24);
    b.extend_from_slice(ns.as_bytes());
    b.extend_from_slice(b":");
    b.extend_from_slice(node.as_bytes());
    b.extend_from_slice(b":j:");
    b.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    b.freeze()
}

/// Key of the watermarks written by writer connection `conn`.
pub fn meta_key(ns: &str, node: &str, conn: usize) -> Bytes {
    Bytes::from(format!("{ns}:{node}:m:{conn}"))
}

/// Key of the takeover lock of node `node`.
pub fn takeover_key(ns: &str, node: &str) -> Bytes {
    Bytes::from(format!("{ns}:{node}:takeover"))
}

/// Watermarks: every live record of a node has `low <= seq <= high`.
pub fn encode_meta(low: u64, high: u64) -> Bytes {
    Bytes::from(format!("{low} {high}"))
}

pub fn decode_meta(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (a, b) = s.split_once(' ')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Encodes a record (and, for a job taken over from another node, where it came from). Node
/// ids and handles are at most a few hundred bytes (node ids are checked to be at most 100).
pub fn encode(r: &JobRecord, origin: Option<&Origin>) -> Bytes {
    let extra = r.reducer.as_ref().map_or(0, |x| x.len() + 4)
        + origin.map_or(0, |o| o.0.len() + 10)
        + r.handle.as_ref().map_or(0, |h| h.len() + 2)
        + 8;
    let mut b =
        BytesMut::with_capacity(27 + r.function.len() + r.unique.len() + r.data.len() + extra);
    let mut flags = 0;
    if r.epoch.is_some() {
        flags |= HAS_EPOCH;
    }
    if r.reducer.is_some() {
        flags |= HAS_REDUCER;
    }
    if origin.is_some() {
        flags |= HAS_ORIGIN;
    }
    if r.handle.is_some() {
        flags |= HAS_HANDLE;
    }
    b.put_u8(if r.handle.is_some() {
        VERSION_WITH_HANDLE
    } else {
        VERSION
    });
    b.put_u8(r.priority as u8);
    b.put_u8(flags);
    b.put_u64_le(r.seq);
    b.put_u32_le(r.attempts);
    b.put_u32_le(r.function.len() as u32);
    b.put_u32_le(r.unique.len() as u32);
    b.put_u32_le(r.data.len() as u32);
    b.put_slice(&r.function);
    b.put_slice(&r.unique);
    if let Some(e) = r.epoch {
        b.put_u64_le(e);
    }
    if let Some(x) = &r.reducer {
        b.put_u32_le(x.len() as u32);
        b.put_slice(x);
    }
    if let Some((node, seq)) = origin {
        b.put_u16_le(node.len() as u16);
        b.put_slice(node.as_bytes());
        b.put_u64_le(*seq);
    }
    if let Some(h) = &r.handle {
        b.put_u16_le(h.len() as u16);
        b.put_slice(h);
    }
    b.put_slice(&r.data);
    b.freeze()
}

/// Decodes a record; the fields share `v`'s buffer (no copies).
pub fn decode(v: &Bytes) -> Result<(JobRecord, Option<Origin>), String> {
    let mut c = v.clone();
    let need = |c: &Bytes, n: usize| {
        if c.remaining() < n {
            Err(format!("record truncated ({} bytes)", v.len()))
        } else {
            Ok(())
        }
    };
    need(&c, 27)?;
    let version = c.get_u8();
    if version != VERSION && version != VERSION_WITH_HANDLE {
        return Err(format!(
            "record version {version} (this gearhouse reads versions {VERSION} and {VERSION_WITH_HANDLE})"
        ));
    }
    let priority = Priority::from_u8(c.get_u8()).ok_or("bad priority")?;
    let flags = c.get_u8();
    let seq = c.get_u64_le();
    let attempts = c.get_u32_le();
    let flen = c.get_u32_le() as usize;
    let ulen = c.get_u32_le() as usize;
    let dlen = c.get_u32_le() as usize;
    need(&c, flen + ulen)?;
    let function = c.split_to(flen);
    let unique = c.split_to(ulen);
    let epoch = if flags & HAS_EPOCH != 0 {
        need(&c, 8)?;
        Some(c.get_u64_le())
    } else {
        None
    };
    let reducer = if flags & HAS_REDUCER != 0 {
        need(&c, 4)?;
        let n = c.get_u32_le() as usize;
        need(&c, n)?;
        Some(c.split_to(n))
    } else {
        None
    };
    let origin = if flags & HAS_ORIGIN != 0 {
        need(&c, 2)?;
        let n = c.get_u16_le() as usize;
        need(&c, n + 8)?;
        let node = String::from_utf8_lossy(&c.split_to(n)).into_owned();
        Some((node, c.get_u64_le()))
    } else {
        None
    };
    let handle = if flags & HAS_HANDLE != 0 {
        need(&c, 2)?;
        let n = c.get_u16_le() as usize;
        need(&c, n)?;
        Some(c.split_to(n))
    } else {
        None
    };
    if c.remaining() != dlen {
        return Err(format!(
            "record data is {} bytes, header says {dlen}",
            c.remaining()
        ));
    }
    Ok((
        JobRecord {
            seq,
            function,
            unique,
            data: c,
            priority,
            epoch,
            reducer,
            attempts,
            handle,
        },
        origin,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(f: &str, u: &str, d: &[u8]) -> JobRecord {
        JobRecord {
            seq: 42,
            function: Bytes::copy_from_slice(f.as_bytes()),
            unique: Bytes::copy_from_slice(u.as_bytes()),
            data: Bytes::copy_from_slice(d),
            priority: Priority::Low,
            epoch: None,
            reducer: None,
            attempts: 3,
            handle: None,
        }
    }

    #[test]
    fn records_round_trip_with_dashes_empty_uniques_and_binary_data() {
        let mut r = rec("resize-image", "", b"\0\r\n bytes \xff");
        assert_eq!(decode(&encode(&r, None)).unwrap(), (r.clone(), None));
        r.epoch = Some(1_900_000_000);
        r.reducer = Some(Bytes::from_static(b"sum-up"));
        let o = ("dead-node".to_string(), 7);
        assert_eq!(
            decode(&encode(&r, Some(&o))).unwrap(),
            (r.clone(), Some(o.clone()))
        );
        r.handle = Some(Bytes::from_static(b"H:first-node:12"));
        let v = encode(&r, Some(&o));
        assert_eq!(v[0], VERSION_WITH_HANDLE);
        assert_eq!(decode(&v).unwrap(), (r, Some(o)));
    }

    /// A record written before handles were kept (version 1, bytes as that version wrote
    /// them) still decodes, with no handle.
    #[test]
    fn version_1_records_without_a_handle_still_decode() {
        let mut v = vec![1u8, Priority::High as u8, HAS_ORIGIN];
        v.extend_from_slice(&9u64.to_le_bytes());
        v.extend_from_slice(&2u32.to_le_bytes());
        for n in [1u32, 1, 4] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.extend_from_slice(b"fu");
        v.extend_from_slice(&1u16.to_le_bytes());
        v.extend_from_slice(b"a");
        v.extend_from_slice(&5u64.to_le_bytes());
        v.extend_from_slice(b"data");
        let (r, origin) = decode(&Bytes::from(v)).unwrap();
        assert_eq!((r.seq, r.attempts, r.handle.clone()), (9, 2, None));
        assert_eq!(
            (&r.function[..], &r.unique[..], &r.data[..]),
            (&b"f"[..], &b"u"[..], &b"data"[..])
        );
        assert_eq!(origin, Some(("a".to_string(), 5)));
        // Without a handle, version 1 is still what is written.
        assert_eq!(encode(&r, origin.as_ref())[0], VERSION);
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let mut r = rec("f", "u", b"data");
        r.handle = Some(Bytes::from_static(b"H:n:1"));
        for v in [encode(&rec("f", "u", b"data"), None), encode(&r, None)] {
            for n in 0..v.len() {
                assert!(decode(&v.slice(..n)).is_err(), "prefix {n}");
            }
        }
        let v = encode(&rec("f", "u", b"data"), None);
        let mut bad = BytesMut::from(&v[..]);
        bad[0] = 9;
        assert!(decode(&bad.freeze()).unwrap_err().contains("version 9"));
    }

    #[test]
    fn keys_and_watermarks() {
        assert_eq!(&job_key("gh", "n-1", 17)[..], b"gh:n-1:j:17");
        assert_eq!(&meta_key("gh", "n-1", 2)[..], b"gh:n-1:m:2");
        assert_eq!(decode_meta(&encode_meta(5, 90)), Some((5, 90)));
        assert_eq!(decode_meta(b"x"), None);
    }
}
