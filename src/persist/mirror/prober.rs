//! Node health: probing every node, noticing restarts and evictions, marking nodes up or down.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::http::Health;
use crate::persist::client::{ClientError, Connection};

impl Inner {
    pub(super) fn mark_down(&self, i: usize, why: &str) {
        let n = &self.nodes[i];
        *n.reason.lock().unwrap() = why.to_string();
        n.gen.fetch_add(1, Ordering::SeqCst);
        if n.up.swap(false, Ordering::SeqCst) {
            *n.down_since.lock().unwrap() = Some(Instant::now());
            self.metrics.node_up.with_label_values(&[&n.addr]).set(0);
            tracing::error!(node = %n.addr, "memcached node is down: {why}");
            self.refresh_health();
        }
    }

    pub(super) fn mark_up(&self, i: usize) {
        let n = &self.nodes[i];
        if !n.up.swap(true, Ordering::SeqCst) {
            *n.down_since.lock().unwrap() = None;
            n.reason.lock().unwrap().clear();
            self.metrics.node_up.with_label_values(&[&n.addr]).set(1);
            tracing::info!(node = %n.addr, "memcached node is up");
            self.repair_wake.notify_one();
            self.refresh_health();
        }
    }

    /// Node `i` restarted empty: none of its copies exist any more.
    pub(super) fn forget_node(&self, i: usize) {
        let mut st = self.lock();
        let bit = !(1u16 << i);
        for s in st.window.slots.iter_mut() {
            s.may &= bit;
            s.ok &= bit;
        }
        st.pending_deletes[i].clear();
        drop(st);
        self.repair_wake.notify_one();
    }
}

/// Parses `stats` into the identity `(pid, start time)` and the eviction counter.
fn identity_of(stats: &[(String, String)]) -> Option<((u64, u64), u64)> {
    let get = |k: &str| {
        stats
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    let pid = get("pid")?;
    let boot = get("time")?.saturating_sub(get("uptime")?);
    Some(((pid, boot), get("evictions").unwrap_or(0)))
}

/// Connects to a node and reads its identity and eviction settings.
pub(in crate::persist) async fn probe(
    addr: &str,
    timeout: Duration,
) -> Result<((u64, u64), u64, bool, Vec<(String, String)>), ClientError> {
    let mut c = Connection::connect(addr, timeout).await?;
    let stats = c.stats(None, timeout).await?;
    let settings = c.stats(Some("settings"), timeout).await?;
    let (identity, evictions) = identity_of(&stats)
        .ok_or_else(|| ClientError::Protocol("stats without pid/time/uptime".into()))?;
    let can_evict = settings.iter().any(|(k, v)| k == "evictions" && v == "on");
    Ok((identity, evictions, can_evict, stats))
}

/// Watches every node: marks nodes up/down, notices restarts and evictions, keeps the health
/// and status current.
pub(super) async fn prober(inner: Arc<Inner>, health: Arc<Health>, shutdown: CancellationToken) {
    let period = Duration::from_millis(500).min(inner.s.repair_interval);
    let timeout = inner.s.write_timeout.min(Duration::from_secs(2));
    let mut warned_evict = vec![false; inner.nodes.len()];
    let mut last_evictions = vec![0u64; inner.nodes.len()];
    loop {
        for i in 0..inner.nodes.len() {
            let n = &inner.nodes[i];
            match probe(&n.addr, timeout).await {
                Ok((identity, evictions, can_evict, stats)) => {
                    let get = |k: &str| {
                        stats
                            .iter()
                            .find(|(n, _)| n == k)
                            .and_then(|(_, v)| v.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    n.items.store(get("curr_items"), Ordering::Relaxed);
                    n.bytes.store(get("bytes"), Ordering::Relaxed);
                    n.limit_bytes
                        .store(get("limit_maxbytes"), Ordering::Relaxed);
                    let previous = n.identity.lock().unwrap().replace(identity);
                    if previous.is_some_and(|p| p != identity) {
                        tracing::warn!(node = %n.addr, old_pid = previous.map(|p| p.0), new_pid = identity.0,
                            "memcached restarted and lost its copies of the queue; rewriting them in the background");
                        // Writers must not use connections to the old process.
                        inner.mark_down(i, "restarted");
                        inner.forget_node(i);
                    }
                    n.evictions.store(evictions, Ordering::Relaxed);
                    n.can_evict.store(can_evict, Ordering::Relaxed);
                    inner
                        .metrics
                        .evictions
                        .with_label_values(&[&n.addr])
                        .set(evictions as i64);
                    inner
                        .metrics
                        .eviction_enabled
                        .with_label_values(&[&n.addr])
                        .set(can_evict as i64);
                    if can_evict && !warned_evict[i] {
                        warned_evict[i] = true;
                        tracing::error!(node = %n.addr,
                            "memcached can evict items (it was started without -M): when it fills up it silently drops queued jobs; restart it with -M and enough -m");
                    }
                    if evictions > last_evictions[i] {
                        tracing::error!(node = %n.addr, evictions,
                            "memcached has evicted items: queued jobs may have been lost; run it with -M and more -m");
                    }
                    last_evictions[i] = evictions;
                    inner.mark_up(i);
                }
                Err(e) => {
                    inner
                        .metrics
                        .errors
                        .with_label_values(&[&n.addr, "probe"])
                        .inc();
                    inner.mark_down(i, &e.to_string());
                }
            }
        }
        inner.refresh_health();
        health.set_persistence_status(inner.status_json());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}
