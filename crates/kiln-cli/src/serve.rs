//! `kiln serve`: binds the port, then loads the model (`/health` answers 503 until it
//! is ready), serves until SIGTERM or Ctrl-C, drains requests in flight, and shuts the
//! optimizer down (trackers flushed, profile written when asked).

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use kiln::{KilnConfig, Optimizer, Task};

use crate::ConfigSource;
use crate::output::ProfilerOutputs;

/// `kiln serve` arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config source options.
    #[command(flatten)]
    pub source: ConfigSource,
    /// Address to bind (default `server.host`, 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// Port (default `server.port`, 8080; 0: any free one).
    #[arg(long)]
    pub port: Option<u16>,
    /// Profiler outputs, written at shutdown.
    #[command(flatten)]
    pub profiler: ProfilerOutputs,
}

pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let mut config: KilnConfig = args.source.load()?;
    if let Some(host) = args.host {
        config.server.host = host;
    }
    if let Some(port) = args.port {
        config.server.port = port;
    }
    args.profiler.apply(&mut config);
    let head = match config.task {
        Task::Embed => kiln::text::embedding_head(&config.model.path, &config.text)?,
        // No text head: `normalize` and `dimensions` belong to the embedding routes.
        Task::Generate | Task::Classify => {
            kiln::EmbeddingHead { pooling: kiln::Pooling::Mean, normalize: false }
        }
        Task::Video => anyhow::bail!(
            "kiln serve serves task = \"embed\", \"classify\" and \"generate\"; render videos with kiln run"
        ),
    };
    let routes = match config.task {
        Task::Generate => "POST /v1/chat/completions, POST /v1/completions",
        Task::Classify => "POST /classify, /v2 (Open Inference Protocol)",
        Task::Embed | Task::Video => "POST /v1/embeddings, POST /embed, /v2 (Open Inference Protocol)",
    };
    let address = format!("{}:{}", config.server.host, config.server.port);
    let listener =
        tokio::net::TcpListener::bind(&address).await.with_context(|| format!("binding {address}"))?;
    let bound = listener.local_addr()?;
    let state = kiln_serve::State::new(config.clone(), head);
    let router = kiln_serve::router(state.clone());
    eprintln!(
        "kiln: listening on http://{bound} ({routes}, GET /info, GET /health, GET /metrics); loading {}",
        state.model_name()
    );
    let limits = kiln_serve::Limits::of(&config.server);
    let mut server = tokio::spawn(kiln_serve::serve(listener, router, kiln_serve::termination(), limits));
    let load = async {
        Ok::<_, kiln::Error>(match config.task {
            Task::Generate => {
                Loaded::Generate(Arc::new(kiln::runtime::Generation::from_config(config).await?))
            }
            _ => Loaded::Embed(Arc::new(Optimizer::from_config(config).await?)),
        })
    };
    let loaded = tokio::select! {
        loaded = load => loaded?,
        stopped = &mut server => {
            stopped.context("the server task")?.context("serving")?;
            eprintln!("kiln: stopped before the model had loaded");
            return Ok(());
        }
    };
    let what = match &loaded {
        Loaded::Embed(optimizer) => {
            state.ready(optimizer.clone());
            format!("{} on {}", optimizer.model_info().provider, optimizer.model_info().device)
        }
        Loaded::Generate(generation) => {
            state.ready_generation(generation.clone());
            generation.info().quantization.clone()
        }
    };
    eprintln!("kiln: serving {} ({what}) at http://{bound}", state.model_name());
    let dropped = server.await.context("the server task")?.context("serving")?;
    if dropped == 0 {
        eprintln!("kiln: stopped accepting; requests in flight finished");
    } else {
        eprintln!(
            "kiln: stopped accepting; {dropped} connections still open after server.shutdown_timeout_ms ({} ms) were dropped",
            limits.shutdown_timeout.as_millis()
        );
    }
    // The router's handles went with the server task; this is the last one.
    drop(state);
    let shared = || anyhow::anyhow!("the model is still shared after the server stopped");
    match loaded {
        Loaded::Embed(optimizer) => {
            let optimizer = Arc::try_unwrap(optimizer).map_err(|_| shared())?;
            args.profiler.write(optimizer.reports())?;
            let stats = optimizer.shutdown().await?;
            eprintln!("kiln: shut down after {} requests ({} texts)", stats.requests, stats.texts);
        }
        Loaded::Generate(generation) => {
            let generation = Arc::try_unwrap(generation).map_err(|_| shared())?;
            args.profiler.write(generation.reports())?;
            let stats = generation.shutdown().await;
            eprintln!(
                "kiln: shut down after {} requests ({} tokens generated)",
                stats.requests, stats.generated_tokens
            );
        }
    }
    Ok(())
}

/// What a server serves.
enum Loaded {
    Embed(Arc<Optimizer>),
    Generate(Arc<kiln::runtime::Generation>),
}
