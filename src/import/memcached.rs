//! gearmand's `libmemcached` queue, best effort: one item per job, key
//! `{prefix}{function}-{unique}` (prefix `gear_`), value the payload, flags the priority
//! (0 HIGH, 1 NORMAL, 2 LOW); no epoch is kept.
//!
//! memcached has no way to list its keys completely. This reads `lru_crawler metadump all`
//! (memcached 1.4.31+) and falls back to `stats cachedump` per slab class (from `stats items`),
//! which memcached truncates to 2 MB of answer per class; either may miss items written or
//! moved while it runs. So the final line says the listing may be incomplete: run the import
//! again until it finds none.
//!
//! gearmand's key has no separator between function and unique other than a `-`, and gearmand
//! splits it on the first `-` after the prefix when it replays the queue; a function name with
//! a `-` is cut there and the rest joins the unique. The import splits the same way, so a job
//! arrives in gearhouse exactly as gearmand would have restored it.
//!
//! The text protocol is spoken directly over a blocking socket: a handful of commands, no
//! client library needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::{priority_from_gearmand, ImportError, Source, SourceJob};

/// The key prefix gearmand 1.1.20 uses (built in: gearmand has no option for it).
pub const DEFAULT_PREFIX: &str = "gear_";
/// Keys per `get` and per pipelined batch of `delete`s.
const BATCH: usize = 100;

/// One memcached server holding (part of) a gearmand queue.
pub struct MemcachedQueue {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    addr: String,
    prefix: String,
}

impl MemcachedQueue {
    /// Connects to one server, `HOST:PORT`.
    pub fn connect(addr: &str, prefix: &str) -> Result<MemcachedQueue, ImportError> {
        let io = |e: std::io::Error| ImportError::Memcached {
            addr: addr.to_string(),
            source: e,
        };
        let writer = TcpStream::connect(addr).map_err(io)?;
        writer
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let reader = BufReader::new(writer.try_clone().map_err(io)?);
        Ok(MemcachedQueue {
            reader,
            writer,
            addr: addr.to_string(),
            prefix: prefix.to_string(),
        })
    }

    fn err(&self, source: std::io::Error) -> ImportError {
        ImportError::Memcached {
            addr: self.addr.clone(),
            source,
        }
    }

