//! The mirror's part of `/api/v1/status`.

use std::sync::atomic::Ordering;

use super::Inner;

impl Inner {
    pub(super) fn status_json(&self) -> serde_json::Value {
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|n| {
                let id = *n.identity.lock().unwrap();
                serde_json::json!({
                    "address": n.addr,
                    "up": n.up.load(Ordering::SeqCst),
                    "reason": n.reason.lock().unwrap().clone(),
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
            "on_failure": if self.s.accept_in_memory { "accept_in_memory" } else { "refuse" },
            "pending_writes": self.pending.load(Ordering::SeqCst),
            "replicas_below_target": self.metrics.replicas_below_target.get(),
            "low_watermark": self.low.load(Ordering::SeqCst),
            "high_watermark": self.high.load(Ordering::SeqCst),
            "nodes": nodes,
        })
    }
}
