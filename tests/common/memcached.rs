//! Real memcached processes on free loopback ports, killed on drop (the persistence mirror's
//! storage in tests).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// A real memcached process on a free loopback port; killed on drop.
pub struct Memcached {
    pub child: Child,
    pub port: u16,
    pub args: Vec<String>,
}

impl Memcached {
    /// Starts memcached with `-M` (no eviction) and `mem_mb` of memory, plus `extra` flags.
    pub fn start(mem_mb: u32, extra: &[&str]) -> Memcached {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "-l".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-U".into(),
            "0".into(),
            "-m".into(),
            mem_mb.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(port, args)
    }

    fn start_with(port: u16, args: Vec<String>) -> Memcached {
        let mut cmd = Command::new("memcached");
        cmd.args(&args).stdout(Stdio::null()).stderr(Stdio::null());
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .spawn()
            .expect("memcached must be installed (scripts/install-test-deps.sh)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "memcached did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Memcached { child, port, args }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the process (node loss).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh, empty memcached on the same port with the same flags.
    pub fn restart_empty(&mut self) {
        self.kill();
        let fresh = Self::start_with(self.port, self.args.clone());
        drop(std::mem::replace(self, fresh));
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
