//! AMX tile primitives: the thread's tile configuration, the 32 × 32 products the bf16
//! and int8 linear layers run (`bf16.rs`, `int8.rs`), and single-tile operations for attention
//! (`tile_attention.rs`). Callers check [`isa::active`](super::isa::active) is
//! [`Isa::Amx`](super::isa::Isa::Amx) first: a tile instruction elsewhere is a `SIGILL`.
//!
//! Every tile is configured as 16 rows of 64 bytes (16 f32 or i32, 32 bf16 — 16 pairs —
//! or 64 bytes — 16 groups of 4).
//! Tile registers are not compiler-managed state, so each instruction is its own
//! `asm!` block and the tiles keep their contents between blocks.

/// This thread's tile configuration while alive: eight tiles of 16 rows × 64 bytes.
/// Dropping it releases the tiles, so a context switch does not save 8 KiB of them.
pub(super) struct TileConfig;

impl TileConfig {
    pub(super) fn load() -> Self {
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        let mut config = Config([0; 64]);
        config.0[0] = 1; // palette 1
        for t in 0..8 {
            config.0[16 + 2 * t] = 64; // bytes per row
            config.0[48 + t] = 16; // rows
        }
        // SAFETY: only called with the level at AMX (the CPU has it, the OS granted it);
        // the configuration is 64 bytes, aligned, as `ldtilecfg` reads it.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        }
        TileConfig
    }
}

impl Drop for TileConfig {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `load` on this thread.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// `c` (32 × 32 f32, rows `c_stride` bytes apart) = 32 rows of `a` (bf16, `kp` apart)
/// times the column pair `b` (`chunks` pairs of tiles) — plus what `c` held, when
/// `accumulate` (a slice of a long row's inputs after the first). Tiles 0–3 accumulate
/// (rows 0–15 and 16–31 by columns 0–15 and 16–31), 4–5 hold activations, 6–7 weights.
///
/// Every operand should start on a 64-byte boundary (`bf16::Bits`): a tile row
/// across two cache lines costs two loads.
///
/// # Safety
/// The thread's tiles are configured (`TileConfig::load`); `a` holds 32 rows of (at
/// least) `32 · chunks` values `kp` apart, `b` `chunks · 1024` values, `c` 32 rows of 32
/// f32 `c_stride` bytes apart.
#[inline]
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn block(
    a: *const u16,
    kp: usize,
    b: *const u16,
    chunks: usize,
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
) {
    let stride = kp * 2;
    // SAFETY: as the caller promises; every load stays inside `a`, `b` and `c`, the
    // stores inside `c`. Tile registers are not compiler-managed state.
    unsafe {
        start_sums(accumulate.then_some(c.cast()), c_stride);
        for chunk in 0..chunks {
            let a0 = a.add(chunk * 32);
            let b0 = b.add(chunk * 1024);
            // Tiles are not renamed: the next loads into tmm6/7 wait for these
            // products, so their latency is not hidden. Pulling the weights two
            // steps ahead into L1 measured 1.35x on BERT's shapes (a prefetch past
            // the end is harmless).
            let ahead = b0.add(2 * 1024).cast::<u8>();
            for line in 0..32 {
                std::arch::asm!("prefetcht0 [{}]", in(reg) ahead.wrapping_add(line * 64), options(nostack, readonly, preserves_flags));
            }
            std::arch::asm!(
                // Each load just before its first use, so a product starts as soon
                // as its operands are in (1.05x on a 32-row product in L1; within noise on MiniLM).
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {w}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {w}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a0.add(16 * kp),
                b0 = in(reg) b0,
                b1 = in(reg) b0.add(512),
                s = in(reg) stride,
                w = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        store_sums(c.cast(), c_stride);
    }
}

/// `c` (32 × 32 i32, row-major) = 32 rows of `a` (u8, `kp` bytes apart) times the
/// column blocks `b0` and `b1` (int8, `chunks` tiles of 1 KiB each: per 64 inputs, 16
/// rows of 16 columns × 4 inputs), summed exactly (`TDPBUSD`). The same tile roles as
/// [`block`]: 0–3 accumulate, 4–5 activations, 6–7 weights.
///
/// # Safety
/// The thread's tiles are configured (`TileConfig::load`); `a` holds 32 rows of
/// `kp = 64 · chunks` bytes, `b0` and `b1` `chunks · 1024` bytes each, `c` 1024 i32.
#[inline]
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn block_i8(
    a: *const u8,
    kp: usize,
    b0: *const i8,
    b1: *const i8,
    chunks: usize,
    c: *mut i32,
) {
    // SAFETY: as the caller promises; every load stays inside `a`, `b0` and `b1`, the
    // stores inside `c`.
    unsafe {
        start_sums(None, 128);
        for chunk in 0..chunks {
            let a0 = a.add(chunk * 64);
            let (w0, w1) = (b0.add(chunk * 1024), b1.add(chunk * 1024));
            // The weights two steps ahead into L1, as `block` does (a prefetch past the
            // end is harmless).
            for line in 0..16 {
                let at = 2 * 1024 + line * 64;
                std::arch::asm!("prefetcht0 [{}]", in(reg) w0.wrapping_add(at), options(nostack, readonly, preserves_flags));
                std::arch::asm!("prefetcht0 [{}]", in(reg) w1.wrapping_add(at), options(nostack, readonly, preserves_flags));
            }
            std::arch::asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{w0} + {w}*1]",
                "tdpbusd tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{w1} + {w}*1]",
                "tdpbusd tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a0.add(16 * kp),
                w0 = in(reg) w0,
                w1 = in(reg) w1,
                s = in(reg) kp,
                w = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        store_sums(c.cast(), 128);
    }
}

/// The four accumulator tiles of [`block`] and [`block_i8`] (32 × 32 sums of 4 bytes:
/// rows 0–15 and 16–31 by columns 0–15 and 16–31) loaded from `from` (rows `stride` bytes
/// apart), or zeroed when `None`.
///
/// # Safety
/// Tiles configured; `from`, when given, holds 32 rows of 128 bytes `stride` apart.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn start_sums(from: Option<*const u8>, stride: usize) {
    // SAFETY: as the caller promises.
    unsafe {
        match from {
            Some(c) => std::arch::asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c,
                c1 = in(reg) c.add(64),
                c2 = in(reg) c.add(16 * stride),
                c3 = in(reg) c.add(16 * stride + 64),
                s = in(reg) stride,
                options(nostack, readonly),
            ),
            None => std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            ),
        }
    }
}

