//! Per-function settings in the engine: the ones in force for each function (the config file's
//! `[functions."<name>"]` table with run-time changes over it), applying them to a function when
//! it is created or when they change, and the views `show limits`, the HTTP API and `status`
//! read.
//!
//! Run-time changes (admin `limit`, uniform `maxqueue`, `PUT /api/v1/functions/{name}`) are
//! kept by name in [`State`], apart from the function table, so a function dropped and created
//! again keeps them; they are reported to the [`SettingsSink`](super::SettingsSink) (the
//! memcached mirror of the settings) after the lock is released.

use bytes::Bytes;

use super::job::Function;
use super::{limits, Engine, State};
use crate::functions::{FunctionSettings, SettingsError};
use crate::protocol::ProtocolError;

/// A function's queue limit as shown: one number when every priority has the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum MaxQueue {
    All(u32),
    ByPriority { high: u32, normal: u32, low: u32 },
}

impl std::fmt::Display for MaxQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxQueue::All(n) => write!(f, "{n}"),
            MaxQueue::ByPriority { high, normal, low } => write!(f, "{high},{normal},{low}"),
        }
    }
}

/// The settings a function has in force.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SettingsView {
    /// Queued jobs allowed per priority (0 = no limit).
    pub max_queue: MaxQueue,
    /// Jobs started per second (0 = unlimited).
    pub rate: f64,
    /// Jobs that may start at once under `rate` (0 when there is no rate).
    pub burst: u32,
    /// Jobs running at once (0 = unlimited).
    pub max_running: u32,
    /// Seconds results are cached (0 = not cached).
    pub cache_ttl_s: u32,
    /// Failed and excepted background jobs go to the dead-letter store.
    pub dead_letter: bool,
    /// True when any value differs from a function without settings.
    #[serde(skip)]
    pub customized: bool,
}

/// What the limits of a function have held back so far.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LimitStats {
    /// Jobs started since the limits were set.
    pub jobs_started: u64,
    /// Seconds those jobs spent at the head of their queue held back by the limits.
    pub held_seconds: f64,
    /// Grabs that found the next job held back by the rate.
    pub refused_by_rate: u64,
    /// Grabs that found the next job held back by max_running.
    pub refused_by_max_running: u64,
}

/// One function's settings, run-time changes and limit statistics.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FunctionSettingsInfo {
    pub name: String,
    pub settings: SettingsView,
    /// The keys changed at run time (kept in memcached when persistence is on).
    pub runtime: FunctionSettings,
    /// `None` when the function has no rate or max_running limit.
    pub limits: Option<LimitStats>,
}

impl Engine {
    /// Applies `change` (any subset of the settings) to function `name` at run time, creating
    /// the function if needed, and returns the settings now in force. Keys `change` leaves out
    /// keep their value; 0 lifts a limit. The change is reported to the settings sink.
    pub fn set_function_settings(
        &self,
        name: &str,
        change: &FunctionSettings,
    ) -> Result<SettingsView, SettingsError> {
        change.validate(name)?;
        let view = {
            let mut st = self.lock();
            let st = &mut *st;
            let func = self
                .function_id(st, &Bytes::copy_from_slice(name.as_bytes()))
                .map_err(too_many)?;
            st.runtime_settings
                .entry(name.to_string())
                .or_default()
                .merge(change);
            let s = self.settings_for(st, name);
            self.configure(&mut st.functions[func as usize], &s);
            // A loosened limit lets sleeping workers in (a tighter one wakes nobody).
            self.wake(st, func, 0);
            self.view_of(&st.functions[func as usize])
        };
        self.settings_changed(name);
        Ok(view)
    }

    /// Puts back run-time settings read from the mirror at start-up (over the config file's),
    /// creating their functions; nothing is reported back to the sink. Invalid entries are
    /// skipped and logged. Returns how many were applied.
    pub fn restore_function_settings(
        &self,
        saved: impl IntoIterator<Item = (String, FunctionSettings)>,
    ) -> usize {
        let mut st = self.lock();
        let st = &mut *st;
        let mut n = 0;
        for (name, s) in saved {
            if let Err(e) = s.validate(&name) {
                tracing::warn!(function = %name, "saved settings not restored: {e}");
                continue;
            }
            let Ok(func) = self.function_id(st, &Bytes::copy_from_slice(name.as_bytes())) else {
                tracing::error!(
                    function = %name,
                    "saved settings not restored: too many functions (engine.max_functions)"
                );
                continue;
            };
            st.runtime_settings.insert(name.clone(), s);
            let s = self.settings_for(st, &name);
            self.configure(&mut st.functions[func as usize], &s);
            n += 1;
        }
        n
    }

    /// The settings of `name` changed at run time, if any.
    pub fn runtime_function_settings(&self, name: &str) -> Option<FunctionSettings> {
        self.lock().runtime_settings.get(name).cloned()
    }

