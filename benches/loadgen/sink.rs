//! `loadgen otlp-sink`: an OTLP/HTTP trace receiver that throws the spans away, so a run with
//! tracing on measures the exporter's cost, not a collector's.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Args;

#[derive(Default)]
struct SinkStats {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// An HTTP/1.1 server that answers every POST with 200 and an empty body (an empty protobuf
/// ExportTraceServiceResponse, or `{}` for JSON), so an OTLP/HTTP exporter sees success.
pub async fn otlp_sink(args: &Args) -> io::Result<()> {
    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    let addr = listener.local_addr()?;
    println!("otlp-sink listening on http://{addr} (POST any path; GET /stats)");
    let stats = Arc::new(SinkStats::default());
    let report = stats.clone();
    let accept = async move {
        loop {
            let (s, _) = listener.accept().await?;
            let stats = stats.clone();
            tokio::spawn(async move {
                if let Err(e) = sink_conn(s, stats).await {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        eprintln!("otlp-sink: connection: {e}");
                    }
                }
            });
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let r: io::Result<()> = tokio::select! {
        r = accept => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    println!(
        "RESULT mode=otlp-sink requests={} bytes={}",
        report.requests.load(Ordering::Relaxed),
        report.bytes.load(Ordering::Relaxed)
    );
    r
}

async fn sink_conn(mut s: TcpStream, stats: Arc<SinkStats>) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        // Headers.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 64 * 1024 {
                return Err(io::Error::other("headers too long"));
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.advance(head_end);
        let mut lines = head.split("\r\n");
        let request = lines.next().unwrap_or("").to_string();
        let (mut len, mut chunked, mut json, mut close) = (0usize, false, false, false);
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => len = v.parse().unwrap_or(0),
                "transfer-encoding" => chunked = v.contains("chunked"),
                "content-type" => json = v.contains("json"),
                "connection" => close = v == "close",
                _ => {}
            }
        }
        let body_len = if chunked {
            read_chunked(&mut s, &mut buf).await?
        } else {
            while buf.len() < len {
                if s.read_buf(&mut buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            buf.advance(len);
            len
        };
        let body: String = if request.starts_with("GET /stats") {
            format!(
                "requests={} bytes={}\n",
                stats.requests.load(Ordering::Relaxed),
                stats.bytes.load(Ordering::Relaxed)
            )
        } else {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            stats.bytes.fetch_add(body_len as u64, Ordering::Relaxed);
            if json {
                "{}".into()
            } else {
                String::new()
            }
        };
        let ctype = if json {
            "application/json"
        } else {
            "application/x-protobuf"
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// Consumes a chunked body from `buf`/`s`; returns its length.
async fn read_chunked(s: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let mut total = 0;
    loop {
        let line_end = loop {
            if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                break p;
            }
            if s.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::other("bad chunk size"))?;
        buf.advance(line_end + 2);
        while buf.len() < size + 2 {
            if s.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        buf.advance(size + 2);
        total += size;
        if size == 0 {
            return Ok(total);
        }
    }
}
