//! Layered configuration: built-in defaults, then the config file, then `GEARHOUSE_*`
//! environment variables, then command-line flags. Every key is documented in
//! `config/default.toml`.
//!
//! Environment names are `GEARHOUSE_<SECTION>__<KEY>`, e.g. `GEARHOUSE_SERVER__LISTEN` or
//! `GEARHOUSE_ENGINE__JOB_RETRIES` (double underscore between section and key, because keys
//! themselves contain single underscores). Lists take commas:
//! `GEARHOUSE_PERSISTENCE__MEMCACHED=10.0.0.1:11211,10.0.0.2:11211`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::access::{Access, AccessRule};
use crate::engine::EngineConfig;
use crate::functions::FunctionSettings;
use crate::protocol::ArgLimits;
use crate::server::ServerConfig;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {key}: {why}")]
    Invalid { key: &'static str, why: String },
}

/// The whole configuration, section by section.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub engine: EngineSection,
    pub http: HttpSection,
    pub log: LogSection,
    pub metrics: MetricsSection,
    pub persistence: PersistenceSection,
    pub tracing: TracingSection,
    pub scheduler: SchedulerSection,
    /// `[[schedules]]`: recurring schedules defined in the file.
    pub schedules: Vec<crate::schedule::ScheduleSpec>,
    pub access: AccessSection,
    pub cache: CacheSection,
    pub dead_letters: DeadLettersSection,
    /// `[functions."<name>"]` tables: per-function settings (empty by default).
    pub functions: BTreeMap<String, FunctionSettings>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: String,
    pub max_packet_size: usize,
    pub max_admin_line: usize,
    pub max_connections: usize,
    pub outbound_queue: usize,
    pub frame_timeout_ms: u64,
    pub max_function_len: usize,
    pub max_unique_len: usize,
    pub max_client_id_len: usize,
    pub admin_networks: Vec<String>,
    pub admin_read_networks: Vec<String>,
    pub max_unsent_bytes: usize,
    /// Time one connection may spend handling its requests before it lets the others run.
    pub turn_budget_us: u64,
    pub shutdown_timeout_ms: u64,
    /// Runtime threads serving connections; 0 = one per core.
    pub worker_threads: usize,
    /// How long to keep retrying a listen address that is still in use (EADDRINUSE) at start-up.
    pub bind_retry_ms: u64,
    /// Listen backlog of the Gearman socket.
    pub backlog: u32,
    /// TCP keepalive on accepted connections, and its timers (0 = the system's value).
    pub keepalive: bool,
    pub keepalive_idle_s: u32,
    pub keepalive_interval_s: u32,
    pub keepalive_count: u32,
    /// File the process id is written to at start and removed from at exit; empty = none.
    pub pid_file: String,
    /// User to switch to once the listeners are bound; empty = stay.
    pub user: String,
    /// TLS on `listen`: certificate chain and private key (PEM); empty = plain.
    pub tls_cert: String,
    pub tls_key: String,
    /// CA certificates (PEM) client certificates must chain to; set = client certificates required.
    pub tls_client_ca: String,
    pub tls_handshake_timeout_ms: u64,
    /// A plain listener beside the TLS one; empty = none.
    pub plain_listen: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    pub node_id: String,
    pub job_retries: u32,
    pub worker_wakeup: u32,
    pub max_queue_per_function: u32,
    pub max_functions: usize,
    /// Forward WORK_EXCEPTION to every client of a job, not only those that sent
    /// OPTION_REQ exceptions (gearmand's `--exceptions`).
    pub exceptions: bool,
}

