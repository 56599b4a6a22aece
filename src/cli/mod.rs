//! The command line: `gearhouse serve|config|recover`, and gearmand 1.1.20's options with the
//! same meaning, so a unit file or init script written for gearmand starts gearhouse unchanged
//! (also under the name `gearmand`, with no subcommand).
//!
//! Flags do not act on their own: each becomes a `section.key` override on top of the layered
//! configuration ([`crate::config`]), so `gearhouse config` can show every value and where it
//! came from. gearmand options with no equivalent are refused at start-up, by name, with what to
//! use instead ([`gearmand`]); running the process around the server (bind retry, daemon, pid
//! file, privileges, systemd readiness) is [`process`].

pub mod gearmand;
pub mod process;
pub mod show;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError};

/// Where the configuration file is looked for when `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/gearhouse/gearhouse.toml";

#[derive(Parser, Debug)]
#[command(
    name = "gearhouse",
    version,
    propagate_version = true,
    about = "A Gearman job server: drop-in for gearmand, durable and observable"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Print the effective configuration (every key, its value and where it came from) for
    /// the same flags as `serve`, and exit.
    Config(ServeArgs),
    /// Move a dead node's durable queue from memcached into a running server, once.
    Recover(RecoverArgs),
    /// Move the jobs waiting in gearmand 1.1.20's persistent queue into a running gearhouse
    /// (each deleted from the source only after gearhouse acknowledged it).
    Import(ImportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Which gearmand queue store to read.
    #[command(subcommand)]
    pub source: ImportSource,
    /// Gearman address of the running gearhouse that receives the jobs.
    #[arg(long, default_value = "127.0.0.1:4730", global = true)]
    pub server: String,
}

