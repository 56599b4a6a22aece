//! Takeover on request: the admin command `takeover <node> [<namespace> <memcached,...>]` asks
//! this server to take a dead node's queue over exactly as an automatic takeover does
//! ([`super::lease`], [`super::takeover::run`]): the jobs keep their handles and the dead
//! letters move. `gearhouse recover --from-node` sends it first and moves jobs through the
//! Gearman protocol (new handles, letters left behind) only when the server cannot do this.
//!
//! The connection that sent the command hands a [`TakeoverRequest`] to the lease watcher task
//! (which holds what a takeover needs, and runs one takeover at a time) and waits for its
//! one-line answer:
//! - `OK moved <n> jobs of node <id> ...`: done (`n` may be 0: nothing was left);
//! - `ERR UNKNOWN_OPTION ...`: this server is not where that queue is (persistence off, another
//!   namespace or another memcached cluster): the command falls back to the protocol;
//! - `ERR QUEUE_ERROR ...`: refused or failed (the node renews its lease, another server holds
//!   its takeover lock, memcached did not answer): nothing to fall back to, the text says why;
//! - `ERR INVALID_ARGUMENTS ...`: a malformed command, or this server's own node id.

use std::collections::BTreeSet;

use tokio::sync::{mpsc, oneshot};

use super::Settings;

/// Requests waiting for the watcher at once; past it the command is answered "busy".
const QUEUED_REQUESTS: usize = 4;

/// What the admin command asks for (`namespace` and `memcached`: where the asker believes the
/// queue is; `None` = this server's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeoverAsk {
    pub node: String,
    pub namespace: Option<String>,
    pub memcached: Option<Vec<String>>,
}

/// One request on its way to the watcher, with where its answer goes.
#[derive(Debug)]
pub struct TakeoverRequest {
    pub ask: TakeoverAsk,
    pub reply: oneshot::Sender<String>,
}

/// How a takeover attempt ended (automatic attempts log it; requested ones answer with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Moved {
        moved: u64,
        skipped: u64,
    },
    /// Nothing queued and no dead letters under the node's keys.
    Nothing,
    /// Another server holds (`done`: completed) the node's takeover lock.
    LockedBy {
        owner: String,
        done: bool,
    },
    /// memcached did not answer a read or the lock write.
    Unreadable(String),
    Failed(String),
}

/// The sending side, kept by the Gearman listener's connections.
#[derive(Debug, Clone)]
pub struct TakeoverRequests(mpsc::Sender<TakeoverRequest>);

/// The channel between the connections and the watcher task.
pub fn channel() -> (TakeoverRequests, mpsc::Receiver<TakeoverRequest>) {
    let (tx, rx) = mpsc::channel(QUEUED_REQUESTS);
    (TakeoverRequests(tx), rx)
}

impl TakeoverRequests {
    /// Hands `ask` to the watcher and waits for its answer line (with `\r\n`).
    pub async fn ask(&self, ask: TakeoverAsk) -> String {
        let (reply, answer) = oneshot::channel();
        if self.0.try_send(TakeoverRequest { ask, reply }).is_err() {
            return err(
                "QUEUE_ERROR",
                "other takeover requests are waiting: try again later",
            );
        }
        answer.await.unwrap_or_else(|_| {
            err(
                "QUEUE_ERROR",
                "the server is stopping: the takeover did not run",
            )
        })
    }
}

/// The answer to a request this server cannot take: persistence is off.
pub fn no_persistence() -> String {
    err(
        "UNKNOWN_OPTION",
        "persistence is off: this server keeps no queue in memcached to take over into",
    )
}

