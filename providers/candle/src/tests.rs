//! The provider's tests: loading errors, the packed CPU kernels and int8 against candle's graph.
use std::path::{Path, PathBuf};

use super::*;

fn load(spec: &ModelSpec) -> Result<Arc<dyn Model>> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(CandleProvider::default().load(spec))
}

#[test]
fn registers_itself_under_its_name() {
    assert!(kiln_core::providers().unwrap().names().contains(&NAME));
}

#[test]
fn missing_folder_config_and_weights_are_clear_errors() {
    let err = load(&ModelSpec::new("/no/such/model", Device::Cpu, DType::F32)).err().unwrap().to_string();
    assert!(err.contains("/no/such/model: no such folder"), "{err}");

    let dir = tempfile_dir();
    let err = load(&ModelSpec::new(&dir, Device::Cpu, DType::F32)).err().unwrap().to_string();
    assert!(err.contains("no config.json; expected a Hugging Face BERT folder"), "{err}");

    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let err = load(&ModelSpec::new(&dir, Device::Cpu, DType::F32)).err().unwrap().to_string();
    assert!(err.contains("model_type `gpt2`; provider `candle` loads model_type `bert`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Generation on a GPU: what it does not take is refused with the reason, before any
/// device is opened; without the `cuda` feature the device itself is.
#[test]
fn generating_on_a_gpu_refuses_what_it_does_not_take() {
    let generator = |spec: &ModelSpec| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(CandleProvider::default().load_generator(spec))
            .err()
            .expect("refused")
            .to_string()
    };
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.kiln/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.is_file(), "{} is missing: run scripts/setup generate", gguf.display());
    let int8 =
        ModelSpec { quantization: Quantization::Int8, ..ModelSpec::new(&gguf, Device::Cuda(0), DType::F16) };
    let err = generator(&int8);
    assert!(
        err.contains("dequantizes a GGUF file's matrices to model.dtype") && err.contains("int8"),
        "{err}"
    );
    let err = generator(&ModelSpec::new("/no/such/model.gguf", Device::Cuda(0), DType::F16));
    assert!(err.contains("no such GGUF file"), "{err}");
    #[cfg(not(feature = "cuda"))]
    {
        let err = generator(&ModelSpec::new(&gguf, Device::Cuda(0), DType::F16));
        assert!(err.contains("runs on cpu only, not cuda:0") && err.contains("candle-cuda"), "{err}");
    }
}

#[test]
fn unsupported_device_and_dtype_say_what_is_accepted() {
    #[cfg(not(feature = "cuda"))]
    {
        let err = load(&ModelSpec::new(".", Device::Cuda(0), DType::F32)).err().unwrap().to_string();
        assert!(err.contains("runs on cpu only, not cuda:0"), "{err}");
    }
    let err = load(&ModelSpec::new(".", Device::Cpu, DType::I64)).err().unwrap().to_string();
    assert!(err.contains("f32, f16 or bf16, not i64"), "{err}");
}

fn minilm_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.kiln/models/all-MiniLM-L6-v2");
    assert!(dir.join("model.safetensors").is_file(), "{} is missing: run scripts/setup", dir.display());
    dir
}

/// BERT inputs of `[batch, sequence]` with token types 0.
fn bert_inputs(batch: usize, sequence: usize, ids: &[i64], mask: &[i64]) -> Inputs {
    let tensor = |values: Vec<i64>| Tensor::from_vec(vec![batch, sequence], values).unwrap();
    Inputs::new()
        .with("input_ids", tensor(ids.to_vec()))
        .with("attention_mask", tensor(mask.to_vec()))
        .with("token_type_ids", tensor(vec![0; batch * sequence]))
}

/// The packed CPU kernels against candle-transformers' graph on the same weights:
/// token outputs at every real position (rows right-padded, left-padded and with a
/// hole), zeros at padded ones, and every pooling on right-padded rows.
#[test]
fn packed_cpu_kernels_match_candles_graph() {
    let dir = minilm_dir();
    let provider =
        |cpu_kernels| CandleProvider { options: CandleOptions { cpu_kernels, ..Default::default() } };
    let run = |cpu_kernels: bool, spec: &ModelSpec, inputs: &Inputs| {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let model = runtime.block_on(provider(cpu_kernels).load(spec)).unwrap();
        let outputs = model.run(inputs).unwrap();
        let name = if spec.head.is_some() { SENTENCE_EMBEDDING } else { LAST_HIDDEN_STATE };
        outputs.require(name).unwrap().to_f32_vec().unwrap()
    };
    let (batch, sequence, hidden) = (4, 7, 384);
    let ids: Vec<i64> = (0..batch * sequence).map(|i| 1000 + (i as i64 * 7919) % 20000).collect();
    #[rustfmt::skip]
    let mask: Vec<i64> = vec![
        1, 1, 1, 1, 1, 1, 1,
        1, 1, 1, 0, 0, 0, 0,
        0, 0, 1, 1, 1, 1, 1,
        1, 1, 0, 1, 1, 0, 0,
    ];
    let inputs = |mask: &[i64]| bert_inputs(batch, sequence, &ids, mask);
    let spec = ModelSpec::new(&dir, Device::Cpu, DType::F32);
    let (packed, graph) = (run(true, &spec, &inputs(&mask)), run(false, &spec, &inputs(&mask)));
    for (place, (p, g)) in packed.chunks(hidden).zip(graph.chunks(hidden)).enumerate() {
        if mask[place] == 0 {
            assert!(p.iter().all(|&v| v == 0.0), "padded position {place} is not zeros");
            continue;
        }
        let worst = p.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 2e-4, "position {place}: largest difference {worst}");
    }

    let right: Vec<i64> = (0..batch * sequence).map(|i| i64::from(i % sequence < 2 + i / sequence)).collect();
    for pooling in [Pooling::Mean, Pooling::MeanSqrtLen, Pooling::Cls, Pooling::Max] {
        for normalize in [true, false] {
            let spec = spec.clone().with_head(EmbeddingHead { pooling, normalize });
            let (p, g) = (run(true, &spec, &inputs(&right)), run(false, &spec, &inputs(&right)));
            let worst = p.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-4, "{pooling:?}, normalize {normalize}: largest difference {worst}");
        }
    }
}

