//! Socket options the server sets on accepted connections: TCP keepalive (`server.keepalive*`,
//! gearmand's `--keepalive*`). Plain `setsockopt` through libc, since std exposes none of them
//! and one call per accepted socket does not justify another dependency.

use std::io;
use std::os::fd::AsRawFd;

/// TCP keepalive timers; 0 leaves the system's value (`net.ipv4.tcp_keepalive_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keepalive {
    /// Idle seconds before the first probe (TCP_KEEPIDLE).
    pub idle_s: u32,
    /// Seconds between probes (TCP_KEEPINTVL).
    pub interval_s: u32,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT).
    pub count: u32,
}

/// Turns keepalive on for `stream` with `k`'s timers. Works on any socket (`tokio::net::TcpStream`
/// or std's); an error means the kernel refused a value (e.g. above its maximum).
pub fn apply_keepalive(stream: &impl AsRawFd, k: &Keepalive) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    for (opt, v) in [
        (libc::TCP_KEEPIDLE, k.idle_s),
        (libc::TCP_KEEPINTVL, k.interval_s),
        (libc::TCP_KEEPCNT, k.count),
    ] {
        if v > 0 {
            let v = libc::c_int::try_from(v)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "keepalive value"))?;
            setsockopt(fd, libc::IPPROTO_TCP, opt, v)?;
        }
    }
    Ok(())
}

fn setsockopt(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is an open socket borrowed from the caller; the value is a c_int on the stack
    // and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn getsockopt(fd: libc::c_int, level: libc::c_int, opt: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as in `setsockopt`, with a writable value and length.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        v
    }

    #[test]
    fn keepalive_and_its_timers_reach_the_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = s.as_raw_fd();
        assert_eq!(getsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        let system_idle = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE);
        apply_keepalive(
            &s,
            &Keepalive {
                idle_s: 0,
                interval_s: 7,
                count: 3,
            },
        )
        .unwrap();
        assert_eq!(getsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(
            getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            system_idle
        );
        assert_eq!(getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 7);
        assert_eq!(getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
    }
}
