//! The scheduler's admin commands, in the admin protocol's style: `show schedules` (a listing
//! ending in `.`) and `cancel schedule ID` (state-changing: `server.admin_networks` only, inside
//! a `gearhouse.admin` span). `src/admin.rs` routes the lines here.

use std::net::SocketAddr;

use bytes::{BufMut, BytesMut};

use super::Scheduler;
use crate::engine::Engine;

/// `show schedules`: `ID\tCRON\tFUNCTION\tPRIORITY\tNEXT_DUE\tLAST_RUN` per schedule (times in
/// RFC 3339 UTC, `-` for none), then `.`. Returns the command name and success.
pub fn show(engine: &Engine, out: &mut BytesMut) -> (&'static str, bool) {
    const NAME: &str = "show schedules";
    if let Some(s) = Scheduler::for_engine(engine) {
        for v in s.list() {
            let last = v.last_run.unwrap_or_else(|| "-".into());
            out.put_slice(
                format!(
                    "{}\t{}\t{}\t{}\t{}\t{}\n",
                    v.spec.id,
                    v.spec.cron,
                    v.spec.function,
                    v.spec.priority.priority().as_str(),
                    v.next_due,
                    last
                )
                .as_bytes(),
            );
        }
    }
    out.put_slice(b".\n");
    (NAME, true)
}

/// `cancel schedule ID`: removes the schedule (from memcached too, so from every server).
pub fn cancel(
    engine: &Engine,
    words: &[&str],
    peer: SocketAddr,
    is_admin: bool,
    out: &mut BytesMut,
) -> (&'static str, bool) {
    const NAME: &str = "cancel schedule";
    if !is_admin {
        out.put_slice(
            b"ERR PERMISSION_DENIED cancel+schedule+is+accepted+only+from+server.admin_networks\r\n",
        );
        return (NAME, false);
    }
    let Some(id) = words.get(2) else {
        out.put_slice(b"ERR INVALID_ARGUMENTS cancel+schedule+ID\r\n");
        return (NAME, false);
    };
    let _span = tracing::info_span!("gearhouse.admin", command = NAME, peer = %peer).entered();
    match Scheduler::for_engine(engine) {
        Some(s) if s.cancel(id) => {
            tracing::info!(schedule = id, "schedule {id} cancelled");
            out.put_slice(b"OK\r\n");
            (NAME, true)
        }
        _ => {
            out.put_slice(format!("ERR UNKNOWN_SCHEDULE no+schedule+{id}\r\n").as_bytes());
            (NAME, false)
        }
    }
}
