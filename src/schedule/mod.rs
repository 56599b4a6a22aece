//! Recurring schedules: cron expressions (UTC, optional leading seconds field) that each submit
//! a background job when due, defined in the config (`[[schedules]]`), over HTTP
//! (`/api/v1/schedules`) or by the admin protocol, and kept in the cluster's key-value store so
//! they survive restarts and are shared by every server of a namespace.
//!
//! Shape, and why:
//! - One table (`id -> definition, next due time, last run`) behind a `std::sync::Mutex` (plain
//!   data, never held across an await), and one task that sleeps until the earliest due time:
//!   no polling, so a schedule days ahead costs memory, not CPU. Changes wake it through a
//!   `Notify`.
//! - Each due time is fired by its own task (`fire.rs`): claim it in memcached (`add`, one winner among the
//!   servers), submit through [`LocalClient`] (it returns after the job's durable write), then
//!   record it as the last run. The job's unique is derived from (schedule id, due time) unless
//!   the schedule sets one, so even a double submit would coalesce while the first is queued.
//! - A schedule learned at start-up or from another server (a periodic re-read of the index,
//!   `scheduler.sync_interval_ms`) whose latest due time is after its recorded last run fires
//!   that due time once (claimed like any other), then continues from now: a run missed while
//!   no server was up fires once, not once per missed interval.
//! - Without persistence the table lives in memory only (config schedules come back at start,
//!   API ones do not) and claims are not needed: there is one server.
//!
//! The admin protocol and the HTTP router are handed only the [`Engine`], so they find this
//! server's scheduler with [`Scheduler::for_engine`] (a registry keyed by the engine's metrics,
//! one per server).

pub mod admin;
pub mod cron;
mod fire;
mod metrics;
mod store;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use self::cron::{CronError, CronExpr};
pub use self::metrics::ScheduleMetrics;
use self::store::Store;
use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::persist::kv::{Kv, KvError};
use crate::protocol::{ArgLimits, Priority};

/// A schedule's priority as configuration and JSON spell it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PriorityName {
    High,
    #[default]
    Normal,
    Low,
}

impl PriorityName {
    /// The engine's priority.
    pub fn priority(self) -> Priority {
        match self {
            PriorityName::High => Priority::High,
            PriorityName::Normal => Priority::Normal,
            PriorityName::Low => Priority::Low,
        }
    }
}

/// A schedule's definition, as `[[schedules]]`, the POST body and the stored JSON spell it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// 1 to 64 of `A-Z a-z 0-9 _ . -` (it is part of memcached keys).
    pub id: String,
    /// 5 fields, or 6 with a leading seconds field; UTC.
    pub cron: String,
    /// The function each run submits a background job to.
    pub function: String,
    /// The job's data.
    #[serde(default)]
    pub payload: String,
    #[serde(default)]
    pub priority: PriorityName,
    /// A fixed unique for every run (a run still queued absorbs the next); default: one per
    /// due time, `sched:<id>:<due>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<String>,
}

/// Why a schedule was refused or could not be changed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScheduleError {
    /// A field is missing or wrong; the text names it.
    #[error("{0}")]
    Invalid(String),
    #[error("schedule {0:?} already exists (DELETE it first to change it)")]
    Duplicate(String),
    #[error("no schedule {0:?}")]
    NotFound(String),
    #[error("{max} schedules already exist: raise scheduler.max_schedules or remove some")]
    TooMany { max: usize },
    /// memcached did not take the change.
    #[error("schedule store: {0}")]
    Store(#[from] KvError),
}

impl From<CronError> for ScheduleError {
    fn from(e: CronError) -> Self {
        ScheduleError::Invalid(e.to_string())
    }
}

/// Checks a definition and parses its cron expression.
pub fn validate(spec: &ScheduleSpec, limits: &ArgLimits) -> Result<CronExpr, ScheduleError> {
    let bad = |s: String| Err(ScheduleError::Invalid(s));
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= 64
        && spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !id_ok || spec.id == "index" {
        return bad(format!(
            "id {:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . - (and not \"index\")",
            spec.id
        ));
    }
    if spec.function.is_empty() || spec.function.contains('\0') {
        return bad("function must be a non-empty function name".into());
    }
    if spec.function.len() > limits.max_function {
        return bad(format!(
            "function is {} bytes, the limit is server.max_function_len = {}",
            spec.function.len(),
            limits.max_function
        ));
    }
    if let Some(u) = &spec.unique {
        if u.len() > limits.max_unique || u.contains('\0') {
            return bad(format!(
                "unique must be at most server.max_unique_len = {} bytes, without NUL",
                limits.max_unique
            ));
        }
    }
    Ok(CronExpr::parse(&spec.cron)?)
}

