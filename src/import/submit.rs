//! Submit to gearhouse, then delete from the source: the one place that decides when a job
//! may leave gearmand's store.
//!
//! Jobs go out in pipelined windows (one write carries a window of submits, the replies come
//! back in order on the same connection). A job is deleted from the source only after its own
//! JOB_CREATED arrived, and the deletes of a window are one batch (one sqlite transaction, one
//! redis pipeline). If the import stops between the ack and the delete, the job is in both
//! places; a rerun resubmits it, which gearhouse coalesces with the queued one when the unique
//! is non-empty (gearmand always stores one). A refusal (ERROR) skips that job only: it stays
//! in the source. Anything else that breaks the connection stops the import, with the jobs of
//! the current window still in the source.

use std::time::Instant;

use super::{ImportError, Source, SourceJob, Summary};
use crate::client::{ClientError, Connection, Job};
use crate::codec::PacketType;

/// Submits in one pipelined window: large enough to fill a write, small enough that a
/// connection lost mid-window leaves little to resubmit.
const WINDOW: usize = 512;
/// A progress line every this many jobs.
const PROGRESS_EVERY: u64 = 5000;

/// Moves `jobs` into the gearhouse at `server`, deleting each from `source` after its ack,
/// and returns the counts (with `left` read back from the source).
pub fn import(
    server: &str,
    jobs: &[SourceJob],
    source: &mut dyn Source,
) -> Result<Summary, ImportError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let gearhouse = |source| ImportError::Gearhouse {
        server: server.to_string(),
        source,
    };
    let mut summary = Summary::default();
    rt.block_on(async {
        let mut conn = Connection::connect(server).await.map_err(gearhouse)?;
        let started = Instant::now();
        let mut next_progress = PROGRESS_EVERY;
        for window in jobs.chunks(WINDOW) {
            for j in window {
                conn.put_submit(&to_job(j), true).map_err(gearhouse)?;
            }
            conn.flush().await.map_err(gearhouse)?;
            let mut acked = Vec::with_capacity(window.len());
            for j in window {
                let p = conn.recv().await.map_err(gearhouse)?;
                match p.kind {
                    PacketType::JOB_CREATED => acked.push(j),
                    PacketType::ERROR => match ClientError::server(&p.body) {
                        ClientError::Server { code, text } => {
                            summary.refuse(format!("{code} {text}").trim_end().to_string())
                        }
                        other => return Err(gearhouse(other)),
                    },
                    other => {
                        return Err(gearhouse(ClientError::Protocol(format!(
                            "{} where JOB_CREATED was expected",
                            other.name()
                        ))))
                    }
                }
            }
            source.delete(&acked)?;
            summary.moved += acked.len() as u64;
            let done = summary.moved + summary.skipped;
            if done >= next_progress {
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                eprintln!(
                    "{done}/{} jobs: moved {}, skipped {} ({:.0} jobs/s)",
                    jobs.len(),
                    summary.moved,
                    summary.skipped,
                    done as f64 / secs
                );
                next_progress = done + PROGRESS_EVERY;
            }
        }
        Ok(())
    })?;
    summary.left = source.remaining()?;
    Ok(summary)
}

/// The background submit that recreates `j`: an epoch makes it SUBMIT_JOB_EPOCH (whose packet
/// carries no priority, as in gearmand), otherwise the priority picks the packet.
fn to_job(j: &SourceJob) -> Job<'_> {
    let job = Job::new(&j.function, &j.data)
        .unique(&j.unique)
        .priority(j.priority);
    match j.epoch {
        Some(e) => job.epoch(e),
        None => job,
    }
}
