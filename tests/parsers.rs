//! Property tests of the parsers that read bytes from strangers, through the same entry points
//! as the cargo-fuzz targets in `fuzz/` (`gearhouse::fuzzing`), so every test run exercises
//! them on stable. Inputs are arbitrary bytes plus mutations of valid traffic (the fuzz
//! corpora's seeds), so the cases reach past the first length check.

use bytes::BytesMut;
use gearhouse::codec::{put_packet, PacketType};
use gearhouse::fuzzing;
use proptest::prelude::*;

/// A valid request packet of a random type and arguments.
fn packet() -> impl Strategy<Value = Vec<u8>> {
    (
        1u32..=42,
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 0..5),
    )
        .prop_map(|(kind, args)| {
            let kind = PacketType::try_from(kind).unwrap_or(PacketType::ECHO_REQ);
            let args: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            let mut b = BytesMut::new();
            put_packet(&mut b, *b"\0REQ", kind, &args);
            b.to_vec()
        })
}

/// Valid traffic (packets and admin lines), then a few bytes flipped.
fn traffic() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just(b"status\n".to_vec()),
        Just(b"show jobs\r\n".to_vec()),
        Just(b"workers\n".to_vec()),
        "[ -~]{0,40}\n".prop_map(|s| s.into_bytes()),
    ];
    let chunk = prop_oneof![packet(), line];
    (
        proptest::collection::vec(chunk, 1..6),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    )
        .prop_map(|(chunks, flips)| {
            let mut v: Vec<u8> = chunks.concat();
            for (at, b) in flips {
                let n = v.len();
                v[at % n] = b;
            }
            v
        })
}

/// memcached replies as the server sends them, then mutated.
fn replies() -> impl Strategy<Value = Vec<u8>> {
    let reply = prop_oneof![
        Just(b"HD\r\n".to_vec()),
        Just(b"EN\r\n".to_vec()),
        Just(b"MN\r\n".to_vec()),
        Just(b"SERVER_ERROR out of memory\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| {
            let mut r = format!("VA {}\r\n", v.len()).into_bytes();
            r.extend_from_slice(&v);
            r.extend_from_slice(b"\r\n");
            r
        }),
        (0u64..u64::MAX).prop_map(|n| format!("VA {n} t\r\n").into_bytes()),
    ];
    (
        proptest::collection::vec(reply, 1..6),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    )
        .prop_map(|(rs, flips)| {
            let mut v: Vec<u8> = rs.concat();
            for (at, b) in flips {
                let n = v.len();
                v[at % n] = b;
            }
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_gearman_codec_frames_any_bytes_the_same_however_they_arrive(
        data in prop_oneof![traffic(), proptest::collection::vec(any::<u8>(), 0..300)],
        cuts in proptest::collection::vec(0u8..40, 1..8),
    ) {
        fuzzing::gearman_stream(&data, &cuts);
    }

    #[test]
    fn memcached_replies_never_allocate_on_a_lying_length(data in prop_oneof![
        replies(),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]) {
        fuzzing::memcached_replies(&data);
    }

    #[test]
    fn durable_records_that_decode_reencode_the_same(data in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..120),
        // A valid header with random lengths and contents behind it.
        (any::<[u8; 26]>(), proptest::collection::vec(any::<u8>(), 0..60)).prop_map(|(h, rest)| {
            let mut v = vec![1u8];
            v.extend_from_slice(&h);
            v[1] %= 3;
            v[2] %= 8;
            for i in 0..3 {
                let at = 15 + 4 * i;
                let len = (v[at] % 16) as u32;
                v[at..at + 4].copy_from_slice(&len.to_le_bytes());
            }
            v.extend_from_slice(&rest);
            v
        }),
    ]) {
        fuzzing::durable_record(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_admin_line_gets_an_answer(lines in proptest::collection::vec(
        prop_oneof![
            "(status|workers|show jobs|show unique jobs|maxqueue a 1|cancel job H:x:1|drop function c|create function z|version|getpid|verbose|prioritystatus)",
            "[ -~]{0,60}",
        ],
        1..6,
    )) {
        fuzzing::admin_lines(lines.join("\n").as_bytes());
    }
}

/// libFuzzer needs each input to take the same path whatever ran before it: what one
/// `admin_lines` input changes (queue limits, cancelled jobs, dropped functions, rate limits, a
/// shutdown) is not seen by the next.
#[test]
fn admin_inputs_do_not_see_each_other() {
    let probe = b"status\nprioritystatus\nshow jobs\nshow unique jobs\nshow limits\nworkers";
    let changes = b"maxqueue a 1\nmaxqueue c 0 1 2\ncancel job H:gearhouse:1\ndrop function c\n\
                    create function z\nlimit a 1 1 1\nshutdown graceful\nshutdown\n";
    let fresh = fuzzing::admin_answers(probe);
    // Within one input the changes show, so the probe can tell.
    let changed = fuzzing::admin_answers(&[&changes[..], &probe[..]].concat());
    let seen = String::from_utf8_lossy(&changed);
    assert!(
        !seen.contains("H:gearhouse:1\t"),
        "job 1 was cancelled: {seen}"
    );
    assert!(seen.contains("z\t0\t0\t0\n"), "z was created: {seen}");
    assert!(
        String::from_utf8_lossy(&fresh).contains("H:gearhouse:1\t"),
        "{}",
        String::from_utf8_lossy(&fresh)
    );
    assert_eq!(
        String::from_utf8_lossy(&fuzzing::admin_answers(probe)),
        String::from_utf8_lossy(&fresh)
    );
}
