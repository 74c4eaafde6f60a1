//! A provider defined outside kiln (examples/custom_provider.rs) registers with one
//! macro line and is chosen by name in a config, through the whole pipeline.

#[allow(dead_code)]
#[path = "../examples/custom_provider.rs"]
mod example;

mod support;

use std::path::Path;

#[test]
fn the_example_provider_is_registered() {
    assert!(kiln::providers().unwrap().names().contains(&"hashing"));
}

#[tokio::test]
async fn the_config_naming_it_embeds_through_it() {
    support::minilm_dir(); // its tokenizer comes from the MiniLM folder
    let config = support::root().join("examples/custom_provider.toml");
    let texts: Vec<String> = [
        "the cat sat on the mat",
        "the cat sat on the mat",
        "a cat sat on a mat",
        "quarterly revenue grew by ten percent",
    ]
    .map(String::from)
    .to_vec();
    let v = example::embed_with(Path::new(&config), &texts).await.unwrap();
    assert!(v.iter().all(|e| e.len() == 256), "dim comes from [provider.options]");
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!((cos(&v[0], &v[1]) - 1.0).abs() < 1e-5, "same text, same vector");
    assert!(cos(&v[0], &v[2]) > cos(&v[0], &v[3]) + 0.3, "shared words make texts closer");
}

#[tokio::test]
async fn its_options_are_validated_by_the_provider() {
    let config = support::root().join("examples/custom_provider.toml");
    let sets = vec!["provider.options.dims=3".to_string()];
    let config = kiln::KilnConfig::load(Some(&config), &sets).unwrap();
    let err = kiln::Optimizer::from_config(config).await.err().unwrap().to_string();
    assert!(err.contains("`provider.options.dims`: found unknown field `dims`"), "{err}");
    assert!(err.contains("the keys provider `hashing` accepts"), "{err}");
}

/// A fifth provider's first test: the conformance suite every kiln provider passes (no
/// fixture: hashing embeddings have no reference to agree with).
#[tokio::test]
async fn it_passes_the_conformance_suite() {
    support::minilm_dir();
    let config = support::root().join("examples/custom_provider.toml");
    let config = kiln::KilnConfig::load(Some(&config), &[]).unwrap();
    kiln_conformance::check_embedding_provider(config, None, kiln_conformance::Tolerance::F32).await;
}