/// `[access]`: access rules on the Gearman port.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    pub rules: Vec<AccessRule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub listen: String,
    /// Bearer tokens accepted for job submission from outside `server.admin_networks`.
    pub submit_tokens: Vec<String>,
    /// Default wait for a foreground job's result (`X-Gearman-Timeout` overrides it).
    pub job_timeout_ms: u64,
    /// HTTP job submissions in progress at once; past it 503.
    pub max_concurrent_jobs: usize,
    /// Kept-alive HTTP connections that keep an engine connection between their requests.
    pub max_kept_connections: usize,
    /// Open connections on the HTTP listener; past it new ones are closed at once.
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// A tracing filter; after loading always a valid one (gearmand's level names are
    /// translated, see [`normalize_level`]).
    pub level: String,
    pub format: LogFormat,
    /// Where logs go: empty or `stderr` = stderr, `none` = nowhere, else a file appended to.
    pub file: String,
}

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// What to do with a background job that cannot be made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The client gets `ERROR QUEUE_ERROR`: the job was not accepted.
    Refuse,
    /// Keep the job in memory only, counted and logged.
    AcceptInMemory,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub max_function_labels: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PersistenceSection {
    /// memcached nodes, `host:port`; empty = in-memory queue only.
    pub memcached: Vec<String>,
    pub namespace: String,
    /// 0 = automatic (2 with two or more nodes, else 1).
    pub replicas: usize,
    pub on_failure: OnFailure,
    pub write_timeout_ms: u64,
    pub connections_per_node: usize,
    pub max_batch: usize,
    pub max_pending_writes: usize,
    pub max_pending_deletes: usize,
    pub recover_from_node: String,
    pub repair_interval_ms: u64,
    /// Seconds a peer's lease must be missing before its queue is taken over; 0 = off.
    pub takeover_after_s: u64,
    /// Lease renewal interval; 0 = takeover_after_s / 5.
    pub lease_renew_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSection {
    /// Collector base URL; empty = tracing off (the `OTEL_*` variables win over it).
    pub otlp_endpoint: String,
    /// `service.name` of every exported span.
    pub service_name: String,
    /// Share of unremarkable jobs whose traces are kept (tail sampling); 1 = every job.
    pub sample_ratio: f64,
    /// A job whose queue wait or run time reaches this many milliseconds is always kept.
    pub slow_ms: u64,
    /// Job events waiting for the export thread past which new jobs are not traced.
    pub max_queue: usize,
    /// Jobs followed at once past which new jobs are not traced.
    pub max_jobs_in_flight: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    /// How often each server re-reads the shared schedule index (schedules added or removed
    /// on another server).
    pub sync_interval_ms: u64,
    /// How long a claimed due time is remembered in memcached.
    pub claim_ttl_s: u32,
    /// Schedules allowed; more are refused.
    pub max_schedules: usize,
}

/// `[cache]`: the result cache's in-memory front and its store queue.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Bytes of results kept in memory in front of memcached; 0 = none.
    pub front_bytes: usize,
    /// Results waiting to be written to memcached before new ones are skipped.
    pub store_queue: usize,
}

/// `[dead_letters]`: the bounds of the dead-letter store.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersSection {
    /// Letters kept at most (the oldest is dropped first).
    pub max_count: usize,
    /// Bytes of letters kept at most (the oldest are dropped first).
    pub max_bytes: usize,
    /// Letters waiting to be recorded before new ones are lost (and counted).
    pub queue: usize,
}

/// The shipped configuration file, `config/default.toml`: the one place every default is
/// written (and documented). It is the first layer of every load, and since no section has
/// `#[serde(default)]`, a key missing from it is an error at start-up and in the tests, not a
/// silent zero.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

impl Default for Config {
    /// The built-in defaults: `config/default.toml` alone.
    fn default() -> Self {
        Config::load_with_env(None, &[], std::iter::empty())
            .expect("config/default.toml holds every key (tested)")
    }
}

/// Each section's `Default` is its part of [`Config::default`] (so of `config/default.toml`).
macro_rules! section_defaults {
    ($($section:ident: $ty:ty),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                Config::default().$section
            }
        }
    )*};
}

