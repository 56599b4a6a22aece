//! gearmand's `redis` queue: one hash per job, key `{prefix}-{function}-{unique}` (prefix
//! `_gear_` unless `--redis-prefix`), fields `data` (the payload) and `priority` (0 HIGH,
//! 1 NORMAL, 2 LOW). The store keeps no epoch.
//!
//! gearmand splits a key on the first `-` after the prefix when it replays the queue, so a
//! function name containing `-` comes back cut short and the rest lands in the unique. This
//! import reads keys the same way: a job whose function had a `-` arrives in gearhouse exactly as
//! gearmand itself would have restored it. Keys are listed with SCAN (never KEYS, which blocks
//! the redis server), read and deleted with one pipeline per batch.

use std::collections::HashMap;

use ::redis::{Client, Connection, RedisError};

use super::{priority_from_gearmand, ImportError, Source, SourceJob};

/// gearmand's default `--redis-prefix`.
pub const DEFAULT_PREFIX: &str = "_gear_";
/// Keys asked for per SCAN step and read per HGETALL pipeline.
const BATCH: usize = 1000;

/// A connection to the redis server holding a gearmand queue.
pub struct RedisQueue {
    con: Connection,
    addr: String,
    prefix: String,
}

impl RedisQueue {
    /// Connects to `addr` (`HOST:PORT`).
    pub fn connect(addr: &str, prefix: &str) -> Result<RedisQueue, ImportError> {
        let err = |source| ImportError::Redis {
            addr: addr.to_string(),
            source,
        };
        let con = Client::open(format!("redis://{addr}/"))
            .and_then(|c| c.get_connection())
            .map_err(err)?;
        Ok(RedisQueue {
            con,
            addr: addr.to_string(),
            prefix: prefix.to_string(),
        })
    }

    fn err(&self, source: RedisError) -> ImportError {
        ImportError::Redis {
            addr: self.addr.clone(),
            source,
        }
    }

    /// Every key of this prefix, listed with SCAN (a key may be listed twice by SCAN's
    /// contract; duplicates are dropped).
    fn keys(&mut self) -> Result<Vec<Vec<u8>>, ImportError> {
        let pattern = format!("{}-*", glob_escape(&self.prefix));
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(BATCH)
                .query(&mut self.con)
                .map_err(|e| self.err(e))?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    /// Every queued job. Keys this import cannot split (no `-` after the prefix), or that
    /// vanished or are not hashes, are skipped: gearmand would not restore them either.
    pub fn jobs(&mut self) -> Result<Vec<SourceJob>, ImportError> {
        let keys = self.keys()?;
        let mut jobs = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let mut pipe = ::redis::pipe();
            for k in chunk {
                pipe.cmd("HGETALL").arg(k);
            }
            let maps: Vec<HashMap<Vec<u8>, Vec<u8>>> =
                pipe.query(&mut self.con).map_err(|e| self.err(e))?;
            for (key, fields) in chunk.iter().zip(maps) {
                let Some((function, unique)) = split_key(key, self.prefix.as_bytes()) else {
                    continue;
                };
                let Some(data) = fields.get(&b"data"[..]) else {
                    continue;
                };
                let priority = fields
                    .get(&b"priority"[..])
                    .and_then(|p| std::str::from_utf8(p).ok()?.trim().parse().ok())
                    .unwrap_or(1);
                jobs.push(SourceJob {
                    function: function.to_vec(),
                    unique: unique.to_vec(),
                    data: data.clone(),
                    priority: priority_from_gearmand(priority),
                    epoch: None,
                });
            }
        }
        Ok(jobs)
    }

    fn key(&self, j: &SourceJob) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + j.function.len() + j.unique.len() + 2);
        k.extend_from_slice(self.prefix.as_bytes());
        k.push(b'-');
        k.extend_from_slice(&j.function);
        k.push(b'-');
        k.extend_from_slice(&j.unique);
        k
    }
}

impl Source for RedisQueue {
    fn delete(&mut self, jobs: &[&SourceJob]) -> Result<(), ImportError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        for j in jobs {
            pipe.cmd("DEL").arg(self.key(j)).ignore();
        }
        pipe.query::<()>(&mut self.con).map_err(|e| self.err(e))
    }

    fn remaining(&mut self) -> Result<u64, ImportError> {
        Ok(self.keys()?.len() as u64)
    }
}

/// `{prefix}-{function}-{unique}` split as gearmand splits it: the function runs to the first
/// `-` after the prefix, the unique is the rest (it may hold more `-`).
pub fn split_key<'k>(key: &'k [u8], prefix: &[u8]) -> Option<(&'k [u8], &'k [u8])> {
    super::split_function_unique(key.strip_prefix(prefix)?.strip_prefix(b"-")?)
}

/// The prefix as a literal in a SCAN MATCH glob.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_on_the_first_dash_like_gearmand() {
        assert_eq!(
            split_key(b"_gear_-fa-u1", b"_gear_"),
            Some((&b"fa"[..], &b"u1"[..]))
        );
        // A function "f-b" with unique "u3" comes back as function "f", unique "b-u3".
        assert_eq!(
            split_key(b"_gear_-f-b-u3", b"_gear_"),
            Some((&b"f"[..], &b"b-u3"[..]))
        );
        assert_eq!(split_key(b"_gear_-nodash", b"_gear_"), None);
        assert_eq!(split_key(b"other-fa-u1", b"_gear_"), None);
        assert_eq!(glob_escape("a*b"), "a\\*b");
    }
}
