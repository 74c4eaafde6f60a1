//! Memory admission on a device: serves MiniLM there, asks for a second model whose
//! safetensors header declares more weights than the device has free (100 GiB; only
//! the header exists, admission reads nothing else), prints the refusal, and shows the
//! first model still serving. On a GPU the free figure is NVML's.
//!
//! ```sh
//! cargo run --release --example gpu_admission --features candle-cuda -- MODEL_DIR cuda:0
//! cargo run --release --example gpu_admission -- .kiln/models/all-MiniLM-L6-v2 cpu   # 100 GiB may fit a big host
//! ```
//!
//! Exit code 0 when the refusal is an out-of-memory error and serving goes on.

use kiln::{DType, Device, Error, KilnConfig, ModelSpec, Optimizer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, device] = args.as_slice() else {
        return Err("usage: gpu_admission MODEL_DIR DEVICE (cpu, cuda:N)".into());
    };
    let device: Device = device.parse()?;
    let sets = [format!("model.path={model:?}"), format!("model.device=\"{device}\"")];
    let optimizer = Optimizer::from_config(KilnConfig::load(None, &sets)?).await?;
    println!("serving {} on {}", optimizer.model_info().name, optimizer.model_info().device);

    let dir = tempfile::tempdir()?;
    std::fs::copy(std::path::Path::new(model).join("config.json"), dir.path().join("config.json"))?;
    // 100 GiB of f32 weights, declared.
    let bytes: u64 = 100 << 30;
    let header = format!(
        r#"{{"embeddings.word_embeddings.weight":{{"dtype":"F32","shape":[{},1024],"data_offsets":[0,{bytes}]}}}}"#,
        bytes / 4 / 1024
    );
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    std::fs::write(dir.path().join("model.safetensors"), file)?;

    let refused = match optimizer.load_model(ModelSpec::new(dir.path(), device, DType::F32)).await {
        Err(e @ Error::OutOfMemory { .. }) => {
            println!("refused: {e}");
            true
        }
        Err(e) => {
            println!("failed otherwise: {e}");
            false
        }
        Ok(_) => {
            println!("loaded: 100 GiB fit on {device}");
            false
        }
    };
    let v = optimizer.embed(&["still serving after the refusal".to_string()]).await?;
    println!("still serving: {} dims; models loaded: {}", v[0].len(), optimizer.models().loaded().len());
    optimizer.shutdown().await?;
    if !refused {
        std::process::exit(1);
    }
    Ok(())
}
