//! The `kiln` command line. `main.rs` only parses arguments and calls [`run`]; this
//! library holds the logic so tests can call it.
//!
//! [`run`] is a dispatcher: `kiln run` and `kiln bench` go to the module of the
//! config's task — `embed`, `classify`, `generate`, `video` — and every task writes
//! through [`output`] (whole files, JSON Lines rows, the profiler's report and trace).

pub mod bench;
mod classify;
mod embed;
mod generate;
mod http_load;
pub mod input;
mod listing;
pub mod output;
mod preprocess;
mod serve;
mod video;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use kiln::{KilnConfig, Task};

use crate::input::InputFormat;
pub use crate::output::ProfilerOutputs;

/// Fast, observable ML inference on any backend.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// kiln's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the config's task over an input file.
    Run(RunArgs),
    /// Print the merged, validated config (defaults < file < KILN_* env < --set).
    Config {
        /// Config source options.
        #[command(flatten)]
        source: ConfigSource,
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Generate load on the configured model and report throughput and latency.
    Bench(BenchArgs),
    /// Run only the image pipeline (the config's `[preprocess]` section; no model) and
    /// write the batch as a NumPy `.npy`.
    Preprocess(PreprocessArgs),
    /// List this machine's devices: the CPU and each NVIDIA GPU (NVML).
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the config's model over HTTP: OpenAI's /v1/embeddings, TEI's /embed and
    /// /info, /health, Prometheus' /metrics.
    Serve(serve::ServeArgs),
    /// List the providers in this build and what they support.
    Providers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Where the config comes from.
#[derive(Debug, Args)]
pub struct ConfigSource {
    /// A kiln.toml; without one, the built-in defaults (candle, CPU, MiniLM) apply.
    pub config: Option<PathBuf>,
    /// Override a key: `--set model.dtype=f16` (repeatable; wins over file and env).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ConfigSource {
    fn load(&self) -> Result<KilnConfig> {
        Ok(KilnConfig::load(self.config.as_deref(), &self.sets)?)
    }
}

/// `kiln run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config source options.
    #[command(flatten)]
    pub source: ConfigSource,
    /// Input: for `embed`, one text per line or JSON Lines {"id", "text"}; for
    /// `classify`, a folder of images, an image, or a text file listing image paths;
    /// for `generate`, prompts; `video` takes none (its config says what to render).
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    /// Output file: JSON Lines in input order — {"id", "embedding"} (embed) or
    /// {"id", "path", "top_k": [{"label", "index", "score"}]} (classify); for `video`,
    /// the video: .gif, .mp4 (with ffmpeg on PATH), .png (one per frame) or .npy.
    #[arg(long, short)]
    pub output: PathBuf,
    /// How to read the input.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
    pub format: InputFormat,
    /// Profiler outputs.
    #[command(flatten)]
    pub profiler: ProfilerOutputs,
}

impl RunArgs {
    /// `--input`, which every task but `video` reads.
    pub fn input(&self, task: kiln::Task) -> Result<&std::path::Path> {
        self.input
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("kiln run needs --input FILE for task = \"{}\"", task.as_str()))
    }
}

