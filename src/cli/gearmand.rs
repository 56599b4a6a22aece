//! gearmand 1.1.20's options: which ones map to a gearhouse setting (and how), and which are
//! refused at start-up, by name, with what to use instead. A refused option stops the start
//! instead of being ignored, because each changes what the operator expects (TLS, where the
//! queue is kept, handle format): running without it silently would be worse than not starting.

use std::ffi::OsString;

use super::{CliError, Override, ServeArgs};

/// gearmand options with no gearhouse equivalent: (long name, or prefix when it ends with '-';
/// what to do instead).
const REFUSED: &[(&str, &str)] = &[
    ("file-descriptors", "raise the limit with LimitNOFILE= in the systemd unit (or ulimit -n); server.max_connections bounds connections"),
    ("syslog", "logs go to stderr (the journal under systemd) or to -l FILE"),
    ("coredump", "core dumps follow the system's settings (ulimit -c, systemd-coredump)"),
    ("hashtable-buckets", "gearhouse's tables grow as needed: drop the option"),
    ("job-handle-prefix", "job handles are H:<node_id>:<n>: set --node-id (engine.node_id)"),
    ("config-file", "gearmand's option file is not read: put the settings in a TOML file for --config (see deploy/gearhouse.toml)"),
    ("libsqlite3-", "the libsqlite3 queue is not supported: the durable queue is memcached (--memcached)"),
    ("store-queue-on-shutdown", "the libsqlite3 queue is not supported: the durable queue is memcached (--memcached)"),
    ("libpq-", "the Postgres queue is not supported: the durable queue is memcached (--memcached)"),
    ("redis-", "the redis queue is not supported: the durable queue is memcached (--memcached)"),
    ("mysql-", "the MySQL queue is not supported: the durable queue is memcached (--memcached)"),
];

/// gearmand's short options that take a value (the rest of a `-xyz` cluster is that value).
const SHORT_WITH_VALUE: &str = "bjlLPrqtuwp";