/// The scheduler's settings (`[scheduler]`, plus what it borrows from other sections).
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub node_id: String,
    /// How often the shared index is re-read for schedules added or removed elsewhere.
    pub sync_interval: Duration,
    /// How long a claimed due time is remembered (longer than any clock skew between servers).
    pub claim_ttl_s: u32,
    pub max_schedules: usize,
    /// Who may add and remove schedules (`server.admin_networks`).
    pub admin_networks: Vec<IpNet>,
    pub limits: ArgLimits,
    /// Packets the engine may queue for the scheduler's in-process connections.
    pub outbound: usize,
}

impl SchedulerSettings {
    pub fn from_config(cfg: &Config) -> SchedulerSettings {
        let server = cfg.server_config();
        SchedulerSettings {
            node_id: cfg.node_id(),
            sync_interval: Duration::from_millis(cfg.scheduler.sync_interval_ms.max(100)),
            claim_ttl_s: cfg.scheduler.claim_ttl_s,
            max_schedules: cfg.scheduler.max_schedules,
            admin_networks: server.admin_networks,
            limits: server.limits,
            outbound: server.outbound_queue,
        }
    }
}

/// A schedule as listed by `GET /api/v1/schedules` (a JSON array of these, the shape the
/// status page reads) and `show schedules`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleView {
    #[serde(flatten)]
    pub spec: ScheduleSpec,
    /// The next due time, RFC 3339 UTC, and as Unix seconds.
    pub next_due: String,
    pub next_due_unix: u64,
    /// The last due time fired (by any server), when known.
    pub last_run: Option<String>,
    pub last_run_unix: Option<u64>,
    /// The handle of the last job this server submitted for it.
    pub last_handle: Option<String>,
    /// `config` or `api`.
    pub source: &'static str,
}

/// One schedule in the table.
struct Entry {
    spec: ScheduleSpec,
    cron: CronExpr,
    next_due: u64,
    last_run: Option<u64>,
    last_handle: Option<String>,
    from_config: bool,
}

impl Entry {
    fn view(&self) -> ScheduleView {
        ScheduleView {
            spec: self.spec.clone(),
            next_due: cron::rfc3339(self.next_due),
            next_due_unix: self.next_due,
            last_run: self.last_run.map(cron::rfc3339),
            last_run_unix: self.last_run,
            last_handle: self.last_handle.clone(),
            source: if self.from_config { "config" } else { "api" },
        }
    }
}

/// This server's scheduler: a cheap handle to the shared table.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

struct Shared {
    engine: Engine,
    store: Option<Store>,
    settings: SchedulerSettings,
    metrics: ScheduleMetrics,
    /// The table; a std mutex: plain data, held for map operations only, never across await.
    table: Mutex<BTreeMap<String, Entry>>,
    /// Wakes the timer task when the table changed (its earliest due time may have moved).
    changed: Notify,
}

/// Schedulers by engine (its metrics' address), for the admin protocol and HTTP handlers,
/// which are handed only the engine. Weak on both sides: a stopped server leaves nothing.
type Registry = Vec<(Weak<Metrics>, Weak<Shared>)>;
static REGISTRY: Mutex<Registry> = Mutex::new(Vec::new());

impl Scheduler {
    /// Builds the table from the config's `[[schedules]]` and the stored schedules (firing a run
    /// missed while down once), then runs until `stop`. Call it after recovery, when the engine
    /// takes submits.
    pub async fn start(cfg: &Config, engine: &Engine, stop: CancellationToken) -> Scheduler {
        let settings = SchedulerSettings::from_config(cfg);
        let store = crate::persist::Settings::from_config(cfg)
            .ok()
            .flatten()
            .map(|s| Store::new(Kv::from_settings(&s), &s.namespace));
        Self::start_with(settings, &cfg.schedules, store, engine, stop).await
    }

