//! Where schedules live between restarts: the cluster's key-value store ([`Kv`]) when
//! persistence is on, else nowhere (the table is in memory only and the server says so).
//!
//! Keys, all under the persistence namespace and none under a node id, because a schedule
//! belongs to the cluster: every server sharing the namespace runs the same table.
//! - `<ns>:sched:index`: the ids, one per line (memcached cannot list keys).
//! - `<ns>:sched:<id>`: the definition, as JSON.
//! - `<ns>:sched:<id>:last`: the last due time fired (Unix seconds), for missed-run recovery.
//! - `<ns>:sched:<id>:<due>`: the claim of one due time (memcached `add`): the one server that
//!   wins it submits the job; it expires after `scheduler.claim_ttl_s`.
//!
//! The index is read, changed and written back (memcached has no list type here): two servers
//! adding schedules at the same instant can lose one id from it. Definitions are changed by
//! people, rarely, so this is accepted and written down rather than locked.

use bytes::Bytes;

use super::ScheduleSpec;
use crate::persist::kv::{Kv, KvError};

/// The durable side of the schedule table.
pub(super) struct Store {
    kv: Kv,
    namespace: String,
}

impl Store {
    pub(super) fn new(kv: Kv, namespace: &str) -> Store {
        Store {
            kv,
            namespace: namespace.to_string(),
        }
    }

    fn index_key(&self) -> Bytes {
        Kv::key(&self.namespace, &["sched", "index"])
    }

    fn def_key(&self, id: &str) -> Bytes {
        Kv::key(&self.namespace, &["sched", id])
    }

    fn last_key(&self, id: &str) -> Bytes {
        Kv::key(&self.namespace, &["sched", id, "last"])
    }

    /// The ids in the index.
    pub(super) async fn ids(&self) -> Result<Vec<String>, KvError> {
        let raw = self.kv.get(&self.index_key()).await?;
        Ok(raw
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn write_ids(&self, ids: &[String]) -> Result<(), KvError> {
        self.kv
            .set(&self.index_key(), ids.join("\n").as_bytes(), 0)
            .await
            .map(|_| ())
    }

    /// The stored definition of `id`; `Ok(None)` when it is gone (deleted) or unreadable.
    pub(super) async fn get(&self, id: &str) -> Result<Option<ScheduleSpec>, KvError> {
        let raw = self.kv.get(&self.def_key(id)).await?;
        Ok(raw.and_then(|b| match serde_json::from_slice::<ScheduleSpec>(&b) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(schedule = id, error = %e, "stored schedule definition is not readable JSON: ignored");
                None
            }
        }))
    }

    /// Stores the definition and adds the id to the index (definition first: an id in the index
    /// always has a definition to read).
    pub(super) async fn put(&self, spec: &ScheduleSpec) -> Result<(), KvError> {
        let json = serde_json::to_vec(spec).expect("a schedule serializes");
        self.kv.set(&self.def_key(&spec.id), &json, 0).await?;
        let mut ids = self.ids().await?;
        if !ids.iter().any(|i| i == &spec.id) {
            ids.push(spec.id.clone());
            self.write_ids(&ids).await?;
        }
        Ok(())
    }

    /// Removes the id from the index, then its definition and last run (index first: a server
    /// syncing in between finds no id rather than an id without a definition).
    pub(super) async fn remove(&self, id: &str) -> Result<(), KvError> {
        let mut ids = self.ids().await?;
        let before = ids.len();
        ids.retain(|i| i != id);
        if ids.len() != before {
            self.write_ids(&ids).await?;
        }
        self.kv.delete(&self.def_key(id)).await?;
        self.kv.delete(&self.last_key(id)).await
    }

    /// The last due time fired, if one was recorded.
    pub(super) async fn last_run(&self, id: &str) -> Result<Option<u64>, KvError> {
        let raw = self.kv.get(&self.last_key(id)).await?;
        Ok(raw.and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse().ok()))
    }

    pub(super) async fn set_last_run(&self, id: &str, due: u64) -> Result<(), KvError> {
        self.kv
            .set(&self.last_key(id), due.to_string().as_bytes(), 0)
            .await
            .map(|_| ())
    }

    /// Claims due time `due` of `id` for `node`; `true` = this server fires it.
    pub(super) async fn claim(
        &self,
        id: &str,
        due: u64,
        node: &str,
        ttl_s: u32,
    ) -> Result<bool, KvError> {
        let key = Kv::key(&self.namespace, &["sched", id, &due.to_string()]);
        self.kv.claim(&key, node.as_bytes(), ttl_s).await
    }
}
