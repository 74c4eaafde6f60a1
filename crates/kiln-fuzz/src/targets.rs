//! The fuzz targets. Each panics only on a finding; see [`crate::TARGETS`].

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Unstructured;
use kiln_core::config::Align;
use kiln_core::{
    DType, Dim, KilnConfig, Layout, Metrics, ModelInfo, NamedTensors, PreprocessConfig, ProfileReport,
    ResizeFilter, ResizeMode, Tensor, TensorSpec, TextConfig, TrackerConfig, TrackingConfig, build_trackers,
};
use kiln_text::TextPipeline;
use kiln_text::input::{TextFormat, parse_texts};
use kiln_vision::{ImageInput, ImagePipeline};

use crate::formats;

/// An error meant for a user: non-empty, one line.
fn assert_one_line(message: &str, what: &str) {
    assert!(!message.trim().is_empty(), "{what}: empty error message");
    assert!(!message.trim_end().contains('\n'), "{what}: error of several lines: {message}");
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary folder for the fuzz target")
}

pub fn config(data: &[u8]) {
    let (file, sets) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let sets: Vec<String> = sets
        .split(|&b| b == b'\n')
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let dir = scratch();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, file).expect("writing the fuzz config");
    let config = match KilnConfig::load(Some(&path), &sets) {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.to_string().trim().is_empty(), "empty config error");
            return;
        }
    };
    config.validate().unwrap_or_else(|e| panic!("a loaded config fails validation: {e}"));
    // `kiln config` prints the merged config for users to save and load again.
    let printed = config.to_toml().unwrap_or_else(|e| panic!("a loaded config does not print as TOML: {e}"));
    let again_path = dir.path().join("printed.toml");
    std::fs::write(&again_path, &printed).expect("writing the printed config");
    let again = KilnConfig::load(Some(&again_path), &[]).unwrap_or_else(|e| {
        panic!("the printed config does not load again: {e}\n--- printed ---\n{printed}")
    });
    let (a, b) = (serde_json::to_value(&config).ok(), serde_json::to_value(&again).ok());
    if a != b {
        let differ: Vec<String> = match (&a, &b) {
            (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) => a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}: {v} became {}", b.get(k).cloned().unwrap_or_default()))
                .collect(),
            _ => vec![format!("{a:?} became {b:?}")],
        };
        panic!("the printed config loads back different: {}", differ.join("; "));
    }
}

pub fn text_input(data: &[u8]) {
    for format in [TextFormat::Lines, TextFormat::Jsonl] {
        match parse_texts(data, "input.txt", format) {
            Ok(records) => {
                assert!(!records.is_empty(), "{format:?}: Ok with no records");
                if format == TextFormat::Lines {
                    let body = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
                    let lines = body.split(|&b| b == b'\n').count() - usize::from(body.ends_with(b"\n"));
                    assert_eq!(records.len(), lines, "one record per line");
                    assert!(records.iter().all(|r| !r.text.contains('\n')), "a line record holds a newline");
                }
            }
            Err(e) => {
                assert!(e.starts_with("input.txt: "), "{format:?}: error does not name the input: {e}");
                assert_one_line(&e, "text input");
            }
        }
    }
}

fn minilm() -> &'static TextPipeline {
    static PIPELINE: OnceLock<TextPipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        let dir = std::env::var_os("KILN_FUZZ_MODEL").map(PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(kiln_core::config::DEFAULT_MODEL_DIR)
        });
        TextPipeline::from_model_dir(&dir, &TextConfig::default(), Some(512)).unwrap_or_else(|e| {
            panic!(
                "the tokenize target needs MiniLM at {} (scripts/setup; or KILN_FUZZ_MODEL): {e}",
                dir.display()
            )
        })
    })
}

pub fn tokenize(data: &[u8]) {
    let pipeline = minilm();
    let text = String::from_utf8_lossy(data);
    let rows = pipeline.encode_rows(&[text.as_ref()]).unwrap_or_else(|e| panic!("tokenizing failed: {e}"));
    let row = &rows[0];
    let max_length = pipeline.settings().max_length;
    assert!(row.len() <= max_length, "{} tokens, max_length {max_length}", row.len());
    assert_eq!(row.ids.len(), row.type_ids.len());
    if text.chars().count() <= pipeline.settings().max_chars {
        let reference = pipeline.encode(&[text.as_ref()]).unwrap_or_else(|e| panic!("reference failed: {e}"));
        let ids = reference
            .inputs
            .get(kiln_text::INPUT_IDS)
            .and_then(|t| t.to_vec::<i64>().ok())
            .unwrap_or_default();
        assert_eq!(row.ids, ids[..reference.lengths[0]], "fast rows differ from the tokenizer on {text:?}");
    }
}