    async fn start_with(
        settings: SchedulerSettings,
        specs: &[ScheduleSpec],
        store: Option<Store>,
        engine: &Engine,
        stop: CancellationToken,
    ) -> Scheduler {
        let metrics = ScheduleMetrics::new(&engine.metrics().registry);
        let durable = store.is_some();
        let s = Scheduler {
            shared: Arc::new(Shared {
                engine: engine.clone(),
                store,
                settings,
                metrics,
                table: Mutex::new(BTreeMap::new()),
                changed: Notify::new(),
            }),
        };
        {
            let mut r = REGISTRY.lock().expect("registry lock");
            r.retain(|(m, s)| m.strong_count() > 0 && s.strong_count() > 0);
            r.push((Arc::downgrade(engine.metrics()), Arc::downgrade(&s.shared)));
        }
        for spec in specs {
            if let Err(e) = s.install_config(spec).await {
                tracing::warn!(schedule = %spec.id, error = %e, "config schedule not stored (it runs from memory on this server)");
            }
        }
        s.sync().await;
        let count = s.table().len();
        if durable {
            tracing::info!(
                schedules = count,
                "scheduler started: schedules are shared through memcached"
            );
        } else {
            tracing::info!(schedules = count, "scheduler started: schedules are in memory only (no persistence.memcached): API schedules do not survive a restart");
        }
        tokio::spawn(s.clone().run_timer(stop.clone()));
        if durable {
            tokio::spawn(s.clone().run_sync(stop));
        }
        s
    }

    /// The scheduler of the server `engine` belongs to, once it has started.
    pub fn for_engine(engine: &Engine) -> Option<Scheduler> {
        let r = REGISTRY.lock().expect("registry lock");
        let key = Arc::as_ptr(engine.metrics());
        r.iter()
            .rev()
            .find(|(m, _)| std::ptr::eq(m.as_ptr(), key))
            .and_then(|(_, s)| s.upgrade())
            .map(|shared| Scheduler { shared })
    }

    /// Who may add and remove schedules.
    pub fn admin_networks(&self) -> &[IpNet] {
        &self.shared.settings.admin_networks
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.shared.table.lock().expect("schedule table lock")
    }

    /// Every schedule, by id.
    pub fn list(&self) -> Vec<ScheduleView> {
        self.table().values().map(Entry::view).collect()
    }

    /// Adds a schedule (refused if the id exists here or in the store). Its first run is the
    /// next due time after now.
    pub async fn add(&self, spec: ScheduleSpec) -> Result<ScheduleView, ScheduleError> {
        let cron = validate(&spec, &self.shared.settings.limits)?;
        self.check_room(&spec.id)?;
        let now = cron::now_unix();
        if let Some(store) = &self.shared.store {
            if store.get(&spec.id).await?.is_some() {
                return Err(ScheduleError::Duplicate(spec.id));
            }
            // "Nothing was due before now": a crash before the first run still fires it once.
            store.set_last_run(&spec.id, now).await?;
            store.put(&spec).await?;
        }
        let entry = Entry {
            next_due: cron.next_after(now)?,
            spec,
            cron,
            last_run: None,
            last_handle: None,
            from_config: false,
        };
        let view = entry.view();
        {
            let mut t = self.table();
            if t.contains_key(&entry.spec.id) {
                return Err(ScheduleError::Duplicate(entry.spec.id));
            }
            t.insert(entry.spec.id.clone(), entry);
            self.shared.metrics.schedules.set(t.len() as i64);
        }
        self.shared.changed.notify_one();
        tracing::info!(schedule = %view.spec.id, cron = %view.spec.cron, function = %view.spec.function, next_due = %view.next_due, "schedule added");
        Ok(view)
    }

    fn check_room(&self, id: &str) -> Result<(), ScheduleError> {
        let t = self.table();
        if t.contains_key(id) {
            return Err(ScheduleError::Duplicate(id.to_string()));
        }
        if t.len() >= self.shared.settings.max_schedules {
            return Err(ScheduleError::TooMany {
                max: self.shared.settings.max_schedules,
            });
        }
        Ok(())
    }

