//! The connection layer under the routes: hyper's HTTP/1 server driven by kiln's own
//! accept loop (axum's `serve` sets none of these bounds), so no client holds a
//! connection, a file descriptor or the shutdown for as long as it likes.
//!
//! - **Header read and keep-alive idle**: hyper's `header_read_timeout`
//!   (`server.header_timeout_ms`): a request's headers must arrive within it, and a
//!   kept-alive connection waiting for its next request is closed after it (hyper ≥ 1.6
//!   starts the timer when the connection goes idle too). Slowloris clients go.
//! - **Body**: `server.body_timeout_ms`, per request, where the body is read
//!   (`layers::Body`), after the API key is checked.
//! - **Open connections**: at most `server.max_connections`; one more is answered `503`
//!   with `Retry-After` and closed at once, before anything of it is parsed, so the cap
//!   holds however the client behaves and stays below the process's file limit.
//! - **Drain**: on shutdown no new connection is accepted, idle ones close, requests in
//!   flight finish — for at most `server.shutdown_timeout_ms`; then the rest are
//!   dropped, so a half-sent request cannot hold the exit past an orchestrator's grace
//!   period.
//! - **Memory given back**: bodies are buffered whole (up to `server.max_body_bytes`,
//!   on at most `server.max_connections` connections); glibc's allocator keeps what they
//!   freed for reuse, so 300 stalled 2 MB bodies left ~590 MB resident after they were
//!   answered 408. After connections end, at most every [`TRIM_EVERY`], the free pages go
//!   back to the system (`malloc_trim`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use kiln::config::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The bounds [`serve`] keeps, from `server.*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `server.header_timeout_ms`.
    pub header_timeout: Duration,
    /// `server.max_connections`.
    pub max_connections: usize,
    /// `server.shutdown_timeout_ms`.
    pub shutdown_timeout: Duration,
}

impl Limits {
    /// The limits `server` sets.
    pub fn of(server: &ServerConfig) -> Self {
        Limits {
            header_timeout: Duration::from_millis(server.header_timeout_ms),
            max_connections: server.max_connections,
            shutdown_timeout: Duration::from_millis(server.shutdown_timeout_ms),
        }
    }
}

/// How often, at most, freed memory is handed back to the system after connections end.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Hands the allocator's free pages back to the system, while serving, whenever a
/// connection ended since the last time (every [`TRIM_EVERY`] at most).
fn trim_after_connections(ended: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if ended.swap(false, Ordering::Relaxed) {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    })
}

/// glibc's `malloc_trim(0)`: free pages of every arena back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Serves `router` on `listener` within `limits` until `shutdown` completes; then stops
/// accepting, lets requests in flight finish within `limits.shutdown_timeout`, drops the
/// connections still open then, and returns how many it dropped. When it returns, no
/// connection holds a clone of `router` any more.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<usize> {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let service = TowerToHyperService::new(router);
    let mut connections = tokio::task::JoinSet::new();
    let ended = Arc::new(AtomicBool::new(false));
    let trimmer = trim_after_connections(ended.clone());
    tokio::pin!(shutdown);
    loop {
        // Finished connections' tasks are reaped as new ones come, so the set stays as
        // large as what is open.
        while connections.try_join_next().is_some() {}
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors (or a connection reset before accept):
                    // the open connections finish and free some; do not spin meanwhile.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        let ended = ended.clone();
        connections.spawn(async move {
            // A connection's error (a reset, a header timeout) is the client's business.
            let _ = connection.await;
            drop(permit);
            ended.store(true, Ordering::Relaxed);
        });
    }
    drop(listener);
    trimmer.abort();
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown()).await.is_ok() {
        return Ok(0);
    }
    let dropped = connections.len();
    tracing::warn!(
        "{dropped} connections still open {} ms after shutdown began (server.shutdown_timeout_ms): dropped",
        limits.shutdown_timeout.as_millis()
    );
    connections.shutdown().await;
    Ok(dropped)
}

/// Answers a connection over the cap with `503` and closes it, within a second whatever
/// the client does.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = format!(
        "{{\"error\":{{\"message\":\"this server has {cap} connections open (server.max_connections); retry shortly\",\
         \"type\":\"overloaded\"}}}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
