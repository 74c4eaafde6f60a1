//! `kiln serve` as users run it: a real process on a free loopback port, called over
//! plain HTTP/1.1.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::root;

/// Starts `kiln serve ARGS` on a free loopback port: the process, its address, and
/// its stderr lines after the first.
pub fn start(args: &[&str]) -> (Server, String, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--port", "0"])
        .args(args)
        .current_dir(root())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, stderr) = std::sync::mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let server = Server(child);
    let first = stderr.recv_timeout(Duration::from_secs(60)).expect("kiln serve printed nothing");
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    (server, base, stderr)
}

/// SIGTERM: the server stops accepting, drains, and exits cleanly with its summary line.
pub fn stop(mut server: Server, stderr: std::sync::mpsc::Receiver<String>) {
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // Its stderr closes when it exits: read to the end, within a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rest = Vec::new();
    loop {
        match stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => rest.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("kiln serve did not stop within 60 s of SIGTERM: {rest:?}")
            }
        }
    }
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("shut down after")), "{rest:?}");
}

/// The server process, killed if the test fails before it stops it.
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 call over a plain socket with a JSON body (or none): the status and
/// the body.
pub fn call(base: &str, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    call_raw(base, method, path, "application/json", body.as_bytes())
}

/// One HTTP/1.1 call with a body of `content_type`: the status and the body.
pub fn call_raw(base: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let host = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A sample without labels from a `/metrics` text.
pub fn metric(base: &str, name: &str) -> f64 {
    let (status, text) = call(base, "GET", "/metrics", None);
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Waits (120 s at most) for the line `kiln serve` prints on stderr once its model has
/// loaded (the port opens before), then checks that `/health` answers 200.
pub fn wait_ready(base: &str, stderr: &std::sync::mpsc::Receiver<String>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        match stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("kiln: serving") => break,
            Ok(line) => seen.push(line),
            Err(e) => panic!("{base} did not say it was serving within 120 s ({e}): {seen:?}"),
        }
    }
    assert_eq!(call(base, "GET", "/health", None).0, 200, "{base} said it was serving: {seen:?}");
}
