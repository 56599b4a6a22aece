//! `gearhouse import`: moves the jobs waiting in gearmand 1.1.20's persistent queue into a
//! running gearhouse over the Gearman protocol.
//!
//! Each source module reads gearmand's own storage format and nothing else: [`sqlite`] (the
//! `libsqlite3` queue's table), [`redis`] (the `redis` queue's hashes), [`memcached`] (the
//! `libmemcached` queue's items, best effort: memcached cannot list its keys completely). They hand a list of
//! [`SourceJob`]s to [`submit::import`], which submits each one as a background job and deletes
//! it from the source only after gearhouse answered JOB_CREATED. An interrupted import can
//! therefore run again: a job is either still in the source or already in gearhouse (and for a
//! non-empty unique, gearhouse coalesces a resubmit with the queued job instead of doubling it).
//! A job gearhouse refuses stays in the source and is counted as skipped, with the reason.
//!
//! The sources are synchronous (sqlite and the redis client block), the submits go through the
//! crate's async [`crate::client`] on a current-thread runtime: the import is a one-shot CLI.

pub mod memcached;
pub mod redis;
pub mod sqlite;
pub mod submit;

use crate::cli::{ImportArgs, ImportSource};
use crate::protocol::Priority;

/// Runs `gearhouse import`: reads the source, moves its jobs, prints the final counts (and
/// the refusal reasons) on stdout and returns them; the caller turns an incomplete import
/// into a failing exit status.
pub fn run(args: &ImportArgs) -> Result<Summary, ImportError> {
    let summary = match &args.source {
        ImportSource::Sqlite { file, table } => {
            let mut q = sqlite::SqliteQueue::open(file, table)?;
            let jobs = q.jobs()?;
            eprintln!("{} jobs in {} table {table}", jobs.len(), file.display());
            submit::import(&args.server, &jobs, &mut q)?
        }
        ImportSource::Redis { addr, prefix } => {
            let mut q = redis::RedisQueue::connect(addr, prefix)?;
            let jobs = q.jobs()?;
            eprintln!("{} jobs in redis {addr} under prefix {prefix}", jobs.len());
            submit::import(&args.server, &jobs, &mut q)?
        }
        ImportSource::Memcached { servers, prefix } => {
            let mut total = Summary {
                note: Some("memcached listing may be incomplete: run again until it finds none"),
                ..Summary::default()
            };
            for addr in servers {
                let mut q = memcached::MemcachedQueue::connect(addr, prefix)?;
                let jobs = q.jobs()?;
                eprintln!("{} jobs listed in memcached {addr}", jobs.len());
                total.add(submit::import(&args.server, &jobs, &mut q)?);
            }
            total
        }
    };
    println!("{summary}");
    Ok(summary)
}

/// One job read from gearmand's store, with what gearmand kept of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceJob {
    /// The function name.
    pub function: Vec<u8>,
    /// The unique id (gearmand stores a generated UUID when the client sent none).
    pub unique: Vec<u8>,
    /// The payload, unchanged.
    pub data: Vec<u8>,
    /// gearmand's priority (0 HIGH, 1 NORMAL, 2 LOW in every store).
    pub priority: Priority,
    /// Unix time the job is due at, when the store keeps one and it is set (non-zero).
    pub epoch: Option<u64>,
}

/// Maps gearmand's stored priority number (`gearman_job_priority_t`) to ours; anything
/// unknown is NORMAL, as gearmand itself would treat an out-of-range value.
pub fn priority_from_gearmand(n: i64) -> Priority {
    match n {
        0 => Priority::High,
        2 => Priority::Low,
        _ => Priority::Normal,
    }
}

/// `{function}-{unique}` (a key with its store's prefix removed) split as gearmand splits it:
/// the function runs to the first `-`, the unique is the rest (it may hold more `-`), so a
/// function named `f-b` comes back as `f`. gearmand's memcached and redis queues both key jobs
/// this way.
pub fn split_function_unique(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let dash = rest.iter().position(|&b| b == b'-')?;
    Some((&rest[..dash], &rest[dash + 1..]))
}

