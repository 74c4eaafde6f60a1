//! kiln's configuration: one typed tree, merged from layers and validated on load.
//!
//! Layers, later ones winning: built-in defaults < a TOML file < `KILN_*` environment
//! variables (`KILN_MODEL__DTYPE=f16` sets `model.dtype`; `__` separates sections) <
//! `--set section.key=value` flags. Every problem — an unknown key, a value of the wrong
//! type, an unknown variant, a number out of range — is reported at once with its key,
//! the value found, what is accepted and which layer set it.
//!
//! Relative paths written in a config file are relative to that file; relative paths
//! from the environment or `--set` are relative to the working directory.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider as FigmentProvider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::device::{Device, DeviceChoice};
use crate::error::{ConfigIssue, Error, Result};

mod generate;
mod sections;
mod server;
mod video;
pub use generate::GenerateConfig;
pub use sections::*;
pub use server::ServerConfig;
pub use video::VideoConfig;

/// Prefix of environment variables read as config.
pub const ENV_PREFIX: &str = "KILN_";

/// Environment variables with the prefix that are not config keys.
const ENV_IGNORED: &[&str] = &["log"];

/// The whole configuration of a kiln run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KilnConfig {
    /// What the run does with its inputs.
    pub task: Task,
    /// Which backend, and its own options.
    pub provider: ProviderConfig,
    /// Which model, where, at which precision.
    pub model: ModelConfig,
    /// Text pre- and post-processing.
    pub text: TextConfig,
    /// Image pre-processing.
    pub preprocess: PreprocessConfig,
    /// The classify task's labels and top-k.
    pub classify: ClassifyConfig,
    /// The generate task's decoding settings.
    pub generate: GenerateConfig,
    /// Batching of requests.
    pub batching: BatchingConfig,
    /// Limits on loaded models.
    pub models: ModelsConfig,
    /// The memory governor.
    pub memory: MemoryConfig,
    /// Concurrency, deadlines and retries.
    pub scheduler: SchedulerConfig,
    /// The result cache.
    pub cache: CacheConfig,
    /// Spans and resource sampling.
    pub profiler: ProfilerConfig,
    /// How often metrics go to the trackers, and where their files go.
    pub tracking: TrackingConfig,
    /// Where metrics go; several at once.
    pub trackers: Vec<TrackerConfig>,
    /// `kiln serve`'s address and request limits.
    pub server: ServerConfig,
    /// The video task's pipeline.
    pub video: VideoConfig,
}

impl Default for KilnConfig {
    fn default() -> Self {
        KilnConfig {
            task: Task::Embed,
            provider: ProviderConfig::default(),
            model: ModelConfig::default(),
            text: TextConfig::default(),
            preprocess: PreprocessConfig::default(),
            classify: ClassifyConfig::default(),
            generate: GenerateConfig::default(),
            batching: BatchingConfig::default(),
            models: ModelsConfig::default(),
            memory: MemoryConfig::default(),
            scheduler: SchedulerConfig::default(),
            cache: CacheConfig::default(),
            profiler: ProfilerConfig::default(),
            tracking: TrackingConfig::default(),
            trackers: Vec::new(),
            server: ServerConfig::default(),
            video: VideoConfig::default(),
        }
    }
}

/// The kind of work a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Texts in, one embedding vector per text out.
    Embed,
    /// Images in, the top-k labels with their probabilities out.
    Classify,
    /// Prompts (or chat messages) in, generated text out, token by token.
    Generate,
    /// A video: diffusion keyframes, then interpolated frames between them (`[video]`).
    Video,
}

impl Task {
    /// The name configs use: `"embed"`, `"classify"`, `"generate"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Embed => "embed",
            Task::Classify => "classify",
            Task::Generate => "generate",
            Task::Video => "video",
        }
    }
}

