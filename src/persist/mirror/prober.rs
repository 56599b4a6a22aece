//! Node health: probing every node (`stats`, `stats settings`), noticing a memcached that
//! restarted empty or can evict, and marking nodes up or down.
//!
//! A node changes state in [`Inner::mark_down`] / [`Inner::mark_up`], whoever notices (the
//! prober, a writer whose batch failed, recovery). Each change is a short span
//! (`gearhouse.node_down` / `gearhouse.node_up`, with the node and the reason), so a trace
//! backend shows outages on the same timeline as jobs. Log lines about the mirror's
//! background state (dropped deletes, refusals suppressed by the throttle) are written here,
//! every probe round, rather than under the locks where the events happen.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::error::NodeFailure;
use super::writer::WARN_PERIOD;
use super::Inner;
use crate::http::Health;
use crate::persist::client::{ClientError, Connection};
use crate::persist::lock;

/// What one probe of a node found.
pub(in crate::persist) struct Probe {
    /// `(pid, start time)`: a change means memcached restarted (empty).
    pub identity: (u64, u64),
    /// The `evictions` stat.
    pub evictions: u64,
    /// `stats settings` says `evictions on` (started without -M).
    pub can_evict: bool,
    pub items: u64,
    pub bytes: u64,
    pub limit_bytes: u64,
}

