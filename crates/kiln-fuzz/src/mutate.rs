//! Deterministic mutations for the smoke run in `cargo test`: the kinds of change
//! libFuzzer makes (bit flips, byte edits, interesting integers, splices, cuts), from
//! a fixed seed so a failure repeats.

/// A small xorshift generator: reproducible, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced by a constant).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x80",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\n",
    b"\r\n",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"=",
    b"\xEF\xBB\xBF",
    b"\xc3",
    b"\xf0\x9f\x98",
    b"-1",
    b"1e309",
    b"NaN",
];

/// One to four random edits of `input`, some using `other` (another corpus entry).
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(out.len() + 1);
                let token = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(i..i, token.iter().copied());
            }
            3 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = 1 + rng.below((out.len() - i).min(16));
                out.drain(i..i + n);
            }
            4 if !out.is_empty() => {
                // Overwrite with an interesting value: length fields and counts.
                let token = INTERESTING[rng.below(INTERESTING.len())];
                let i = rng.below(out.len());
                for (j, &b) in token.iter().enumerate() {
                    if let Some(slot) = out.get_mut(i + j) {
                        *slot = b;
                    }
                }
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let n = 1 + rng.below((other.len() - from).min(64));
                let at = rng.below(out.len() + 1);
                out.splice(at..at, other[from..from + n].iter().copied());
            }
            6 if !out.is_empty() => out.truncate(rng.below(out.len())),
            7 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = 1 + rng.below((out.len() - i).min(8));
                let piece = out[i..i + n].to_vec();
                out.splice(i..i, piece);
            }
            _ => out.push(rng.next_u64() as u8),
        }
    }
    out
}
