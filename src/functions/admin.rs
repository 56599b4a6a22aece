//! The admin text commands for per-function settings, called from [`crate::admin`]:
//!
//! - `limit FUNCTION RATE BURST MAX_RUNNING` (0 = unlimited; burst 0 = 1) sets a function's
//!   rate and concurrency limits at run time and answers `OK`. It changes state, so
//!   `crate::admin` accepts it only from `server.admin_networks` and runs it inside a
//!   `gearhouse.admin` span, where this module writes the one info line saying what changed.
//! - `show limits` lists every function whose settings differ from the defaults, one
//!   tab-separated line each (`FUNCTION RATE BURST MAX_RUNNING MAX_QUEUE CACHE_TTL_S
//!   DEAD_LETTER`, dead_letter as 1 or 0, max_queue as `high,normal,low` when they differ),
//!   then `.`, like gearmand's other listings.

use bytes::{BufMut, BytesMut};

use super::FunctionSettings;
use crate::engine::Engine;
use crate::protocol::ErrorCode;

const USAGE: &str = "limit FUNCTION RATE BURST MAX_RUNNING (0 = unlimited)";

/// gearmand's error style: `ERR CODE text+with+plus+for+spaces`.
fn err(out: &mut BytesMut, code: ErrorCode, text: &str) {
    out.put_slice(b"ERR ");
    out.put_slice(code.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(text.replace(' ', "+").as_bytes());
    out.put_slice(b"\r\n");
}

/// `limit FUNCTION RATE BURST MAX_RUNNING`; `words` is the whole line split on whitespace.
/// Returns whether the limits were set.
pub fn limit(engine: &Engine, words: &[&str], out: &mut BytesMut) -> bool {
    let parsed = match words {
        [_, func, rate, burst, max_running] => (|| {
            Some((
                *func,
                rate.parse::<f64>().ok()?,
                burst.parse::<u32>().ok()?,
                max_running.parse::<u32>().ok()?,
            ))
        })(),
        _ => None,
    };
    let Some((func, rate, burst, max_running)) = parsed else {
        err(out, ErrorCode::InvalidArguments, USAGE);
        return false;
    };
    let change = FunctionSettings {
        rate: Some(rate),
        burst: Some(burst),
        max_running: Some(max_running),
        ..Default::default()
    };
    match engine.set_function_settings(func, &change) {
        Ok(_) => {
            tracing::info!(
                function = func,
                rate,
                burst,
                max_running,
                "limits of {func} set: rate {rate}/s, burst {burst}, max_running {max_running} (0 = unlimited)"
            );
            out.put_slice(b"OK\r\n");
            true
        }
        Err(e) => {
            err(out, ErrorCode::InvalidArguments, &e.to_string());
            false
        }
    }
}

/// `show limits`: one line per function with non-default settings, then `.`.
pub fn show_limits(engine: &Engine, out: &mut BytesMut) -> bool {
    for f in engine.customized_functions() {
        let s = &f.settings;
        out.put_slice(
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                f.name,
                s.rate,
                s.burst,
                s.max_running,
                s.max_queue,
                s.cache_ttl_s,
                s.dead_letter as u8
            )
            .as_bytes(),
        );
    }
    out.put_slice(b".\n");
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::BytesMut;

    use super::*;
    use crate::engine::EngineConfig;

    fn run(e: &Engine, line: &str, f: fn(&Engine, &[&str], &mut BytesMut) -> bool) -> String {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let mut out = BytesMut::new();
        f(e, &words, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn limit_sets_and_show_limits_lists_only_functions_with_settings() {
        let mut cfg = EngineConfig::default();
        cfg.functions.insert(
            "mail".into(),
            FunctionSettings {
                dead_letter: Some(true),
                cache_ttl_s: Some(60),
                ..Default::default()
            },
        );
        let e = Engine::new(cfg, Arc::new(crate::metrics::Metrics::new(10)), None, None);
        e.create_function(&"plain".into()).unwrap();
        e.create_function(&"mail".into()).unwrap();
        assert_eq!(run(&e, "limit resize 50 5 2", limit), "OK\r\n");
        assert_eq!(run(&e, "limit slow 0.5 0 0", limit), "OK\r\n");
        e.set_max_queue(&"slow".into(), [1, 2, 3]).unwrap();
        assert_eq!(
            run(&e, "show limits", |e, _, o| show_limits(e, o)),
            "mail\t0\t0\t0\t10000000\t60\t1\n\
             resize\t50\t5\t2\t10000000\t0\t0\n\
             slow\t0.5\t1\t0\t1,2,3\t0\t0\n.\n"
        );
        assert_eq!(
            run(&e, "limit resize 50 5", limit),
            "ERR INVALID_ARGUMENTS limit+FUNCTION+RATE+BURST+MAX_RUNNING+(0+=+unlimited)\r\n"
        );
        assert_eq!(
            run(&e, "limit resize fast 5 2", limit),
            "ERR INVALID_ARGUMENTS limit+FUNCTION+RATE+BURST+MAX_RUNNING+(0+=+unlimited)\r\n"
        );
        let bad = run(&e, "limit resize -3 5 2", limit);
        assert!(
            bad.starts_with("ERR INVALID_ARGUMENTS functions.\"resize\".rate"),
            "{bad}"
        );
        // Lifting every limit leaves nothing to list for resize.
        assert_eq!(run(&e, "limit resize 0 0 0", limit), "OK\r\n");
        assert!(!run(&e, "show limits", |e, _, o| show_limits(e, o)).contains("resize"));
    }
}
