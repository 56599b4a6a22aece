//! Layered configuration: built-in defaults, then the config file, then `GEARHOUSE_*`
//! environment variables, then command-line flags. Every key is documented in
//! `config/default.toml`.
//!
//! Environment names are `GEARHOUSE_<SECTION>__<KEY>`, e.g. `GEARHOUSE_SERVER__LISTEN` or
//! `GEARHOUSE_ENGINE__JOB_RETRIES` (double underscore between section and key, because keys
//! themselves contain single underscores). Lists take commas:
//! `GEARHOUSE_PERSISTENCE__MEMCACHED=10.0.0.1:11211,10.0.0.2:11211`.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::engine::EngineConfig;
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
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub engine: EngineSection,
    pub http: HttpSection,
    pub log: LogSection,
    pub metrics: MetricsSection,
    pub persistence: PersistenceSection,
    pub tracing: TracingSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    pub shutdown_timeout_ms: u64,
    /// Runtime threads serving connections; 0 = one per core.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    pub node_id: String,
    pub job_retries: u32,
    pub worker_wakeup: u32,
    pub max_queue_per_function: u32,
    pub max_functions: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub level: String,
    pub format: LogFormat,
}

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// What to do with a background job that cannot be made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The client gets `ERROR QUEUE_ERROR`: the job was not accepted.
    #[default]
    Refuse,
    /// Keep the job in memory only, counted and logged.
    AcceptInMemory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    pub max_function_labels: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    pub recover_from_node: String,
    pub repair_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
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

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "0.0.0.0:4730".into(),
            max_packet_size: 16 << 20,
            max_admin_line: 4096,
            max_connections: 10_000,
            outbound_queue: 4096,
            frame_timeout_ms: 60_000,
            max_function_len: 512,
            max_unique_len: 1024,
            max_client_id_len: 256,
            admin_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
            shutdown_timeout_ms: 10_000,
            worker_threads: 0,
        }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        let d = EngineConfig::default();
        EngineSection {
            node_id: String::new(),
            job_retries: d.job_retries,
            worker_wakeup: d.worker_wakeup,
            max_queue_per_function: d.max_queue_per_function,
            max_functions: d.max_functions,
        }
    }
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: "127.0.0.1:4731".into(),
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            max_function_labels: 500,
        }
    }
}

impl Default for PersistenceSection {
    fn default() -> Self {
        PersistenceSection {
            memcached: Vec::new(),
            namespace: "gearhouse".into(),
            replicas: 0,
            on_failure: OnFailure::Refuse,
            write_timeout_ms: 2_000,
            connections_per_node: 1,
            max_batch: 512,
            max_pending_writes: 100_000,
            recover_from_node: String::new(),
            repair_interval_ms: 5_000,
        }
    }
}

impl Default for TracingSection {
    fn default() -> Self {
        TracingSection {
            otlp_endpoint: String::new(),
            service_name: "gearhouse".into(),
            // Failed, retried, dropped, refused and slow jobs are always kept: the ratio only
            // thins out jobs that went well (README "Tail sampling").
            sample_ratio: 0.1,
            slow_ms: 1_000,
            max_queue: 65_536,
            max_jobs_in_flight: 100_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: Default::default(),
            engine: Default::default(),
            http: Default::default(),
            log: Default::default(),
            metrics: Default::default(),
            persistence: Default::default(),
            tracing: Default::default(),
        }
    }
}

/// Keys that hold lists, so an environment value is split on commas.
const LIST_KEYS: &[&str] = &["server.admin_networks", "persistence.memcached"];

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
        let mut b = config::Config::builder();
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
        let cfg: Config = b.build()?.try_deserialize()?;
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
        for n in &self.server.admin_networks {
            if n.parse::<ipnet::IpNet>().is_err() {
                return Err(ConfigError::Invalid {
                    key: "server.admin_networks",
                    why: format!("{n:?} is not a network like 127.0.0.0/8"),
                });
            }
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
        Ok(())
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
            shutdown_timeout: Duration::from_millis(s.shutdown_timeout_ms),
        }
    }
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
    fn the_shipped_default_file_loads_and_matches_the_defaults() {
        let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let c = Config::load_with_env(Some(&f), &[], env(&[])).unwrap();
        let d = Config::default();
        assert_eq!(c.server.listen, d.server.listen);
        assert_eq!(c.server.max_packet_size, d.server.max_packet_size);
        assert_eq!(c.http.listen, d.http.listen);
        assert_eq!(c.engine.worker_wakeup, d.engine.worker_wakeup);
        assert_eq!(c.persistence.memcached, d.persistence.memcached);
    }
}