/// The four accumulator tiles (as [`start_sums`] lays them out) to `to`.
///
/// # Safety
/// Tiles configured; `to` has room for 32 rows of 128 bytes `stride` apart.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_sums(to: *mut u8, stride: usize) {
    // SAFETY: as the caller promises.
    unsafe {
        std::arch::asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) to,
            c1 = in(reg) to.add(64),
            c2 = in(reg) to.add(16 * stride),
            c3 = in(reg) to.add(16 * stride + 64),
            s = in(reg) stride,
            options(nostack),
        );
    }
}

/// `tmm{T}` = 0.
///
/// # Safety
/// The thread's tiles are configured (`TileConfig::load`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn zero<const T: u8>() {
    // SAFETY: as the caller promises.
    unsafe { std::arch::asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) }
}

/// `tmm{T}` = 16 rows of 64 bytes at `p`, `stride` bytes apart.
///
/// # Safety
/// Tiles configured; the 16 rows are readable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn load<const T: u8>(p: *const u16, stride: usize) {
    // SAFETY: as the caller promises.
    unsafe {
        std::arch::asm!("tileloadd tmm{t}, [{p} + {s}*1]", t = const T, p = in(reg) p, s = in(reg) stride,
            options(nostack, readonly))
    }
}

/// 16 rows of `tmm{T}` (16 f32 each) to `p`, `stride` bytes apart.
///
/// # Safety
/// Tiles configured; the 16 rows are writable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn store<const T: u8>(p: *mut f32, stride: usize) {
    // SAFETY: as the caller promises.
    unsafe {
        std::arch::asm!("tilestored [{p} + {s}*1], tmm{t}", t = const T, p = in(reg) p, s = in(reg) stride, options(nostack))
    }
}

/// `tmm{C}` += `tmm{A}` · `tmm{B}`: A's 16 rows of 32 bf16 times B's 16 rows of 16
/// column pairs, summed in f32.
///
/// # Safety
/// Tiles configured and loaded.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
    // SAFETY: as the caller promises.
    unsafe {
        std::arch::asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B, options(nostack, nomem))
    }
}
