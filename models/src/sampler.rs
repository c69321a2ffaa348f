//! The sampler: turns one position's logits into a token, deterministically from the seed.
//! It is specified here rather than borrowed from a crate whose RNG may change between
//! versions, because a replay verifier on another node must reproduce it bit for bit.
//!
//! Order of operations (llama.cpp's): repetition penalty over the last `repeat_last_n`
//! tokens (positive logits divided, negative multiplied, once per distinct token); then
//! greedy argmax if temperature is 0; else top-k, temperature, softmax, top-p, and one draw
//! from xoshiro256** seeded by splitmix64(seed).

use tessera_protocol::SamplingParams;

/// xoshiro256**: small, fast, and fully specified (no dependency on an RNG crate's version).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Seeds the four state words with splitmix64, as the xoshiro authors recommend.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Per-request sampler state: parameters, RNG and scratch space reused across tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    scratch: Vec<(f32, u32)>,
    seen: Vec<u32>,
}

impl Sampler {
    /// A sampler for one request; `params` must have passed `validate()`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            scratch: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Chooses the next token from `logits` (modified in place by the penalty), given the
    /// tokens so far (prompt and generated).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_repetition_penalty(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (if l.is_nan() { f32::NEG_INFINITY } else { l }, i as u32)),
        );
        let by_logit_desc =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = self.params.top_k as usize;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
        }
        cands.sort_unstable_by(by_logit_desc);
        // Softmax with temperature, in f64 so the cumulative sums are stable.
        let t = f64::from(self.params.temperature);
        let max = f64::from(cands[0].0);
        let mut probs: Vec<f64> = cands
            .iter()
            .map(|c| ((f64::from(c.0) - max) / t).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut n = probs.len();
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= f64::from(self.params.top_p) {
                    n = i + 1;
                    break;
                }
            }
        }
        let mass: f64 = probs[..n].iter().sum();
        let r = self.rng.next_f64() * mass;
        let mut cum = 0.0;
        for i in 0..n {
            cum += probs[i];
            if r < cum {
                return cands[i].1;
            }
        }
        cands[n - 1].1
    }

    /// The parameters this sampler applies.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The uniform draw `sample` would make next (none when greedy), advancing the stream
    /// exactly as `sample` does: what a replay verifier needs to judge a sampled position.
    pub fn draw(&mut self) -> Option<f64> {
        (!self.params.is_greedy()).then(|| self.rng.next_f64())
    }

    /// The repetition penalty step of `sample`, on its own.
    pub fn apply_repetition_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let start = history
            .len()
            .saturating_sub(self.params.repeat_last_n as usize);
        self.seen.clear();
        self.seen.extend_from_slice(&history[start..]);
        self.seen.sort_unstable();
        self.seen.dedup();
        for &t in &self.seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// Index of the largest logit, lowest index on ties (NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_l = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_l {
            best_l = l;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn rng_matches_reference_xoshiro256starstar() {
        // Expected values from an independent implementation of splitmix64 seeding and
        // xoshiro256** (Vigna's reference algorithm), computed once in Python.
        let mut r = Rng::new(0);
        assert_eq!(r.s[0], 0xE220_A839_7B1D_CDAF, "splitmix64(0) first output");
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(
            first,
            vec![
                0x99ec_5f36_cb75_f2b4,
                0xbf6e_1f78_4956_452a,
                0x1a5f_849d_4933_e6e0
            ]
        );
        assert_ne!(Rng::new(1).next_u64(), Rng::new(0).next_u64());
    }

    #[test]
    fn greedy_takes_argmax_and_ignores_seed() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        for seed in 0..5 {
            assert_eq!(
                Sampler::new(params(0.0, seed)).sample(&mut logits.clone(), &[]),
                1
            );
        }
    }

    #[test]
    fn same_seed_same_choices_different_seed_different_choices() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 10) as f32 * 0.1).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, seed));
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = vec![0.0, 1.0, 5.0, 2.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(1.5, 3)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 2);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Probabilities ~0.88, 0.12, ~0: top_p 0.5 keeps only the first.
        let logits = vec![2.0, 0.0, -30.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params(1.0, 11)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut logits = vec![2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..params(0.0, 0)
        });
        assert_eq!(s.sample(&mut logits, &[0, 2]), 1);
        assert_eq!(logits, vec![2.0 / 1.5, 1.9, -1.5]);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = vec![0.0f32, (3.0f32).ln()];
        let mut s = Sampler::new(params(1.0, 42));
        let ones = (0..4000)
            .filter(|_| s.sample(&mut logits.clone(), &[]) == 1)
            .count();
        assert!(
            (2800..3200).contains(&ones),
            "expected ~75% ones, got {ones}/4000"
        );
    }
}
