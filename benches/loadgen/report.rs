//! Fields of the RESULT line shared by every mode (errors, the server's memory); the format is
//! what benches/compare.sh parses, so it does not change.

use std::sync::atomic::Ordering;

use crate::workers::Shared;

/// The server's VmRSS/VmHWM: printed as a human line, returned as ` rss_kb=.. hwm_kb=..`.
pub fn rss(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return String::new();
    };
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return " rss_kb=NA".into();
    };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("NA")
            .to_string()
    };
    let (r, h) = (field("VmRSS:"), field("VmHWM:"));
    println!(
        "server pid {pid}: VmRSS {} MiB, VmHWM {} MiB",
        r.parse::<f64>()
            .map(|k| format!("{:.1}", k / 1024.0))
            .unwrap_or(r.clone()),
        h.parse::<f64>()
            .map(|k| format!("{:.1}", k / 1024.0))
            .unwrap_or(h.clone())
    );
    format!(" rss_kb={r} hwm_kb={h}")
}

pub fn errors_field(shared: &Shared) -> String {
    format!(" errors={}", shared.errors.load(Ordering::Relaxed))
}