    fn line(&mut self) -> std::io::Result<Vec<u8>> {
        let mut l = Vec::new();
        if self.reader.read_until(b'\n', &mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        while matches!(l.last(), Some(b'\n' | b'\r')) {
            l.pop();
        }
        Ok(l)
    }

    /// Sends `cmd` and returns the answer's lines up to `END` (an error line ends it too).
    fn listing(&mut self, cmd: &str) -> std::io::Result<Result<Vec<Vec<u8>>, String>> {
        self.writer.write_all(cmd.as_bytes())?;
        self.writer.write_all(b"\r\n")?;
        let mut lines = Vec::new();
        loop {
            let l = self.line()?;
            if l == b"END" {
                return Ok(Ok(lines));
            }
            if l.starts_with(b"ERROR")
                || l.starts_with(b"CLIENT_ERROR")
                || l.starts_with(b"SERVER_ERROR")
                || l.starts_with(b"BUSY")
            {
                return Ok(Err(String::from_utf8_lossy(&l).into_owned()));
            }
            lines.push(l);
        }
    }

    /// The keys of this prefix memcached lists now (possibly not all of them).
    fn keys(&mut self) -> Result<Vec<Vec<u8>>, ImportError> {
        let mut keys = match self.metadump().map_err(|e| self.err(e))? {
            Some(k) => k,
            None => self.cachedump().map_err(|e| self.err(e))?,
        };
        keys.retain(|k| k.starts_with(self.prefix.as_bytes()));
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    /// `lru_crawler metadump all`: `key=<uri-encoded key> exp=...` lines; `None` when this
    /// memcached does not have it (or the crawler is busy or disabled).
    fn metadump(&mut self) -> std::io::Result<Option<Vec<Vec<u8>>>> {
        let Ok(lines) = self.listing("lru_crawler metadump all")? else {
            return Ok(None);
        };
        Ok(Some(
            lines
                .iter()
                .filter_map(|l| {
                    let k = l.strip_prefix(b"key=")?;
                    let end = k.iter().position(|&b| b == b' ').unwrap_or(k.len());
                    Some(uri_decode(&k[..end]))
                })
                .collect(),
        ))
    }

    /// `stats cachedump CLASS 0` for every slab class `stats items` lists.
    fn cachedump(&mut self) -> std::io::Result<Vec<Vec<u8>>> {
        let items = self.listing("stats items")?.unwrap_or_default();
        let mut classes: Vec<u32> = items
            .iter()
            .filter_map(|l| {
                let rest = std::str::from_utf8(l).ok()?.strip_prefix("STAT items:")?;
                rest.split(':').next()?.parse().ok()
            })
            .collect();
        classes.dedup();
        let mut keys = Vec::new();
        for class in classes {
            let lines = self
                .listing(&format!("stats cachedump {class} 0"))?
                .unwrap_or_default();
            keys.extend(lines.iter().filter_map(|l| {
                let k = l.strip_prefix(b"ITEM ")?;
                let end = k.iter().position(|&b| b == b' ').unwrap_or(k.len());
                Some(k[..end].to_vec())
            }));
        }
        Ok(keys)
    }

    /// Every job this server lists now. Keys gearmand could not split (no `-` after the
    /// prefix) or that vanished between the listing and the `get` are passed over.
    pub fn jobs(&mut self) -> Result<Vec<SourceJob>, ImportError> {
        let keys = self.keys()?;
        let mut jobs = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            self.get(chunk, &mut jobs).map_err(|e| self.err(e))?;
        }
        Ok(jobs)
    }

    fn get(&mut self, keys: &[Vec<u8>], jobs: &mut Vec<SourceJob>) -> std::io::Result<()> {
        let mut cmd = b"get".to_vec();
        for k in keys {
            cmd.push(b' ');
            cmd.extend_from_slice(k);
        }
        cmd.extend_from_slice(b"\r\n");
        self.writer.write_all(&cmd)?;
        loop {
            let l = self.line()?;
            if l == b"END" {
                return Ok(());
            }
            // VALUE <key> <flags> <bytes>
            let head = String::from_utf8_lossy(&l).into_owned();
            let mut words = head.split(' ');
            let (Some("VALUE"), Some(key), Some(flags), Some(len)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unexpected answer to get: {head}"),
                ));
            };
            let len: usize = len.parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad length: {head}"),
                )
            })?;
            let mut data = vec![0; len + 2];
            self.reader.read_exact(&mut data)?;
            data.truncate(len);
            if let Some((function, unique)) = split_key(key.as_bytes(), self.prefix.as_bytes()) {
                jobs.push(SourceJob {
                    function: function.to_vec(),
                    unique: unique.to_vec(),
                    data,
                    priority: priority_from_gearmand(flags.parse().unwrap_or(1)),
                    epoch: None,
                });
            }
        }
    }

    fn key(&self, j: &SourceJob) -> Vec<u8> {
        let mut k = self.prefix.as_bytes().to_vec();
        k.extend_from_slice(&j.function);
        k.push(b'-');
        k.extend_from_slice(&j.unique);
        k
    }

    fn delete_batch(&mut self, jobs: &[&SourceJob]) -> std::io::Result<()> {
        let mut cmd = Vec::new();
        for j in jobs {
            cmd.extend_from_slice(b"delete ");
            cmd.extend_from_slice(&self.key(j));
            cmd.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&cmd)?;
        for _ in jobs {
            let l = self.line()?;
            // NOT_FOUND: gone already (expired, evicted or deleted by someone else): the job
            // is in gearhouse either way.
            if l != b"DELETED" && l != b"NOT_FOUND" {
                return Err(std::io::Error::other(format!(
                    "delete answered {}",
                    String::from_utf8_lossy(&l)
                )));
            }
        }
        Ok(())
    }
}

impl Source for MemcachedQueue {
    fn delete(&mut self, jobs: &[&SourceJob]) -> Result<(), ImportError> {
        for chunk in jobs.chunks(BATCH) {
            self.delete_batch(chunk).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn remaining(&mut self) -> Result<u64, ImportError> {
        Ok(self.keys()?.len() as u64)
    }
}

/// `{prefix}{function}-{unique}` split as gearmand splits it: the function runs to the first
/// `-` after the prefix.
pub fn split_key<'k>(key: &'k [u8], prefix: &[u8]) -> Option<(&'k [u8], &'k [u8])> {
    super::split_function_unique(key.strip_prefix(prefix)?)
}

/// metadump prints keys URI-encoded (`%XX`).
fn uri_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            let hex = &s[i + 1..i + 3];
            if hex.iter().all(u8::is_ascii_hexdigit) {
                let digits = std::str::from_utf8(hex).unwrap_or("00");
                out.push(u8::from_str_radix(digits, 16).unwrap_or(0));
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_on_the_first_dash_like_gearmand() {
        assert_eq!(
            split_key(b"gear_fa-u1", b"gear_"),
            Some((&b"fa"[..], &b"u1"[..]))
        );
        assert_eq!(
            split_key(b"gear_f-b-u3", b"gear_"),
            Some((&b"f"[..], &b"b-u3"[..]))
        );
        assert_eq!(split_key(b"gear_nodash", b"gear_"), None);
    }

    #[test]
    fn metadump_keys_are_uri_decoded() {
        assert_eq!(uri_decode(b"gear_f%2Fx-u%25"), b"gear_f/x-u%");
        assert_eq!(uri_decode(b"plain%2"), b"plain%2");
    }
}
