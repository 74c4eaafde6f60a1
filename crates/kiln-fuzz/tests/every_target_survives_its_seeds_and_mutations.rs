//! The fuzz targets' smoke run: every committed seed, then deterministic mutations of
//! them, through every target. A finding is written to `target/fuzz-findings/` and
//! named in the failure, so `scripts/fuzz <target> --run <file>` replays it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use kiln_fuzz::mutate::{Rng, mutate};
use kiln_fuzz::{TARGETS, Target, seeds};

/// Mutations per target: enough to leave the seeds' paths, few enough for CI (the
/// slowest target, images, takes about a second for these).
const MUTATIONS: usize = 2000;

fn save(target: &Target, input: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-findings");
    std::fs::create_dir_all(&dir).expect("creating target/fuzz-findings");
    let hash =
        input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let path = dir.join(format!("{}-{hash:016x}", target.name));
    std::fs::write(&path, input).expect("saving the finding");
    path
}

fn run(target: &Target, input: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|panic| {
        let message = kiln_core::panic_message(&*panic);
        format!("{}: {message}\n  input saved as {}", target.name, save(target, input).display())
    })
}

#[test]
fn every_target_survives_its_seeds_and_mutations() {
    // Findings are collected and reported together; the default hook would print each.
    // (This file holds one test, so the hook silences nothing else.)
    std::panic::set_hook(Box::new(|_| {}));
    let mut findings = Vec::new();
    for target in TARGETS {
        let corpus = seeds(target.name).unwrap_or_else(|e| panic!("seeds/{}: {e}", target.name));
        assert!(!corpus.is_empty(), "seeds/{} is empty", target.name);
        for input in &corpus {
            findings.extend(run(target, input).err());
        }
        let mut rng = Rng::new(target.name.len() as u64 * 7919);
        for _ in 0..MUTATIONS {
            let input = mutate(&corpus[rng.below(corpus.len())], &corpus[rng.below(corpus.len())], &mut rng);
            findings.extend(run(target, &input).err());
        }
    }
    drop(std::panic::take_hook()); // the default hook again, to report
    assert!(findings.is_empty(), "{} finding(s):\n{}", findings.len(), findings.join("\n"));
}
