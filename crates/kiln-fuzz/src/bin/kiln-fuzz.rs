//! libFuzzer entry point: `KILN_FUZZ_TARGET=<name>` picks the target (see
//! `scripts/fuzz`, which builds this with coverage instrumentation and runs it).
#![no_main]

use std::sync::OnceLock;

static TARGET: OnceLock<&'static kiln_fuzz::Target> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let target = TARGET.get_or_init(|| {
        let name = std::env::var("KILN_FUZZ_TARGET").unwrap_or_default();
        kiln_fuzz::target(&name).unwrap_or_else(|| {
            let names: Vec<_> = kiln_fuzz::TARGETS.iter().map(|t| t.name).collect();
            eprintln!("KILN_FUZZ_TARGET={name:?} is not a target; targets: {}", names.join(", "));
            std::process::exit(2)
        })
    });
    (target.run)(data);
});
