//! Per-function settings changed at run time, mirrored to memcached so a restart (or a crash)
//! keeps them, through the replicated [`Kv`] store beside the queue.
//!
//! Keys: `<namespace>:<node_id>:fn:<name>` holds one function's run-time changes as JSON
//! (`{"name": ..., "settings": {...}}`, only the keys changed at run time, so the config file
//! still decides the rest), and `<namespace>:<node_id>:fn-index` lists the names as a JSON array,
//! since memcached cannot list keys. A name is percent-encoded in its key (bytes other than
//! `A-Z a-z 0-9 . _ -`); a name whose key would pass memcached's 250 bytes is keyed by its
//! FNV-1a hash instead, the value's `name` telling it apart.
//!
//! Writing: the engine reports each change through its [`SettingsSink`] seam (under no lock);
//! the name goes into a dirty set (bounded by the function table) and one writer task writes
//! the current values of the dirty names, so writes are never reordered and a burst of changes
//! costs one write per function. A failed write keeps the name dirty and is retried every
//! second. [`SettingsMirror::flush`] waits until every change made before it is written (the
//! HTTP API answers after it). Reading back happens once at start-up, after the queue's
//! recovery ([`SettingsMirror::restore`]), over the config file's values.
//!
//! Without `persistence.memcached` there is no mirror: run-time changes live in memory only and
//! a restart goes back to the config file.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::FunctionSettings;
use crate::engine::{Engine, SettingsSink};
use crate::persist::kv::{Kv, KvError};

/// How long a failed write waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Longest encoded name kept readable in a key; longer ones are hashed (namespace and node id
/// take up to 100 bytes each, memcached allows 250 in all).
const MAX_KEY_NAME: usize = 40;

/// Why run-time settings could not be written or read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SettingsStoreError {
    #[error("memcached: {0}")]
    Kv(#[from] KvError),
    #[error("stored settings under {key} are not valid: {why}")]
    Corrupt { key: String, why: String },
    #[error("the settings writer stopped (server shutting down)")]
    Stopped,
}

/// One function's run-time settings as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    name: String,
    settings: FunctionSettings,
}

/// The mirror of run-time settings. Cheap to clone.
#[derive(Clone)]
pub struct SettingsMirror {
    inner: Arc<Inner>,
}

struct Inner {
    kv: Kv,
    namespace: String,
    node_id: String,
    /// Names whose settings changed since the writer last wrote them. A plain mutex: held for
    /// an insert or a swap, never across an await.
    dirty: Mutex<BTreeSet<String>>,
    /// Names the index lists (the writer's; read at start-up).
    indexed: Mutex<BTreeSet<String>>,
    /// The stored index lacks names of `indexed` (its last write failed or is to come).
    index_stale: AtomicBool,
    /// Changes reported so far; the writer publishes how many it has written.
    requested: AtomicU64,
    written: watch::Sender<(u64, Result<(), String>)>,
    wake: Notify,
}

impl SettingsMirror {
    /// A mirror over the persistence settings' cluster (no I/O yet).
    pub fn new(s: &crate::persist::Settings) -> SettingsMirror {
        Self::with_kv(Kv::from_settings(s), &s.namespace, &s.node_id)
    }

    /// A mirror over `kv`, keyed under `namespace` and `node_id`.
    pub fn with_kv(kv: Kv, namespace: &str, node_id: &str) -> SettingsMirror {
        SettingsMirror {
            inner: Arc::new(Inner {
                kv,
                namespace: namespace.to_string(),
                node_id: node_id.to_string(),
                dirty: Mutex::new(BTreeSet::new()),
                indexed: Mutex::new(BTreeSet::new()),
                index_stale: AtomicBool::new(false),
                requested: AtomicU64::new(0),
                written: watch::channel((0, Ok(()))).0,
                wake: Notify::new(),
            }),
        }
    }

    /// The key of function `name`'s settings.
    pub fn key_of(&self, name: &str) -> Bytes {
        let i = &self.inner;
        Kv::key(&i.namespace, &[&i.node_id, "fn", &key_part(name)])
    }

    /// The key of the index of names.
    pub fn index_key(&self) -> Bytes {
        let i = &self.inner;
        Kv::key(&i.namespace, &[&i.node_id, "fn-index"])
    }