impl KilnConfig {
    /// The layered sources: defaults, `file` (if any), `KILN_*` variables, `--set` flags.
    pub fn figment(file: Option<&Path>, sets: &[String]) -> Result<Figment> {
        let mut figment = Figment::from(Serialized::defaults(KilnConfig::default()));
        if let Some(file) = file {
            // figment ignores a missing file; a config the user named must exist.
            if !file.is_file() {
                let e = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
                return Err(Error::io("reading config", file, e));
            }
            // Parsed once here, so a syntax error is one issue naming the file rather than
            // the same error from every section figment extracts.
            let text = std::fs::read_to_string(file).map_err(|e| Error::io("reading config", file, e))?;
            if let Err(e) = toml::from_str::<toml::Table>(&text) {
                let mut issue = ConfigIssue::new(
                    "(config)",
                    format!("TOML that does not parse: {}", e.to_string().trim_end()),
                    "valid TOML (see docs/config.md)",
                );
                issue.origin = Some(file.display().to_string());
                return Err(Error::Config(vec![issue]));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(ENV_IGNORED));
        Ok(figment.merge(SetFlags::parse(sets)?))
    }

    /// Loads, resolves and validates the config from its layers.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self> {
        Self::from_figment(&Self::figment(file, sets)?)
    }

    /// Extracts, resolves relative paths and validates.
    pub fn from_figment(figment: &Figment) -> Result<Self> {
        let mut config = extract_all(figment)?;
        let written = config.model.path.clone();
        if let Some(dir) = file_dir(figment, "model.path") {
            config.model.path = dir.join(&config.model.path);
        }
        // A path that is not there but reads as `ORG/NAME[@REVISION]` is a model in the
        // Hugging Face cache (a local folder of that name wins, as in transformers).
        if let Some(found) = crate::hub::resolve_path(&written, &config.model.path) {
            config.model.path = found.map_err(|e| match e {
                Error::ModelLoad { reason, .. } => Error::model_load(
                    absolute(&config.model.path),
                    format!(
                        "model.path `{}` is not a file or folder, and as a Hugging Face id: {reason}",
                        written.display()
                    ),
                ),
                other => other,
            })?;
        }
        if let (Some(dir), Some(labels)) = (file_dir(figment, "classify.labels"), &config.classify.labels) {
            config.classify.labels = Some(dir.join(labels));
        }
        if let (Some(dir), Some(media)) =
            (file_dir(figment, "server.allowed_media_dir"), &config.server.allowed_media_dir)
        {
            config.server.allowed_media_dir = Some(dir.join(media));
        }
        config.server.allowed_media_dir = config.server.allowed_media_dir.as_deref().map(absolute);
        // Unset (empty) stays unset: joined to a folder it would name the folder.
        if !config.video.interpolator.as_os_str().is_empty() {
            if let Some(dir) = file_dir(figment, "video.interpolator") {
                config.video.interpolator = dir.join(&config.video.interpolator);
            }
            config.video.interpolator = absolute(&config.video.interpolator);
        }
        // Absolute, so the config `kiln config` prints means the same saved anywhere
        // (a relative path in a file is read relative to that file).
        config.model.path = absolute(&config.model.path);
        config.classify.labels = config.classify.labels.as_deref().map(absolute);
        config.validate()?;
        Ok(config)
    }

