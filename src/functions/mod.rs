//! Per-function settings: the `[functions."<name>"]` tables of the config file (queue limit, rate
//! limit, concurrency limit, result cache, dead letters), in one place so that every feature that
//! looks a function up reads the same values. A setting left out of a table keeps the server's
//! behaviour for functions without one (no limit, no cache, no dead letters).
//!
//! - this file: the settings struct, merging a change into it, and validation (the same rules
//!   for the config file, the admin `limit` command and `PUT /api/v1/functions/{name}`);
//! - [`admin`]: the `limit` and `show limits` admin commands;
//! - [`persist`]: settings changed at run time, mirrored to memcached and read back at start-up.
//!
//! The engine keeps the settings in force (the config file's, with run-time changes over them)
//! and acts on them (`Engine::set_function_settings`); this module decides what a valid
//! setting is and where changes are kept.

pub mod admin;
pub mod persist;

use serde::{Deserialize, Serialize};

/// Highest `rate` accepted: a million starts per second is far above what one server does;
/// anything higher is a typo.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Lowest non-zero `rate` accepted: one job every 1000 s. Slower limits belong in a scheduler.
pub const MIN_RATE: f64 = 0.001;

/// The settings of one function; `None` = not set (the default behaviour).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSettings {
    /// Queued jobs allowed per priority (as the `maxqueue` admin command sets); 0 = no limit.
    pub max_queue: Option<u32>,
    /// Jobs started per second across all workers; 0 = unlimited.
    pub rate: Option<f64>,
    /// Jobs that may start at once after an idle spell under `rate` (unset or 0 = 1).
    pub burst: Option<u32>,
    /// Jobs running at once across all workers; 0 = unlimited.
    pub max_running: Option<u32>,
    /// Seconds a WORK_COMPLETE result is cached under (function, unique); 0 = not cached.
    pub cache_ttl_s: Option<u32>,
    /// Failed and excepted background jobs go to the dead-letter store.
    pub dead_letter: Option<bool>,
}

/// Why a setting was refused. The text names the setting and the accepted values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "functions.{function:?}.rate = {rate} is out of range: 0 (unlimited) or {MIN_RATE} to {MAX_RATE} jobs per second"
    )]
    Rate { function: String, rate: f64 },
    #[error("function name must not be empty")]
    EmptyName,
    /// The function would be new and the server already has `engine.max_functions`.
    #[error("{0}")]
    TooManyFunctions(String),
}

impl FunctionSettings {
    /// Takes every key that `change` sets; keys it leaves out keep their value.
    pub fn merge(&mut self, change: &FunctionSettings) {
        fn take<T: Copy>(into: &mut Option<T>, from: Option<T>) {
            if from.is_some() {
                *into = from;
            }
        }
        take(&mut self.max_queue, change.max_queue);
        take(&mut self.rate, change.rate);
        take(&mut self.burst, change.burst);
        take(&mut self.max_running, change.max_running);
        take(&mut self.cache_ttl_s, change.cache_ttl_s);
        take(&mut self.dead_letter, change.dead_letter);
    }

    /// These settings with `over`'s keys on top.
    pub fn merged(&self, over: &FunctionSettings) -> FunctionSettings {
        let mut s = self.clone();
        s.merge(over);
        s
    }

    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        *self == FunctionSettings::default()
    }

    /// Checks the values for function `name` (the config file, `limit` and the HTTP API share
    /// these rules). Counts need no check: every `u32` is meaningful, 0 meaning "no limit".
    pub fn validate(&self, name: &str) -> Result<(), SettingsError> {
        if name.is_empty() {
            return Err(SettingsError::EmptyName);
        }
        if let Some(rate) = self.rate {
            let ok = rate == 0.0 || (MIN_RATE..=MAX_RATE).contains(&rate);
            if !ok {
                return Err(SettingsError::Rate {
                    function: name.to_string(),
                    rate,
                });
            }
        }
        Ok(())
    }

    /// The rate limit in force: `Some((jobs per second, burst))`, `None` = unlimited.
    pub fn rate_limit(&self) -> Option<(f64, u32)> {
        let rate = self.rate.filter(|&r| r > 0.0)?;
        Some((rate, self.burst.unwrap_or(1).max(1)))
    }

    /// The concurrency limit in force; `None` = unlimited.
    pub fn running_limit(&self) -> Option<u32> {
        self.max_running.filter(|&n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_overrides_only_the_keys_it_sets() {
        let mut s = FunctionSettings {
            rate: Some(5.0),
            burst: Some(3),
            dead_letter: Some(true),
            ..Default::default()
        };
        s.merge(&FunctionSettings {
            rate: Some(0.0),
            max_running: Some(2),
            ..Default::default()
        });
        assert_eq!(s.rate, Some(0.0));
        assert_eq!(s.burst, Some(3));
        assert_eq!(s.max_running, Some(2));
        assert_eq!(s.dead_letter, Some(true));
        assert_eq!(s.rate_limit(), None, "rate 0 is unlimited");
        assert_eq!(s.running_limit(), Some(2));
        assert!(!s.is_empty());
        assert!(FunctionSettings::default().is_empty());
    }

    #[test]
    fn burst_defaults_to_one_and_bad_rates_name_the_setting() {
        let s = FunctionSettings {
            rate: Some(50.0),
            ..Default::default()
        };
        assert_eq!(s.rate_limit(), Some((50.0, 1)));
        assert!(s.validate("resize").is_ok());
        for bad in [-1.0, f64::NAN, f64::INFINITY, 0.0001, 2e6] {
            let s = FunctionSettings {
                rate: Some(bad),
                ..Default::default()
            };
            let e = s.validate("resize").unwrap_err().to_string();
            assert!(e.contains("functions.\"resize\".rate"), "{e}");
        }
        assert_eq!(
            FunctionSettings::default().validate(""),
            Err(SettingsError::EmptyName)
        );
    }
}