    /// Removes a schedule here and from the store (so from every server at its next sync).
    pub async fn remove(&self, id: &str) -> Result<(), ScheduleError> {
        let local = self.forget(id);
        let stored = match &self.shared.store {
            Some(store) => {
                let had = store.get(id).await?.is_some();
                store.remove(id).await?;
                had
            }
            None => false,
        };
        if !local && !stored {
            return Err(ScheduleError::NotFound(id.to_string()));
        }
        tracing::info!(schedule = id, "schedule removed");
        Ok(())
    }

    /// Removes a schedule from this server's table at once and from the store in a task (for
    /// the admin protocol, which cannot wait); false when it is not in the table.
    pub fn cancel(&self, id: &str) -> bool {
        if !self.forget(id) {
            return false;
        }
        let s = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            if let Some(store) = &s.shared.store {
                if let Err(e) = store.remove(&id).await {
                    tracing::warn!(schedule = %id, error = %e, "cancelled schedule could not be removed from memcached: other servers keep it, and it returns here at the next sync");
                }
            }
        });
        true
    }

    /// Drops `id` from the table and its metric series; true when it was there.
    fn forget(&self, id: &str) -> bool {
        let had = {
            let mut t = self.table();
            let had = t.remove(id).is_some();
            self.shared.metrics.schedules.set(t.len() as i64);
            had
        };
        if had {
            let _ = self.shared.metrics.fired.remove_label_values(&[id]);
            self.shared.changed.notify_one();
        }
        had
    }

    /// Puts a config schedule in the store (the config wins over a stored definition; its last
    /// run is kept) and in the table.
    async fn install_config(&self, spec: &ScheduleSpec) -> Result<(), ScheduleError> {
        let cron = validate(spec, &self.shared.settings.limits)?;
        let now = cron::now_unix();
        let mut last = None;
        let mut result = Ok(());
        if let Some(store) = &self.shared.store {
            let stored = async {
                last = store.last_run(&spec.id).await?;
                if last.is_none() {
                    store.set_last_run(&spec.id, now).await?;
                }
                store.put(spec).await
            };
            result = stored.await.map_err(ScheduleError::from);
        }
        self.insert_loaded(spec.clone(), cron, last, now, true);
        result
    }

    /// Adds a schedule read from the config or the store; fires its latest due time once when
    /// that is after its last run (a run missed while no server was up).
    fn insert_loaded(
        &self,
        spec: ScheduleSpec,
        cron: CronExpr,
        last: Option<u64>,
        now: u64,
        from_config: bool,
    ) {
        let Ok(next_due) = cron.next_after(now) else {
            return;
        };
        let missed = last.and_then(|l| cron.latest_at_or_before(now).filter(|d| *d > l));
        let id = spec.id.clone();
        {
            let mut t = self.table();
            if t.contains_key(&id) {
                return;
            }
            t.insert(
                id.clone(),
                Entry {
                    spec,
                    cron,
                    next_due,
                    last_run: last,
                    last_handle: None,
                    from_config,
                },
            );
            self.shared.metrics.schedules.set(t.len() as i64);
        }
        self.shared.changed.notify_one();
        if let Some(due) = missed {
            tracing::info!(schedule = %id, due = %cron::rfc3339(due), "a run fell due while no server was running: firing it once");
            tokio::spawn(self.clone().fire(id, due, true));
        }
    }

    /// Re-reads the shared index: loads schedules added elsewhere, drops those removed.
    async fn sync(&self) {
        let Some(store) = &self.shared.store else {
            return;
        };
        // Taken before the index is read: an id added here after this point is not dropped.
        let known: HashSet<String> = self.table().keys().cloned().collect();
        let ids = match store.ids().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "schedule index not readable: keeping the table as it is");
                return;
            }
        };
        for id in ids.iter().filter(|i| !known.contains(*i)) {
            let loaded = async {
                let spec = store.get(id).await?;
                let last = store.last_run(id).await?;
                Ok::<_, KvError>(spec.map(|s| (s, last)))
            };
            match loaded.await {
                Ok(Some((spec, last))) => match validate(&spec, &self.shared.settings.limits) {
                    Ok(cron) => self.insert_loaded(spec, cron, last, cron::now_unix(), false),
                    Err(e) => {
                        tracing::warn!(schedule = %id, error = %e, "stored schedule refused")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(schedule = %id, error = %e, "stored schedule not readable")
                }
            }
        }
        let present: HashSet<&String> = ids.iter().collect();
        for id in known.iter().filter(|i| !present.contains(i)) {
            if self.forget(id) {
                tracing::info!(schedule = %id, "schedule removed on another server");
            }
        }
    }

    async fn run_sync(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.shared.settings.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.sync().await,
            }
        }
    }

    /// The one timer: sleeps until the earliest due time, hands each due schedule to a firing
    /// task and moves it to its next due time.
    async fn run_timer(self, stop: CancellationToken) {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let earliest = self.table().values().map(|e| e.next_due).min();
            let sleep = async {
                match earliest {
                    Some(t) => {
                        let wait = t as f64 - cron::now_unix_f64();
                        if wait > 0.0 {
                            tokio::time::sleep(Duration::from_secs_f64(wait)).await
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut changed => continue,
                _ = sleep => {}
            }
            let now = cron::now_unix_f64();
            let mut due = Vec::new();
            {
                let mut t = self.table();
                for e in t.values_mut() {
                    if (e.next_due as f64) <= now {
                        due.push((e.spec.id.clone(), e.next_due));
                        // Strictly after the whole second now falls in: a late wake-up fires
                        // one run, not one per interval slept through.
                        match e.cron.next_after(now as u64) {
                            Ok(n) => e.next_due = n.max(e.next_due + 1),
                            Err(_) => e.next_due = u64::MAX,
                        }
                    }
                }
            }
            for (id, t) in due {
                tokio::spawn(self.clone().fire(id, t, false));
            }
        }
    }

    /// Records `due` as the last run in the table (never moving backwards).
    fn note_run(&self, id: &str, due: u64, handle: Option<String>) {
        if let Some(e) = self.table().get_mut(id) {
            if e.last_run.is_none_or(|l| l < due) {
                e.last_run = Some(due);
            }
            if handle.is_some() {
                e.last_handle = handle;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ArgLimits = ArgLimits {
        max_function: 16,
        max_unique: 8,
        max_client_id: 8,
    };

    fn spec(id: &str, cron: &str, function: &str) -> ScheduleSpec {
        ScheduleSpec {
            id: id.into(),
            cron: cron.into(),
            function: function.into(),
            payload: String::new(),
            priority: PriorityName::Normal,
            unique: None,
        }
    }

    #[test]
    fn definitions_are_checked_field_by_field() {
        assert!(validate(&spec("nightly-1.a_b", "0 2 * * *", "report"), &LIMITS).is_ok());
        let refused = |s: ScheduleSpec| validate(&s, &LIMITS).unwrap_err().to_string();
        // Ids are parts of memcached keys: no ':' or spaces, and not the index's name.
        for id in ["", "a:b", "a b", "index", &"x".repeat(65)] {
            assert!(
                refused(spec(id, "* * * * *", "f")).contains("must be 1 to 64"),
                "{id:?}"
            );
        }
        assert!(refused(spec("a", "* * * * *", "")).contains("function"));
        assert!(
            refused(spec("a", "* * * * *", &"f".repeat(17))).contains("server.max_function_len")
        );
        let mut long_unique = spec("a", "* * * * *", "f");
        long_unique.unique = Some("u".repeat(9));
        assert!(refused(long_unique).contains("server.max_unique_len"));
        assert!(refused(spec("a", "* * *", "f")).contains("invalid cron expression"));
    }

    #[test]
    fn definitions_read_from_json_with_defaults_and_refuse_unknown_keys() {
        let s: ScheduleSpec =
            serde_json::from_str(r#"{"id": "t", "cron": "* * * * * *", "function": "f"}"#).unwrap();
        assert_eq!(
            (s.payload.as_str(), s.priority, s.unique),
            ("", PriorityName::Normal, None)
        );
        let e = serde_json::from_str::<ScheduleSpec>(
            r#"{"id": "t", "cron": "* * * * *", "function": "f", "every": 5}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("every"), "{e}");
        let e = serde_json::from_str::<ScheduleSpec>(
            r#"{"id": "t", "cron": "* * * * *", "function": "f", "priority": "urgent"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("urgent"), "{e}");
    }
}