    /// Range checks serde cannot express; every problem is reported.
    pub fn validate(&self) -> Result<()> {
        let mut issues = self.generate.issues();
        issues.extend(self.server.issues());
        if self.task == Task::Video {
            issues.extend(self.video.issues());
        }
        if !self.model.dtype.is_float() {
            issues.push(ConfigIssue::new(
                "model.dtype",
                format!("\"{}\"", self.model.dtype),
                "one of f32, f16, bf16",
            ));
        }
        if self.provider.name.trim().is_empty() {
            issues.push(ConfigIssue::new(
                "provider.name",
                "\"\"",
                "a registered provider name (see `kiln providers`)",
            ));
        }
        if self.model.path.as_os_str().is_empty() {
            issues.push(ConfigIssue::new("model.path", "\"\"", "a model file or folder"));
        }
        if !self.model.gpu_ids.is_empty()
            && !matches!(self.model.device, DeviceChoice::Auto | DeviceChoice::Fixed(Device::Cuda(_)))
        {
            issues.push(ConfigIssue::new(
                "model.device",
                format!("\"{}\" with model.gpu_ids = {:?}", self.model.device, self.model.gpu_ids),
                "\"auto\" or \"cuda:N\" when gpu_ids lists GPUs for replicas",
            ));
        }
        if self.model.gpu_ids.len() > 64 {
            issues.push(ConfigIssue::new(
                "model.gpu_ids",
                format!("{} entries", self.model.gpu_ids.len()),
                "at most 64 replicas",
            ));
        }
        check_range(&mut issues, "batching.max_batch_size", self.batching.max_batch_size, 1, 4096);
        check_range(&mut issues, "batching.max_batch_tokens", self.batching.max_batch_tokens, 0, 1 << 24);
        check_range(&mut issues, "text.tokenizer_threads", self.text.tokenizer_threads, 0, 1024);
        check_range(&mut issues, "batching.max_wait_ms", self.batching.max_wait_ms as usize, 0, 10_000);
        check_range(&mut issues, "batching.queue_capacity", self.batching.queue_capacity, 1, 1 << 20);
        if let Some(m) = self.batching.batch_multiple {
            check_range(&mut issues, "batching.batch_multiple", m, 1, 4096);
        }
        if let Some(m) = self.batching.sequence_multiple {
            check_range(&mut issues, "batching.sequence_multiple", m, 1, 4096);
        }
        let m = &self.memory;
        check_range(&mut issues, "memory.sample_interval_ms", m.sample_interval_ms as usize, 10, 3_600_000);
        for (key, value) in
            [("memory.high_watermark", m.high_watermark), ("memory.low_watermark", m.low_watermark)]
        {
            if !(value > 0.0 && value <= 1.0) {
                issues.push(ConfigIssue::new(key, value.to_string(), "a fraction in (0, 1]"));
            }
        }
        if m.low_watermark > m.high_watermark {
            issues.push(ConfigIssue::new(
                "memory.low_watermark",
                m.low_watermark.to_string(),
                format!("at most memory.high_watermark ({})", m.high_watermark),
            ));
        }
        check_range(&mut issues, "models.max_loaded", self.models.max_loaded, 1, 1024);
        check_range(&mut issues, "scheduler.max_concurrent", self.scheduler.max_concurrent, 1, 1 << 20);
        check_range(&mut issues, "scheduler.timeout_ms", self.scheduler.timeout_ms as usize, 0, 3_600_000);
        check_range(
            &mut issues,
            "scheduler.max_inputs_per_call",
            self.scheduler.max_inputs_per_call,
            1,
            1 << 24,
        );
        check_range(&mut issues, "scheduler.retries", self.scheduler.retries, 0, 100);
        check_range(&mut issues, "scheduler.backoff_ms", self.scheduler.backoff_ms as usize, 0, 60_000);
        check_range(&mut issues, "cache.ttl_s", self.cache.ttl_s as usize, 1, 365 * 24 * 3600);
        if self.cache.max_bytes < 1024 {
            issues.push(ConfigIssue::new(
                "cache.max_bytes",
                self.cache.max_bytes.to_string(),
                "at least 1024 (use `cache.enabled = false` to turn the cache off)",
            ));
        }
        if let Some(n) = self.text.max_length {
            check_range(&mut issues, "text.max_length", n, 1, 65_536);
        }
        if let Some(n) = self.text.max_chars {
            check_range(&mut issues, "text.max_chars", n, 0, 1 << 30);
        }
        self.preprocess.check(&mut issues);
        check_range(&mut issues, "classify.top_k", self.classify.top_k, 1, 1_000_000);
        let p = &self.profiler;
        check_range(&mut issues, "profiler.sample_interval_ms", p.sample_interval_ms as usize, 10, 3_600_000);
        check_range(&mut issues, "profiler.max_trace_events", p.max_trace_events, 1, 100_000_000);
        check_range(&mut issues, "tracking.interval_ms", self.tracking.interval_ms as usize, 10, 86_400_000);
        if self.tracking.run_name.as_ref().is_some_and(|n| !valid_run_name(n)) {
            issues.push(ConfigIssue::new(
                "tracking.run_name",
                format!("{:?}", self.tracking.run_name.as_deref().unwrap_or_default()),
                "a name of letters, digits, '-', '_' and '.', not starting with '.'",
            ));
        }
        for (i, t) in self.trackers.iter().enumerate() {
            if t.kind.trim().is_empty() {
                issues.push(ConfigIssue::new(
                    format!("trackers[{i}].kind"),
                    "\"\"",
                    "a registered tracker kind",
                ));
            }
        }
        if issues.is_empty() { Ok(()) } else { Err(Error::Config(issues)) }
    }