    /// Reads every stored function's run-time settings.
    pub async fn load(&self) -> Result<BTreeMap<String, FunctionSettings>, SettingsStoreError> {
        let index_key = self.index_key();
        let names: Vec<String> = match self.inner.kv.get(&index_key).await? {
            None => Vec::new(),
            Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt(&index_key, e))?,
        };
        let mut out = BTreeMap::new();
        for name in names {
            let key = self.key_of(&name);
            let Some(v) = self.inner.kv.get(&key).await? else {
                // Listed but gone (memcached lost it): the config file's values apply.
                tracing::warn!(function = %name, "run-time settings of {name} are listed but not stored; the config file's apply");
                continue;
            };
            let r: Record = serde_json::from_slice(&v).map_err(|e| corrupt(&key, e))?;
            if r.name != name {
                return Err(SettingsStoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    why: format!("it holds the settings of {:?}, not {name:?}", r.name),
                });
            }
            out.insert(name, r.settings);
        }
        *lock(&self.inner.indexed) = out.keys().cloned().collect();
        Ok(out)
    }

    /// Reads the stored settings back into `engine` (over the config file's); a failure is
    /// logged and the config file's values stay in force. Returns how many were restored.
    pub async fn restore(&self, engine: &Engine) -> usize {
        match self.load().await {
            Ok(saved) => {
                let n = engine.restore_function_settings(saved);
                if n > 0 {
                    tracing::info!(
                        functions = n,
                        "run-time settings of {n} functions read back from memcached"
                    );
                }
                n
            }
            Err(e) => {
                tracing::error!(
                    "run-time function settings not read back ({e}); the config file's settings apply until they are changed again"
                );
                0
            }
        }
    }

    /// Reports the engine's run-time changes to this mirror and starts the writer task, which
    /// writes what is dirty once more when `shutdown` is cancelled, then ends.
    pub fn start(
        &self,
        engine: &Engine,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        engine.set_settings_sink(Arc::new(self.clone()));
        let (mirror, engine) = (self.clone(), engine.clone());
        tokio::spawn(async move { mirror.run(engine, shutdown).await })
    }

    /// Waits until every change reported before this call is written; the error of the write
    /// that covered it, if it failed.
    pub async fn flush(&self) -> Result<(), SettingsStoreError> {
        let want = self.inner.requested.load(Ordering::SeqCst);
        let mut rx = self.inner.written.subscribe();
        let r = rx
            .wait_for(|(done, _)| *done >= want)
            .await
            .map_err(|_| SettingsStoreError::Stopped)?;
        match &r.1 {
            Ok(()) => Ok(()),
            Err(e) => Err(SettingsStoreError::Kv(KvError::Unreachable(e.clone()))),
        }
    }

    async fn run(&self, engine: Engine, shutdown: CancellationToken) {
        loop {
            let failed = self.write_dirty(&engine).await.is_err();
            let pause = async {
                if failed {
                    tokio::time::sleep(RETRY).await
                } else {
                    self.inner.wake.notified().await
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.write_dirty(&engine).await;
                    return;
                }
                _ = pause => {}
            }
        }
    }

    /// One round: writes the current settings of every dirty name, then the index if it grew,
    /// and publishes how many changes are written. Names whose write failed stay dirty.
    async fn write_dirty(&self, engine: &Engine) -> Result<(), SettingsStoreError> {
        let i = &self.inner;
        let target = i.requested.load(Ordering::SeqCst);
        let names = std::mem::take(&mut *lock(&i.dirty));
        let mut result = Ok(());
        for name in names {
            let settings = engine.runtime_function_settings(&name).unwrap_or_default();
            let value = serde_json::to_vec(&Record {
                name: name.clone(),
                settings,
            })
            .expect("settings serialize");
            match i.kv.set(&self.key_of(&name), &value, 0).await {
                Ok(_) => {
                    if lock(&i.indexed).insert(name) {
                        i.index_stale.store(true, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    tracing::warn!(function = %name, "run-time settings not written to memcached, retrying: {e}");
                    lock(&i.dirty).insert(name);
                    result = Err(SettingsStoreError::from(e));
                }
            }
        }
        if i.index_stale.swap(false, Ordering::SeqCst) {
            let names: Vec<String> = lock(&i.indexed).iter().cloned().collect();
            let value = serde_json::to_vec(&names).expect("names serialize");
            if let Err(e) = i.kv.set(&self.index_key(), &value, 0).await {
                tracing::warn!(
                    "index of run-time settings not written to memcached, retrying: {e}"
                );
                i.index_stale.store(true, Ordering::SeqCst);
                result = Err(SettingsStoreError::from(e));
            }
        }
        let published = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
        let _previous = i.written.send_replace((target, published));
        result
    }
}

impl SettingsSink for SettingsMirror {
    fn changed(&self, function: &str) {
        let i = &self.inner;
        lock(&i.dirty).insert(function.to_string());
        i.requested.fetch_add(1, Ordering::SeqCst);
        i.wake.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn corrupt(key: &[u8], e: serde_json::Error) -> SettingsStoreError {
    SettingsStoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    }
}

/// A function name as a memcached key part: percent-encoded, or `~` and its FNV-1a hash when
/// too long.
fn key_part(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    if s.len() <= MAX_KEY_NAME {
        return s;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("~{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_valid_keys_and_long_ones_are_hashed() {
        assert_eq!(key_part("resize"), "resize");
        assert_eq!(key_part("Resize.Big_v2-x"), "Resize.Big_v2-x");
        assert_eq!(key_part("a b:c"), "a%20b%3Ac");
        assert_eq!(key_part("é"), "%C3%A9");
        let long = "x".repeat(500);
        let k = key_part(&long);
        assert_eq!(k.len(), 17);
        assert_ne!(k, key_part(&"x".repeat(501)));
        let m = SettingsMirror::with_kv(Kv::new(&[], 1, Duration::from_secs(1)), "gh", "n1");
        assert_eq!(&m.key_of("a b")[..], b"gh:n1:fn:a%20b");
        assert_eq!(&m.index_key()[..], b"gh:n1:fn-index");
        assert!(crate::persist::client::is_valid_key(&m.key_of(&long)));
    }
}