/// gearmand's queue stores `gearhouse import` reads (see `crate::import`).
#[derive(Subcommand, Debug)]
pub enum ImportSource {
    /// gearmand -q libsqlite3 --libsqlite3-db FILE.
    Sqlite {
        /// The --libsqlite3-db file (gearmand stopped).
        file: PathBuf,
        /// The --libsqlite3-table.
        #[arg(long, default_value = "gearman_queue")]
        table: String,
    },
    /// gearmand -q redis --redis-server HOST --redis-port PORT.
    Redis {
        /// The redis server, HOST:PORT.
        addr: String,
        /// The --redis-prefix.
        #[arg(long, default_value = "_gear_")]
        prefix: String,
    },
    /// gearmand -q libmemcached --libmemcached-servers=...; best effort (memcached cannot list
    /// every key: run it again until it finds none).
    Memcached {
        /// The memcached servers, HOST:PORT[,HOST:PORT...].
        #[arg(value_delimiter = ',', required = true)]
        servers: Vec<String>,
        /// The key prefix (gearmand's is built in: `gear_`).
        #[arg(long, default_value = "gear_")]
        prefix: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct RecoverArgs {
    /// Node id of the dead server whose queue is moved.
    #[arg(long)]
    pub from_node: String,
    /// memcached nodes holding the queue, host:port[,host:port...].
    #[arg(long, value_delimiter = ',', required = true)]
    pub memcached: Vec<String>,
    /// Key namespace the dead server used [persistence.namespace].
    #[arg(long, default_value = "gearhouse")]
    pub namespace: String,
    /// Gearman address of the running server that receives the jobs.
    #[arg(long, default_value = "127.0.0.1:4730")]
    pub server: String,
    /// Copies the dead server kept (persistence.replicas); 0 = 2 with two or more nodes, else 1.
    #[arg(long, default_value_t = 0)]
    pub replicas: usize,
    /// Submits in flight at once.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
    /// Name recorded in the takeover lock key (when the jobs go through the protocol).
    #[arg(long, default_value = "gearhouse-recover")]
    pub owner: String,
    /// How long to wait for the server's own takeover (admin command `takeover`) to answer.
    #[arg(long, default_value_t = 600)]
    pub takeover_timeout_s: u64,
}

/// `serve` and `config` flags: gearhouse's own, and gearmand's that map (see README,
/// "Switching from gearmand").
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// Config file [default: /etc/gearhouse/gearhouse.toml when it exists, else built-in defaults].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Gearman listen address ADDR:PORT, or a host alone (gearmand's -L) [server.listen].
    #[arg(short = 'L', long)]
    pub listen: Option<String>,
    /// Gearman listen port, with the host of --listen/server.listen (gearmand's -p) [server.listen].
    #[arg(short = 'p', long)]
    pub port: Option<u16>,
    /// HTTP listen address for /metrics, /healthz, /readyz, /api/v1/status [http.listen].
    #[arg(long)]
    pub http: Option<String>,
    /// Log level: error, warn, info, debug, trace, gearmand's names, or a filter [log.level].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log level, gearmand's spelling: FATAL, ALERT, CRITICAL, ERROR, WARNING, NOTICE, INFO, DEBUG [log.level].
    #[arg(long, value_name = "LEVEL")]
    pub verbose: Option<String>,
    /// Log destination: stderr, none, or a file appended to [log.file].
    #[arg(short = 'l', long)]
    pub log_file: Option<String>,
    /// Node id used in job handles and memcached keys [engine.node_id, default: host name].
    #[arg(long)]
    pub node_id: Option<String>,
    /// Attempts after which a job is dropped with WORK_FAIL, 0 = never [engine.job_retries].
    #[arg(short = 'j', long)]
    pub job_retries: Option<u32>,
    /// Sleeping workers woken per queued job, 0 = all [engine.worker_wakeup].
    #[arg(short = 'w', long)]
    pub worker_wakeup: Option<u32>,
    /// Threads serving connections, 0 = one per core [server.worker_threads].
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// memcached nodes for the durable queue, host:port[,host:port...] [persistence.memcached].
    #[arg(long)]
    pub memcached: Option<String>,
    /// Seconds a peer's lease must be missing before this server takes its queue over; 0 = off
    /// [persistence.takeover_after_s].
    #[arg(long, value_name = "SECONDS")]
    pub takeover_after: Option<u64>,
    /// File the process id is written to, removed at exit [server.pid_file].
    #[arg(short = 'P', long)]
    pub pid_file: Option<String>,
    /// Detach into the background once the listeners are bound (not needed under systemd).
    #[arg(short = 'd', long)]
    pub daemon: bool,
    /// Switch to this user once the listeners are bound (needs root) [server.user].
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// TCP keepalive on client connections [server.keepalive].
    #[arg(long)]
    pub keepalive: bool,
    /// Keepalive idle seconds; -1 or 0 = the system's value [server.keepalive_idle_s].
    #[arg(long, allow_negative_numbers = true, value_name = "SECONDS")]
    pub keepalive_idle: Option<i64>,
    /// Seconds between keepalive probes; -1 or 0 = the system's [server.keepalive_interval_s].
    #[arg(long, allow_negative_numbers = true, value_name = "SECONDS")]
    pub keepalive_interval: Option<i64>,
    /// Keepalive probes before the connection is dropped; -1 or 0 = the system's [server.keepalive_count].
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub keepalive_count: Option<i64>,
    /// Listen backlog of the Gearman socket [server.backlog].
    #[arg(short = 'b', long)]
    pub backlog: Option<u32>,
    /// Send WORK_EXCEPTION to every client, not only those that asked [engine.exceptions].
    #[arg(long)]
    pub exceptions: bool,
    /// TLS on the Gearman listener: PEM certificate chain [server.tls_cert]. gearmand's
    /// --ssl-certificate is the same.
    #[arg(long, alias = "ssl-certificate", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// PEM private key of --tls-cert [server.tls_key]. gearmand's --ssl-key is the same.
    #[arg(long, alias = "ssl-key", value_name = "FILE")]
    pub tls_key: Option<String>,
    /// PEM CA certificates client certificates must chain to; set = required
    /// [server.tls_client_ca]. gearmand's --ssl-ca-file is the same.
    #[arg(long, alias = "ssl-ca-file", value_name = "FILE")]
    pub tls_client_ca: Option<String>,
    /// With TLS on, a plain listener beside it, ADDR:PORT [server.plain_listen].
    #[arg(long, value_name = "ADDR")]
    pub plain_listen: Option<String>,
    /// gearmand's --ssl: TLS on (needs --ssl-certificate and --ssl-key).
    #[arg(long)]
    pub ssl: bool,
    /// gearmand's queue type: builtin (in memory) or libmemcached (with --libmemcached-servers).
    #[arg(short = 'q', long, value_name = "TYPE")]
    pub queue_type: Option<String>,
    /// With -q libmemcached: memcached nodes [persistence.memcached].
    #[arg(long, value_name = "HOST:PORT,...")]
    pub libmemcached_servers: Option<String>,
    /// With -q libmemcached: key prefix [persistence.namespace].
    #[arg(long, value_name = "PREFIX")]
    pub libmemcached_prefix: Option<String>,
    /// gearmand's protocol modules: gear (always on) and http (with --http-port).
    #[arg(short = 'r', long, value_name = "MODULE")]
    pub protocol: Vec<String>,
    /// With -r http: the port of the HTTP listener (metrics, health, status) [http.listen].
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Accepted for gearmand compatibility: gearhouse always hands a worker's functions out in
    /// turn.
    #[arg(short = 'R', long)]
    pub round_robin: bool,
}

/// Why the command line was refused. All of these exit 2, before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{option}: not supported by gearhouse: {instead}")]
    Refused { option: String, instead: String },
    #[error("{flag}: {why}")]
    Invalid { flag: &'static str, why: String },
    #[error("{0}")]
    Config(#[from] ConfigError),
}

/// One flag's value, as a configuration override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// `section.key`.
    pub key: &'static str,
    pub value: String,
    /// The flag as given, for `gearhouse config` and error messages.
    pub flag: &'static str,
}

/// The parsed command line, whichever name the binary was started under.
///
/// Started as `gearmand` (a symlink), the whole command line is gearmand's: it is read as
/// `gearhouse serve ...`. gearmand options gearhouse cannot honour are refused here, by name.
/// Clap's own errors (an unknown flag, `--help`) print and exit as clap does.
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Cli, CliError> {
    let mut argv: Vec<OsString> = argv.into_iter().collect();
    let as_gearmand = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "gearmand");
    let version = argv.len() == 2 && matches!(argv[1].to_str(), Some("-V" | "--version"));
    if as_gearmand && !version {
        argv.insert(1, "serve".into());
    }
    if matches!(
        argv.get(1).and_then(|a| a.to_str()),
        Some("serve" | "config")
    ) {
        gearmand::refuse_unsupported(&argv[2..])?;
    }
    Ok(Cli::try_parse_from(argv).unwrap_or_else(|e| e.exit()))
}

