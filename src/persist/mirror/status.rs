//! The mirror's part of `/api/v1/status`: settings, watermarks and, per node, whether it is up
//! (and why not), its memcached process id, fill and eviction figures from the last probe.

use std::sync::atomic::Ordering;

use super::Inner;
use crate::persist::lock;

impl Inner {
    /// The JSON under `persistence` in `/api/v1/status`.
    pub(super) fn status_json(&self) -> serde_json::Value {
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|n| {
                let id = *lock(&n.identity);
                serde_json::json!({
                    "address": &*n.addr,
                    "up": n.up.load(Ordering::SeqCst),
                    "reason": lock(&n.reason).clone(),
                    "pid": id.map(|i| i.0),
                    "items": n.items.load(Ordering::Relaxed),
                    "bytes": n.bytes.load(Ordering::Relaxed),
                    "limit_maxbytes": n.limit_bytes.load(Ordering::Relaxed),
                    "evictions": n.evictions.load(Ordering::Relaxed),
                    "eviction_enabled": n.can_evict.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::json!({
            "enabled": true,
            "namespace": self.s.namespace,
            "node_id": self.s.node_id,
            "replicas": self.s.replicas,
            "on_failure": self.s.on_failure,
            "pending_writes": self.pending.load(Ordering::SeqCst),
            "replicas_below_target": self.metrics.replicas_below_target.get(),
            "low_watermark": self.low.load(Ordering::SeqCst),
            "high_watermark": self.high.load(Ordering::SeqCst),
            "nodes": nodes,
        })
    }
}
