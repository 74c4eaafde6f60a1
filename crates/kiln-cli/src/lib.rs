//! The `kiln` command line. `main.rs` only parses arguments and calls [`run`]; this
//! library holds the logic so tests can call it.

pub mod bench;
mod generate;
mod http_load;
pub mod input;
mod run;
mod serve;
mod video;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use kiln::{KilnConfig, Optimizer};

use crate::input::InputFormat;

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

/// `--profile` and `--trace`: the profiler's report and Chrome trace.
#[derive(Debug, Clone, Default, Args)]
pub struct ProfilerOutputs {
    /// Write the profiler's report (spans: count, total, mean, p50/p95/p99, max; peak
    /// RSS and GPU memory; mean CPU%) as JSON to this file. Turns the profiler on.
    #[arg(long, value_name = "FILE.json")]
    pub profile: Option<PathBuf>,
    /// Write a Chrome trace (every span, and resource samples as counters) to this
    /// file; open it in https://ui.perfetto.dev or chrome://tracing. Turns tracing on.
    #[arg(long, value_name = "FILE.json")]
    pub trace: Option<PathBuf>,
}

impl ProfilerOutputs {
    /// Turns on in `config` what the requested outputs need.
    pub fn apply(&self, config: &mut KilnConfig) {
        if self.profile.is_some() || self.trace.is_some() {
            config.profiler.enabled = true;
        }
        if self.trace.is_some() {
            config.profiler.trace = true;
        }
    }
}

/// Writes the outputs `outputs` asks for from the optimizer's profiler.
pub fn write_profiler_outputs(optimizer: &Optimizer, outputs: &ProfilerOutputs) -> Result<()> {
    write_outputs(outputs, |p| optimizer.write_profile(p), |p| optimizer.write_trace(p))
}

/// Writes the outputs `outputs` asks for from the generation engine's profiler.
pub fn write_generation_outputs(
    generation: &kiln::runtime::Generation,
    outputs: &ProfilerOutputs,
) -> Result<()> {
    write_outputs(outputs, |p| generation.write_profile(p), |p| generation.write_trace(p))
}

