//! libFuzzer entry point: `KILN_FUZZ_TARGET=<name>` picks the target (see
//! `scripts/fuzz`, which builds this with coverage instrumentation and runs it).
#![no_main]

use std::sync::OnceLock;

static TARGET: OnceLock<&'static kiln_fuzz::Target> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let target = TARGET.get_or_init(|| {
        // libfuzzer-sys's hook aborts on every panic, even one kiln catches on purpose
        // (kiln-vision turns a decoder's panic into an error for that image). With the
        // default hook back, a caught panic is just handled; one that escapes still
        // aborts, at the C boundary of this function, and libFuzzer reports it.
        drop(std::panic::take_hook());
        let name = std::env::var("KILN_FUZZ_TARGET").unwrap_or_default();
        kiln_fuzz::target(&name).unwrap_or_else(|| {
            let names: Vec<_> = kiln_fuzz::TARGETS.iter().map(|t| t.name).collect();
            eprintln!("KILN_FUZZ_TARGET={name:?} is not a target; targets: {}", names.join(", "));
            std::process::exit(2)
        })
    });
    (target.run)(data);
});