/// Refuses the gearmand options of [`REFUSED`] (and `-f`) wherever they appear in `args`.
pub fn refuse_unsupported(args: &[OsString]) -> Result<(), CliError> {
    let refused = |option: String, instead: &str| {
        Err(CliError::Refused {
            option,
            instead: instead.into(),
        })
    };
    for a in args.iter().filter_map(|a| a.to_str()) {
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or(long);
            for (r, instead) in REFUSED {
                let hit = match r.strip_suffix('-') {
                    Some(prefix) => name.starts_with(prefix) && name.len() > prefix.len(),
                    None => name == *r,
                };
                if hit {
                    return refused(format!("--{name}"), instead);
                }
            }
        } else if let Some(shorts) = a.strip_prefix('-') {
            for c in shorts.chars() {
                if c == 'f' {
                    return refused("-f".into(), REFUSED[0].1);
                }
                if SHORT_WITH_VALUE.contains(c) {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Whether `-L`'s value is a whole address (`host:port`, `[v6]:port`) rather than gearmand's
/// host alone.
fn is_full_address(v: &str) -> bool {
    if v.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match v.split_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !port.contains(':') && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

/// `host:port` → (`host`, `port`), keeping IPv6 brackets on the host.
fn split_address(a: &str) -> (&str, &str) {
    a.rsplit_once(':').unwrap_or((a, ""))
}

fn join_address(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The flags that set a whole key, and notes to log about accepted options that change
/// nothing. `-p`, a host-only `-L` and `--http-port` need the address the other layers give:
/// see [`listen_address`] and [`http_address`].
pub fn overrides(a: &ServeArgs) -> Result<(Vec<Override>, Vec<String>), CliError> {
    let mut o = Vec::new();
    let mut notes = Vec::new();
    let mut put = |key: &'static str, flag: &'static str, value: Option<String>| {
        if let Some(value) = value {
            o.push(Override { key, value, flag });
        }
    };
    let full_listen = a.listen.clone().filter(|l| is_full_address(l));
    put("server.listen", "--listen", full_listen);
    put("http.listen", "--http", a.http.clone());
    if a.log_level.is_some() && a.verbose.is_some() {
        return Err(CliError::Invalid {
            flag: "--verbose",
            why: "give --verbose or --log-level, not both".into(),
        });
    }
    put("log.level", "--log-level", a.log_level.clone());
    put("log.level", "--verbose", a.verbose.clone());
    put("log.file", "-l/--log-file", a.log_file.clone());
    put("engine.node_id", "--node-id", a.node_id.clone());
    put(
        "engine.job_retries",
        "-j/--job-retries",
        a.job_retries.map(|v| v.to_string()),
    );
    put(
        "engine.worker_wakeup",
        "-w/--worker-wakeup",
        a.worker_wakeup.map(|v| v.to_string()),
    );
    put(
        "server.worker_threads",
        "-t/--threads",
        a.threads.map(|v| v.to_string()),
    );
    put("persistence.memcached", "--memcached", a.memcached.clone());
    put(
        "persistence.takeover_after_s",
        "--takeover-after",
        a.takeover_after.map(|v| v.to_string()),
    );
    put("server.pid_file", "-P/--pid-file", a.pid_file.clone());
    put("server.tls_cert", "--tls-cert", a.tls_cert.clone());
    put("server.tls_key", "--tls-key", a.tls_key.clone());
    put(
        "server.tls_client_ca",
        "--tls-client-ca",
        a.tls_client_ca.clone(),
    );
    put(
        "server.plain_listen",
        "--plain-listen",
        a.plain_listen.clone(),
    );
    if a.ssl && a.tls_cert.is_none() {
        return Err(CliError::Invalid {
            flag: "--ssl",
            why: "needs --ssl-certificate and --ssl-key (or --tls-cert and --tls-key)".into(),
        });
    }
    put("server.user", "-u/--user", a.user.clone());
    put(
        "server.keepalive",
        "--keepalive",
        a.keepalive.then(|| "true".into()),
    );
    // gearmand's -1 means "the system's value", which is 0 here.
    let secs = |v: Option<i64>| v.map(|v| v.max(0).to_string());
    put(
        "server.keepalive_idle_s",
        "--keepalive-idle",
        secs(a.keepalive_idle),
    );
    put(
        "server.keepalive_interval_s",
        "--keepalive-interval",
        secs(a.keepalive_interval),
    );
    put(
        "server.keepalive_count",
        "--keepalive-count",
        secs(a.keepalive_count),
    );
    put(
        "server.backlog",
        "-b/--backlog",
        a.backlog.map(|v| v.to_string()),
    );
    put(
        "engine.exceptions",
        "--exceptions",
        a.exceptions.then(|| "true".into()),
    );
    match a
        .queue_type
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("builtin") => {
            if a.libmemcached_servers.is_some() || a.libmemcached_prefix.is_some() {
                return Err(CliError::Invalid {
                    flag: "--libmemcached-servers",
                    why: "needs -q libmemcached (or use --memcached HOST:PORT,...)".into(),
                });
            }
        }
        Some("libmemcached") => {
            let Some(servers) = a.libmemcached_servers.clone() else {
                return Err(CliError::Invalid {
                    flag: "-q libmemcached",
                    why: "needs --libmemcached-servers HOST:PORT,...".into(),
                });
            };
            put(
                "persistence.memcached",
                "-q libmemcached --libmemcached-servers",
                Some(servers),
            );
            put(
                "persistence.namespace",
                "--libmemcached-prefix",
                a.libmemcached_prefix.clone(),
            );
        }
        Some(other) => {
            return Err(CliError::Refused {
                option: format!("-q {other}"),
                instead: "the durable queue is memcached: -q libmemcached --libmemcached-servers \
                          HOST:PORT,... (or --memcached), or -q builtin for in memory"
                    .into(),
            })
        }
    }
    let mut http_module = false;
    for p in &a.protocol {
        match p.to_ascii_lowercase().as_str() {
            "gear" => {}
            "http" => http_module = true,
            other => {
                return Err(CliError::Refused {
                    option: format!("-r {other}"),
                    instead: "the protocol modules are gear (always on) and http".into(),
                })
            }
        }
    }
    if a.http_port.is_some() && !http_module {
        return Err(CliError::Invalid {
            flag: "--http-port",
            why: "needs -r http (or use --http ADDR)".into(),
        });
    }
    if http_module {
        notes.push(
            "-r http: gearmand's HTTP job paths (GET/POST/PUT /FUNCTION, X-Gearman-* headers) \
             are served on gearhouse's HTTP listener, beside /metrics, /healthz, /readyz, \
             /api/v1/status and /jobs/...; submitting needs a peer in server.admin_networks or \
             a token from http.submit_tokens"
                .into(),
        );
    }
    if a.round_robin {
        notes.push(
            "-R/--round-robin: gearhouse always hands a worker's functions out in turn; \
             the option changes nothing"
                .into(),
        );
    }
    Ok((o, notes))
}

/// `server.listen` from gearmand's `-p PORT` and host-only `-L HOST`, each replacing its half
/// of `current` (the address the file, environment and `--listen ADDR` give); `None` when
/// neither is given.
pub fn listen_address(a: &ServeArgs, current: &str) -> Result<Option<Override>, CliError> {
    let host_only = a.listen.as_deref().filter(|l| !is_full_address(l));
    if host_only.is_none() && a.port.is_none() {
        return Ok(None);
    }
    let (cur_host, cur_port) = split_address(current);
    let host = host_only.unwrap_or(cur_host);
    let port = a.port.map(|p| p.to_string());
    let port = port.as_deref().unwrap_or(cur_port);
    if host.is_empty() {
        return Err(CliError::Invalid {
            flag: "-L/--listen",
            why: "is empty: give a host such as 0.0.0.0".into(),
        });
    }
    Ok(Some(Override {
        key: "server.listen",
        value: join_address(host, port),
        flag: "-L/-p",
    }))
}

/// `http.listen` for gearmand's `-r http` (`--http-port`, default 8080 as in gearmand), on the
/// host `current` gives (loopback by default: expose it deliberately). That listener speaks
/// gearmand's HTTP protocol at its own paths (`src/http/gearmand.rs`) besides gearhouse's.
pub fn http_address(a: &ServeArgs, current: &str) -> Result<Option<Override>, CliError> {
    if !a.protocol.iter().any(|p| p.eq_ignore_ascii_case("http")) {
        return Ok(None);
    }
    let (host, _) = split_address(current);
    Ok(Some(Override {
        key: "http.listen",
        value: join_address(host, &a.http_port.unwrap_or(8080).to_string()),
        flag: "-r http --http-port",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn refused_options_are_named_wherever_they_are() {
        for (args, named) in [
            (&["-p", "1", "--syslog"][..], "--syslog"),
            (&["-f", "100"][..], "-f"),
            (&["-df100"][..], "-f"),
            (&["--redis-server", "x"][..], "--redis-server"),
            (&["--job-handle-prefix", "H:x"][..], "--job-handle-prefix"),
        ] {
            let e = refuse_unsupported(&os(args)).expect_err(named).to_string();
            assert!(e.starts_with(named), "{args:?}: {e}");
        }
        refuse_unsupported(&os(&["-l", "/tmp/f", "-d", "-L", "::1", "--", "--syslog"])).unwrap();
    }

    #[test]
    fn port_and_host_replace_their_half() {
        let mut a = ServeArgs {
            port: Some(5000),
            ..Default::default()
        };
        let l = |a: &ServeArgs, cur| listen_address(a, cur).unwrap().map(|o| o.value);
        assert_eq!(l(&a, "0.0.0.0:4730").as_deref(), Some("0.0.0.0:5000"));
        a.listen = Some("::1".into());
        assert_eq!(l(&a, "0.0.0.0:4730").as_deref(), Some("[::1]:5000"));
        a.port = None;
        a.listen = Some("10.0.0.1".into());
        assert_eq!(l(&a, "0.0.0.0:4730").as_deref(), Some("10.0.0.1:4730"));
        a.listen = Some("10.0.0.1:99".into());
        assert_eq!(
            l(&a, "0.0.0.0:4730"),
            None,
            "a whole address is a plain override"
        );
        assert!(is_full_address("[::1]:4730") && is_full_address("localhost:1"));
        assert!(!is_full_address("::") && !is_full_address("localhost"));
    }
}
