//! Firing one due time of one schedule, in named steps: check the definition is still the
//! stored one (it may have been removed or redefined on another server), claim the due time
//! (one server wins), submit the job, record the run. Each firing is its own task inside a
//! `gearhouse.schedule.fire` span, so a slow memcached delays no other schedule.

use std::net::SocketAddr;

use bytes::Bytes;
use tracing::Instrument;

use super::{cron, validate, ScheduleSpec, Scheduler};
use crate::local::LocalClient;
use crate::protocol::Submit;

/// Why a due time was not fired (the span's `outcome`, beside `fired`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// Removed here or on another server before it fell due.
    Removed,
    /// Redefined on another server with an expression that does not match this due time.
    Redefined,
    /// The stored definition is no longer valid.
    Invalid,
    /// Another server claimed the due time first (it fires it).
    ClaimedElsewhere,
    /// memcached did not answer the claim: firing without one could run it twice.
    ClaimFailed,
    /// The engine refused the job (queue full, not durable...).
    Refused,
}

impl Skip {
    fn as_str(self) -> &'static str {
        match self {
            Skip::Removed => "removed",
            Skip::Redefined => "redefined",
            Skip::Invalid => "invalid",
            Skip::ClaimedElsewhere => "claimed_elsewhere",
            Skip::ClaimFailed => "claim_failed",
            Skip::Refused => "refused",
        }
    }
}

impl Scheduler {
    /// Fires due time `due` of schedule `id` (`missed`: a run that fell due while no server
    /// was up, fired once after recovery).
    pub(super) async fn fire(self, id: String, due: u64, missed: bool) {
        let span = tracing::info_span!(
            "gearhouse.schedule.fire",
            schedule = %id,
            due,
            missed,
            lateness_ms = tracing::field::Empty,
            handle = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let outcome = async {
            let spec = self.current_definition(&id, due).await?;
            self.claim(&id, due).await?;
            let handle = self.submit(&id, due, &spec).await?;
            self.record(&id, due, missed, handle).await;
            Ok::<_, Skip>(())
        }
        .instrument(span.clone())
        .await;
        span.record("outcome", outcome.map_or_else(Skip::as_str, |()| "fired"));
    }

    /// The definition to fire: the table's, unless the store says it was removed or changed.
    async fn current_definition(&self, id: &str, due: u64) -> Result<ScheduleSpec, Skip> {
        let sh = &self.shared;
        let spec = self
            .table()
            .get(id)
            .map(|e| e.spec.clone())
            .ok_or(Skip::Removed)?;
        let Some(store) = &sh.store else {
            return Ok(spec);
        };
        match store.get(id).await {
            Ok(None) => {
                self.forget(id);
                tracing::info!(
                    schedule = id,
                    "schedule removed on another server: not fired"
                );
                Err(Skip::Removed)
            }
            Ok(Some(stored)) if stored != spec => {
                let cron = validate(&stored, &sh.settings.limits).map_err(|_| Skip::Invalid)?;
                let still_due = cron.latest_at_or_before(due) == Some(due);
                if let Some(e) = self.table().get_mut(id) {
                    e.next_due = cron.next_after(cron::now_unix()).unwrap_or(u64::MAX);
                    e.spec = stored.clone();
                    e.cron = cron;
                }
                sh.changed.notify_one();
                if still_due {
                    Ok(stored)
                } else {
                    Err(Skip::Redefined)
                }
            }
            // Unreadable: the claim below decides whether memcached is there at all.
            Ok(Some(_)) | Err(_) => Ok(spec),
        }
    }

    /// Claims the due time in memcached (without persistence there is one server: no claim).
    async fn claim(&self, id: &str, due: u64) -> Result<(), Skip> {
        let sh = &self.shared;
        let Some(store) = &sh.store else {
            return Ok(());
        };
        match store
            .claim(id, due, &sh.settings.node_id, sh.settings.claim_ttl_s)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                sh.metrics.claims_lost.inc();
                self.note_run(id, due, None);
                Err(Skip::ClaimedElsewhere)
            }
            Err(e) => {
                sh.metrics.errors.with_label_values(&["claim"]).inc();
                tracing::warn!(schedule = id, error = %e, "due time not fired: its claim in memcached failed (firing without one could run it twice)");
                Err(Skip::ClaimFailed)
            }
        }
    }

    /// Submits the background job and waits for JOB_CREATED (after its durable write).
    async fn submit(&self, id: &str, due: u64, spec: &ScheduleSpec) -> Result<String, Skip> {
        let sh = &self.shared;
        let unique = spec
            .unique
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| format!("sched:{id}:{due}"));
        let mut client = LocalClient::connect(
            &sh.engine,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            "gearhouse-scheduler",
            sh.settings.outbound,
        );
        let submitted = client
            .submit(Submit {
                function: Bytes::from(spec.function.clone()),
                unique: Bytes::from(unique),
                data: Bytes::from(spec.payload.clone()),
                priority: spec.priority.priority(),
                background: true,
                epoch: None,
                reducer: None,
            })
            .await;
        match submitted {
            Ok(h) => Ok(String::from_utf8_lossy(&h).into_owned()),
            Err(e) => {
                sh.metrics.errors.with_label_values(&["submit"]).inc();
                tracing::warn!(schedule = id, error = %e, "due time not fired: the job was refused");
                Err(Skip::Refused)
            }
        }
    }

    /// Counts the run, notes it in the table and records it as the last run in the store.
    async fn record(&self, id: &str, due: u64, missed: bool, handle: String) {
        let sh = &self.shared;
        let lateness = (cron::now_unix_f64() - due as f64).max(0.0);
        sh.metrics.lateness.observe(lateness);
        sh.metrics.fired.with_label_values(&[id]).inc();
        if missed {
            sh.metrics.missed_fired.inc();
        }
        let span = tracing::Span::current();
        span.record("lateness_ms", (lateness * 1000.0) as u64);
        span.record("handle", handle.as_str());
        tracing::debug!(schedule = id, handle = %handle, lateness_ms = (lateness * 1000.0) as u64, "schedule fired");
        self.note_run(id, due, Some(handle));
        if let Some(store) = &sh.store {
            if let Err(e) = store.set_last_run(id, due).await {
                tracing::warn!(schedule = id, error = %e, "last run not recorded: after a restart this due time is not refired (its claim stands)");
            }
        }
    }
}
