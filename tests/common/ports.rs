//! Free loopback ports for the processes the tests start.
//!
//! A port is picked, released, and only then bound by the child process: in between, anything
//! can take it. The kernel gives outgoing connections their source ports from its ephemeral
//! range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768-60999 by default), which is also
//! where binding port 0 picks from, and the tests open many connections: a port picked that way
//! can become some connection's source port before the child binds it. So ports are picked
//! below that range, from a sequence that starts at a random place, so that one test process
//! never hands out the same port twice.

use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The lowest port handed out.
const LOW: u16 = 10_000;

/// A free TCP port on loopback (bound then released), below the ephemeral range.
pub fn free_port() -> u16 {
    // (ports in the sequence, the sequence), from the range read once per process.
    static SEQUENCE: OnceLock<(u32, AtomicU32)> = OnceLock::new();
    let (span, next) = SEQUENCE.get_or_init(|| {
        let span = u32::from(ephemeral_start().saturating_sub(LOW));
        let start = RandomState::new().hash_one(std::process::id()) as u32;
        (span, AtomicU32::new(start))
    });
    if *span < 1_000 {
        // An unusual ephemeral range: leave the choice to the kernel.
        return TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    for _ in 0..*span {
        let port = LOW + (next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port from {LOW} up to the ephemeral range");
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