    /// The config as pretty TOML, as `kiln config` prints it.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::InvalidInput(format!("config cannot be written as TOML: {e}")))
    }
}

/// Run names become folder names; keep them portable.
fn valid_run_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_range(issues: &mut Vec<ConfigIssue>, key: &str, value: usize, min: usize, max: usize) {
    if !(min..=max).contains(&value) {
        issues.push(ConfigIssue::new(key, value.to_string(), format!("an integer in {min}..={max}")));
    }
}

/// Extracts section by section, so a problem in one section does not hide those in
/// the others (serde stops at the first error of a value).
fn extract_all(figment: &Figment) -> Result<KilnConfig> {
    fn section<T: DeserializeOwned>(f: &Figment, key: &str, issues: &mut Vec<ConfigIssue>) -> Option<T> {
        match f.extract_inner::<T>(key) {
            Ok(v) => Some(v),
            Err(e) => {
                issues.extend(config_issues(e, key));
                None
            }
        }
    }
    let mut issues = Vec::new();
    let known = [
        "task",
        "provider",
        "model",
        "text",
        "preprocess",
        "classify",
        "generate",
        "batching",
        "models",
        "memory",
        "scheduler",
        "cache",
        "profiler",
        "tracking",
        "trackers",
        "server",
        "video",
    ];
    // A source that does not parse (a TOML syntax error) fails every section alike:
    // report it once, not once per section.
    let top = figment.data().map_err(|e| Error::Config(config_issues(e, "")))?;
    {
        for (key, value) in top.get(&Profile::Default).into_iter().flatten() {
            if !known.contains(&key.as_str()) {
                let mut issue =
                    ConfigIssue::new(key, "an unknown key", format!("one of the keys {}", known.join(", ")));
                issue.origin =
                    figment.get_metadata(value.tag()).map(|m| origin(m, None, std::slice::from_ref(key)));
                issues.push(issue);
            }
        }
    }
    let config = KilnConfig {
        task: section(figment, "task", &mut issues).unwrap_or(Task::Embed),
        provider: section(figment, "provider", &mut issues).unwrap_or_default(),
        model: section(figment, "model", &mut issues).unwrap_or_default(),
        text: section(figment, "text", &mut issues).unwrap_or_default(),
        preprocess: section(figment, "preprocess", &mut issues).unwrap_or_default(),
        classify: section(figment, "classify", &mut issues).unwrap_or_default(),
        generate: section(figment, "generate", &mut issues).unwrap_or_default(),
        batching: section(figment, "batching", &mut issues).unwrap_or_default(),
        models: section(figment, "models", &mut issues).unwrap_or_default(),
        memory: section(figment, "memory", &mut issues).unwrap_or_default(),
        scheduler: section(figment, "scheduler", &mut issues).unwrap_or_default(),
        cache: section(figment, "cache", &mut issues).unwrap_or_default(),
        profiler: section(figment, "profiler", &mut issues).unwrap_or_default(),
        tracking: section(figment, "tracking", &mut issues).unwrap_or_default(),
        trackers: section(figment, "trackers", &mut issues).unwrap_or_default(),
        server: section(figment, "server", &mut issues).unwrap_or_default(),
        video: section(figment, "video", &mut issues).unwrap_or_default(),
    };
    if issues.is_empty() {
        return Ok(config);
    }
    // Sections that failed hold defaults, which pass; the others are range-checked now
    // so one run reports every problem.
    if let Err(Error::Config(more)) = config.validate() {
        issues.extend(more);
    }
    Err(Error::Config(issues))
}

