//! TLS on the Gearman port and per-identity access rules, with the real binary: certificates
//! made by the `openssl` CLI, Python `gear` (Zuul's library, with its ssl_key/ssl_cert/ssl_ca
//! arguments: mutual TLS) as client and worker, and a raw rustls client for the refusals the
//! rules give. Also: a plain listener beside the TLS one, handshakes refused without a trusted
//! client certificate, and the certificate reloaded on SIGHUP.
//!
//! Debian's libgearman (the `gearman` CLI, PHP's extension) is built without SSL: its `-S` flag
//! is accepted but connects in clear text, so it cannot be tested against a TLS listener.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::pki::Pki;
use common::process::Proc;
use common::{free_port, BinServer};
use gearhouse::client::{is_listing, PacketReader};
use gearhouse::codec::{put_packet, PacketType, MAGIC_REQ};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A rustls client presenting `name`'s certificate (none for `None`), trusting the test CA.
fn connector(pki: &Pki, name: Option<&str>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&pki.path("ca.pem")) {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match name {
        Some(n) => b
            .with_client_auth_cert(
                certs(&pki.path(&format!("{n}.pem"))),
                key(&pki.path(&format!("{n}.key"))),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(cfg))
}

fn certs(p: &Path) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut std::fs::read(p).unwrap().as_slice())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn key(p: &Path) -> PrivateKeyDer<'static> {
    rustls_pemfile::private_key(&mut std::fs::read(p).unwrap().as_slice())
        .unwrap()
        .unwrap()
}

/// A raw Gearman connection over TLS.
struct TlsConn {
    stream: TlsStream<TcpStream>,
    reader: PacketReader,
}