fn write_outputs(
    outputs: &ProfilerOutputs,
    profile: impl Fn(&std::path::Path) -> kiln::Result<bool>,
    trace: impl Fn(&std::path::Path) -> kiln::Result<bool>,
) -> Result<()> {
    if let Some(path) = &outputs.profile {
        profile(path)?;
        eprintln!("kiln: profile written to {}", path.display());
    }
    if let Some(path) = &outputs.trace {
        trace(path)?;
        eprintln!("kiln: trace written to {} (open in https://ui.perfetto.dev)", path.display());
    }
    Ok(())
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
    /// do not apply. For a baseline outside kiln on exactly the same texts.
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
        Command::Run(args) => run::run_task(args).await,
        Command::Config { source, json } => {
            let config = source.load()?;
            let text = if json { serde_json::to_string_pretty(&config)? } else { config.to_toml()? };
            println!("{}", text.trim_end());
            Ok(())
        }
        Command::Providers { json } => providers(json),
        Command::Preprocess(args) => preprocess(args),
        Command::Devices { json } => devices(json),
        Command::Bench(args) => bench_command(args).await,
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

async fn bench_command(args: BenchArgs) -> Result<()> {
    let options = bench::BenchOptions {
        requests: args.requests,
        concurrency: args.concurrency,
        unique_ratio: args.unique_ratio,
        words: args.words,
        texts: match &args.texts {
            Some(path) => Some(bench::read_texts(path)?),
            None => None,
        },
        progress: true,
        profiler: args.profiler.clone(),
        http: false,
    };
    let mut config = args.source.load()?;
    args.profiler.apply(&mut config);
    if config.task == kiln::Task::Video {
        return video::bench(config, args.rounds, args.reference.as_deref(), args.json.as_deref()).await;
    }
    if config.task == kiln::Task::Generate {
        // Prompts, not texts to embed: one stream against `--concurrency` streams.
        return generate::bench_generate(
            config,
            args.requests,
            args.concurrency,
            options.texts,
            args.json.as_deref(),
        )
        .await;
    }
    let baseline = if args.compare.is_empty() {
        None
    } else {
        let sets: Vec<String> = args.source.sets.iter().chain(&args.compare).cloned().collect();
        let config = KilnConfig::load(args.source.config.as_deref(), &sets)?;
        let baseline_options =
            bench::BenchOptions { profiler: ProfilerOutputs::default(), ..options.clone() };
        let report = bench::run_once(config, &baseline_options, args.compare.clone()).await?;
        bench::print("baseline", &report);
        Some(report)
    };
    let http_config = args.http.then(|| config.clone());
    let report = bench::run_once(config, &options, Vec::new()).await?;
    bench::print("kiln", &report);
    let ratio = baseline.as_ref().map(|b| report.throughput_rps / b.throughput_rps.max(1e-9));
    if let Some(ratio) = ratio {
        println!("throughput ratio kiln / baseline ({}): {ratio:.2}", args.compare.join(", "));
    }
    let http = match http_config {
        Some(config) => {
            let http_options =
                bench::BenchOptions { profiler: ProfilerOutputs::default(), http: true, ..options.clone() };
            let over_http = bench::run_once(config, &http_options, Vec::new()).await?;
            bench::print("kiln serve (HTTP)", &over_http);
            let ratio = over_http.throughput_rps / report.throughput_rps.max(1e-9);
            println!("throughput ratio HTTP / in-process: {ratio:.2}");
            Some((over_http, ratio))
        }
        None => None,
    };
    if let Some(path) = &args.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(b) = &baseline {
            value["baseline"] = serde_json::to_value(b)?;
            value["throughput_ratio"] = serde_json::json!(ratio);
        }
        if let Some((h, ratio)) = &http {
            value["http"] = serde_json::to_value(h)?;
            value["http_ratio"] = serde_json::json!(ratio);
        }
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal (indicatif draws nothing otherwise).
fn progress_bar(total: usize, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

fn preprocess(args: PreprocessArgs) -> Result<()> {
    use kiln::vision::{ImageInput, ImagePipeline, expand_paths, write_npy};
    let mut config = kiln::PreprocessConfig::load(Some(&args.config), &args.sets)?;
    // Repeats measure the pipeline, not the cache.
    if args.repeat > 1 {
        config.cache_bytes = 0;
    }
    let paths = expand_paths(&args.images)?;
    let inputs: Vec<ImageInput> = paths.iter().map(ImageInput::path).collect();
    let pipeline = ImagePipeline::new(&config)?;
    let mut best = f64::INFINITY;
    let mut batch = None;
    for _ in 0..args.repeat.max(1) {
        let started = Instant::now();
        batch = Some(pipeline.process(&inputs)?);
        best = best.min(started.elapsed().as_secs_f64());
    }
    let batch = batch.expect("ran at least once");
    let failed: Vec<String> =
        batch.rows.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    for e in &failed {
        eprintln!("kiln: skipped {e}");
    }
    let done = inputs.len() - failed.len();
    if done > 0 {
        write_npy(&args.out, &batch.tensor)?;
    }
    eprintln!(
        "kiln: preprocessed {done} of {} images in {:.3} s ({:.1} images/s{}); {:?} {} written to {}",
        inputs.len(),
        best,
        done as f64 / best.max(1e-9),
        if args.repeat > 1 { format!(", best of {}", args.repeat) } else { String::new() },
        batch.tensor.shape(),
        batch.tensor.dtype(),
        if done > 0 { args.out.display().to_string() } else { "nothing".into() }
    );
    if !failed.is_empty() {
        anyhow::bail!("{} of {} images could not be read (listed above)", failed.len(), inputs.len());
    }
    Ok(())
}

fn devices(json: bool) -> Result<()> {
    let report = kiln::runtime::discover_devices();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let row = |device: &kiln::Device, name: &str, memory: &kiln::MemoryInfo, details: String| {
        println!(
            "{:<8} {:<28} {:>9.1} / {:>6.1} GiB  {details}",
            device.to_string(),
            name,
            gib(memory.used),
            gib(memory.total)
        );
    };
    let c = &report.cpu;
    println!("{:<8} {:<28} {:>22}  details", "device", "name", "memory used / total");
    let cores = c.cores.map(|n| format!(", {n} cores")).unwrap_or_default();
    row(&c.device, &c.name, &c.memory, format!("{} threads{cores}", c.threads));
    for g in &report.gpus {
        let mut details = Vec::new();
        if let Some(u) = g.utilization_percent {
            details.push(format!("{u}% busy"));
        }
        if let Some(t) = g.temperature_c {
            details.push(format!("{t} °C"));
        }
        if let Some(p) = g.power_w {
            details.push(format!("{p:.0} W"));
        }
        row(&g.device, &g.name, &g.memory, details.join(", "));
    }
    match (&report.driver_version, &report.cuda_version, &report.no_gpu_reason) {
        (Some(d), Some(c), _) => println!("NVIDIA driver {d}, CUDA {c}"),
        (_, _, Some(reason)) => println!("{reason}"),
        _ => {}
    }
    Ok(())
}

fn providers(json: bool) -> Result<()> {
    let registry = kiln::providers()?;
    let rows: Vec<serde_json::Value> = registry
        .iter()
        .map(|reg| {
            let built = (reg.build)(&kiln::ProviderConfig { name: reg.name.into(), ..Default::default() });
            match built {
                Ok(p) => serde_json::json!({"name": reg.name, "description": reg.description, "capabilities": p.capabilities()}),
                Err(e) => serde_json::json!({"name": reg.name, "description": reg.description, "error": e.to_string()}),
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    println!("{:<10} {:<14} {:<16} {:<17} description", "provider", "devices", "dtypes", "quantization");
    for row in &rows {
        let caps = &row["capabilities"];
        let quantization = ["none".to_string(), list(&caps["quantization"])].join(", ");
        println!(
            "{:<10} {:<14} {:<16} {:<17} {}",
            row["name"].as_str().unwrap_or_default(),
            list(&caps["devices"]),
            list(&caps["dtypes"]),
            quantization.trim_end_matches(", "),
            row["error"].as_str().map_or_else(
                || row["description"].as_str().unwrap_or_default().to_string(),
                |e| format!("unavailable: {e}")
            )
        );
    }
    // The other plugin kinds a config can choose in this binary.
    println!();
    for c in kiln::caches()?.iter() {
        println!("cache.kind = {:<14} {}", format!("{:?}", c.kind), c.description);
    }
    for p in kiln::runtime::profilers()?.iter() {
        println!("profiler.kind = {:<11} {}", format!("{:?}", p.kind), p.description);
    }
    println!("trackers: {}", kiln::trackers()?.names().join(", "));
    Ok(())
}