/// Pipelines for the 16 settings the first byte of an image input selects.
fn image_pipeline(selector: u8) -> &'static ImagePipeline {
    static PIPELINES: [OnceLock<ImagePipeline>; 16] = [const { OnceLock::new() }; 16];
    PIPELINES[usize::from(selector & 15)].get_or_init(|| {
        let config = PreprocessConfig {
            mode: [
                ResizeMode::Letterbox,
                ResizeMode::Resize,
                ResizeMode::ShortestEdge,
                ResizeMode::Letterbox,
            ][usize::from(selector & 3)],
            filter: if selector & 4 == 0 { ResizeFilter::Bilinear } else { ResizeFilter::Lanczos3 },
            align: if selector & 4 == 0 { Align::Center } else { Align::Start },
            layout: if selector & 8 == 0 { Layout::Chw } else { Layout::Hwc },
            dtype: if selector & 8 == 0 { DType::F32 } else { DType::F16 },
            width: 24,
            height: 16,
            fast_jpeg: selector & 1 == 0,
            max_pixels: 1 << 22,
            threads: 1,
            cache_bytes: 0,
            ..PreprocessConfig::default()
        };
        ImagePipeline::new(&config).expect("a valid fuzz preprocess config")
    })
}

pub fn image(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else { return };
    let pipeline = image_pipeline(selector);
    match pipeline.process_one(&ImageInput::bytes("fuzz.img", bytes.to_vec())) {
        Ok(tensor) => {
            assert_eq!(tensor.shape(), pipeline.shape(1).as_slice());
            let values = tensor.to_f32_vec().expect("a float tensor");
            assert!(values.iter().all(|v| v.is_finite()), "non-finite pixel values");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("fuzz.img"), "error does not name the image: {message}");
            assert_one_line(&message, "image");
        }
    }
}

fn model_info() -> ModelInfo {
    let mut info = ModelInfo::new("fuzz", "none", kiln_core::Device::Cpu, DType::F32);
    let dynamic = |n: &str| Dim::Dynamic(n.into());
    info.inputs = vec![
        TensorSpec::new("input_ids", DType::I64, vec![dynamic("batch"), dynamic("sequence")]),
        TensorSpec::new("attention_mask", DType::I64, vec![dynamic("batch"), dynamic("sequence")]),
        TensorSpec::new("pixel_values", DType::F32, vec![dynamic("batch"), Dim::Fixed(3), Dim::Fixed(2)]),
    ];
    info
}

fn arbitrary_shape(u: &mut Unstructured) -> arbitrary::Result<Vec<usize>> {
    let rank = u.int_in_range(0..=5)?;
    (0..rank)
        .map(|_| {
            Ok(match u.int_in_range(0..=3)? {
                0 => u.arbitrary::<usize>()?,
                1 => 0,
                _ => u.int_in_range(1..=4)?,
            })
        })
        .collect()
}

pub fn tensor_request(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let info = model_info();
    let names = ["input_ids", "attention_mask", "pixel_values", "token_type_ids"];
    let mut inputs = NamedTensors::new();
    let count = u.int_in_range(0..=4).unwrap_or(0);
    for _ in 0..count {
        let Ok(name) = u.choose(&names) else { break };
        let Ok(&dtype) = u.choose(&DType::ALL) else { break };
        let Ok(shape) = arbitrary_shape(&mut u) else { break };
        // The right byte count when it is small, otherwise whatever the input says.
        let expected = shape.iter().try_fold(dtype.size(), |n, &d| n.checked_mul(d));
        let len = match expected {
            Some(n) if n <= 4096 && u.ratio(7, 8).unwrap_or(true) => n,
            _ => u.int_in_range(0..=64).unwrap_or(0),
        };
        match Tensor::from_bytes(dtype, shape.clone(), vec![0; len]) {
            Ok(tensor) => {
                assert_eq!(Some(len), expected, "a tensor of {dtype} {shape:?} accepted {len} bytes");
                inputs.insert(*name, tensor);
            }
            Err(e) => assert_one_line(&e.to_string(), "tensor"),
        }
    }
    match info.validate(&inputs) {
        Ok(()) => {
            for spec in &info.inputs {
                let tensor = inputs.get(&spec.name).expect("validate passed without a listed input");
                spec.check(tensor).expect("validate passed a tensor its spec refuses");
            }
            assert!(inputs.names().iter().all(|n| info.inputs.iter().any(|s| s.name == *n)));
        }
        Err(e) => assert_one_line(&e.to_string(), "validate"),
    }
}