/// int8 (`model.quantization`): the packed kernels with quantized layers, pooled
/// vectors within cosine 0.995 of f32 on padded rows of unequal length, and a
/// refusal naming the conditions off the CPU kernels.
#[test]
fn int8_runs_quantized_layers_close_to_f32() {
    let dir = minilm_dir();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let head = EmbeddingHead { pooling: Pooling::Mean, normalize: true };
    let spec = ModelSpec::new(&dir, Device::Cpu, DType::F32).with_head(head);
    let int8_spec = spec.clone().with_quantization(Quantization::Int8);
    let provider = CandleProvider::default();
    let f32_model = runtime.block_on(provider.load(&spec)).unwrap();
    let int8_model = runtime.block_on(provider.load(&int8_spec)).unwrap();
    let (batch, sequence) = (3, 40);
    let ids: Vec<i64> = (0..batch * sequence).map(|i| 2000 + (i as i64 * 7919) % 20000).collect();
    let mask: Vec<i64> =
        (0..batch * sequence).map(|i| i64::from(i % sequence < 5 + 17 * (i / sequence))).collect();
    let inputs = bert_inputs(batch, sequence, &ids, &mask);
    let run = |m: &Arc<dyn Model>| {
        m.run(&inputs).unwrap().require(SENTENCE_EMBEDDING).unwrap().to_f32_vec().unwrap()
    };
    let (a, b) = (run(&f32_model), run(&int8_model));
    for (row, (x, y)) in a.chunks(384).zip(b.chunks(384)).enumerate() {
        let cosine: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        assert!((0.995..0.999_999).contains(&cosine), "row {row}: cosine {cosine} between f32 and int8");
    }

    let bf16 = ModelSpec::new(&dir, Device::Cpu, DType::BF16).with_quantization(Quantization::Int8);
    let e = runtime.block_on(provider.load(&bf16)).err().unwrap().to_string();
    assert!(e.contains("int8") && e.contains("dtype f32") && e.contains("not cpu bf16"), "{e}");
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-candle-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// kiln's block kernel on the real GGUF file's matrices (SmolLM2's Q4_1 layers and its
/// Q8_0 embedding table, the tied output projection) against candle's quantized matmul
/// on the same blocks, which also quantizes the activations per 32 inputs (`Q8_1` /
/// `Q8_0`) but rounds a block's sum to f16 before scaling it (GGML scales, then rounds)
/// and breaks ties away from zero: the two differ by a small fraction of what quantizing
/// the activations itself costs (both against the dequantized weights in f32).
#[test]
fn block_kernel_matches_candles_quantized_matmul_on_the_gguf_file() {
    use candle_core::quantized::{GgmlDType, QMatMul, gguf_file};

    use crate::cpu::blocks::{BlockDense, Format};

    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.kiln/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing: run scripts/setup generate", path.display());
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    for (name, format) in [
        ("blk.0.ffn_down.weight", Format::Q4_1),
        ("blk.7.attn_q.weight", Format::Q4_1),
        ("token_embd.weight", Format::Q8_0),
    ] {
        let t = content.tensor(&mut file, name, &CDevice::Cpu).unwrap();
        let want_type = if format == Format::Q4_1 { GgmlDType::Q4_1 } else { GgmlDType::Q8_0 };
        assert_eq!(t.dtype(), want_type, "{name}");
        let [n, k] = t.shape().dims()[..] else { panic!("{name} is not a matrix") };
        let layer = BlockDense::from_file(format, &t.data().unwrap(), k, n).unwrap();
        let rows = 5;
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 1.7).collect();
        let mut got = Vec::new();
        layer.forward(&x, rows, &mut got);
        let xs = CTensor::from_slice(&x, (rows, k), &CDevice::Cpu).unwrap();
        let exact = t.dequantize(&CDevice::Cpu).unwrap();
        let exact = xs.matmul(&exact.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let candle = QMatMul::from_qtensor(t).unwrap().forward(&xs).unwrap();
        let candle = candle.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a - b).abs()).sum::<f32>() / a.len() as f32;
        let (to_candle, candle_to_f32, to_f32) =
            (mean(&got, &candle), mean(&candle, &exact), mean(&got, &exact));
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!(
            "{name} ({format:?}, {n}x{k}): mean difference to candle {to_candle:e}; to f32: kiln {to_f32:e}, \
             candle {candle_to_f32:e} (values up to {scale})"
        );
        assert!(to_candle < candle_to_f32 / 4.0, "{name}: kiln and candle differ by {to_candle} on average");
        assert!(to_f32 < 1e-3 * scale, "{name}: kiln differs from f32 by {to_f32} on average");
    }
}
