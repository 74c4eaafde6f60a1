//! A throwaway `redis-server` on a loopback port, for tests of anything that uses the
//! shared cache (kiln's own, and a user's).
//!
//! The binary is `$REDIS_SERVER_BIN` when set (`scripts/setup serve` unpacks Debian's
//! package into `.kiln/tools/redis` and sets it), else `redis-server` on `PATH`.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` that keeps nothing on disk; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits (10 s at most) until it
    /// accepts connections. The error says what is missing and how to get it.
    pub fn start() -> Result<Self, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free loopback port: {e}"))?
            .port();
        let binary = match std::env::var_os("REDIS_SERVER_BIN") {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from("redis-server"),
        };
        let mut server = RedisServer { child: None, port, binary };
        server.restart()?;
        Ok(server)
    }

    /// The loopback port it listens on (the same across [`restart`](Self::restart)s).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (as an outage would) and waits for its exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port, and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let child = Command::new(&self.binary)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {} ({e}): run `scripts/setup serve` (Debian's redis-server, unpacked into \
                     .kiln/tools/redis) and `. .kiln/env`, or put redis-server on PATH",
                    self.binary.display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("{} exited at start ({status})", self.binary.display()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not listen on port {} within 10 s",
                    self.binary.display(),
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
