//! A throwaway `redis-server` on a loopback port, for tests of anything that uses the
//! shared cache (kiln's own, and a user's).
//!
//! The binary is `$REDIS_SERVER_BIN` when set (`scripts/setup serve` unpacks Debian's
//! package into `.kiln/tools/redis` and sets it), else `redis-server` on `PATH`.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

    /// Starts it again, empty, on the same port, and waits until it says it accepts
    /// connections (its log line "Ready to accept connections").
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let mut child = Command::new(&self.binary)
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
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {} ({e}): run `scripts/setup serve` (Debian's redis-server, unpacked into \
                     .kiln/tools/redis) and `. .kiln/env`, or put redis-server on PATH",
                    self.binary.display()
                )
            })?;
        // Its log goes to stdout: read to the end on a thread (so the pipe never fills),
        // the ready line passed on.
        let (ready, said_ready) = std::sync::mpsc::channel();
        let log = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(log).lines().map_while(Result::ok) {
                if line.contains("Ready to accept connections") {
                    let _ = ready.send(());
                }
            }
        });
        self.child = Some(child);
        match said_ready.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.as_mut().and_then(|c| c.wait().ok());
                Err(format!("{} exited at start ({status:?})", self.binary.display()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "{} did not say it was ready on port {} within 10 s",
                self.binary.display(),
                self.port
            )),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
