//! Every level of the CPU kernels' dispatch this machine can run (AMX, AVX-512 VNNI,
//! AVX-512, AVX2, portable; `KILN_CPU_ISA` / `kiln::cpu_kernels::set_max_isa` forces the
//! lower ones) gives the fixture texts' embeddings within each precision's tolerance of
//! sentence-transformers' f32: f32 and bf16 cosine ≥ 0.9999, int8 ≥ 0.99. The level is
//! process-wide, so this binary holds this one test alone.

mod support;

use kiln::Optimizer;
use kiln::cpu_kernels::{self, Isa};
use support::{cosines_to, minilm_config, reference};

#[tokio::test]
async fn every_dispatch_level_this_cpu_runs_agrees_with_sentence_transformers() {
    let reference = reference();
    let detected = cpu_kernels::detected();
    eprintln!("this CPU runs the kernels up to {detected}");
    let levels: Vec<Isa> = [Isa::Amx, Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|&level| level <= detected)
        .collect();
    for level in levels {
        cpu_kernels::set_max_isa(level);
        assert_eq!(cpu_kernels::active(), level);
        for (precision, sets, min) in [
            ("f32", &[][..], 0.9999),
            ("bf16", &["model.dtype=\"bf16\""][..], 0.9999),
            ("int8", &["model.quantization=\"int8\""][..], 0.99),
        ] {
            let mut sets = sets.to_vec();
            // The portable int8 path is plain Rust, written for correctness.
            sets.push("scheduler.timeout_ms=300000");
            let optimizer = Optimizer::from_config(minilm_config(&sets)).await.unwrap();
            let ours = optimizer.embed(&reference.texts).await.unwrap();
            let (cosines, worst, mean) = cosines_to(&ours, &reference);
            for (text, c) in reference.texts.iter().zip(&cosines) {
                assert!(*c >= min, "{level}, {precision}: cosine {c:.6} for {text:?}");
            }
            eprintln!(
                "{level}, {precision}: cosine to sentence-transformers worst {worst:.6}, mean {mean:.6}"
            );
            optimizer.shutdown().await.unwrap();
        }
    }
    cpu_kernels::set_max_isa(detected);
}
