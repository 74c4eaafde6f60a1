//! Which instruction sets the packed CPU kernels use: detected once, capped by
//! `KILN_CPU_ISA` or [`set_max_isa`], so the lower paths can be forced and tested on a
//! CPU that has the higher ones (as oneDNN's `ONEDNN_MAX_CPU_ISA` does).
//!
//! AMX needs more than the CPUID bits: Linux hands a process the 8 KiB of tile state
//! only after it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); the
//! first tile instruction before that is a `SIGILL`. Detection makes the request, so
//! [`Isa::Amx`] is reported only where the kernel can run.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// A level of the CPU kernels' dispatch, lowest first; each includes the ones below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, compiled for the baseline x86-64 (or any other architecture).
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F.
    Avx512,
    /// AVX-512 F, BW and VNNI: kiln's int8 and GGML block kernels.
    Avx512Vnni,
    /// AMX tiles (bf16 and int8) with the OS's permission, on top of AVX-512 VNNI.
    Amx,
}

impl Isa {
    const ALL: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni, Isa::Amx];

    /// The name `KILN_CPU_ISA` takes and logs show.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Amx => "amx",
        }
    }

    /// The level named `name` (as [`Isa::name`] gives), or an error listing the names.
    pub fn parse(name: &str) -> Result<Isa, String> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name.trim()).ok_or_else(|| {
            format!("unknown CPU kernel level '{name}'; known: {}", Isa::ALL.map(Isa::name).join(", "))
        })
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What this CPU (and OS) can run.
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

const UNSET: u8 = u8::MAX;
static CAP: AtomicU8 = AtomicU8::new(UNSET);

/// Caps the kernels of this process at `isa` (the lower of it and [`detected`] runs).
/// Process-wide, for every model loaded before or after: a comparison or test of the
/// lower paths, not a per-model setting.
pub fn set_max_isa(isa: Isa) {
    CAP.store(isa as u8, Ordering::Relaxed);
}

/// The level the kernels run at now: [`detected`], capped by [`set_max_isa`] or else
/// by `KILN_CPU_ISA` (an unknown name there is reported once on stderr and ignored).
pub fn active() -> Isa {
    let cap = match CAP.load(Ordering::Relaxed) {
        UNSET => env_cap(),
        level => Isa::ALL[usize::from(level)],
    };
    detected().min(cap)
}

fn env_cap() -> Isa {
    static ENV: OnceLock<Isa> = OnceLock::new();
    *ENV.get_or_init(|| match std::env::var("KILN_CPU_ISA") {
        Ok(name) if !name.is_empty() => Isa::parse(&name).unwrap_or_else(|e| {
            eprintln!("kiln: KILN_CPU_ISA: {e}; using what the CPU has");
            Isa::Amx
        }),
        _ => Isa::Amx,
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
        return Isa::Portable;
    }
    if !std::is_x86_feature_detected!("avx512f") {
        return Isa::Avx2;
    }
    if !(std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni")) {
        return Isa::Avx512;
    }
    // The tile paths' epilogues and attention use AVX-512 BF16 and VL, which every CPU
    // with AMX has.
    let companions = std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512vl");
    if companions && amx_permitted() { Isa::Amx } else { Isa::Avx512Vnni }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

/// CPUID's AMX-BF16, AMX-TILE and AMX-INT8 bits, then the OS's permission for the tile
/// data (Linux only; other systems run the AVX-512 kernels).
#[cfg(target_arch = "x86_64")]
fn amx_permitted() -> bool {
    // `is_x86_feature_detected!("amx-tile")` is unstable (rust#126622): read CPUID.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    let bits = (1 << 22) | (1 << 24) | (1 << 25);
    if leaf.edx & bits != bits {
        return false;
    }
    request_tile_data()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only changes which state components the
    // kernel lets this process use; it reads no memory of ours. `syscall` clobbers rcx
    // and r11, declared.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_data() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Ok(isa));
        }
        let err = Isa::parse("sse2").unwrap_err();
        assert!(err.contains("'sse2'") && err.contains("avx512-vnni, amx"), "{err}");
    }
}
