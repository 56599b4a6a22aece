//! Kept-alive HTTP connections: curl and reqwest reusing connections under load, and the one
//! engine connection a kept-alive connection holds between its requests.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_and_many_concurrent_clients() {
    let server = TestServer::start(&[]).await;
    for _ in 0..4 {
        spawn_worker(server.addr, "up", Act::Upper);
    }
    // curl: two requests, one connection.
    let url = format!("http://{}/jobs/up", server.http);
    let a = curl(s(&[
        "-v",
        "--data-binary",
        "one",
        &url,
        "--next",
        "-v",
        "--data-binary",
        "two",
        &url,
    ]))
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.stderr.contains("existing connection"),
        "curl did not reuse the connection:\n{}",
        a.stderr
    );
    // reqwest: 64 clients at once, 10 requests each, over a pool of kept-alive connections.
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        )
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|c| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                for i in 0..10 {
                    let body = format!("client {c} request {i}");
                    let r = http.post(&url).body(body.clone()).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    assert_eq!(r.text().await.unwrap(), body.to_uppercase());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        metric(
            server.http,
            "gearhouse_http_job_requests_total",
            "route=\"submit\",status=\"200\""
        )
        .await,
        642.0
    );
    server.stop().await;
}

/// One request on a kept-alive connection `s`: (status, body).
async fn on_conn(
    s: &mut tokio::net::TcpStream,
    path: &str,
    body: &str,
    extra: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a Content-Length");
            if rest.len() >= len {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                return (status, rest[..len].to_string());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connections the engine has (`/api/v1/status`).
async fn engine_connections(http: SocketAddr) -> u64 {
    let (_, body) = http_get(http, "/api/v1/status").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["connections"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_keeps_one_engine_connection_and_never_a_stale_result() {
    let server = TestServer::start(&[]).await;
    spawn_worker(server.addr, "up", Act::Upper);
    let mut slow = client(server.addr).await;
    slow.can_do(b"slow").await.unwrap();
    eventually("the workers", || async {
        engine_connections(server.http).await == 2
    })
    .await;
    let base = engine_connections(server.http).await;

    let mut s = tokio::net::TcpStream::connect(server.http).await.unwrap();
    assert_eq!(
        on_conn(&mut s, "/jobs/up", "a", "").await,
        (200, "A".into())
    );
    assert_eq!(
        engine_connections(server.http).await,
        base + 1,
        "kept between requests"
    );
    let (status, _) = on_conn(&mut s, "/jobs/up", "b", "X-Gearman-Background: true\r\n").await;
    assert_eq!(status, 202);
    assert_eq!(
        on_conn(&mut s, "/jobs/up", "c", "").await,
        (200, "C".into())
    );
    assert_eq!(
        engine_connections(server.http).await,
        base + 1,
        "still the one"
    );

    // A request that times out while its job runs: the job's result must not answer the
    // connection's next request. Its timeout is shorter than the last request's (30 s): the
    // connection's timer must fire at the earlier deadline.
    let t0 = Instant::now();
    let timed_out = tokio::spawn(async move {
        let r = on_conn(&mut s, "/jobs/slow", "first", "X-Gearman-Timeout: 500\r\n").await;
        (r, s)
    });
    eventually("the first job to queue", || async {
        jobs_of(server.addr, "slow").await == 1
    })
    .await;
    let first = slow
        .grab(GrabKind::Uniq)
        .await
        .unwrap()
        .expect("the first job");
    let ((status, _), mut s) = timed_out.await.unwrap();
    assert_eq!(status, 504);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "504 after {:?}",
        t0.elapsed()
    );
    let next = tokio::spawn(async move {
        let r = on_conn(&mut s, "/jobs/slow", "second", "").await;
        (r, s)
    });
    eventually("the second job to queue", || async {
        jobs_of(server.addr, "slow").await == 2
    })
    .await;
    slow.complete(&first.handle, b"FIRST").await.unwrap();
    let second = slow
        .grab(GrabKind::Uniq)
        .await
        .unwrap()
        .expect("the second job");
    slow.complete(&second.handle, b"SECOND").await.unwrap();
    let (answer, s) = next.await.unwrap();
    assert_eq!(answer, (200, "SECOND".into()));

    drop(s);
    eventually("the engine connection to go with the HTTP one", || async {
        engine_connections(server.http).await == base
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_engine_connections_stop_at_max_kept_connections() {
    let server = TestServer::start(&[("GEARHOUSE_HTTP__MAX_KEPT_CONNECTIONS", "1")]).await;
    spawn_worker(server.addr, "up", Act::Upper);
    eventually("the worker", || async {
        engine_connections(server.http).await == 1
    })
    .await;
    let kept = || metric(server.http, "gearhouse_http_kept_connections", "");

    let mut a = tokio::net::TcpStream::connect(server.http).await.unwrap();
    let mut b = tokio::net::TcpStream::connect(server.http).await.unwrap();
    assert_eq!(
        on_conn(&mut a, "/jobs/up", "a", "").await,
        (200, "A".into())
    );
    assert_eq!(
        on_conn(&mut b, "/jobs/up", "b", "").await,
        (200, "B".into())
    );
    assert_eq!(
        engine_connections(server.http).await,
        2,
        "only the first is kept"
    );
    assert_eq!(kept().await, 1.0);
    // The second connection goes on working, registering per request.
    assert_eq!(
        on_conn(&mut b, "/jobs/up", "c", "").await,
        (200, "C".into())
    );
    assert_eq!(engine_connections(server.http).await, 2);

    drop(a);
    eventually("the kept place to be given back", || async {
        kept().await == 0.0 && engine_connections(server.http).await == 1
    })
    .await;
    assert_eq!(
        on_conn(&mut b, "/jobs/up", "d", "").await,
        (200, "D".into())
    );
    assert_eq!(kept().await, 1.0, "b takes the free place");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_http_max_connections_are_closed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&[("GEARHOUSE_HTTP__MAX_CONNECTIONS", "2")]).await;
    let connect = || tokio::net::TcpStream::connect(server.http);
    // Two kept-alive connections, each answered (the readiness checks' connections are gone
    // once these are served: the server only answers within its bound).
    let (mut a, mut b) = (connect().await.unwrap(), connect().await.unwrap());
    let bg = "X-Gearman-Background: true\r\n";
    assert_eq!(on_conn(&mut a, "/jobs/q", "1", bg).await.0, 202);
    assert_eq!(on_conn(&mut b, "/jobs/q", "2", bg).await.0, 202);

    // A third is accepted by the kernel and closed by the server without an answer.
    let mut c = connect().await.unwrap();
    let _ = c
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("the server closes it at once");
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "answered past the bound: {got:?}"
    );
    // The two within the bound go on.
    assert_eq!(on_conn(&mut a, "/jobs/q", "3", bg).await.0, 202);

    // Closing one frees its place: the next connection is served, and counts the refusal.
    drop(b);
    let refused = || async {
        let Ok((200, body)) = http_get(server.http, "/metrics").await else {
            return None;
        };
        body.lines()
            .find_map(|l| l.strip_prefix("gearhouse_http_connections_refused_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    eventually("a freed place and the refusal counted", || async {
        refused().await.is_some_and(|n| n >= 1.0)
    })
    .await;
    server.stop().await;
}
