//! `kiln bench --http`: the bench's calls sent to `kiln serve`'s `/v1/embeddings` over
//! loopback, one keep-alive HTTP/1.1 connection per caller — a minimal client written
//! for measuring (a request, then a response with `Content-Length`, as kiln's server
//! sends), so the figure is the server's cost, not a client library's.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One caller's connection.
pub(crate) struct Connection {
    stream: BufReader<TcpStream>,
}

/// What a call got: the vector, or the HTTP status of a refusal.
pub(crate) enum Answer {
    Vector(Vec<f32>),
    Refused(u16),
}

impl Connection {
    pub(crate) async fn open(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream: BufReader::new(stream) })
    }

    /// Embeds one text through `POST /v1/embeddings`.
    pub(crate) async fn embed(&mut self, model: &str, text: &str) -> Result<Answer> {
        let body = serde_json::to_vec(&serde_json::json!({"model": model, "input": text}))?;
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.write_all(&body).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("the server closed the connection");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let length = length.context("a response without Content-Length")?;
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        if status != 200 {
            return Ok(Answer::Refused(status));
        }
        let value: serde_json::Value = serde_json::from_slice(&body)?;
        let vector = serde_json::from_value(value["data"][0]["embedding"].clone())
            .context("a response without data[0].embedding")?;
        Ok(Answer::Vector(vector))
    }
}

/// An in-process `kiln serve` over the bench's optimizer, on a loopback port.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) model: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<usize>>,
    state: std::sync::Arc<kiln_serve::State>,
}

impl Server {
    pub(crate) async fn start(
        config: kiln::KilnConfig,
        optimizer: std::sync::Arc<kiln::Optimizer>,
    ) -> Result<Self> {
        let head = kiln::text::embedding_head(&config.model.path, &config.text)?;
        let limits = kiln_serve::Limits::of(&config.server);
        let state = kiln_serve::State::new(config, head);
        state.ready(optimizer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = kiln_serve::router(state.clone());
        let task = tokio::spawn(kiln_serve::serve(
            listener,
            router,
            async move {
                let _ = stopped.await;
            },
            limits,
        ));
        Ok(Server { addr, model: state.model_name().to_string(), stop, task, state })
    }

    /// Stops the server and lets go of the optimizer.
    pub(crate) async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the server task")?.context("serving")?;
        // The router (and with it its handle on the optimizer) is gone; this is the last.
        drop(self.state);
        Ok(())
    }
}