/// A loaded configuration and how it was put together.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The configuration file read, if any.
    pub file: Option<PathBuf>,
    pub overrides: Vec<Override>,
    /// Things to log once logging is up (accepted gearmand options that change nothing).
    pub notes: Vec<String>,
}

/// The configuration file: `--config`, else [`SYSTEM_CONFIG`] when it exists, else none
/// (the built-in defaults).
pub fn config_file(args: &ServeArgs) -> Option<PathBuf> {
    args.config.clone().or_else(|| {
        let p = PathBuf::from(SYSTEM_CONFIG);
        p.exists().then_some(p)
    })
}

/// Loads the configuration for `serve`/`config` from the file, the process environment and
/// the flags.
pub fn load(args: &ServeArgs) -> Result<Loaded, CliError> {
    load_with_env(args, std::env::vars().collect())
}

/// As [`load`], with the environment given.
pub fn load_with_env(args: &ServeArgs, env: Vec<(String, String)>) -> Result<Loaded, CliError> {
    let file = config_file(args);
    let (mut overrides, notes) = gearmand::overrides(args)?;
    let pairs = |o: &[Override]| -> Vec<(&str, String)> {
        o.iter().map(|o| (o.key, o.value.clone())).collect()
    };
    let mut config = Config::load_with_env(file.as_deref(), &pairs(&overrides), env.clone())?;
    // -p and a host-only -L (gearmand's) each replace one half of the address the other layers
    // give, so they are applied once that address is known.
    let listen = gearmand::listen_address(args, &config.server.listen)?;
    let http = gearmand::http_address(args, &config.http.listen)?;
    if listen.is_some() || http.is_some() {
        overrides.extend(listen);
        overrides.extend(http);
        config = Config::load_with_env(file.as_deref(), &pairs(&overrides), env)?;
    }
    Ok(Loaded {
        config,
        file,
        overrides,
        notes,
    })
}
