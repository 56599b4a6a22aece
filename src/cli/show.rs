//! `gearhouse config`: every key of the effective configuration, its value, and the layer it
//! came from. The config crate merges layers without remembering which one won, so the source
//! is worked out afterwards, top down: a flag that set the key, else a `GEARHOUSE_*` variable
//! that is set, else the file when it has the key, else the built-in default.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

use super::{CliError, Loaded};

/// One line of `gearhouse config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `section.key`.
    pub key: String,
    /// The value, as TOML would write it.
    pub value: String,
    /// `default`, `file PATH`, `environment VAR` or `flag FLAG`.
    pub source: String,
}

/// The entries of `loaded`, sorted by key.
pub fn entries(loaded: &Loaded, env: &HashMap<String, String>) -> Result<Vec<Entry>, CliError> {
    let file_keys = match &loaded.file {
        Some(f) => Some(
            config::Config::builder()
                .add_source(config::File::from(f.as_path()).required(true))
                .build()
                .map_err(crate::config::ConfigError::from)?,
        ),
        None => None,
    };
    let tree = serde_json::to_value(&loaded.config).expect("the configuration serializes");
    let mut out = Vec::new();
    for (section, keys) in tree.as_object().into_iter().flatten() {
        if !keys.is_object() {
            // A top-level list such as `[[schedules]]`: one entry for the whole list.
            let in_file = file_keys
                .as_ref()
                .is_some_and(|f| f.get::<config::Value>(section).is_ok());
            out.push(Entry {
                key: section.clone(),
                value: keys.to_string(),
                source: if in_file {
                    format!("file {}", file_name(loaded.file.as_deref()))
                } else {
                    "default".to_string()
                },
            });
            continue;
        }
        for (key, value) in keys.as_object().into_iter().flatten() {
            let full = format!("{section}.{key}");
            let var = format!(
                "GEARHOUSE_{}__{}",
                section.to_uppercase(),
                key.to_uppercase()
            );
            let source = if let Some(o) = loaded.overrides.iter().rev().find(|o| o.key == full) {
                format!("flag {}", o.flag)
            } else if env.contains_key(&var) {
                format!("environment {var}")
            } else if file_keys
                .as_ref()
                .is_some_and(|f| f.get::<config::Value>(&full).is_ok())
            {
                format!("file {}", file_name(loaded.file.as_deref()))
            } else {
                "default".to_string()
            };
            out.push(Entry {
                key: full,
                value: value.to_string(),
                source,
            });
        }
    }
    Ok(out)
}

fn file_name(f: Option<&Path>) -> String {
    f.map(|p| p.display().to_string()).unwrap_or_default()
}

/// The text `gearhouse config` prints: a header naming the file, then `key = value  # source`
/// lines (valid TOML apart from the dotted keys' sections).
pub fn render(loaded: &Loaded, entries: &[Entry]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# configuration file: {}",
        match &loaded.file {
            Some(f) => f.display().to_string(),
            None => format!(
                "none ({} does not exist): built-in defaults",
                super::SYSTEM_CONFIG
            ),
        }
    );
    let width = entries
        .iter()
        .map(|e| e.key.len() + e.value.len() + 3)
        .max()
        .unwrap_or(0);
    for e in entries {
        let kv = format!("{} = {}", e.key, e.value);
        let _ = writeln!(s, "{kv:width$}  # {}", e.source);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{load_with_env, ServeArgs};

    #[test]
    fn each_key_names_the_layer_that_set_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g.toml");
        std::fs::write(&f, "[engine]\njob_retries = 5\nworker_wakeup = 2\n").unwrap();
        let args = ServeArgs {
            config: Some(f.clone()),
            port: Some(4999),
            worker_wakeup: Some(3),
            ..Default::default()
        };
        let env = vec![(
            "GEARHOUSE_SERVER__MAX_CONNECTIONS".to_string(),
            "77".to_string(),
        )];
        let loaded = load_with_env(&args, env.clone()).unwrap();
        let e = entries(&loaded, &env.into_iter().collect()).unwrap();
        let get = |k: &str| e.iter().find(|e| e.key == k).unwrap().clone();
        assert_eq!(get("server.listen").value, "\"0.0.0.0:4999\"");
        assert_eq!(get("server.listen").source, "flag -L/-p");
        assert_eq!(get("engine.worker_wakeup").value, "3");
        assert_eq!(
            get("engine.worker_wakeup").source,
            "flag -w/--worker-wakeup"
        );
        assert_eq!(get("engine.job_retries").value, "5");
        assert_eq!(
            get("engine.job_retries").source,
            format!("file {}", f.display())
        );
        assert_eq!(get("server.max_connections").value, "77");
        assert_eq!(
            get("server.max_connections").source,
            "environment GEARHOUSE_SERVER__MAX_CONNECTIONS"
        );
        assert_eq!(get("log.level").source, "default");
        let count: usize = serde_json::to_value(&loaded.config)
            .unwrap()
            .as_object()
            .unwrap()
            .values()
            .map(|s| s.as_object().map_or(1, |o| o.len()))
            .sum();
        assert_eq!(e.len(), count, "every key is shown");
    }
}
