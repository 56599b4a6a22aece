//! The admin text protocol from the client side: send one command line, read its answer.
//!
//! Listing commands (`status`, `workers`, `show jobs`, ...) answer with lines ending in a line
//! `.`; the others (`version`, `getpid`, `maxqueue`, `cancel job`, ...) with one line. The
//! answer is returned as the server wrote it, line ends included, so tests can compare bytes.

use super::{ClientError, Connection};

/// Commands whose answer is one line; every other command answers a listing ending in `.`.
const ONE_LINE: [&str; 9] = [
    "maxqueue", "cancel", "create", "drop", "getpid", "version", "verbose", "shutdown", "limit",
];

/// True when the answer to `command` is a listing that ends in a line `.`.
pub fn is_listing(command: &str) -> bool {
    let word = command
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    !ONE_LINE.contains(&word.as_str())
}

impl Connection {
    /// Sends `command` (a line without its `\n`) and returns the whole answer as text.
    pub async fn admin(&mut self, command: &str) -> Result<String, ClientError> {
        self.put_raw(command.as_bytes());
        self.put_raw(b"\n");
        self.flush().await?;
        self.read_admin(is_listing(command)).await
    }

    /// Sends a listing command and returns its lines, without the closing `.`; an `ERR` answer
    /// becomes [`ClientError::Server`].
    pub async fn admin_lines(&mut self, command: &str) -> Result<Vec<String>, ClientError> {
        let text = self.admin(command).await?;
        if let Some(err) = text.strip_prefix("ERR ") {
            let (code, rest) = err
                .trim_end()
                .split_once(' ')
                .unwrap_or((err.trim_end(), ""));
            return Err(ClientError::Server {
                code: code.to_string(),
                text: rest.to_string(),
            });
        }
        Ok(text
            .lines()
            .take_while(|l| *l != ".")
            .map(str::to_string)
            .collect())
    }

    /// The `status` row of `function`: (total, running, available workers); `None` when the
    /// server does not list it.
    pub async fn function_status(
        &mut self,
        function: &str,
    ) -> Result<Option<(u64, u64, u64)>, ClientError> {
        let lines = self.admin_lines("status").await?;
        Ok(lines.iter().find_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 4 || f[0] != function {
                return None;
            }
            Some((f[1].parse().ok()?, f[2].parse().ok()?, f[3].parse().ok()?))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Job, WorkEvent};
    use crate::codec::{put_response, PacketType};
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn one_line_commands_are_known() {
        assert!(is_listing("status"));
        assert!(is_listing("show unique jobs"));
        assert!(!is_listing("VERSION"));
        assert!(!is_listing("cancel job H:x:1"));
    }

    /// A scripted server on a real socket: it checks the request bytes and answers a foreground
    /// submit with WORK_DATA then WORK_COMPLETE, then an admin `status`.
    #[tokio::test]
    async fn submit_and_admin_against_a_scripted_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut want = BytesMut::new();
            crate::codec::put_packet(
                &mut want,
                crate::codec::MAGIC_REQ,
                PacketType::SUBMIT_JOB_HIGH,
                &[b"rev", b"u", b"abc"],
            );
            let mut got = vec![0u8; want.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, want);
            let mut out = BytesMut::new();
            put_response(&mut out, PacketType::JOB_CREATED, &[b"H:t:1"]);
            put_response(&mut out, PacketType::WORK_DATA, &[b"H:t:1", b"partial"]);
            put_response(&mut out, PacketType::WORK_COMPLETE, &[b"H:t:1", b"cba"]);
            s.write_all(&out).await.unwrap();
            let mut line = [0u8; 7];
            s.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"status\n");
            s.write_all(b"rev\t0\t0\t1\n.\n").await.unwrap();
        });
        let mut c = Connection::connect(addr).await.unwrap();
        let out = c
            .submit(
                &Job::new("rev", "abc")
                    .unique("u")
                    .priority(crate::protocol::Priority::High),
            )
            .await
            .unwrap();
        assert_eq!(&out.handle[..], b"H:t:1");
        assert_eq!(out.events[0], WorkEvent::Data("partial".into()));
        assert_eq!(out.result().map(|b| &b[..]), Some(&b"cba"[..]));
        assert_eq!(c.function_status("rev").await.unwrap(), Some((0, 0, 1)));
        server.await.unwrap();
        assert!(matches!(c.recv().await, Err(ClientError::Closed)));
    }
}
