//! Choosing the next token from logits: greedy, or sampling with temperature, top-k,
//! top-p and a repetition penalty, from a per-sequence seeded generator (so a seeded
//! run repeats whatever else shares its batches).

use kiln_core::GenerateConfig;

/// SplitMix64: small, fast, and the same sequence everywhere for a seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One sequence's sampler.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repetition_penalty: f32,
    rng: Rng,
}

impl Sampler {
    pub(crate) fn new(config: &GenerateConfig) -> Self {
        Sampler {
            temperature: config.temperature,
            top_k: config.top_k,
            top_p: config.top_p,
            repetition_penalty: config.repetition_penalty,
            rng: Rng::new(config.seed),
        }
    }

    /// Whether [`next`](Self::next) is the first index of the largest logit whatever
    /// the history: no temperature and no repetition penalty. The generator may then
    /// pick the token itself ([`kiln_core::Next::Token`]).
    pub(crate) fn is_greedy(&self) -> bool {
        self.temperature == 0.0 && self.repetition_penalty == 1.0
    }

    /// The next token after `history` (prompt and generated tokens).
    pub(crate) fn next(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / self.repetition_penalty } else { *l * self.repetition_penalty };
                }
            }
        }
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let max = logits[order[0] as usize];
        let mut probs: Vec<f64> =
            order.iter().map(|&t| (((logits[t as usize] - max) / self.temperature) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let sum: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let mut u = self.rng.unit();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return order[i];
            }
            u -= p;
        }
        order[probs.len() - 1]
    }
}

/// The index of the largest logit, the lowest of equal ones (as argmax does elsewhere);
/// NaNs are passed over, and 0 when every logit is NaN. The maximum is found 16 lanes at
/// a time (the compiler vectorizes the lanes' loop), then its first index: with many
/// streams a step samples tens of vocabularies, and the one-at-a-time scan with its
/// dependency on the best so far was most of sampling's time.
fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            if l > *m {
                *m = l;
            }
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &l in lanes.iter().chain(chunks.remainder()) {
        if l > max {
            max = l;
        }
    }
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(temperature: f32, seed: u64) -> GenerateConfig {
        GenerateConfig { temperature, seed, ..GenerateConfig::default() }
    }

    /// The lane-wise argmax against the plain scan: ties to the lowest id, in the
    /// remainder past the last whole 16 too, NaNs passed over.
    #[test]
    fn argmax_takes_the_first_largest_wherever_it_is() {
        let plain = |v: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &l) in v.iter().enumerate() {
                if !l.is_nan() && best.is_none_or(|b| l > v[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        for len in [1, 5, 16, 17, 49, 64, 100] {
            for at in 0..len {
                let mut v: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32) - 20.0).collect();
                v[at] = 3.0;
                assert_eq!(argmax(&v), at as u32, "len {len}, max at {at}");
                // A tie after it, and a NaN before it, change nothing.
                if at + 1 < len {
                    v[len - 1] = 3.0;
                }
                if at > 0 {
                    v[0] = f32::NAN;
                }
                assert_eq!(argmax(&v), plain(&v), "len {len}, max at {at}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
    }

    #[test]
    fn greedy_takes_the_largest_and_the_penalty_can_change_it() {
        let mut s = Sampler::new(&config(0.0, 0));
        assert_eq!(s.next(&mut [0.1, 2.0, 1.9], &[]), 1);
        let mut s = Sampler::new(&GenerateConfig { repetition_penalty: 1.5, ..config(0.0, 0) });
        assert_eq!(s.next(&mut [0.1, 2.0, 1.9], &[1]), 2, "2.0 / 1.5 < 1.9");
    }

    #[test]
    fn sampling_repeats_for_a_seed_and_follows_the_probabilities() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let draw = |seed| {
            let mut s = Sampler::new(&config(1.0, seed));
            (0..2000).map(|_| s.next(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let counts = draw(7).iter().fold([0usize; 4], |mut c, &t| {
            c[t as usize] += 1;
            c
        });
        // softmax: 0.237, 0.087 ... token 2 about 0.64.
        assert!(counts[2] > 1100 && counts[2] < 1450, "{counts:?}");
        assert!(counts[2] > counts[1] && counts[1] > counts[0] && counts[0] > counts[3], "{counts:?}");
        // top_k = 1 is greedy; a small top_p keeps only the most likely token too.
        let mut s = Sampler::new(&GenerateConfig { top_k: 1, ..config(1.0, 3) });
        assert!((0..50).all(|_| s.next(&mut logits.clone(), &[]) == 2));
        let mut s = Sampler::new(&GenerateConfig { top_p: 0.5, ..config(1.0, 3) });
        assert!((0..50).all(|_| s.next(&mut logits.clone(), &[]) == 2));
    }
}
