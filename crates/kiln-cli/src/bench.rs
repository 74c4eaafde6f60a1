//! `kiln bench`: a load generator over the configured model.
//!
//! `requests` single-text calls from `concurrency` concurrent callers; a fraction
//! `unique_ratio` of the texts are distinct and the rest repeat them, so the cache's
//! effect shows. With `compare`, the same load runs first against the config with those
//! overrides (the baseline), then against the config itself, in one process, and the
//! throughput ratio is reported.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kiln::runtime::{LatencyHistogram, Stats};
use kiln::{KilnConfig, Optimizer};

use crate::BenchArgs;
use serde::Serialize;

/// `kiln bench` for the embed and classify tasks: the load, a `--compare` baseline
/// first and an `--http` run after, when asked for.
pub(crate) async fn run(config: KilnConfig, args: &BenchArgs) -> Result<()> {
    let options = BenchOptions {
        requests: args.requests,
        concurrency: args.concurrency,
        unique_ratio: args.unique_ratio,
        words: args.words,
        texts: match &args.texts {
            Some(path) => Some(read_texts(path)?),
            None => None,
        },
        progress: true,
        profiler: args.profiler.clone(),
        http: false,
    };
    let baseline = if args.compare.is_empty() {
        None
    } else {
        let sets: Vec<String> = args.source.sets.iter().chain(&args.compare).cloned().collect();
        let config = KilnConfig::load(args.source.config.as_deref(), &sets)?;
        let baseline_options =
            BenchOptions { profiler: crate::output::ProfilerOutputs::default(), ..options.clone() };
        let report = run_once(config, &baseline_options, args.compare.clone()).await?;
        print("baseline", &report);
        Some(report)
    };
    let http_config = args.http.then(|| config.clone());
    let report = run_once(config, &options, Vec::new()).await?;
    print("kiln", &report);
    let ratio = baseline.as_ref().map(|b| report.throughput_rps / b.throughput_rps.max(1e-9));
    if let Some(ratio) = ratio {
        println!("throughput ratio kiln / baseline ({}): {ratio:.2}", args.compare.join(", "));
    }
    let http = match http_config {
        Some(config) => {
            let http_options = BenchOptions {
                profiler: crate::output::ProfilerOutputs::default(),
                http: true,
                ..options.clone()
            };
            let over_http = run_once(config, &http_options, Vec::new()).await?;
            print("kiln serve (HTTP)", &over_http);
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

/// What to generate.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Calls to make.
    pub requests: usize,
    /// Callers at once.
    pub concurrency: usize,
    /// Distinct texts over requests, in (0, 1].
    pub unique_ratio: f64,
    /// Words per generated text, inclusive range.
    pub words: (usize, usize),
    /// Texts to send instead of generated ones, in order, cycling.
    pub texts: Option<Vec<String>>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Where the measured run's profile and trace go.
    pub profiler: crate::output::ProfilerOutputs,
    /// Send the calls over HTTP to an in-process `kiln serve` of the same config.
    pub http: bool,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Calls made.
    pub requests: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Successful calls per second.
    pub throughput_rps: f64,
    /// Client-side latency of successful calls.
    pub latency_ms: Latency,
    /// Mean texts per model run during the load.
    pub mean_batch_size: f64,
    /// Share of the texts answered without a model run of their own, during the load:
    /// cache hits plus texts that joined a concurrent run of the same text
    /// (single-flight), over all texts looked up.
    pub cache_hit_rate: f64,
    /// Of those, the share that joined a concurrent run (single-flight).
    pub coalesced_rate: f64,
    /// Failed calls by error kind.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Wall time of the load, seconds.
    pub seconds: f64,
    /// Overrides this run used on top of the config (empty for the config itself).
    pub overrides: Vec<String>,
    /// Each replica's share of the load (`model.gpu_ids`; one entry otherwise).
    pub replicas: Vec<ReplicaShare>,
    /// Answers that were not their text's: every answer is compared with the first
    /// answer for the same text (its first dimensions, within 1e-4); a mix-up of
    /// requests shows here. Counted among the errors too (kind `mismatch`).
    pub mismatches: u64,
    /// The largest difference of those (0 when none): f16 rounding across batches of
    /// other shapes stays near 1e-4, another text's vector is far off.
    pub largest_mismatch: f32,
    /// This process's resident memory after the warm-up, before the load, bytes.
    pub rss_before_bytes: u64,
    /// … and after the load, before shutdown: a leak shows as the difference.
    pub rss_after_bytes: u64,
}

/// Dimensions of an answer kept to check later answers for the same text: enough to
/// tell two texts' embeddings apart, little enough (32 bytes a distinct text) not to
/// weigh on the memory the bench also measures.
const CHECKED_DIMS: usize = 8;

/// The first answer seen for each text, and how many later ones differed from it.
struct AnswerCheck {
    first: Vec<std::sync::OnceLock<[f32; CHECKED_DIMS]>>,
    mismatches: AtomicU64,
    /// The largest difference seen, as f32 bits (non-negative floats order as their bits).
    largest: std::sync::atomic::AtomicU32,
}

impl AnswerCheck {
    fn new(texts: usize) -> Self {
        AnswerCheck {
            first: (0..texts).map(|_| std::sync::OnceLock::new()).collect(),
            mismatches: AtomicU64::new(0),
            largest: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Whether `vector` agrees with the first answer for text `index`.
    fn agrees(&self, index: usize, vector: &[f32]) -> bool {
        let mut head = [0f32; CHECKED_DIMS];
        for (h, v) in head.iter_mut().zip(vector) {
            *h = *v;
        }
        let first = self.first[index].get_or_init(|| head);
        let worst = first.iter().zip(&head).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let same = worst <= 1e-4;
        if !same {
            self.mismatches.fetch_add(1, Ordering::Relaxed);
            self.largest.fetch_max(worst.to_bits(), Ordering::Relaxed);
        }
        same
    }
}

/// What one replica ran during the load.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaShare {
    /// Its device.
    pub device: String,
    /// Model runs.
    pub batches: u64,
    /// Texts.
    pub rows: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// The texts of a run: `distinct` generated texts (`words` long, fixed seed), and the
/// index of the text each request sends.
fn workload(requests: usize, unique_ratio: f64, words: (usize, usize)) -> (Vec<String>, Vec<usize>) {
    const WORDS: &[&str] = &[
        "model",
        "inference",
        "batch",
        "latency",
        "throughput",
        "memory",
        "cache",
        "token",
        "vector",
        "embedding",
        "query",
        "document",
        "search",
        "rank",
        "score",
        "server",
        "request",
        "queue",
        "worker",
        "thread",
        "device",
        "tensor",
        "layer",
        "attention",
        "the",
        "a",
        "of",
        "to",
        "and",
        "in",
        "is",
        "for",
    ];
    let distinct = ((requests as f64 * unique_ratio).round() as usize).clamp(1, requests.max(1));
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let texts = (0..distinct)
        .map(|_| {
            let n = words.0 + (next() % (words.1 - words.0 + 1) as u64) as usize;
            (0..n).map(|_| WORDS[(next() % WORDS.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
        })
        .collect();
    // Each distinct text first appears in order, then repeats are spread over the run.
    let order =
        (0..requests).map(|i| if i < distinct { i } else { (next() % distinct as u64) as usize }).collect();
    (texts, order)
}

/// The non-blank lines of a `--texts` file, read as `kiln run` reads a text file (UTF-8
/// checked by line, BOM and CRLF handled); blank lines are left out, since a load of
/// empty requests measures nothing, where `kiln run` embeds them to keep line numbers.
pub fn read_texts(path: &std::path::Path) -> Result<Vec<String>> {
    let records = crate::input::read_texts(path, crate::input::InputFormat::Lines)
        .with_context(|| format!("--texts {}", path.display()))?;
    let texts: Vec<String> = records.into_iter().map(|r| r.text).filter(|t| !t.trim().is_empty()).collect();
    if texts.is_empty() {
        bail!("--texts {}: no non-empty lines; expected one text per line", path.display());
    }
    Ok(texts)
}

/// Runs the load against one config.
pub async fn run_once(
    config: KilnConfig,
    options: &BenchOptions,
    overrides: Vec<String>,
) -> Result<BenchReport> {
    if options.requests == 0 || options.concurrency == 0 {
        bail!("--requests and --concurrency must be at least 1");
    }
    if !(options.unique_ratio > 0.0 && options.unique_ratio <= 1.0) {
        bail!("--unique-ratio must be in (0, 1], got {}", options.unique_ratio);
    }
    if options.words.0 == 0 || options.words.0 > options.words.1 {
        bail!("--words must be MIN-MAX with 1 <= MIN <= MAX, got {}-{}", options.words.0, options.words.1);
    }
    let server_config = config.clone();
    let room = config.batching.queue_capacity;
    let optimizer = Arc::new(Optimizer::from_config(config).await?);
    // Warm-up on texts outside the workload (as many as the queue takes): first-call
    // costs are not measured.
    let warm: Vec<String> =
        (0..options.concurrency.min(32).min(room)).map(|i| format!("warm-up text number {i}")).collect();
    optimizer.embed(&warm).await.context("warm-up")?;
    let server = match options.http {
        true => Some(crate::http_load::Server::start(server_config, optimizer.clone()).await?),
        false => None,
    };
    let target = server.as_ref().map(|s| (s.addr, s.model.clone()));

    let (texts, order) = match &options.texts {
        Some(texts) => (texts.clone(), (0..options.requests).map(|i| i % texts.len()).collect()),
        None => workload(options.requests, options.unique_ratio, options.words),
    };
    let (texts, order) = (Arc::new(texts), Arc::new(order));
    let check = Arc::new(AnswerCheck::new(texts.len()));
    let rss_before_bytes = kiln::runtime::process_rss();
    let before = optimizer.stats();
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(LatencyHistogram::default());
    let bar = if options.progress {
        crate::output::progress_bar(options.requests, "requests")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let callers: Vec<_> = (0..options.concurrency)
        .map(|_| {
            let (optimizer, texts, order, next, check) =
                (optimizer.clone(), texts.clone(), order.clone(), next.clone(), check.clone());
            let (errors, ok, latency, bar) = (errors.clone(), ok.clone(), latency.clone(), bar.clone());
            let target = target.clone();
            tokio::spawn(async move {
                let mut connection = match &target {
                    Some((addr, _)) => Some(crate::http_load::Connection::open(*addr).await?),
                    None => None,
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= order.len() {
                        break;
                    }
                    let t0 = Instant::now();
                    let text = &texts[order[i]];
                    let answer = match (&mut connection, &target) {
                        (Some(c), Some((_, model))) => match c.embed(model, text).await? {
                            crate::http_load::Answer::Vector(v) => Ok(v),
                            crate::http_load::Answer::Refused(status) => Err(format!("http_{status}")),
                        },
                        _ => optimizer
                            .embed(std::slice::from_ref(text))
                            .await
                            .map(|mut v| v.swap_remove(0))
                            .map_err(|e| e.kind().to_string()),
                    };
                    match answer {
                        Ok(vector) if !check.agrees(order[i], &vector) => {
                            *errors.lock().unwrap().entry("mismatch".to_string()).or_default() += 1
                        }
                        Ok(_) => {
                            latency.record(t0.elapsed());
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(kind) => *errors.lock().unwrap().entry(kind).or_default() += 1,
                    }
                    bar.inc(1);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for caller in callers {
        caller.await.context("a load-generating task failed")??;
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if let Some(server) = server {
        server.stop().await?;
    }
    let after = optimizer.stats();
    let rss_after_bytes = kiln::runtime::process_rss();
    let optimizer =
        Arc::try_unwrap(optimizer).map_err(|_| anyhow::anyhow!("bench callers still hold the optimizer"))?;
    options.profiler.write(optimizer.reports())?;
    optimizer.shutdown().await?;

    let p = latency.percentiles();
    let errors_by_kind = errors.lock().unwrap().clone();
    // Every text is a cache hit, a miss, or joined a concurrent run (which looks nothing up).
    let (hits, joined) = (after.cache.hits - before.cache.hits, after.coalesced - before.coalesced);
    let texts = hits + joined + after.cache.misses - before.cache.misses;
    let share = |n: u64| if texts == 0 { 0.0 } else { n as f64 / texts as f64 };
    Ok(BenchReport {
        requests: options.requests as u64,
        errors: errors_by_kind.values().sum(),
        throughput_rps: ok.load(Ordering::Relaxed) as f64 / seconds,
        latency_ms: Latency { p50: p.p50, p95: p.p95, p99: p.p99, max: p.max },
        mean_batch_size: mean_batch_size(&before, &after),
        cache_hit_rate: share(hits + joined),
        coalesced_rate: share(joined),
        errors_by_kind,
        seconds,
        overrides,
        replicas: after
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let was = before.replicas.get(i);
                ReplicaShare {
                    device: r.device.to_string(),
                    batches: r.batches - was.map_or(0, |w| w.batches),
                    rows: r.rows - was.map_or(0, |w| w.rows),
                }
            })
            .collect(),
        mismatches: check.mismatches.load(Ordering::Relaxed),
        largest_mismatch: f32::from_bits(check.largest.load(Ordering::Relaxed)),
        rss_before_bytes,
        rss_after_bytes,
    })
}

/// Mean texts per model run between two snapshots.
fn mean_batch_size(before: &Stats, after: &Stats) -> f64 {
    let runs = after.batches - before.batches;
    if runs == 0 { 0.0 } else { (after.rows() - before.rows()) as f64 / runs as f64 }
}

/// Prints a report as a few lines.
pub fn print(label: &str, r: &BenchReport) {
    println!(
        "{label}: {} requests, {} errors in {:.2} s: {:.1} req/s; mean batch {:.1}; cache hit rate {:.1}% \
         ({:.1}% joined a concurrent run of the same text)",
        r.requests,
        r.errors,
        r.seconds,
        r.throughput_rps,
        r.mean_batch_size,
        r.cache_hit_rate * 100.0,
        r.coalesced_rate * 100.0
    );
    println!(
        "{:width$}  latency ms: p50 {:.3}, p95 {:.3}, p99 {:.3}, max {:.3}",
        "",
        r.latency_ms.p50,
        r.latency_ms.p95,
        r.latency_ms.p99,
        r.latency_ms.max,
        width = label.len()
    );
    if r.replicas.len() > 1 {
        let shares: Vec<String> = r
            .replicas
            .iter()
            .map(|x| format!("{} {} texts in {} runs", x.device, x.rows, x.batches))
            .collect();
        println!("{:width$}  replicas: {}", "", shares.join("; "), width = label.len());
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let largest = match r.mismatches {
        0 => String::new(),
        _ => format!(" (largest difference {:.2e})", r.largest_mismatch),
    };
    println!(
        "{:width$}  answers checked: {} not their text's{largest}; RSS {:.1} MiB before the load, {:.1} MiB after",
        "",
        r.mismatches,
        mib(r.rss_before_bytes),
        mib(r.rss_after_bytes),
        width = label.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_is_not_its_texts_is_counted() {
        let check = AnswerCheck::new(2);
        let a = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
        let b = [0.9f32, 0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
        assert!(check.agrees(0, &a), "the first answer for a text is the reference");
        assert!(check.agrees(1, &b));
        assert!(check.agrees(0, &a.map(|v| v + 1e-6)), "rounding is not a mix-up");
        assert!(!check.agrees(0, &b), "text 1's answer given for text 0");
        assert_eq!(check.mismatches.load(Ordering::Relaxed), 1);
        assert!((f32::from_bits(check.largest.load(Ordering::Relaxed)) - 0.8).abs() < 1e-6);
    }

    #[test]
    fn the_workload_repeats_texts_per_the_unique_ratio() {
        let (texts, order) = workload(1000, 0.25, (4, 64));
        assert_eq!(texts.len(), 250);
        assert_eq!(order.len(), 1000);
        assert!(order.iter().all(|&i| i < 250));
        assert!(texts.iter().all(|t| (4..=64).contains(&t.split(' ').count())));
        let (again, _) = workload(1000, 0.25, (4, 64));
        assert_eq!(texts, again, "the same texts every run");
        assert_eq!(workload(10, 1.0, (2, 2)).0.len(), 10);
    }
}