/// A store jobs can be deleted from once gearhouse has them.
pub trait Source {
    /// Deletes these jobs (all acknowledged by gearhouse) from the store, in one go when the
    /// store can batch.
    fn delete(&mut self, jobs: &[&SourceJob]) -> Result<(), ImportError>;
    /// How many jobs the store still holds.
    fn remaining(&mut self) -> Result<u64, ImportError>;
}

/// The counts printed at the end of an import.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Jobs gearhouse acknowledged and that were deleted from the source.
    pub moved: u64,
    /// Jobs gearhouse refused (they stay in the source).
    pub skipped: u64,
    /// Refusal reasons, one line per distinct reason with its count.
    pub reasons: Vec<(String, u64)>,
    /// Jobs still in the source after the import.
    pub left: u64,
    /// A caveat printed after the counts (memcached's listing may be incomplete).
    pub note: Option<&'static str>,
}

impl Summary {
    /// Counts one refusal under its reason.
    pub fn refuse(&mut self, reason: String) {
        self.skipped += 1;
        match self.reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.reasons.push((reason, 1)),
        }
    }

    /// Adds the counts of another import (one memcached server of several).
    pub fn add(&mut self, other: Summary) {
        self.moved += other.moved;
        self.left += other.left;
        for (reason, n) in other.reasons {
            self.skipped += n;
            match self.reasons.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, m)) => *m += n,
                None => self.reasons.push((reason, n)),
            }
        }
    }

    /// True when everything was moved and nothing is left (the exit status is success).
    pub fn complete(&self) -> bool {
        self.skipped == 0 && self.left == 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "moved {}, skipped {}, left {}",
            self.moved, self.skipped, self.left
        )?;
        for (reason, n) in &self.reasons {
            write!(f, "; {n} refused: {reason}")?;
        }
        if let Some(note) = self.note {
            write!(f, "; {note}")?;
        }
        Ok(())
    }
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The sqlite file could not be opened or queried.
    #[error("sqlite queue {file}: {source} (is it gearmand's --libsqlite3-db file, and --table its --libsqlite3-table?)")]
    Sqlite {
        file: String,
        #[source]
        source: rusqlite::Error,
    },
    /// The redis server could not be reached or answered an error.
    #[error("redis queue at {addr}: {source} (is it gearmand's --redis-server/--redis-port?)")]
    Redis {
        addr: String,
        #[source]
        source: ::redis::RedisError,
    },
    /// Talking to the target gearhouse failed (not a refusal of one job).
    #[error("gearhouse at {server} (--server): {source}")]
    Gearhouse {
        server: String,
        #[source]
        source: crate::client::ClientError,
    },
    /// A memcached server could not be reached or answered something unexpected.
    #[error(
        "memcached queue at {addr}: {source} (is it one of gearmand's --libmemcached-servers?)"
    )]
    Memcached {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The runtime for the client could not be built.
    #[error("starting the client runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gearmand_priorities_map_to_ours() {
        assert_eq!(priority_from_gearmand(0), Priority::High);
        assert_eq!(priority_from_gearmand(1), Priority::Normal);
        assert_eq!(priority_from_gearmand(2), Priority::Low);
        assert_eq!(priority_from_gearmand(7), Priority::Normal);
    }

    #[test]
    fn summary_counts_refusals_by_reason() {
        let mut s = Summary {
            moved: 2,
            ..Summary::default()
        };
        s.refuse("QUEUE_FULL".into());
        s.refuse("QUEUE_FULL".into());
        s.left = 2;
        assert!(!s.complete());
        assert_eq!(
            s.to_string(),
            "moved 2, skipped 2, left 2; 2 refused: QUEUE_FULL"
        );
    }
}