impl TakeoverRequest {
    /// Refuses what this server must not or cannot do before anything is read.
    pub(super) fn check(&self, own_node: &str, s: &Settings) -> Result<(), String> {
        let a = &self.ask;
        if a.node == own_node {
            return Err(err(
                "INVALID_ARGUMENTS",
                &format!("{own_node} is this server's own node id"),
            ));
        }
        if let Some(ns) = a.namespace.as_ref().filter(|ns| **ns != s.namespace) {
            return Err(err(
                "UNKNOWN_OPTION",
                &format!(
                    "this server's queue is in namespace {:?}, not {ns:?}",
                    s.namespace
                ),
            ));
        }
        if let Some(m) = &a.memcached {
            let asked: BTreeSet<&str> = m.iter().map(|n| n.trim()).collect();
            let own: BTreeSet<&str> = s.nodes.iter().map(|n| n.trim()).collect();
            if asked != own {
                return Err(err(
                    "UNKNOWN_OPTION",
                    &format!(
                        "this server's memcached cluster is {}, not {}",
                        s.nodes.join(","),
                        m.join(",")
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn refuse_live(&self) -> String {
        err(
            "QUEUE_ERROR",
            &format!(
                "node {} renews its lease: a live server's queue is never taken over",
                self.ask.node
            ),
        )
    }

    pub(super) fn unreadable(&self, why: &str) -> String {
        err(
            "QUEUE_ERROR",
            &format!("node {}'s lease could not be read: {why}", self.ask.node),
        )
    }

    /// The answer line for how the attempt ended.
    pub(super) fn reply_text(&self, a: &Attempt) -> String {
        let node = &self.ask.node;
        match a {
            Attempt::Moved { moved, skipped } => format!(
                "OK moved {moved} jobs of node {node} with their handles ({skipped} had been moved before); its dead letters moved too\r\n"
            ),
            Attempt::Nothing => {
                format!("OK moved 0 jobs of node {node}: it has no queued jobs or dead letters\r\n")
            }
            Attempt::LockedBy { owner, done: true } => format!(
                "OK moved 0 jobs of node {node}: {owner} took its queue over already\r\n"
            ),
            Attempt::LockedBy { owner, done: false } => err(
                "QUEUE_ERROR",
                &format!("{owner} is taking node {node}'s queue over (its takeover lock)"),
            ),
            Attempt::Unreadable(e) => err("QUEUE_ERROR", &format!("memcached: {e}")),
            Attempt::Failed(e) => err(
                "QUEUE_ERROR",
                &format!("taking over node {node} failed: {e} (run it again to resume)"),
            ),
        }
    }
}

/// What the server said to a `takeover` sent by `gearhouse recover`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `OK ...`: the server did it (the text after `OK`).
    Done(String),
    /// The server cannot (an older server or gearmand, persistence off, another cluster, not
    /// allowed from here): move the jobs through the protocol instead. The line, for the log.
    Fallback(String),
    /// The server refused or failed: the line says why.
    Refused(String),
}

/// Sends `takeover <node> <namespace> <memcached>` to the Gearman server at `addr` and reads
/// its one-line answer (waiting up to `timeout`: a takeover of a large queue takes a while).
pub async fn ask_server(
    addr: &str,
    ask: &TakeoverAsk,
    timeout: std::time::Duration,
) -> std::io::Result<Answer> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut line = format!("takeover {}", ask.node);
    if let (Some(ns), Some(m)) = (&ask.namespace, &ask.memcached) {
        line.push_str(&format!(" {ns} {}", m.join(",")));
    }
    line.push('\n');
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(line.as_bytes()).await?;
        let mut answer = String::new();
        // One line; a server that sends more than 64 KiB without a newline is not answering.
        let n = BufReader::new(s)
            .take(64 * 1024)
            .read_line(&mut answer)
            .await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection without answering",
            ));
        }
        Ok(answer.trim_end().to_string())
    };
    let answer = tokio::time::timeout(timeout, talk).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer to takeover within {timeout:?}"),
        )
    })??;
    Ok(if let Some(rest) = answer.strip_prefix("OK ") {
        Answer::Done(rest.to_string())
    } else if [
        "ERR UNKNOWN_COMMAND",
        "ERR UNKNOWN_OPTION",
        "ERR PERMISSION_DENIED",
    ]
    .iter()
    .any(|p| answer.starts_with(p))
    {
        Answer::Fallback(answer.replace('+', " "))
    } else {
        Answer::Refused(answer.replace('+', " "))
    })
}

/// Parses the command's words after `takeover`.
pub fn parse(words: &[&str]) -> Result<TakeoverAsk, String> {
    match words {
        [node] => Ok(TakeoverAsk {
            node: node.to_string(),
            namespace: None,
            memcached: None,
        }),
        [node, ns, nodes] => Ok(TakeoverAsk {
            node: node.to_string(),
            namespace: Some(ns.to_string()),
            memcached: Some(nodes.split(',').map(str::to_string).collect()),
        }),
        _ => Err(err(
            "INVALID_ARGUMENTS",
            "usage: takeover <node id> [<namespace> <memcached host:port,...>]",
        )),
    }
}

/// An admin error line (`ERR CODE text`, spaces as `+`, as gearmand writes them).
fn err(code: &str, text: &str) -> String {
    format!("ERR {code} {}\r\n", text.replace(' ', "+"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let cfg = crate::config::Config::default();
        let mut s = Settings::build(&cfg, &["m1:11211".into(), "m2:11211".into()]).unwrap();
        s.namespace = "ns".into();
        s.node_id = "b".into();
        s
    }

    fn request(words: &[&str]) -> TakeoverRequest {
        TakeoverRequest {
            ask: parse(words).unwrap(),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn requests_for_another_cluster_or_this_node_are_refused_before_any_read() {
        let s = settings();
        assert!(request(&["a"]).check("b", &s).is_ok());
        assert!(request(&["a", "ns", "m2:11211,m1:11211"])
            .check("b", &s)
            .is_ok());
        let own = request(&["b"]).check("b", &s).unwrap_err();
        assert!(own.starts_with("ERR INVALID_ARGUMENTS b+is+this"), "{own}");
        let ns = request(&["a", "other", "m1:11211,m2:11211"])
            .check("b", &s)
            .unwrap_err();
        assert!(ns.starts_with("ERR UNKNOWN_OPTION "), "{ns}");
        let cluster = request(&["a", "ns", "m1:11211"])
            .check("b", &s)
            .unwrap_err();
        assert!(cluster.starts_with("ERR UNKNOWN_OPTION "), "{cluster}");
        assert!(parse(&["a", "ns"]).is_err());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn answers_say_what_happened_in_one_line() {
        let r = request(&["a"]);
        let moved = r.reply_text(&Attempt::Moved {
            moved: 5,
            skipped: 1,
        });
        assert!(moved.starts_with("OK moved 5 jobs of node a "), "{moved}");
        for a in [
            Attempt::Nothing,
            Attempt::LockedBy {
                owner: "c".into(),
                done: false,
            },
            Attempt::Failed("x y".into()),
        ] {
            let t = r.reply_text(&a);
            assert!(t.ends_with("\r\n") && t.matches('\n').count() == 1, "{t}");
        }
        assert!(r
            .reply_text(&Attempt::LockedBy {
                owner: "c".into(),
                done: false
            })
            .starts_with("ERR QUEUE_ERROR c+is+taking"));
    }
}