/// An error and its causes on one line, each cause once: kiln's messages often
/// already include their source's text, which a plain chain would repeat.
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// `kiln preprocess` arguments.
#[derive(Debug, Args)]
pub struct PreprocessArgs {
    /// A config; only its `[preprocess]` section is read.
    pub config: PathBuf,
    /// Image files, or folders of them (not recursive).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// The `.npy` to write: N×3×H×W (CHW) or N×H×W×3 (HWC), one row per image that
    /// could be read, in order.
    #[arg(long)]
    pub out: PathBuf,
    /// Override a key: `--set preprocess.width=320` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Run the batch this many times and report the best images/s (benchmarking).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

/// `kiln bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Config source options.
    #[command(flatten)]
    pub source: ConfigSource,
    /// Single-text calls to make.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Fraction of distinct texts; the rest repeat them (cache hits).
    #[arg(long, default_value_t = 1.0)]
    pub unique_ratio: f64,
    /// Words per generated text, MIN-MAX.
    #[arg(long, default_value = "4-64", value_parser = parse_words)]
    pub words: (usize, usize),
    /// Send the texts of this file (one per line) instead of generated ones, in order,
    /// cycling when `--requests` is more than its lines; `--unique-ratio` and `--words`
    /// do not apply. For a baseline outside kiln on exactly the same texts. For
    /// `task = "generate"`, one prompt per line, or a `.jsonl` file of prompts as `kiln
    /// run` reads them (messages with images, paths relative to the file).
    #[arg(long, value_name = "FILE")]
    pub texts: Option<PathBuf>,
    /// Also run a baseline with these overrides first (repeatable), and report
    /// config / baseline throughput: `--compare batching.enabled=false`.
    #[arg(long, value_name = "SECTION.KEY=VALUE")]
    pub compare: Vec<String>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Profiler outputs of the measured run (not the baseline).
    #[command(flatten)]
    pub profiler: ProfilerOutputs,
    /// After the in-process run, send the same calls over HTTP (one keep-alive
    /// connection per caller) to `kiln serve`'s `/v1/embeddings` on a loopback port,
    /// over a fresh optimizer of the same config, and report the HTTP / in-process
    /// throughput ratio.
    #[arg(long)]
    pub http: bool,
    /// For `task = "video"`: timed renders per side, interleaved, after a warm-up each.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// For `task = "video"`: also render with scripts/video_reference.py (one frame at
    /// a time) under this Python (with onnxruntime and numpy), report kiln / reference
    /// speed and how far the frames differ.
    #[arg(long, value_name = "PYTHON")]
    pub reference: Option<PathBuf>,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run_task(args).await,
        Command::Config { source, json } => {
            let config = source.load()?;
            let text = if json { serde_json::to_string_pretty(&config)? } else { config.to_toml()? };
            println!("{}", text.trim_end());
            Ok(())
        }
        Command::Providers { json } => listing::providers(json),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Devices { json } => listing::devices(json),
        Command::Bench(args) => bench_task(args).await,
        Command::Serve(args) => serve::serve(args).await,
    }
}

fn parse_words(s: &str) -> std::result::Result<(usize, usize), String> {
    let (min, max) = s.split_once('-').ok_or_else(|| format!("expected MIN-MAX, e.g. 4-64, got `{s}`"))?;
    let parse = |v: &str| {
        v.trim().parse::<usize>().map_err(|_| format!("expected MIN-MAX of whole numbers, got `{s}`"))
    };
    Ok((parse(min)?, parse(max)?))
}

/// `kiln run`: the config's task, by the module of that task.
async fn run_task(args: RunArgs) -> Result<()> {
    let mut config = args.source.load()?;
    args.profiler.apply(&mut config);
    match config.task {
        Task::Embed => embed::run(config, &args).await,
        Task::Classify => classify::run(config, &args).await,
        Task::Generate => generate::run(config, &args).await,
        Task::Video => video::run(config, &args).await,
    }
}

/// `kiln bench`: the load of the config's task, by the module of that task.
async fn bench_task(args: BenchArgs) -> Result<()> {
    let mut config = args.source.load()?;
    args.profiler.apply(&mut config);
    match config.task {
        Task::Video => {
            video::bench(config, args.rounds, args.reference.as_deref(), args.json.as_deref()).await
        }
        // Prompts, not texts to embed: one stream against `--concurrency` streams.
        Task::Generate => {
            generate::bench(
                config,
                args.requests,
                args.concurrency,
                args.texts.as_deref(),
                args.json.as_deref(),
            )
            .await
        }
        Task::Embed | Task::Classify => bench::run(config, &args).await,
    }
}