/// The folder of the config file that set `key`, if a file set it and the value is relative.
/// `path` made absolute against the working directory, lexically (nothing is read, so a
/// missing path is still reported by whoever opens it).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn file_dir(figment: &Figment, key: &str) -> Option<PathBuf> {
    let value = figment.find_value(key).ok()?;
    if Path::new(value.as_str()?).is_absolute() {
        return None;
    }
    match &figment.get_metadata(value.tag())?.source {
        Some(figment::Source::File(file)) => file.parent().map(Path::to_path_buf),
        _ => None,
    }
}

/// Turns figment's errors for `section` into issues with key, value, expectation, origin.
fn config_issues(error: figment::Error, section: &str) -> Vec<ConfigIssue> {
    use figment::error::Kind;
    error
        .into_iter()
        .map(|mut e| {
            // `extract_inner(section)` appends the section to the error's path instead of
            // putting it first; put it first.
            if e.path.last().is_some_and(|p| p == section) {
                e.path.pop();
            }
            if e.path.first().is_none_or(|p| p != section) {
                e.path.insert(0, section.to_string());
            }
            let key = e.path.join(".");
            let origin = e.metadata.as_ref().map(|m| origin(m, e.profile.as_ref(), &e.path));
            let mut issue = match &e.kind {
                // figment's path already ends with the unknown field.
                Kind::UnknownField(_, expected) => ConfigIssue::new(
                    key.clone(),
                    "an unknown key",
                    format!("one of the keys {}", expected.join(", ")),
                ),
                Kind::UnknownVariant(found, expected) => ConfigIssue::new(
                    key.clone(),
                    format!("\"{found}\""),
                    format!("one of {}", expected.join(", ")),
                ),
                Kind::InvalidType(found, expected) | Kind::InvalidValue(found, expected) => {
                    ConfigIssue::new(key.clone(), found.to_string(), expected.clone())
                }
                Kind::MissingField(field) => ConfigIssue::new(
                    if key.is_empty() { field.to_string() } else { format!("{key}.{field}") },
                    "nothing",
                    "a value",
                ),
                other => ConfigIssue::new(
                    if key.is_empty() { "(config)".to_string() } else { key.clone() },
                    other.to_string(),
                    "a valid config (see docs/config.md)",
                ),
            };
            issue.origin = origin;
            issue
        })
        .collect()
}

fn origin(metadata: &Metadata, profile: Option<&Profile>, path: &[String]) -> String {
    match &metadata.source {
        Some(figment::Source::File(file)) => file.display().to_string(),
        _ if metadata.name.contains("environment variable") => {
            format!("environment variable {ENV_PREFIX}{}", path.join("__").to_uppercase())
        }
        _ => {
            let profile = profile.cloned().unwrap_or_default();
            format!("{} `{}`", metadata.name, metadata.interpolate(&profile, path))
        }
    }
}

/// `--set section.key=value` flags as a figment layer. Values are read as TOML
/// (`32`, `true`, `[1, 2]`, `"x"`); anything that is not valid TOML is a string.
struct SetFlags(toml::Table);

impl SetFlags {
    fn parse(sets: &[String]) -> Result<Self> {
        let mut root = toml::Table::new();
        for set in sets {
            let parsed = set.split_once('=').and_then(|(key, raw)| {
                let parts: Vec<&str> = key.trim().split('.').collect();
                parts.iter().all(|p| !p.is_empty()).then_some((parts, raw))
            });
            let Some((parts, raw)) = parsed else {
                return Err(Error::Config(vec![ConfigIssue::new(
                    "--set",
                    format!("`{set}`"),
                    "section.key=value, e.g. --set model.dtype=f16",
                )]));
            };
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let (last, sections) = parts.split_last().expect("split yields at least one part");
            let mut table = &mut root;
            for part in sections {
                let entry = table.entry(part.to_string()).or_insert_with(|| toml::Table::new().into());
                if !entry.is_table() {
                    *entry = toml::Table::new().into();
                }
                table = entry.as_table_mut().expect("made a table just above");
            }
            table.insert(last.to_string(), value);
        }
        Ok(SetFlags(root))
    }
}

impl FigmentProvider for SetFlags {
    fn metadata(&self) -> Metadata {
        Metadata::named("--set flag").interpolater(|_, keys| keys.join("."))
    }
    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(&self.0).data()
    }
}

#[cfg(test)]
mod tests;
