//! Entry points for the parsers that read bytes from strangers, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/`, run on nightly) and the property tests (`tests/parsers.rs`, run on
//! stable in every test run), so both exercise exactly the same code with the same checks.
//! Each takes arbitrary bytes, must not panic, and asserts what must hold whatever the input:
//!
//! - [`gearman_stream`]: the Gearman codec (binary packets and admin lines) and request parsing,
//!   fed in arbitrary pieces: the frames do not depend on how the bytes were split, never exceed
//!   the limits, and the buffer never grows past what arrived plus one body within the limit.
//! - [`admin_lines`]: admin text lines run against a new engine holding jobs: every line gets an
//!   answer ending in a newline.
//! - [`memcached_replies`]: memcached meta-protocol replies: a length on the wire never sizes an
//!   allocation before the bytes arrive.
//! - [`durable_record`]: the durable job record decoder: whatever decodes re-encodes to a record
//!   that decodes the same.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::codec::{Frame, GearmanCodec};
use crate::engine::{Engine, EngineConfig};
use crate::metrics::Metrics;
use crate::persist::{client, record};
use crate::protocol::{ArgLimits, Priority, Request, Submit};

/// Packet body limit used by the entry points: small, so inputs can cross it.
pub const MAX_PACKET: usize = 4096;
/// Admin line limit used by the entry points.
pub const MAX_LINE: usize = 256;

/// Decodes `data` fed in pieces of the sizes `cuts` gives (cycled; 0 counts as 1), then checks
/// that the frames equal those of a decode of the whole input at once.
pub fn gearman_stream(data: &[u8], cuts: &[u8]) {
    let (whole, whole_err) = decode_all(data, &[], usize::MAX);
    let (pieces, pieces_err) = decode_all(data, cuts, 1);
    assert_eq!(whole, pieces, "frames depend on how the bytes arrived");
    // The error text may differ (bad magic is reported as soon as it is visible), not whether
    // there is one.
    assert_eq!(whole_err.is_some(), pieces_err.is_some());
}

/// Frames (and the error that ended them, as text) of `data` fed in pieces.
fn decode_all(data: &[u8], cuts: &[u8], min_piece: usize) -> (Vec<Frame>, Option<String>) {
    let mut codec = GearmanCodec::new(MAX_PACKET, MAX_LINE);
    let limits = ArgLimits {
        max_function: 64,
        max_unique: 64,
        max_client_id: 64,
    };
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let step = if min_piece == usize::MAX {
            data.len()
        } else {
            let c = cuts.get(i % cuts.len().max(1)).copied().unwrap_or(1) as usize;
            c.max(min_piece)
        };
        i += 1;
        let end = (at + step).min(data.len());
        buf.extend_from_slice(&data[at..end]);
        at = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => {
                    match &f {
                        Frame::Packet(p) => {
                            assert!(p.body.len() <= MAX_PACKET, "body over the limit");
                            if let Ok(Request::Submit(s)) = Request::parse(p, &limits) {
                                assert!(s.function.len() <= limits.max_function);
                                assert!(s.unique.len() <= limits.max_unique);
                            }
                        }
                        Frame::Admin(l) => assert!(l.len() <= MAX_LINE, "line over the limit"),
                    }
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
            // What is buffered is at most what arrived: nothing is reserved on a stranger's word
            // beyond one body within the limit.
            assert!(buf.capacity() <= 2 * data.len() + MAX_PACKET + 64 * 1024);
        }
    }
    (frames, None)
}

/// Runs each line of `data` as an admin command (from a non-admin and an admin peer) against a
/// new engine holding three queued jobs, and checks that every line gets an answer ending in a
/// newline.
pub fn admin_lines(data: &[u8]) {
    admin_answers(data);
}

/// What [`admin_lines`] answers to `data`, every answer in order (for tests that compare runs).
///
/// The engine is new for each input, so nothing an input changes (`maxqueue`, `limit`,
/// `cancel job`, `drop function`, a `shutdown` that only answers here) reaches the next one and
/// the same input always takes the same path, as libFuzzer needs. What is costly and never read
/// by an admin command is built once per process ([`admin_fixture`]).
pub fn admin_answers(data: &[u8]) -> Vec<u8> {
    let fixture = admin_fixture();
    let engine = Engine::new(fixture.cfg.clone(), fixture.metrics.clone(), None, None);
    let peer: SocketAddr = "127.0.0.1:9".parse().expect("address");
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let conn = engine.connect(peer, tx, Default::default());
    for (i, f) in ["a", "b b", "c"].iter().enumerate() {
        let mut out = BytesMut::new();
        engine.submit(
            conn,
            Submit {
                function: Bytes::copy_from_slice(f.as_bytes()),
                unique: Bytes::from(format!("u{i}")),
                data: Bytes::from_static(b"x"),
                priority: Priority::ALL[i % 3],
                background: true,
                epoch: None,
                reducer: None,
            },
            &mut out,
        );
    }
    let mut answers = Vec::new();
    for line in data.split(|&b| b == b'\n').take(64) {
        for admin in [false, true] {
            let mut out = BytesMut::new();
            let line = Bytes::copy_from_slice(line);
            let (_, _, after) = crate::admin::execute(&engine, &line, peer, admin, None, &mut out);
            match after {
                crate::admin::AfterAdmin::List(l) => l.write_all(&engine, &mut out),
                // What the connection writes for it on a server without persistence.
                crate::admin::AfterAdmin::Takeover(_) => {
                    out.extend_from_slice(crate::persist::on_request::no_persistence().as_bytes())
                }
                _ => {}
            }
            assert!(out.ends_with(b"\n"), "admin answer without a newline");
            answers.extend_from_slice(&out);
        }
    }
    answers
}

/// What every [`admin_lines`] input shares: building them per input (parsing
/// `config/default.toml`, registering ~50 metric families) took most of its time.
struct AdminFixture {
    cfg: EngineConfig,
    /// Only written by the engine, never read by an admin command. Its function label cap is 0,
    /// so every function's label folds into `__other__` from the first input on: no input
    /// decides another's labels (or path), and the registry holds one label value per family.
    metrics: Arc<Metrics>,
}

fn admin_fixture() -> &'static AdminFixture {
    static FIXTURE: OnceLock<AdminFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| AdminFixture {
        cfg: EngineConfig::default(),
        metrics: Arc::new(Metrics::new(0)),
    })
}

/// Parses memcached replies from `data` until more bytes are needed or an error.
pub fn memcached_replies(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match client::parse_reply(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() < before, "a reply consumed nothing"),
            Ok(None) | Err(_) => break,
        }
        assert!(
            buf.capacity() <= data.len() + 64 * 1024,
            "a length on the wire sized an allocation ({} for {} bytes)",
            buf.capacity(),
            data.len()
        );
    }
}

/// Decodes `data` as a durable record; a record that decodes re-encodes to the same record.
pub fn durable_record(data: &[u8]) {
    let v = Bytes::copy_from_slice(data);
    if let Ok((r, origin)) = record::decode(&v) {
        let again = record::encode(&r, origin.as_ref());
        let (r2, origin2) = record::decode(&again).expect("a re-encoded record decodes");
        assert_eq!((r, origin), (r2, origin2));
    }
}
