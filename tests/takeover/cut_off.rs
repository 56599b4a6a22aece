//! A server cut off from memcached fences itself; its peer takes the queue over, and the cut-off
//! server runs none of it when its access comes back.

use super::*;

/// A TCP proxy in front of one memcached that can black-hole the connections of one process
/// (found through /proc: the socket inode of the connection's far end among the process's
/// file descriptors), so one server loses memcached while its peer, using the same addresses,
/// keeps it.
struct CutProxy {
    addr: SocketAddr,
    victim: Arc<AtomicU32>,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CutProxy {
    async fn start(upstream: String) -> CutProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let victim = Arc::new(AtomicU32::new(0));
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let v = victim.clone();
        tokio::spawn(async move {
            while let Ok((s, peer)) = l.accept().await {
                let (up, v, rx) = (upstream.clone(), v.clone(), cut_rx.clone());
                tokio::spawn(relay(s, peer.port(), addr.port(), up, v, rx));
            }
        });
        CutProxy { addr, victim, cut }
    }
}

/// Forwards one connection; while the proxy is cut and the connection is the victim's, holds
/// it open without forwarding a byte (a black hole, as a partition looks), then closes it.
async fn relay(
    mut s: TcpStream,
    peer_port: u16,
    proxy_port: u16,
    upstream: String,
    victim: Arc<AtomicU32>,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    let is_victim = || {
        let pid = victim.load(Ordering::SeqCst);
        pid != 0 && socket_of(pid, peer_port, proxy_port)
    };
    if *cut.borrow() && is_victim() {
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Ok(mut u) = TcpStream::connect(&upstream).await else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut s, &mut u) => return,
            changed = cut.changed() => {
                if changed.is_err() {
                    return;
                }
                if *cut.borrow() && is_victim() {
                    let _ = cut.wait_for(|c| !*c).await;
                    return;
                }
            }
        }
    }
}

