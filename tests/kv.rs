//! The replicated key-value store for the server's own state (`persist::kv`), against real
//! memcached processes: copies on `replicas` nodes, reads that survive a lost node, claims that
//! exactly one caller wins, TTLs, and clear errors for a value memcached refuses.

mod common;

use std::time::Duration;

use common::memcached::Memcached;
use gearhouse::persist::kv::{Kv, KvError};

fn kv(nodes: &[&Memcached], replicas: usize) -> Kv {
    let addrs: Vec<String> = nodes.iter().map(|m| m.addr()).collect();
    Kv::new(&addrs, replicas, Duration::from_secs(2))
}

#[tokio::test]
async fn values_survive_the_loss_of_a_node_with_two_replicas() {
    let (a, mut b, c) = (
        Memcached::start(64, &[]),
        Memcached::start(64, &[]),
        Memcached::start(64, &[]),
    );
    let store = kv(&[&a, &b, &c], 2);
    for i in 0..50 {
        let k = Kv::key("t", &["kv", &i.to_string()]);
        assert_eq!(
            store.set(&k, format!("v{i}").as_bytes(), 0).await.unwrap(),
            2
        );
    }
    b.kill();
    for i in 0..50 {
        let k = Kv::key("t", &["kv", &i.to_string()]);
        let v = store.get(&k).await.unwrap();
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_bytes()), "key {i}");
    }
    assert_eq!(store.get(b"t:kv:missing").await.unwrap(), None);
    store.delete(b"t:kv:3").await.unwrap();
    assert_eq!(store.get(b"t:kv:3").await.unwrap(), None);
}

#[tokio::test]
async fn of_many_concurrent_claims_exactly_one_wins_and_ttls_expire() {
    let (a, b) = (Memcached::start(64, &[]), Memcached::start(64, &[]));
    let stores: Vec<Kv> = (0..8).map(|_| kv(&[&a, &b], 2)).collect();
    let wins = futures::future::join_all(stores.iter().map(|s| s.claim(b"t:claim:1", b"x", 60)))
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
    assert_eq!(wins, 1);
    let s = &stores[0];
    assert_eq!(s.set(b"t:ttl", b"soon gone", 1).await.unwrap(), 2);
    assert!(s.get(b"t:ttl").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(s.get(b"t:ttl").await.unwrap(), None);
}

#[tokio::test]
async fn refusals_and_outages_are_errors_that_say_why() {
    let mut a = Memcached::start(64, &["-I", "1m"]);
    let s = kv(&[&a], 1);
    let big = vec![b'x'; 2 << 20];
    match s.set(b"t:big", &big, 0).await {
        Err(KvError::Refused(why)) => assert!(why.contains("too large"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        s.set(b"bad key", b"v", 0).await,
        Err(KvError::BadKey(_))
    ));
    a.kill();
    assert!(matches!(
        s.get(b"t:any").await,
        Err(KvError::Unreachable(_))
    ));
}

#[tokio::test]
async fn a_caller_dropped_mid_request_does_not_hand_its_reply_to_the_next() {
    use futures::FutureExt;
    let a = Memcached::start(64, &[]);
    let store = kv(&[&a], 1);
    store.set(b"t:drop:one", b"one", 0).await.unwrap();
    store.set(b"t:drop:two", b"two", 0).await.unwrap();
    for round in 0..20 {
        // One poll writes the request on the open connection; dropping the future then leaves
        // its reply unread (an HTTP handler whose client went away does this).
        let dropped = store.get(b"t:drop:one").now_or_never();
        if let Some(r) = dropped {
            assert_eq!(r.unwrap().as_deref(), Some(&b"one"[..]));
        }
        let v = store.get(b"t:drop:two").await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"two"[..]), "round {round}");
    }
}