pub fn npy(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(dtype) = u.choose(&[DType::F32, DType::F16, DType::U8, DType::I64, DType::I32]) else { return };
    let dtype = *dtype;
    // Now and then thousands of dims, whose header outgrows format 1.0's 64 KiB.
    let rank = if u.ratio(1, 32).unwrap_or(false) { 25_000 } else { u.int_in_range(0..=6).unwrap_or(0) };
    let shape: Vec<usize> =
        (0..rank).map(|i| if i >= 6 { 1 } else { u.int_in_range(0..=5).unwrap_or(1) }).collect();
    let len = shape.iter().product::<usize>() * dtype.size();
    let bytes: Vec<u8> = (0..len).map(|i| u.arbitrary::<u8>().unwrap_or(i as u8)).collect();
    let tensor = Tensor::from_bytes(dtype, shape.clone(), bytes).expect("a consistent tensor");
    let dir = scratch();
    let path = dir.path().join("t.npy");
    kiln_vision::write_npy(&path, &tensor).unwrap_or_else(|e| panic!("write_npy failed: {e}"));
    let file = std::fs::read(&path).expect("reading the .npy back");
    let npy = formats::npy(&file).unwrap_or_else(|e| panic!("unreadable .npy for {dtype} {shape:?}: {e}"));
    let descr = match dtype {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::U8 => "|u1",
        DType::I64 => "<i8",
        _ => "<i4",
    };
    assert_eq!((npy.descr.as_str(), npy.fortran_order, &npy.shape), (descr, false, &shape));
    assert_eq!(npy.data, tensor.bytes());
}

/// What a tracker target logs, decoded from the input.
struct Session {
    config: serde_json::Value,
    steps: Vec<Metrics>,
    summary: Metrics,
    profile: ProfileReport,
}

fn arbitrary_metrics(u: &mut Unstructured) -> Metrics {
    let n = u.int_in_range(0..=6).unwrap_or(0);
    (0..n)
        .filter_map(|_| {
            let name: String = u.arbitrary().ok()?;
            let value = match u.int_in_range(0..=4).ok()? {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => -f64::INFINITY,
                _ => u.arbitrary().ok()?,
            };
            Some((name, value))
        })
        .collect()
}

fn session(data: &[u8]) -> Session {
    let mut u = Unstructured::new(data);
    let text: String = u.arbitrary().unwrap_or_default();
    let config = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    let count = u.int_in_range(0..=8).unwrap_or(0);
    let steps = (0..count).map(|_| arbitrary_metrics(&mut u)).collect();
    let summary = arbitrary_metrics(&mut u);
    let mut profile = ProfileReport { duration_s: u.arbitrary().unwrap_or(1.0), ..ProfileReport::default() };
    for (name, _) in arbitrary_metrics(&mut u) {
        profile.spans.insert(name, Default::default());
    }
    Session { config, steps, summary, profile }
}

/// Runs `session` through a tracker of `kind` writing under `dir`.
fn track(kind: &str, dir: &Path, s: &Session) {
    let tracking =
        TrackingConfig { dir: dir.to_path_buf(), run_name: Some("fuzz".into()), ..TrackingConfig::default() };
    let config = TrackerConfig { kind: kind.into(), options: Default::default() };
    let mut trackers =
        build_trackers(&[config], &tracking).unwrap_or_else(|e| panic!("building {kind}: {e}"));
    let tracker = &mut trackers[0];
    tracker.log_config(&s.config).expect("log_config");
    for (step, metrics) in s.steps.iter().enumerate() {
        tracker.log_metrics(step as u64 + 1, metrics).expect("log_metrics");
    }
    tracker.log_summary(&s.summary).expect("log_summary");
    tracker.log_profile(&s.profile).expect("log_profile");
    tracker.finish().expect("finish");
}

fn only_file(dir: &Path, what: &str) -> PathBuf {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("reading the tracker's folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(what)) {
                found.push(path);
            }
        }
    }
    assert_eq!(found.len(), 1, "expected one {what} file, found {found:?}");
    found.remove(0)
}

pub fn tensorboard(data: &[u8]) {
    let s = session(data);
    let dir = scratch();
    track("tensorboard", dir.path(), &s);
    let file = std::fs::read(only_file(dir.path(), "tfevents")).expect("reading the event file");
    let records = formats::tfrecords(&file).unwrap_or_else(|e| panic!("event file: {e}"));
    // Version, config, one per step, summary, profile.
    assert_eq!(records.len(), 4 + s.steps.len(), "events written");
    for (i, record) in records.iter().enumerate() {
        let fields = formats::fields(record).unwrap_or_else(|e| panic!("event {i} is not a protobuf: {e}"));
        for field in fields {
            if let formats::Field::Bytes(5, summary) = field {
                for value in formats::fields(summary).unwrap_or_else(|e| panic!("event {i}'s summary: {e}")) {
                    let formats::Field::Bytes(1, value) = value else {
                        panic!("event {i}: summary field {value:?}")
                    };
                    formats::fields(value).unwrap_or_else(|e| panic!("event {i}: a summary value: {e}"));
                }
            }
        }
    }
}

