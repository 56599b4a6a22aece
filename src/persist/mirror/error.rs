//! Why a job record write failed, as a value: the mirror decides on the kind (reroute a
//! copy, count it under a reason, warn with the fix) and turns it into text only at the
//! engine's seam, where it becomes the client's `ERROR QUEUE_ERROR <text>`.
//!
//! Every message names the setting or the memcached flag that fixes it. Node addresses are
//! `Arc<str>` shared with the node, so a batch failing on a node clones a pointer per job,
//! never a string.

use std::fmt;
use std::sync::Arc;

use crate::engine::MirrorRefused;
use crate::persist::client::{ClientError, Reply};

/// Which nodes were up when a job could not get `persistence.replicas` copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// Nodes up.
    pub have: usize,
    /// Copies needed (`persistence.replicas`).
    pub need: usize,
    /// Nodes configured.
    pub total: usize,
    /// The nodes down with why: `addr (reason), ...`.
    pub down: String,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot make the job durable: {} needed (persistence.replicas) but only {} of {} memcached nodes are up; down: {}; start them or lower persistence.replicas",
            crate::persist::copies(self.need), self.have, self.total, self.down
        )
    }
}

/// Why a job record write (or one copy of it) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// Too few nodes are up for `persistence.replicas` copies.
    #[error("{0}")]
    NotEnoughNodes(Shortfall),
    /// A copy's node failed and no other node could take it.
    #[error("{cause}; {shortfall}")]
    NoSpareNode {
        cause: Box<WriteError>,
        shortfall: Shortfall,
    },
    /// `persistence.max_pending_writes` writes are already waiting.
    #[error("{limit} job writes are already waiting for memcached (persistence.max_pending_writes); memcached is slower than the submit rate: retry later or add memcached capacity")]
    TooManyPending { limit: usize },
    /// A writer's queue is full.
    #[error("memcached {node} is not keeping up: its write queue is full (persistence.max_pending_writes); retry later or add memcached capacity")]
    QueueFull { node: Arc<str> },
    /// `SERVER_ERROR out of memory storing object` (memcached started with -M and full).
    #[error("memcached {node} refused the write: out of memory ({detail}); start it with more -m (memory in MB), and keep -M so it never evicts queued jobs")]
    OutOfMemory { node: Arc<str>, detail: String },
    /// `SERVER_ERROR object too large for cache` (above memcached's -I).
    #[error("memcached {node} refused the write: the job record ({len} bytes) is larger than its item size limit ({detail}); start memcached with a larger -I (e.g. -I 16m) or send smaller payloads")]
    TooLarge {
        node: Arc<str>,
        len: usize,
        detail: String,
    },
    /// Any other answer than stored.
    #[error("memcached {node} refused the write: {reply}")]
    Rejected { node: Arc<str>, reply: String },
    /// No answer within `persistence.write_timeout_ms`.
    #[error("memcached {node} did not answer within {ms} ms (persistence.write_timeout_ms)")]
    Timeout { node: Arc<str>, ms: u64 },
    /// The connection failed (refused, reset, closed, garbled).
    #[error("memcached {node}: {source}")]
    Connection { node: Arc<str>, source: ClientError },
    /// The node was already marked down when the batch was due.
    #[error("memcached {node} is down ({reason})")]
    NodeDown { node: Arc<str>, reason: String },
}

/// How a node failed a copy: the `reason` label of `gearhouse_memcached_write_failures_total`
/// (created at 0 for every node) and the index of the node's per-reason counters and
/// warning throttles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeFailure {
    OutOfMemory,
    TooLarge,
    Rejected,
    Timeout,
    Connection,
    NodeDown,
    QueueFull,
}

impl NodeFailure {
    /// Every reason, in index order.
    pub const ALL: [NodeFailure; 7] = [
        NodeFailure::OutOfMemory,
        NodeFailure::TooLarge,
        NodeFailure::Rejected,
        NodeFailure::Timeout,
        NodeFailure::Connection,
        NodeFailure::NodeDown,
        NodeFailure::QueueFull,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            NodeFailure::OutOfMemory => "out_of_memory",
            NodeFailure::TooLarge => "too_large",
            NodeFailure::Rejected => "rejected",
            NodeFailure::Timeout => "timeout",
            NodeFailure::Connection => "connection",
            NodeFailure::NodeDown => "node_down",
            NodeFailure::QueueFull => "queue_full",
        }
    }

    /// A node that is up refused the item: only its operator can fix it, so it is logged
    /// (rate-limited), not only counted. Node failures have their own down/up lines.
    pub fn needs_operator(self) -> bool {
        matches!(
            self,
            NodeFailure::OutOfMemory | NodeFailure::TooLarge | NodeFailure::Rejected
        )
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            NodeFailure::OutOfMemory => {
                "give memcached more memory: restart it as memcached -M -m <more MB>"
            }
            NodeFailure::TooLarge => {
                "raise memcached's item size limit: restart it with -I <bigger, e.g. 16m>, or send smaller payloads"
            }
            NodeFailure::Rejected => "see memcached's answer in the first line",
            NodeFailure::Timeout => "check the node's load and network, or raise persistence.write_timeout_ms",
            NodeFailure::Connection | NodeFailure::NodeDown => "start the node or fix the network",
            NodeFailure::QueueFull => "add memcached capacity or lower the submit rate",
        }
    }
}

