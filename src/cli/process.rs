//! The process around the server, as gearmand and systemd expect it: logs appended to a file,
//! the listen address retried while a previous server still holds it, detaching (`-d`), a pid
//! file, dropping root (`-u`), and systemd's readiness notification.
//!
//! Everything here that forks or changes ids runs before the tokio runtime starts, while the
//! process has one thread: `fork` in a multi-threaded process leaves a child whose other
//! threads (the runtime's workers, holding locks) are gone, and `setuid` would apply to the
//! calling thread's credentials only as glibc sees them. So the listeners are bound with std
//! first and handed to tokio afterwards.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Why the process could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open the log file {path} (log.file / -l): {err}")]
    LogFile { path: String, err: io::Error },
    #[error("cannot listen on {addr} ({setting}): {err}")]
    Bind {
        addr: String,
        setting: &'static str,
        err: io::Error,
    },
    #[error("cannot detach (-d): {0}")]
    Daemon(io::Error),
    #[error("cannot write the pid file {path} (server.pid_file / -P): {err}")]
    PidFile { path: String, err: io::Error },
    #[error("cannot switch to user {user:?} (server.user / -u): {why}")]
    User { user: String, why: String },
}

/// Sends stderr to `log.file`: empty or `stderr` leaves it, `none` discards, anything else is
/// a file opened for appending. stderr itself is redirected (dup2), so what logging writes and
/// what a panic prints both land there; logging needs no writer of its own.
pub fn redirect_stderr(file: &str) -> Result<(), ProcessError> {
    let path = match file {
        "" | "stderr" => return Ok(()),
        "none" => "/dev/null",
        p => p,
    };
    let err = |err| ProcessError::LogFile {
        path: path.into(),
        err,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    dup2(f.as_raw_fd(), libc::STDERR_FILENO).map_err(err)
}

fn dup2(from: libc::c_int, to: libc::c_int) -> io::Result<()> {
    // SAFETY: both are open descriptors; dup2 replaces `to` atomically.
    if unsafe { libc::dup2(from, to) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Binds `addr`, retrying every 250 ms for up to `retry` while it is in use (the previous
/// server of a restart is still closing), each retry logged, as gearmand does. `backlog`, when
/// given, replaces std's listen backlog.
pub fn bind(
    addr: &str,
    setting: &'static str,
    retry: Duration,
    backlog: Option<u32>,
) -> Result<TcpListener, ProcessError> {
    let err = |err| ProcessError::Bind {
        addr: addr.into(),
        setting,
        err,
    };
    let deadline = Instant::now() + retry;
    let l = loop {
        match TcpListener::bind(addr) {
            Ok(l) => break l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                let left = deadline.saturating_duration_since(Instant::now());
                tracing::warn!(
                    %addr,
                    "{setting}: address in use; retrying for {} ms more (server.bind_retry_ms)",
                    left.as_millis()
                );
                std::thread::sleep(Duration::from_millis(250).min(left));
            }
            Err(e) => return Err(err(e)),
        }
    };
    if let Some(b) = backlog {
        let b = libc::c_int::try_from(b).unwrap_or(libc::c_int::MAX);
        // SAFETY: `l` is a bound, listening socket; listen() again only changes the backlog.
        if unsafe { libc::listen(l.as_raw_fd(), b) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Detaches into the background: forks (the parent exits 0, so a shell or init script goes on
/// once the listeners are bound), starts a new session, and points stdin and stdout at
/// /dev/null. stderr stays where `log.file` put it. Must run before any thread is started.
pub fn daemonize() -> Result<(), ProcessError> {
    // SAFETY: called while the process has a single thread (before the runtime is built).
    match unsafe { libc::fork() } {
        -1 => return Err(ProcessError::Daemon(io::Error::last_os_error())),
        0 => {}
        // SAFETY: the parent leaves at once, without running destructors that belong to the
        // child now (pid file, listeners).
        _ => unsafe { libc::_exit(0) },
    }
    // SAFETY: plain syscalls in the single-threaded child.
    if unsafe { libc::setsid() } < 0 {
        return Err(ProcessError::Daemon(io::Error::last_os_error()));
    }
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(ProcessError::Daemon)?;
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        dup2(null.as_raw_fd(), fd).map_err(ProcessError::Daemon)?;
    }
    Ok(())
}

/// Switches to `user` (and its primary group, with no supplementary groups). A no-op when
/// the process already runs as that user. Must run before any thread is started.
pub fn switch_user(user: &str) -> Result<(), ProcessError> {
    let fail = |why: String| ProcessError::User {
        user: user.into(),
        why,
    };
    let name = std::ffi::CString::new(user).map_err(|_| fail("contains a NUL byte".into()))?;
    // SAFETY: getpwnam's static result is read at once, before anything else can call it
    // (single thread).
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Err(fail("no such user".into()));
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    // SAFETY: plain id syscalls.
    if unsafe { libc::geteuid() } == uid {
        return Ok(());
    }
    let os = |what: &str| {
        fail(format!(
            "{what}: {} (it needs root)",
            io::Error::last_os_error()
        ))
    };
    // SAFETY: as above; groups first, then the group, then the user (after which we could not).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) < 0 {
            return Err(os("setgroups"));
        }
        if libc::setgid(gid) < 0 {
            return Err(os("setgid"));
        }
        if libc::setuid(uid) < 0 {
            return Err(os("setuid"));
        }
    }
    Ok(())
}

/// The pid file: written when created, removed when dropped (at exit).
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's id to `path`, atomically: written beside it, then renamed over
    /// it, so a reader (a monitor, an init script) never sees the file empty or half written.
    pub fn create(path: &str) -> Result<PidFile, ProcessError> {
        let failed = |err| ProcessError::PidFile {
            path: path.into(),
            err,
        };
        let tmp = format!("{path}.tmp.{}", std::process::id());
        std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(failed)?;
        if let Err(err) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(failed(err));
        }
        Ok(PidFile(path.into()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(path = %self.0.display(), "cannot remove the pid file: {e}");
        }
    }
}

/// Sends `state` (e.g. `READY=1`) to systemd when it started us with `Type=notify`
/// (`$NOTIFY_SOCKET` set); a no-op otherwise. A few lines instead of a crate: the protocol is
/// one datagram.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let r = (|| {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (Linux): '@' stands for the leading NUL.
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                return sock.send_to_addr(state.as_bytes(), &addr);
            }
            #[cfg(not(target_os = "linux"))]
            return Err(io::Error::other(format!("abstract socket {name:?}")));
        }
        sock.send_to(state.as_bytes(), &path)
    })();
    if let Err(e) = r {
        tracing::warn!("cannot notify systemd ({state}) on NOTIFY_SOCKET: {e}");
    }
}

/// Waits until `/readyz` on `http` answers 200 (recovery is done and the Gearman listener is
/// accepting), then tells systemd `READY=1`. The server's start sequence lives in
/// [`crate::app::run_with`]; asking it over HTTP, as a load balancer would, keeps the binary
/// from reaching into it.
pub async fn notify_when_ready(http: SocketAddr) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let target = match http.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), http.port())
        }
        ip if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), http.port())
        }
        _ => http,
    };
    loop {
        if readyz_ok(target).await {
            sd_notify("READY=1\nSTATUS=accepting clients");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz_ok(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        io::Result::Ok(head.ends_with(b" 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ask).await,
        Ok(Ok(true))
    )
}