pub fn wandb(data: &[u8]) {
    let s = session(data);
    let dir = scratch();
    track("wandb", dir.path(), &s);
    let file = std::fs::read(only_file(dir.path(), ".wandb")).expect("reading the .wandb log");
    let records = formats::wandb_records(&file).unwrap_or_else(|e| panic!(".wandb log: {e}"));
    // Version, run, summary and history per step, summary, profile, exit.
    assert_eq!(records.len(), 5 + 2 * s.steps.len(), "records written");
    for (i, record) in records.iter().enumerate() {
        let fields = formats::fields(record).unwrap_or_else(|e| panic!("record {i} is not a protobuf: {e}"));
        assert_eq!(fields.first(), Some(&formats::Field::Varint(1, i as u64 + 1)), "record {i}'s number");
        for field in &fields[1..] {
            if let formats::Field::Bytes(_, body) = field {
                formats::fields(body).unwrap_or_else(|e| panic!("record {i}'s body: {e}"));
            }
        }
    }
    let summary =
        std::fs::read(only_file(dir.path(), "wandb-summary.json")).expect("reading wandb-summary.json");
    let summary: serde_json::Value = serde_json::from_slice(&summary).expect("wandb-summary.json is JSON");
    assert!(summary.is_object(), "wandb-summary.json is not an object");
}

/// The HTTP routes of `kiln serve` over MiniLM (loaded once), called in process.
struct Server {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

/// The API key the `http` target's server wants; the seeds carry it (mutations lose it).
pub const HTTP_KEY: &str = "fuzz-key";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the http target");
        let dir = std::env::var_os("KILN_FUZZ_MODEL").map(PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(kiln_core::config::DEFAULT_MODEL_DIR)
        });
        // Bounds that keep one input cheap: a few inputs a request, a short deadline.
        let sets = [
            format!("model.path={:?}", dir.display().to_string()),
            format!("server.api_keys=[{HTTP_KEY:?}]"),
            "server.max_inputs=8".to_string(),
            "batching.max_wait_ms=0".to_string(),
            "cache.enabled=false".to_string(),
        ];
        let config = KilnConfig::load(None, &sets).expect("the http target's config");
        let head = kiln_text::embedding_head(&config.model.path, &config.text).unwrap_or_else(|e| {
            panic!(
                "the http target needs MiniLM at {} (scripts/setup; or KILN_FUZZ_MODEL): {e}",
                dir.display()
            )
        });
        let state = kiln_serve::State::new(config.clone(), head);
        let optimizer = runtime
            .block_on(kiln::Optimizer::from_config(config))
            .unwrap_or_else(|e| panic!("the http target could not load MiniLM: {e}"));
        state.ready(std::sync::Arc::new(optimizer));
        Server { router: kiln_serve::router(state), runtime }
    })
}

/// An HTTP/1.1 request as bytes (request line, headers, a blank line, the body) to the
/// router; `None` when it is not one (hyper refuses those before kiln sees them).
fn http_request(data: &[u8]) -> Option<axum::http::Request<axum::body::Body>> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&data[..end]).ok()?;
    let body = data[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?, first.next()?);
    let mut request = axum::http::Request::builder().method(method).uri(path);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        request = request.header(name.trim(), value.trim());
    }
    request.body(axum::body::Body::from(body)).ok()
}

/// The status `kiln serve`'s router answers `data` with (`None`: not an HTTP request),
/// its body, and the path asked for.
pub fn http_call(data: &[u8]) -> Option<(axum::http::StatusCode, Vec<u8>, String)> {
    use tower::ServiceExt;
    let request = http_request(data)?;
    let path = request.uri().path().to_string();
    let server = server();
    let (status, body) = server.runtime.block_on(async {
        let response =
            server.router.clone().oneshot(request).await.expect("the router's service is infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .unwrap_or_else(|e| panic!("{path}: the response body is over 16 MiB or unreadable: {e}"));
        (status, body.to_vec())
    });
    Some((status, body, path))
}

pub fn http(data: &[u8]) {
    let Some((status, body, path)) = http_call(data) else { return };
    let code = status.as_u16();
    assert!(
        ![500, 501, 502].contains(&code),
        "{path}: {status} — a client's request must not be an internal error: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    if code >= 400 && code != 405 {
        // Every refusal is JSON with an `error` naming the problem (OpenAI's and TEI's
        // shape, or the Open Inference Protocol's `{"error": "..."}` on /v2).
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("{path}: {status} with a body that is not JSON ({e}): {}", String::from_utf8_lossy(&body))
        });
        let message = json["error"]["message"].as_str().or_else(|| json["error"].as_str());
        let message = message.unwrap_or_else(|| panic!("{path}: {status} without an error message: {json}"));
        assert_one_line(message, &path);
    }
}
