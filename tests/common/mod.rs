//! Shared test harness. Each test binary uses only part of it:
//! - [`server`]: gearhouse in-process ([`TestServer`]) or as the real binary ([`BinServer`]) on
//!   free ports, and a minimal HTTP GET for its endpoints;
//! - [`conn`]: a raw Gearman connection ([`Conn`]) reading through the crate's client, and
//!   [`client`] for a typed [`gearhouse::client::Connection`];
//! - [`memcached`]: real memcached processes;
//! - [`ports`]: free loopback ports for the processes the tests start;
//! - [`process`]: real client programs as child processes with bounded waits (interop tests);
//! - [`otlp`]: reading what an OTLP exporter sent (the trace receivers);
//! - [`pki`]: a throwaway CA and certificates, made by the `openssl` CLI.
#![allow(dead_code, unused_imports)]

pub mod conn;
pub mod memcached;
pub mod otlp;
pub mod pki;
pub mod ports;
pub mod process;
pub mod server;

pub use conn::{client, fail_jobs, Conn, Reply};
pub use memcached::Memcached;
pub use ports::free_port;
pub use server::{binary, http_get, http_request, wait_ready, BinServer, TestServer};