/// Whether process `pid` holds the loopback socket whose local port is `port` and whose
/// remote port is `remote` (from /proc/net/tcp and /proc/<pid>/fd).
fn socket_of(pid: u32, port: u16, remote: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let port_of = |a: &str| {
        a.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && port_of(f[1]) == Some(port) && port_of(f[2]) == Some(remote))
            .then(|| f[9].to_string())
    });
    let Some(inode) = inode else { return false };
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_cut_off_from_memcached_fences_and_never_runs_what_its_peer_took() {
    let _serial = SERIAL.lock().await;
    let ms: Vec<Memcached> = (0..3).map(|_| Memcached::start(64, &["-M"])).collect();
    let mut proxies = Vec::new();
    for m in &ms {
        proxies.push(CutProxy::start(m.addr()).await);
    }
    // Both servers use the proxies' addresses: the same ring, the same lease and lock keys.
    let list = proxies
        .iter()
        .map(|p| p.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let takeover_after = 3;
    let mut a = start("cut-a", &list, takeover_after, &[]).await;
    for p in &proxies {
        p.victim.store(a.child.id(), Ordering::SeqCst);
    }
    let b = start("cut-b", &list, takeover_after, &[]).await;
    let n = 2_000;
    submit_all(a.addr(), 0..n, 4).await;

    let cut_at = Instant::now();
    for p in &proxies {
        p.cut.send_replace(true);
    }
    let (a_http, b_http) = (a.http_addr(), b.http_addr());
    eventually(
        "node cut-a to fence itself",
        Duration::from_secs(10),
        || a.log_text(),
        || async move { metric(a_http, "gearhouse_fenced", "").await == 1.0 },
    )
    .await;
    println!(
        "cut-a fenced {:.2} s after losing memcached",
        cut_at.elapsed().as_secs_f64()
    );
    let ran_a = Arc::new(Ran::default());
    let ran_b = Arc::new(Ran::default());
    let _wa = workers(a.addr(), 2, &ran_a);
    let _wb = workers(b.addr(), 2, &ran_b);
    let r = ran_b.clone();
    eventually(
        "cut-b to take over and run cut-a's queue",
        Duration::from_secs(takeover_after as u64 + 10),
        || b.log_text(),
        || {
            let r = r.clone();
            async move { r.distinct() >= n as usize }
        },
    )
    .await;
    println!(
        "cut-b ran all {n} jobs {:.2} s after cut-a lost memcached",
        cut_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        ran_a.distinct(),
        0,
        "cut-a ran durable jobs while fenced: {:?}",
        ran_a.snapshot()
    );

    // Access comes back: cut-a renews, finds its queue taken and stays fenced.
    for p in &proxies {
        p.cut.send_replace(false);
    }
    eventually(
        "cut-a to learn that cut-b took its queue",
        Duration::from_secs(10),
        || a.log_text(),
        || async move { status(a_http).await["lease"]["taken_over_by"] == "cut-b" },
    )
    .await;
    assert_eq!(metric(a_http, "gearhouse_fenced", "").await, 1.0);
    // Its workers still get none of the jobs it holds in memory.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(ran_a.distinct(), 0, "cut-a ran jobs cut-b had taken over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut all = ran_b.snapshot();
    for (k, v) in ran_a.snapshot() {
        *all.entry(k).or_insert(0) += v;
    }
    assert_eq!(check_none_lost("cut off and back", 0..n, &all), 0);
    let log = a.log_text();
    assert!(
        log.contains("fenced: no lease renewal reached memcached"),
        "{log}"
    );
    assert!(log.contains("staying fenced: node cut-b took"), "{log}");
    takeover_shown(b_http, 0, "cut-a", n).await;

    // Jobs cut-a accepts while it stays fenced wait there; if it dies before anyone restarts
    // it, cut-b (the owner of its completed takeover lock) takes them over too.
    submit_all(a.addr(), n..n + 5, 1).await;
    let r = ran_b.clone();
    let late = (n..n + 5).map(|id| format!("job-{id}")).collect::<Vec<_>>();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ran_a.distinct(), 0, "cut-a ran jobs while fenced");
    a.kill9();
    eventually(
        "cut-b to take over the jobs cut-a accepted while fenced",
        Duration::from_secs(takeover_after as u64 + 10),
        || b.log_text(),
        || {
            let (r, late) = (r.clone(), late.clone());
            async move {
                let seen = r.snapshot();
                late.iter().all(|j| seen.contains_key(j))
            }
        },
    )
    .await;
    takeover_shown(b_http, 1, "cut-a", 5).await;

    // The way out is a restart: cut-a comes back with an empty queue, unfenced, and takes
    // new work again.
    ran_a.stop.store(true, Ordering::SeqCst);
    let a = start("cut-a", &list, takeover_after, &[]).await;
    let log = a.log_text();
    assert!(
        log.contains("node cut-b took this node's queue over while it was away"),
        "{log}"
    );
    let a_http = a.http_addr();
    assert_eq!(metric(a_http, "gearhouse_fenced", "").await, 0.0);
    let ran_a2 = Arc::new(Ran::default());
    let _wa2 = workers(a.addr(), 1, &ran_a2);
    submit_all(a.addr(), n + 5..n + 15, 1).await;
    let r = ran_a2.clone();
    eventually(
        "the restarted cut-a to run new jobs",
        Duration::from_secs(10),
        || a.log_text(),
        || {
            let r = r.clone();
            async move { r.distinct() >= 10 }
        },
    )
    .await;
    assert_eq!(
        check_none_lost("after the restart", n + 5..n + 15, &ran_a2.snapshot()),
        0
    );
    assert_eq!(
        ran_a2.distinct(),
        10,
        "old jobs of cut-a came back after its restart"
    );
    ran_a2.stop.store(true, Ordering::SeqCst);
    ran_b.stop.store(true, Ordering::SeqCst);
}