/// Connects to a node and reads its identity, fill and eviction settings.
pub(in crate::persist) async fn probe(addr: &str, timeout: Duration) -> Result<Probe, ClientError> {
    let mut c = Connection::connect(addr, timeout).await?;
    let stats = c.stats(None, timeout).await?;
    let settings = c.stats(Some("settings"), timeout).await?;
    let get = |k: &str| {
        stats
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    let (Some(pid), Some(time), Some(uptime)) = (get("pid"), get("time"), get("uptime")) else {
        return Err(ClientError::Protocol(
            "stats without pid/time/uptime".into(),
        ));
    };
    Ok(Probe {
        identity: (pid, time.saturating_sub(uptime)),
        evictions: get("evictions").unwrap_or(0),
        can_evict: settings.iter().any(|(k, v)| k == "evictions" && v == "on"),
        items: get("curr_items").unwrap_or(0),
        bytes: get("bytes").unwrap_or(0),
        limit_bytes: get("limit_maxbytes").unwrap_or(0),
    })
}

/// Watches every node: marks nodes up/down, notices restarts and evictions, keeps the health
/// and status current.
pub(super) async fn prober(inner: Arc<Inner>, health: Arc<Health>, shutdown: CancellationToken) {
    let period = Duration::from_millis(500).min(inner.s.repair_interval);
    let timeout = inner.s.write_timeout.min(Duration::from_secs(2));
    let mut seen: Vec<Seen> = inner.nodes.iter().map(|_| Seen::default()).collect();
    loop {
        for (i, seen) in seen.iter_mut().enumerate() {
            match probe(&inner.nodes[i].addr, timeout).await {
                Ok(p) => inner.note_probe(i, &p, seen),
                Err(e) => {
                    inner
                        .metrics
                        .errors
                        .with_label_values(&[&*inner.nodes[i].addr, "probe"])
                        .inc();
                    inner.mark_down(i, &e.to_string());
                }
            }
            inner.log_background(i);
        }
        inner.refresh_health();
        health.set_persistence_status(inner.status_json());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// What the prober remembers of a node between rounds.
#[derive(Default)]
struct Seen {
    warned_evict: bool,
    evictions: u64,
}

impl Inner {
    /// Applies one successful probe of node `i`.
    fn note_probe(&self, i: usize, p: &Probe, seen: &mut Seen) {
        let n = &self.nodes[i];
        n.items.store(p.items, Ordering::Relaxed);
        n.bytes.store(p.bytes, Ordering::Relaxed);
        n.limit_bytes.store(p.limit_bytes, Ordering::Relaxed);
        let previous = lock(&n.identity).replace(p.identity);
        if let Some(old) = previous.filter(|&old| old != p.identity) {
            tracing::warn!(node = %n.addr, old_pid = old.0, new_pid = p.identity.0,
                "memcached restarted and lost its copies of the queue; rewriting them in the background");
            // Writers must not use connections to the old process.
            self.mark_down(i, "restarted");
            self.forget_node(i);
        }
        n.evictions.store(p.evictions, Ordering::Relaxed);
        n.can_evict.store(p.can_evict, Ordering::Relaxed);
        self.metrics
            .evictions
            .with_label_values(&[&*n.addr])
            .set(p.evictions as i64);
        self.metrics
            .eviction_enabled
            .with_label_values(&[&*n.addr])
            .set(p.can_evict as i64);
        if p.can_evict && !seen.warned_evict {
            seen.warned_evict = true;
            tracing::error!(node = %n.addr,
                "memcached can evict items (it was started without -M): when it fills up it silently drops queued jobs; restart it with -M and enough -m");
        }
        if p.evictions > seen.evictions {
            tracing::error!(node = %n.addr, evictions = p.evictions,
                "memcached has evicted items: queued jobs may have been lost; run it with -M and more -m");
        }
        seen.evictions = p.evictions;
        self.mark_up(i);
    }

    /// Logs what happened to node `i` under locks since the last round: deletes dropped, and
    /// refusals the throttle held back once their period is over.
    fn log_background(&self, i: usize) {
        let n = &self.nodes[i];
        let dropped = n.dropped_deletes.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::error!(node = %n.addr, dropped,
                "more than {} deletes waited for this memcached node (persistence.max_pending_deletes); the oldest {dropped} were dropped, so finished jobs kept there may run again after a restart",
                self.s.max_pending_deletes);
        }
        let now = self.clock_ms();
        for f in NodeFailure::ALL {
            if let Some(suppressed) =
                n.warnings[f as usize].take_due(now, WARN_PERIOD.as_millis() as u64)
            {
                tracing::warn!(node = %n.addr, reason = f.label(), suppressed,
                    "memcached {} refused {suppressed} more job records ({}) in the last {} s; {}",
                    n.addr, f.label(), WARN_PERIOD.as_secs(), f.fix());
            }
        }
    }

    /// Marks node `i` down (again) with why; on the transition: metric, log, health and a
    /// `gearhouse.node_down` span.
    pub(super) fn mark_down(&self, i: usize, why: &str) {
        let n = &self.nodes[i];
        *lock(&n.reason) = why.to_string();
        n.gen.fetch_add(1, Ordering::SeqCst);
        if n.up.swap(false, Ordering::SeqCst) {
            *lock(&n.down_since) = Some(Instant::now());
            self.metrics.node_up.with_label_values(&[&*n.addr]).set(0);
            tracing::info_span!("gearhouse.node_down", node = %n.addr, reason = why)
                .in_scope(|| tracing::error!(node = %n.addr, "memcached node is down: {why}"));
            self.refresh_health();
        }
    }

    /// Marks node `i` up; on the transition: metric, log, health, a repair round and a
    /// `gearhouse.node_up` span (its reason: why the node had been down).
    pub(super) fn mark_up(&self, i: usize) {
        let n = &self.nodes[i];
        if !n.up.swap(true, Ordering::SeqCst) {
            let down_for = lock(&n.down_since).take().map(|t| t.elapsed());
            let was = std::mem::take(&mut *lock(&n.reason));
            self.metrics.node_up.with_label_values(&[&*n.addr]).set(1);
            let down_s = down_for.map_or(0.0, |d| d.as_secs_f64());
            tracing::info_span!("gearhouse.node_up", node = %n.addr, reason = %was, down_s)
                .in_scope(|| tracing::info!(node = %n.addr, "memcached node is up"));
            self.repair_wake.notify_one();
            self.refresh_health();
        }
    }

    /// Node `i` restarted empty: none of its copies exist any more.
    pub(super) fn forget_node(&self, i: usize) {
        let mut st = self.state();
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