impl TlsConn {
    /// Connects and completes the handshake; `Err` with the reason when the server refuses it
    /// (with TLS 1.3 a refused client certificate shows on the first read, so this reads once).
    async fn open(c: &TlsConnector, port: u16) -> Result<TlsConn, String> {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let stream = c.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let mut conn = TlsConn {
            stream,
            reader: PacketReader::default(),
        };
        // An ECHO round trip proves the session is usable.
        conn.send(PacketType::ECHO_REQ, &[b"ping"]).await;
        match tokio::time::timeout(
            Duration::from_secs(5),
            conn.reader.read_packet(&mut conn.stream),
        )
        .await
        {
            Ok(Ok(p)) if p.kind == PacketType::ECHO_RES => Ok(conn),
            Ok(Ok(p)) => Err(format!("unexpected {:?}", p.kind)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 5 s".into()),
        }
    }

    async fn send(&mut self, kind: PacketType, args: &[&[u8]]) {
        let mut b = BytesMut::new();
        put_packet(&mut b, MAGIC_REQ, kind, args);
        self.stream.write_all(&b).await.unwrap();
    }

    async fn recv(&mut self) -> (PacketType, String) {
        let p = tokio::time::timeout(
            Duration::from_secs(5),
            self.reader.read_packet(&mut self.stream),
        )
        .await
        .expect("a packet within 5 s")
        .expect("a packet");
        (p.kind, String::from_utf8_lossy(&p.body).into_owned())
    }

    async fn admin(&mut self, line: &str) -> String {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        let read = self.reader.read_admin(&mut self.stream, is_listing(line));
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("an admin answer within 5 s")
            .expect("an admin answer")
    }
}

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Python gear over TLS with `name`'s client certificate.
fn py_gear(pki: &Pki, name: &str, port: u16, args: &[&str]) -> Proc {
    let mut a = vec![
        format!("GEAR_SSL_KEY={}", pki.p(&format!("{name}.key"))),
        format!("GEAR_SSL_CERT={}", pki.p(&format!("{name}.pem"))),
        format!("GEAR_SSL_CA={}", pki.p("ca.pem")),
        "python3".into(),
        script("py_gear.py"),
        port.to_string(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    Proc::spawn(&format!("python gear ({name})"), "env", &a)
}

/// A server with TLS (client certificates required), a plain listener beside it, and rules.
fn tls_server(pki: &Pki, plain_port: u16) -> BinServer {
    let cfg = pki.path("gearhouse.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
tls_cert = "{cert}"
tls_key = "{key}"
tls_client_ca = "{ca}"
plain_listen = "127.0.0.1:{plain_port}"

[[access.rules]]
identity = "worker-1"
register = ["tls_*"]

[[access.rules]]
identity = "app"
submit = ["tls_rev"]
admin = "read"

[[access.rules]]
network = "127.0.0.0/8"
admin = "read"
"#,
            cert = pki.p("server.pem"),
            key = pki.p("server.key"),
            ca = pki.p("ca.pem"),
        ),
    )
    .unwrap();
    let cfg = cfg.to_string_lossy().into_owned();
    BinServer::start(&["--config", &cfg, "--node-id", "tls"], &[])
}

async fn metric(srv: &BinServer, series: &str) -> f64 {
    let (_, body) = common::http_get(srv.http_addr(), "/metrics").await.unwrap();
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_gear_over_mutual_tls_and_the_access_rules() {
    let pki = Pki::new();
    pki.issue("server", "localhost", true, false);
    for (n, cn) in [
        ("worker", "worker-1"),
        ("app", "app"),
        ("stranger", "stranger"),
    ] {
        pki.issue(n, cn, false, false);
    }
    pki.issue("forged", "app", false, true);
    let plain_port = free_port();
    let srv = tls_server(&pki, plain_port);

    // The happy path with a real client library: Python gear, mutual TLS, worker and client.
    let worker = py_gear(
        &pki,
        "worker",
        srv.port,
        &["worker", "1", "tls_rev=reverse"],
    );
    let client = py_gear(
        &pki,
        "app",
        srv.port,
        &["client", "fg", "tls_rev", "normal", "over tls"],
    )
    .finish_within(Duration::from_secs(30));
    let r = client.one("result");
    assert_eq!(
        r["data"],
        serde_json::json!(["slt revo"]),
        "{}",
        client.diag()
    );
    worker.finish_within(Duration::from_secs(10));

    // The rules, through a raw TLS client.
    let mut app = TlsConn::open(&connector(&pki, Some("app")), srv.port)
        .await
        .unwrap();
    app.send(PacketType::SUBMIT_JOB, &[b"tls_other", b"", b"x"])
        .await;
    let (kind, body) = app.recv().await;
    assert_eq!(kind, PacketType::ERROR, "{body}");
    assert!(body.starts_with("PERMISSION_DENIED\0"), "{body}");
    assert!(
        body.contains("tls_other") && body.contains("identity app"),
        "{body}"
    );
    app.send(PacketType::CAN_DO, &[b"tls_rev"]).await;
    let (kind, body) = app.recv().await;
    assert_eq!(kind, PacketType::ERROR, "{body}");
    assert!(body.contains("register"), "{body}");
    assert!(app.admin("status").await.ends_with(".\n"));
    let denied = app.admin("shutdown").await;
    assert!(denied.starts_with("ERR PERMISSION_DENIED"), "{denied}");

    let mut w = TlsConn::open(&connector(&pki, Some("worker")), srv.port)
        .await
        .unwrap();
    let denied = w.admin("status").await;
    assert!(denied.starts_with("ERR PERMISSION_DENIED"), "{denied}");
    w.send(PacketType::SUBMIT_JOB_BG, &[b"tls_rev", b"", b"x"])
        .await;
    assert_eq!(w.recv().await.0, PacketType::ERROR);

    // A certificate the CA did not sign (even with an allowed name), and none at all.
    let forged = TlsConn::open(&connector(&pki, Some("forged")), srv.port).await;
    assert!(
        forged.is_err(),
        "a self-signed 'app' certificate was accepted"
    );
    let anonymous = TlsConn::open(&connector(&pki, None), srv.port).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was accepted"
    );
    // A verified certificate no rule names may do nothing but echo and ask for status.
    let mut s = TlsConn::open(&connector(&pki, Some("stranger")), srv.port)
        .await
        .unwrap();
    s.send(PacketType::SUBMIT_JOB, &[b"tls_rev", b"", b"x"])
        .await;
    let (_, body) = s.recv().await;
    assert!(body.contains("no matching rule"), "{body}");

    // The plain listener beside the TLS one: loopback is read-only admin, no jobs.
    let mut plain = common::Conn::connect(format!("127.0.0.1:{plain_port}").parse().unwrap()).await;
    assert!(plain.admin("status").await.contains("tls_rev"));
    plain
        .send(PacketType::SUBMIT_JOB, &[b"tls_rev", b"", b"x"])
        .await;
    let r = plain.recv().await;
    assert_eq!(r.kind, PacketType::ERROR);
    assert!(r.arg(1).contains("network 127.0.0.0/8"), "{}", r.arg(1));

    assert!(metric(&srv, "gearhouse_access_denied_total{action=\"submit\"}").await >= 3.0);
    assert!(metric(&srv, "gearhouse_access_denied_total{action=\"register\"}").await >= 1.0);
    assert!(metric(&srv, "gearhouse_access_denied_total{action=\"admin\"}").await >= 1.0);
    assert!(metric(&srv, "gearhouse_tls_handshakes_total{result=\"failed\"}").await >= 2.0);
    assert!(metric(&srv, "gearhouse_tls_handshakes_total{result=\"ok\"}").await >= 5.0);
}

/// The common name of the certificate the server presents to a new connection.
async fn served_cn(pki: &Pki, port: u16) -> String {
    let c = TlsConn::open(&connector(pki, Some("app")), port)
        .await
        .unwrap();
    let cert = c.stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    gearhouse::tls::common_name(&cert).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old() {
    let pki = Pki::new();
    pki.issue("server", "localhost", true, false);
    pki.issue("app", "app", false, false);
    let mut srv = tls_server(&pki, free_port());
    assert_eq!(served_cn(&pki, srv.port).await, "localhost");
    let hup = |srv: &BinServer| unsafe {
        libc::kill(srv.child.id() as i32, libc::SIGHUP);
    };

    // A renewed certificate, in place of the old files.
    pki.issue("server", "renewed.localhost", true, false);
    hup(&srv);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if served_cn(&pki, srv.port).await == "renewed.localhost" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reloaded: {}",
            srv.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&srv, "gearhouse_tls_reloads_total{result=\"ok\"}").await,
        1.0
    );

    // A broken key: the reload fails, is logged and counted, and the server keeps serving.
    std::fs::write(pki.path("server.key"), "not a key").unwrap();
    hup(&srv);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&srv, "gearhouse_tls_reloads_total{result=\"failed\"}").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no failed reload: {}",
            srv.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served_cn(&pki, srv.port).await, "renewed.localhost");
    assert!(
        srv.log_text().contains("TLS reload failed"),
        "{}",
        srv.log_text()
    );
    assert!(srv.terminate().success());
}

#[test]
fn a_missing_certificate_stops_the_start_naming_the_setting() {
    let out = Command::new(common::server::binary())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--http",
            &format!("127.0.0.1:{}", free_port()),
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tls_cert") && err.contains("/nonexistent/cert.pem"),
        "{err}"
    );
}