impl WriteError {
    /// memcached's answer to one set, as an error with advice (`len`: the record's size).
    pub fn from_reply(node: &Arc<str>, reply: &Reply, len: usize) -> WriteError {
        let node = node.clone();
        match reply {
            Reply::ServerError(m) if m.contains("out of memory") => WriteError::OutOfMemory {
                node,
                detail: m.clone(),
            },
            Reply::ServerError(m) if m.contains("too large") => WriteError::TooLarge {
                node,
                len,
                detail: m.clone(),
            },
            Reply::ServerError(m) => WriteError::Rejected {
                node,
                reply: format!("SERVER_ERROR {m}"),
            },
            Reply::ClientError(m) => WriteError::Rejected {
                node,
                reply: format!("CLIENT_ERROR {m}"),
            },
            other => WriteError::Rejected {
                node,
                reply: format!("unexpected reply {other:?}"),
            },
        }
    }

    /// A failed exchange with `node`.
    pub fn from_client(node: &Arc<str>, e: ClientError) -> WriteError {
        match e {
            ClientError::Timeout(ms) => WriteError::Timeout {
                node: node.clone(),
                ms,
            },
            source => WriteError::Connection {
                node: node.clone(),
                source,
            },
        }
    }

    /// How a node failed, for errors that belong to one node.
    pub fn node_failure(&self) -> Option<NodeFailure> {
        Some(match self {
            WriteError::OutOfMemory { .. } => NodeFailure::OutOfMemory,
            WriteError::TooLarge { .. } => NodeFailure::TooLarge,
            WriteError::Rejected { .. } => NodeFailure::Rejected,
            WriteError::Timeout { .. } => NodeFailure::Timeout,
            WriteError::Connection { .. } => NodeFailure::Connection,
            WriteError::NodeDown { .. } => NodeFailure::NodeDown,
            WriteError::QueueFull { .. } => NodeFailure::QueueFull,
            WriteError::NoSpareNode { cause, .. } => return cause.node_failure(),
            WriteError::NotEnoughNodes(_) | WriteError::TooManyPending { .. } => return None,
        })
    }
}

/// The engine's seam: the engine keeps the text for the client's `ERROR QUEUE_ERROR`.
impl From<WriteError> for MirrorRefused {
    fn from(e: WriteError) -> MirrorRefused {
        MirrorRefused(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Arc<str> {
        Arc::from("10.0.0.5:11211")
    }

    #[test]
    fn memcached_refusals_become_advice() {
        let oom = WriteError::from_reply(
            &node(),
            &Reply::ServerError("out of memory storing object".into()),
            100,
        );
        assert_eq!(oom.node_failure(), Some(NodeFailure::OutOfMemory));
        let text = oom.to_string();
        assert!(
            text.contains("10.0.0.5:11211") && text.contains("more -m") && text.contains("-M"),
            "{text}"
        );
        let big = WriteError::from_reply(
            &node(),
            &Reply::ServerError("object too large for cache".into()),
            2_000_000,
        );
        assert_eq!(big.node_failure(), Some(NodeFailure::TooLarge));
        assert!(big.to_string().contains("2000000 bytes") && big.to_string().contains("-I"));
        let odd = WriteError::from_reply(&node(), &Reply::NotStored, 1);
        assert_eq!(odd.node_failure().map(NodeFailure::label), Some("rejected"));
    }

    #[test]
    fn failure_indexes_follow_all() {
        for (i, f) in NodeFailure::ALL.into_iter().enumerate() {
            assert_eq!(f as usize, i, "{f:?}");
        }
    }

    #[test]
    fn a_lost_copy_names_the_failure_and_the_nodes_that_are_missing() {
        let cause = WriteError::from_client(&node(), ClientError::Timeout(250));
        assert_eq!(cause.node_failure(), Some(NodeFailure::Timeout));
        let e = WriteError::NoSpareNode {
            cause: Box::new(cause),
            shortfall: Shortfall {
                have: 1,
                need: 2,
                total: 3,
                down: "10.0.0.5:11211 (closed the connection)".into(),
            },
        };
        let text = MirrorRefused::from(e.clone()).0;
        assert!(
            text.starts_with("memcached 10.0.0.5:11211 did not answer within 250 ms (persistence.write_timeout_ms); cannot make the job durable: 2 copies needed"),
            "{text}"
        );
        assert!(text.contains("lower persistence.replicas"), "{text}");
        // Counted under the node failure that caused it.
        assert_eq!(e.node_failure(), Some(NodeFailure::Timeout));
    }
}