section_defaults!(
    server: ServerSection,
    engine: EngineSection,
    http: HttpSection,
    log: LogSection,
    metrics: MetricsSection,
    persistence: PersistenceSection,
    tracing: TracingSection,
    access: AccessSection,
    scheduler: SchedulerSection,
    cache: CacheSection,
    dead_letters: DeadLettersSection
);

/// Keys that hold lists, so an environment value is split on commas.
const LIST_KEYS: &[&str] = &[
    "server.admin_networks",
    "server.admin_read_networks",
    "persistence.memcached",
    "http.submit_tokens",
];

impl Config {
    /// Loads defaults, then `file` (if given; it must exist), then the environment, then the
    /// `overrides` (flag values as `section.key` → value).
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Config, ConfigError> {
        Self::load_with_env(file, overrides, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &[(&str, String)],
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::load_layers(DEFAULTS_TOML, file, overrides, env)
    }

    /// The layers, bottom up: `defaults` (TOML text), `file`, `env`, `overrides`.
    fn load_layers(
        defaults: &str,
        file: Option<&Path>,
        overrides: &[(&str, String)],
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut b = config::Config::builder()
            .add_source(config::File::from_str(defaults, config::FileFormat::Toml));
        if let Some(f) = file {
            b = b.add_source(config::File::from(f).required(true));
        }
        let env: config::Map<String, String> = env.into_iter().collect();
        let mut e = config::Environment::with_prefix("GEARHOUSE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(env));
        for k in LIST_KEYS {
            e = e.with_list_parse_key(k);
        }
        b = b.add_source(e);
        for (k, v) in overrides {
            if LIST_KEYS.contains(k) {
                let list: Vec<String> = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                b = b.set_override(*k, list)?;
            } else {
                b = b.set_override(*k, v.clone())?;
            }
        }
        let mut cfg: Config = b.build()?.try_deserialize()?;
        cfg.log.level = normalize_level(&cfg.log.level)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why: &str| {
            Err(ConfigError::Invalid {
                key,
                why: why.into(),
            })
        };
        if self.server.max_packet_size < 1024 {
            return bad("server.max_packet_size", "must be at least 1024 bytes");
        }
        if self.server.max_packet_size > u32::MAX as usize {
            return bad("server.max_packet_size", "must fit a 32-bit packet length");
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections", "must be at least 1");
        }
        for (key, list) in [
            ("server.admin_networks", &self.server.admin_networks),
            (
                "server.admin_read_networks",
                &self.server.admin_read_networks,
            ),
        ] {
            for n in list {
                if n.parse::<ipnet::IpNet>().is_err() {
                    return Err(ConfigError::Invalid {
                        key,
                        why: format!("{n:?} is not a network like 127.0.0.0/8"),
                    });
                }
            }
        }
        if self.server.max_unsent_bytes < 64 * 1024 {
            return bad("server.max_unsent_bytes", "must be at least 65536");
        }
        if !(100..=1_000_000).contains(&self.server.turn_budget_us) {
            return bad(
                "server.turn_budget_us",
                "must be between 100 and 1000000 (microseconds)",
            );
        }
        if let Err(e) = Access::new(&self.access.rules) {
            return Err(ConfigError::Invalid {
                key: "access.rules",
                why: e.to_string(),
            });
        }
        let s = &self.server;
        if s.tls_cert.is_empty() != s.tls_key.is_empty() {
            return bad(
                "server.tls_cert",
                "server.tls_cert and server.tls_key go together (both or neither)",
            );
        }
        if s.tls_cert.is_empty() && !s.tls_client_ca.is_empty() {
            return bad(
                "server.tls_client_ca",
                "client certificates need TLS: set server.tls_cert and server.tls_key",
            );
        }
        if s.tls_cert.is_empty() && !s.plain_listen.is_empty() {
            return bad(
                "server.plain_listen",
                "is a plain listener beside a TLS one: without server.tls_cert, server.listen is plain already",
            );
        }
        if self.http.submit_tokens.iter().any(|t| t.trim().len() < 16) {
            return bad(
                "http.submit_tokens",
                "each token must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            );
        }
        if self.http.job_timeout_ms == 0 {
            return bad("http.job_timeout_ms", "must be at least 1");
        }
        if self.http.max_concurrent_jobs == 0 {
            return bad("http.max_concurrent_jobs", "must be at least 1");
        }
        if self.http.max_connections == 0 {
            return bad("http.max_connections", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return bad("tracing.sample_ratio", "must be between 0 and 1");
        }
        if self.tracing.slow_ms == 0 {
            return bad(
                "tracing.slow_ms",
                "must be at least 1 (a job waiting or running that long is always traced)",
            );
        }
        if self.tracing.max_queue == 0 {
            return bad("tracing.max_queue", "must be at least 1");
        }
        for (name, s) in &self.functions {
            s.validate(name).map_err(|e| ConfigError::Invalid {
                key: "functions",
                why: e.to_string(),
            })?;
        }
        let limits = self.server_config().limits;
        let mut ids = std::collections::HashSet::new();
        for (i, s) in self.schedules.iter().enumerate() {
            if !ids.insert(&s.id) {
                return Err(ConfigError::Invalid {
                    key: "schedules",
                    why: format!("[[schedules]] #{}: id {:?} is used twice", i + 1, s.id),
                });
            }
            if let Err(e) = crate::schedule::validate(s, &limits) {
                return Err(ConfigError::Invalid {
                    key: "schedules",
                    why: format!("[[schedules]] #{} ({:?}): {e}", i + 1, s.id),
                });
            }
        }
        if self.cache.store_queue == 0 {
            return bad("cache.store_queue", "must be at least 1");
        }
        if self.dead_letters.max_count == 0 || self.dead_letters.queue == 0 {
            return bad(
                "dead_letters.max_count",
                "max_count and queue must be at least 1",
            );
        }
        Ok(())
    }

    /// TCP keepalive settings for accepted connections, when `server.keepalive` is on.
    pub fn keepalive(&self) -> Option<crate::net::Keepalive> {
        let s = &self.server;
        s.keepalive.then_some(crate::net::Keepalive {
            idle_s: s.keepalive_idle_s,
            interval_s: s.keepalive_interval_s,
            count: s.keepalive_count,
        })
    }

    /// The node id: configured, else the host name.
    pub fn node_id(&self) -> String {
        if !self.engine.node_id.is_empty() {
            return self.engine.node_id.clone();
        }
        hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .map(|h| h.split('.').next().unwrap_or("gearhouse").to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "gearhouse".into())
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            node_id: self.node_id(),
            job_retries: self.engine.job_retries,
            worker_wakeup: self.engine.worker_wakeup,
            max_queue_per_function: self.engine.max_queue_per_function,
            max_functions: self.engine.max_functions,
            exceptions: self.engine.exceptions,
            functions: self.functions.clone(),
        }
    }

    pub fn server_config(&self) -> ServerConfig {
        let s = &self.server;
        ServerConfig {
            max_packet_size: s.max_packet_size,
            max_admin_line: s.max_admin_line,
            max_connections: s.max_connections,
            outbound_queue: s.outbound_queue,
            frame_timeout: Duration::from_millis(s.frame_timeout_ms),
            limits: ArgLimits {
                max_function: s.max_function_len,
                max_unique: s.max_unique_len,
                max_client_id: s.max_client_id_len,
            },
            admin_networks: s
                .admin_networks
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            admin_read_networks: s
                .admin_read_networks
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            max_unsent_bytes: s.max_unsent_bytes,
            turn_budget: Duration::from_micros(s.turn_budget_us),
            shutdown_timeout: Duration::from_millis(s.shutdown_timeout_ms),
            keepalive: self.keepalive(),
            access: std::sync::Arc::new(
                Access::new(&self.access.rules).expect("access rules are checked at load"),
            ),
            tls_handshake_timeout: Duration::from_millis(s.tls_handshake_timeout_ms),
        }
    }

    /// The TLS files of the Gearman listener, when TLS is on.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        let s = &self.server;
        (!s.tls_cert.is_empty()).then(|| crate::tls::TlsFiles {
            cert: s.tls_cert.clone().into(),
            key: s.tls_key.clone().into(),
            client_ca: (!s.tls_client_ca.is_empty()).then(|| s.tls_client_ca.clone().into()),
        })
    }
}

/// Log level names, gearmand's (`--verbose`) and tracing's, in any case, as tracing levels.
const LEVELS: &[(&str, &str)] = &[
    ("fatal", "error"),
    ("alert", "error"),
    ("critical", "error"),
    ("error", "error"),
    ("warning", "warn"),
    ("warn", "warn"),
    ("notice", "info"),
    ("info", "info"),
    ("debug", "debug"),
    ("trace", "trace"),
    ("off", "off"),
];

/// Turns `log.level` into a tracing filter that means what was asked, or refuses it.
///
/// A bare word is a level (gearmand's FATAL..DEBUG or tracing's error..trace, any case);
/// `target=level` directives keep their target and get their level translated. A bare word
/// that is not a level is refused: tracing would read `warning` as "everything from the
/// target named warning" and the server would log nothing at all, silently.
pub fn normalize_level(level: &str) -> Result<String, ConfigError> {
    let invalid = |why: String| ConfigError::Invalid {
        key: "log.level",
        why,
    };
    let as_level = |w: &str| {
        let w = w.trim().to_ascii_lowercase();
        LEVELS.iter().find(|(n, _)| *n == w).map(|(_, l)| *l)
    };
    let mut out = Vec::new();
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.rsplit_once('=') {
            None => match as_level(d) {
                Some(l) => out.push(l.to_string()),
                None => {
                    return Err(invalid(format!(
                        "{d:?} is not a log level: use FATAL, ALERT, CRITICAL, ERROR, WARNING, \
                         NOTICE, INFO, DEBUG (gearmand's), error, warn, info, debug, trace, or a \
                         filter such as \"gearhouse=debug,info\""
                    )))
                }
            },
            Some((target, l)) => match as_level(l) {
                Some(l) => out.push(format!("{target}={l}")),
                None => {
                    return Err(invalid(format!(
                        "{d:?}: {l:?} is not a log level (error, warn, info, debug, trace)"
                    )))
                }
            },
        }
    }
    if out.is_empty() {
        return Err(invalid("is empty: use info, warn, debug...".into()));
    }
    let filter = out.join(",");
    tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| invalid(format!("{level:?} is not a valid filter: {e}")))?;
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[server]\nlisten = \"1.1.1.1:1\"\nmax_connections = 7\n[engine]\njob_retries = 3\n",
        )
        .unwrap();
        let c = Config::load_with_env(
            Some(&f),
            &[("server.listen", "3.3.3.3:3".into())],
            env(&[
                ("GEARHOUSE_SERVER__LISTEN", "2.2.2.2:2"),
                ("GEARHOUSE_SERVER__MAX_CONNECTIONS", "9"),
                ("GEARHOUSE_PERSISTENCE__MEMCACHED", "a:1,b:2"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "3.3.3.3:3");
        assert_eq!(c.server.max_connections, 9);
        assert_eq!(c.engine.job_retries, 3);
        assert_eq!(c.persistence.memcached, vec!["a:1", "b:2"]);
        assert_eq!(c.server.max_packet_size, 16 << 20);
    }

    #[test]
    fn function_tables_keep_the_names_case_and_unset_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[functions.\"Resize.Big\"]\nrate = 50\nmax_running = 2\n[functions.mail]\ndead_letter = true\n",
        )
        .unwrap();
        let c = Config::load_with_env(Some(&f), &[], env(&[])).unwrap();
        let big = &c.functions["Resize.Big"];
        assert_eq!(
            (big.rate, big.max_running, big.burst),
            (Some(50.0), Some(2), None)
        );
        assert_eq!(c.functions["mail"].dead_letter, Some(true));
        assert!(Config::default().functions.is_empty());
        std::fs::write(&f, "[functions.mail]\nrte = 5\n").unwrap();
        let err = Config::load_with_env(Some(&f), &[], env(&[])).unwrap_err();
        assert!(err.to_string().contains("rte"), "{err}");
    }

    #[test]
    fn invalid_values_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[server]\nlisten_port = 1\n").unwrap();
        assert!(Config::load_with_env(Some(&f), &[], env(&[])).is_err());
        let e = Config::load_with_env(
            None,
            &[],
            env(&[("GEARHOUSE_SERVER__ADMIN_NETWORKS", "nope")]),
        );
        assert!(e.unwrap_err().to_string().contains("admin_networks"));
    }

    #[test]
    fn every_default_lives_in_the_shipped_file() {
        // The shipped file alone is a whole configuration...
        let d = Config::default();
        assert_eq!(d.server.max_packet_size, 16 << 20);
        assert_eq!(d.persistence.on_failure, OnFailure::Refuse);
        assert_eq!(d.log.format, LogFormat::Text);
        // ...and no key has a second, hidden default in the code: without any one of its
        // `key = value` lines, loading fails and names that key.
        let mut checked = 0;
        for (i, line) in DEFAULTS_TOML.lines().enumerate() {
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            let without: Vec<&str> = DEFAULTS_TOML
                .lines()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, l)| l)
                .collect();
            let e = Config::load_layers(&without.join("\n"), None, &[], env(&[]))
                .expect_err(key)
                .to_string();
            assert!(e.contains(key.trim()), "{key}: {e}");
            checked += 1;
        }
        let fields = serde_json::to_value(&d).unwrap();
        let count: usize = fields
            .as_object()
            .unwrap()
            .values()
            // A section counts its keys; a top-level list (`schedules = []`) is one line.
            .map(|s| s.as_object().map_or(1, |o| o.len()))
            .sum();
        assert_eq!(
            checked, count,
            "every field has exactly one line in the file"
        );
    }

    #[test]
    fn gearmand_and_tracing_level_names_become_tracing_filters() {
        for (given, want) in [
            ("WARNING", "warn"),
            ("warning", "warn"),
            ("Fatal", "error"),
            ("ALERT", "error"),
            ("CRITICAL", "error"),
            ("ERROR", "error"),
            ("NOTICE", "info"),
            ("INFO", "info"),
            ("DEBUG", "debug"),
            ("warn", "warn"),
            ("trace", "trace"),
            ("gearhouse=debug,info", "gearhouse=debug,info"),
            ("gearhouse=WARNING, INFO", "gearhouse=warn,info"),
        ] {
            let c = Config::load_with_env(None, &[("log.level", given.into())], env(&[]))
                .unwrap_or_else(|e| panic!("{given}: {e}"));
            assert_eq!(c.log.level, want, "{given}");
        }
        for bad in ["warnings", "", "verbose", "gearhouse=loud"] {
            let e = Config::load_with_env(None, &[], env(&[("GEARHOUSE_LOG__LEVEL", bad)]))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("log.level"), "{bad}: {e}");
        }
    }

    #[test]
    fn enums_parse_from_their_documented_names() {
        let c = Config::load_with_env(
            None,
            &[],
            env(&[
                ("GEARHOUSE_PERSISTENCE__ON_FAILURE", "accept_in_memory"),
                ("GEARHOUSE_LOG__FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(c.persistence.on_failure, OnFailure::AcceptInMemory);
        assert_eq!(c.log.format, LogFormat::Json);
        let e = Config::load_with_env(None, &[], env(&[("GEARHOUSE_LOG__FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("xml") && e.contains("log.format"), "{e}");
    }
}