    /// Names of the functions with settings changed at run time.
    pub fn runtime_function_names(&self) -> Vec<String> {
        self.lock().runtime_settings.keys().cloned().collect()
    }

    /// One function's settings, run-time changes and limit statistics; `None` for a function
    /// the server does not know.
    pub fn function_settings(&self, name: &str) -> Option<FunctionSettingsInfo> {
        let st = self.lock();
        let &id = st.function_ids.get(name.as_bytes())?;
        Some(self.info_of(&st, &st.functions[id as usize]))
    }

    /// Every function whose settings differ from the defaults, by name (`show limits`).
    pub fn customized_functions(&self) -> Vec<FunctionSettingsInfo> {
        let st = self.lock();
        let mut v: Vec<(Bytes, FunctionSettingsInfo)> = st
            .functions
            .iter()
            .map(|(_, f)| (f.name.clone(), self.info_of(&st, f)))
            .filter(|(_, i)| i.settings.customized)
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// The settings of `name`: its config-file table with its run-time changes over it.
    pub(super) fn settings_for(&self, st: &State, name: &str) -> FunctionSettings {
        let file = self.shared.cfg.functions.get(name);
        match (file, st.runtime_settings.get(name)) {
            (Some(f), Some(r)) => f.merged(r),
            (Some(f), None) => f.clone(),
            (None, Some(r)) => r.clone(),
            (None, None) => FunctionSettings::default(),
        }
    }

    /// Settings of a function being created, if it has any (config file or run time).
    pub(super) fn initial_settings(&self, st: &State, name: &[u8]) -> Option<FunctionSettings> {
        let name = std::str::from_utf8(name).ok()?;
        let known =
            self.shared.cfg.functions.contains_key(name) || st.runtime_settings.contains_key(name);
        known.then(|| self.settings_for(st, name))
    }

    /// Installs settings on a function: its queue limit, cache and dead letters, its limits,
    /// and the settings gauges.
    pub(super) fn configure(&self, f: &mut Function, s: &FunctionSettings) {
        f.apply(s);
        limits::update(f, s, self.shared.clock, &self.shared.limit_metrics);
        self.shared.limit_metrics.publish(&f.metrics.label, f);
    }

    /// Records a uniform `maxqueue` as a run-time `max_queue` setting (non-uniform limits have
    /// no single value to keep: they stay in memory only).
    pub(super) fn record_max_queue(&self, st: &mut State, func: u32, limits: [u32; 3]) -> bool {
        let f = &st.functions[func as usize];
        self.shared.limit_metrics.publish(&f.metrics.label, f);
        let Ok(name) = std::str::from_utf8(&f.name) else {
            return false;
        };
        if limits[0] != limits[1] || limits[1] != limits[2] {
            return false;
        }
        st.runtime_settings
            .entry(name.to_string())
            .or_default()
            .max_queue = Some(limits[0]);
        true
    }

    /// Tells the settings sinks that `name`'s run-time settings changed (lock released).
    pub(super) fn settings_changed(&self, name: &str) {
        let sinks = self
            .shared
            .settings_sinks
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for sink in sinks {
            sink.changed(name);
        }
    }

    pub(super) fn view_of(&self, f: &Function) -> SettingsView {
        let default_queue = self.shared.cfg.max_queue_per_function;
        let max_queue = match f.max_queue.unwrap_or([default_queue; 3]) {
            [h, n, l] if h == n && n == l => MaxQueue::All(n),
            [high, normal, low] => MaxQueue::ByPriority { high, normal, low },
        };
        let (rate, burst) = f.limits.as_ref().and_then(|l| l.rate()).unwrap_or((0.0, 0));
        let max_running = f.limits.as_ref().map_or(0, |l| l.max_running());
        SettingsView {
            max_queue,
            rate,
            burst,
            max_running,
            cache_ttl_s: f.cache_ttl_s,
            dead_letter: f.dead_letter,
            customized: f.max_queue.is_some()
                || f.limits.is_some()
                || f.cache_ttl_s > 0
                || f.dead_letter,
        }
    }

    fn info_of(&self, st: &State, f: &Function) -> FunctionSettingsInfo {
        let name = String::from_utf8_lossy(&f.name).into_owned();
        let runtime = st.runtime_settings.get(&name).cloned().unwrap_or_default();
        let limits = f.limits.as_ref().map(|l| {
            let (jobs_started, held_seconds) = l.waited();
            let (refused_by_rate, refused_by_max_running) = l.refusals();
            LimitStats {
                jobs_started,
                held_seconds,
                refused_by_rate,
                refused_by_max_running,
            }
        });
        FunctionSettingsInfo {
            settings: self.view_of(f),
            name,
            runtime,
            limits,
        }
    }
}

fn too_many(e: ProtocolError) -> SettingsError {
    SettingsError::TooManyFunctions(e.text)
}
