//! gearhouse: a Gearman job server.
//!
//! The path of a job, one module per layer:
//! - [`server`]: sockets; one task per connection, owning its framing and write buffer.
//! - [`codec`]: bytes ↔ frames (binary packets and admin text lines), with size limits.
//! - [`protocol`]: frames ↔ typed requests, argument checks, `ERROR` codes.
//! - [`engine`]: requests → state changes: jobs, queues, priorities, coalescing, workers, timers
//!   ([`seq_index`] maps job handles to jobs).
//! - [`tls`] and [`access`]: TLS on the Gearman listener (rustls, client certificates, SIGHUP
//!   reload) and per-identity access rules (submit, register, admin).
//! - [`admin`]: the admin text protocol (gearmand's formats) over the engine's snapshots.
//! - [`metrics`] and [`http`]: Prometheus metrics, health and the JSON status API.
//! - [`local`]: an in-process client of the engine, for work the server submits itself (HTTP,
//!   schedules, dead-letter retries).
//! - [`schedule`]: recurring schedules (cron, UTC) that submit background jobs, shared by the
//!   servers of a cluster through memcached.
//! - [`telemetry`]: logging setup and one OpenTelemetry trace per job (OTLP).
//! - [`cache`]: cached job results (memcached, with an in-memory front); [`dead_letters`]: jobs
//!   the server gave up on, kept for listing and retry.
//! - [`functions`]: per-function settings (`[functions."<name>"]`: limits, cache, dead letters).
//! - [`config`]: layered configuration (defaults, file, `GEARHOUSE_*` env, flags).
//! - [`app`]: wires the pieces together for the binary and for tests.
//! - [`client`]: a small async Gearman client (pipelined connection, client and worker calls,
//!   admin commands) used by `gearhouse recover`, the integration tests and the load generator.
//! - [`import`]: `gearhouse import`, gearmand's persistent queue (sqlite, redis, memcached)
//!   moved into a running gearhouse, each job deleted from the source after its ack.
//! - [`cli`]: the command line (gearhouse's and gearmand's) and the process around the server
//!   (bind retry, daemon, pid file, privileges, systemd readiness); [`net`]: socket options.

pub mod access;
pub mod admin;
pub mod app;
pub mod cache;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod dead_letters;
pub mod engine;
pub mod functions;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod import;
pub mod local;
pub mod metrics;
pub mod net;
pub mod persist;
pub mod protocol;
pub mod schedule;
pub mod seq_index;
pub mod server;
pub mod telemetry;
pub mod tls;
