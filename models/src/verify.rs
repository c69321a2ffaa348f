//! The replay verifier's judgement of one position, and of a whole transcript.
//!
//! A replay recomputes the logits of every generated position in one teacher-forced pass
//! ([`crate::Model::replay`]); this module decides, per position, how far the claim is from
//! what the replayed model would have done, as a distance in logits:
//! - **fingerprint distance**: the claimed top-k logits against the replayed logits of the
//!   same ids (less the commitment grid's rounding slack), and any token the replay ranks in
//!   its top-k that the claim left out, by how much it beats the claim's last logit;
//! - **choice margin**: the smallest uniform move of the (penalised) logits, in the L∞
//!   sense, under which this sampler with this seed would have drawn the claimed token.
//!   Greedy positions: half the gap to the argmax. Sampled positions: the draw `u` of the
//!   seeded stream against the claimed token's cumulative interval, bounded for every
//!   logit vector within δ and found by bisection.
//!
//! A position fails when the larger of the two exceeds the tolerance. Honest nodes on the
//! same engine reproduce logits exactly; the tolerance absorbs other thread counts, batch
//! shapes and backends (`docs/verification.md` has the calibration).

use tessera_protocol::{
    Failure, FailureKind, Fingerprint, SamplingParams, TokenRecord, TranscriptCommitment, Verdict,
    FINGERPRINT_TOP_K, LOGIT_GRID,
};

use crate::sampler::Sampler;

/// Largest distance reported; anything beyond it is equally wrong.
pub const MAX_DISTANCE: f32 = 64.0;

/// Tokens whose logit is this many temperatures below the best carry weight below e^-30 and
/// are left out of the sampled-position bounds.
const WEIGHT_FLOOR: f64 = 30.0;

/// How far a claimed fingerprint is from the replayed logits, in logits.
pub fn fingerprint_distance(logits: &[f32], claimed: &Fingerprint) -> f32 {
    distance_to(logits, &Fingerprint::from_logits(logits), claimed)
}

/// [`fingerprint_distance`] with the replay's own fingerprint `top` already computed.
fn distance_to(logits: &[f32], top: &Fingerprint, claimed: &Fingerprint) -> f32 {
    let slack = LOGIT_GRID / 2.0;
    let vocab = logits.len();
    let expected = FINGERPRINT_TOP_K.min(vocab);
    let mut d = 0f32;
    let mut claimed_min = f32::INFINITY;
    let mut present = 0;
    for (k, &id) in claimed.ids.iter().enumerate() {
        if id == u32::MAX {
            continue;
        }
        let Some(&l) = logits.get(id as usize) else {
            return MAX_DISTANCE;
        };
        if claimed.ids[..k].contains(&id) {
            return MAX_DISTANCE;
        }
        present += 1;
        let c = claimed.logits[k] as f32 * LOGIT_GRID;
        d = d.max((l - c).abs() - slack);
        claimed_min = claimed_min.min(c);
    }
    if present != expected {
        return MAX_DISTANCE;
    }
    // Completeness: a token the replay ranks in its top-k must not beat the claim's last
    // logit by more than the tolerance if the claim left it out.
    for &id in &top.ids {
        if id == u32::MAX || claimed.ids.contains(&id) {
            continue;
        }
        d = d.max(logits[id as usize] - (claimed_min + slack));
    }
    if d.is_nan() {
        MAX_DISTANCE
    } else {
        d.clamp(0.0, MAX_DISTANCE)
    }
}

/// Smallest L∞ move of `logits` (already penalised) under which the sampler picks
/// `claimed`, given the draw `u` (`None` when greedy).
pub fn choice_margin(logits: &[f32], claimed: u32, u: Option<f64>, params: &SamplingParams) -> f32 {
    let Some(&lc) = logits.get(claimed as usize) else {
        return MAX_DISTANCE;
    };
    if lc.is_nan() {
        return MAX_DISTANCE;
    }
    let Some(u) = u else {
        // Greedy: the claimed token must be (within 2δ of) the argmax.
        let best = logits
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != claimed as usize)
            .map(|(_, &l)| if l.is_nan() { f32::NEG_INFINITY } else { l })
            .fold(f32::NEG_INFINITY, f32::max);
        return ((best - lc) / 2.0).clamp(0.0, MAX_DISTANCE);
    };
    let t = f64::from(params.temperature);
    let lmax = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    // The candidates that carry weight.
    let floor = f64::from(lmax) - WEIGHT_FLOOR * t;
    let cands: Vec<(f32, u32)> = logits
        .iter()
        .enumerate()
        .filter(|&(i, &l)| f64::from(l) >= floor || i == claimed as usize)
        .map(|(i, &l)| (l, i as u32))
        .collect();
    let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let k = params.top_k as usize;
    // The replay's top-k set (as the sampler selects it), with the claimed token kept in
    // it; sorted best first only where top-p needs the order (the sampler's sort).
    let mut top: Vec<(f32, u32)> = cands.clone();
    if k > 0 && k < top.len() {
        top.select_nth_unstable_by(k - 1, by_logit_desc);
        top.truncate(k);
        if !top.iter().any(|c| c.1 == claimed) {
            top.push((lc, claimed));
        }
    }
    if params.top_p < 1.0 {
        top.sort_unstable_by(by_logit_desc);
    }
    let lmaxf = f64::from(lmax);
    let weight = |l: f64| ((l - lmaxf) / t).exp();
    let lc = f64::from(lc);
    // Every weight once: the bisection below only sums them.
    let ws: Vec<f64> = top.iter().map(|&(l, _)| weight(f64::from(l))).collect();
    let wc = weight(lc);
    let z: f64 = ws.iter().sum();
    let mut others: Vec<(f64, f64)> = top
        .iter()
        .zip(&ws)
        .filter(|(c, _)| c.1 != claimed)
        .map(|(&(l, _), &w)| (f64::from(l), w))
        .collect();
    // The replay's top-p mass (what the sampler scales u by).
    let p = f64::from(params.top_p);
    let mass = if p < 1.0 {
        let mut cum = 0.0;
        let mut m = 1.0;
        for w in &ws {
            cum += w / z;
            if cum >= p {
                m = cum;
                break;
            }
        }
        m
    } else {
        1.0
    };
    // Whether some logit vector within δ of these picks the claimed token, given the
    // weight ahead of it for certain (`strict`), possibly (`maybe`), and how many
    // candidates are certainly ranked above it (top-k).
    let accept = |delta: f64, ahead_strict: f64, ahead_maybe: f64, strict_count: usize| -> bool {
        if k > 0 && strict_count >= k {
            return false;
        }
        let g = (delta / t).exp();
        let lo = (ahead_strict / g) / (ahead_strict / g + (z - ahead_strict) * g);
        let hi = (ahead_maybe + wc) * g / ((ahead_maybe + wc) * g + (z - ahead_maybe - wc) / g);
        if p < 1.0 && lo >= p {
            return false;
        }
        let (m_lo, m_hi) = if p < 1.0 {
            (mass / (g * g), (mass * g * g).min(1.0))
        } else {
            (1.0, 1.0)
        };
        u * m_hi >= lo && u * m_lo < hi
    };
    // δ = 0 in one pass: the answer for every honest position.
    let strict0: f64 = others.iter().filter(|o| o.0 > lc).map(|o| o.1).sum();
    let maybe0: f64 = others.iter().filter(|o| o.0 >= lc).map(|o| o.1).sum();
    let count0 = if k > 0 {
        cands.iter().filter(|c| f64::from(c.0) > lc).count()
    } else {
        0
    };
    if accept(0.0, strict0, maybe0, count0) {
        return 0.0;
    }
    // A deviation: sort once, then each trial δ is two binary searches over prefix sums.
    others.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut prefix = Vec::with_capacity(others.len() + 1);
    prefix.push(0.0);
    for o in &others {
        prefix.push(prefix[prefix.len() - 1] + o.1);
    }
    let mut ranked: Vec<f64> = if k > 0 {
        cands.iter().map(|c| f64::from(c.0)).collect()
    } else {
        Vec::new()
    };
    ranked.sort_unstable_by(|a, b| b.total_cmp(a));
    let trial = |delta: f64| {
        let strict = others.partition_point(|o| o.0 > lc + 2.0 * delta);
        let maybe = others.partition_point(|o| o.0 >= lc - 2.0 * delta);
        let count = ranked.partition_point(|&l| l > lc + 2.0 * delta);
        accept(delta, prefix[strict], prefix[maybe], count)
    };
    let max = f64::from(MAX_DISTANCE);
    if !trial(max) {
        return MAX_DISTANCE;
    }
    let (mut lo, mut hi) = (0.0, max);
    for _ in 0..30 {
        let mid = (lo + hi) / 2.0;
        if trial(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi as f32
}

/// Judges a transcript position by position as the replayed logits arrive.
#[derive(Debug)]
pub struct Judge {
    sampler: Sampler,
    history: Vec<u32>,
    records: Vec<TokenRecord>,
    tolerance: f32,
    next: usize,
    failed: u32,
    first_failure: Option<Failure>,
    sum: f64,
    max: f32,
    max_fp: f32,
    max_choice: f32,
    scratch: Vec<f32>,
    replayed: Vec<TokenRecord>,
}

impl Judge {
    /// A judge for `records` generated after `prompt` with `sampling`.
    pub fn new(
        prompt: &[u32],
        records: &[TokenRecord],
        sampling: &SamplingParams,
        tolerance: f32,
    ) -> Self {
        let mut history = Vec::with_capacity(prompt.len() + records.len());
        history.extend_from_slice(prompt);
        Self {
            sampler: Sampler::new(sampling.clone()),
            history,
            records: records.to_vec(),
            tolerance,
            next: 0,
            failed: 0,
            first_failure: None,
            sum: 0.0,
            max: 0.0,
            max_fp: 0.0,
            max_choice: 0.0,
            scratch: Vec::new(),
            replayed: Vec::with_capacity(records.len()),
        }
    }

    /// Checks the records' shape before any logits: positions follow the prompt, ids are in
    /// the vocabulary. Returns the first structural failure.
    pub fn check_shape(
        prompt_len: usize,
        records: &[TokenRecord],
        vocab: usize,
    ) -> Option<Failure> {
        records.iter().enumerate().find_map(|(i, r)| {
            let kind = if r.position as usize != prompt_len + i {
                FailureKind::Position
            } else if r.token as usize >= vocab {
                FailureKind::TokenOutOfVocabulary
            } else {
                return None;
            };
            Some(Failure {
                index: i as u32,
                kind,
                distance: 0.0,
            })
        })
    }

    /// Judges the next record against `logits`, the replayed logits it was sampled from.
    pub fn push(&mut self, logits: &[f32]) {
        let Some(record) = self.records.get(self.next).copied() else {
            return;
        };
        let top = Fingerprint::from_logits(logits);
        let fp = distance_to(logits, &top, &record.fingerprint);
        self.replayed.push(TokenRecord {
            fingerprint: top,
            ..record
        });
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        self.sampler
            .apply_repetition_penalty(&mut self.scratch, &self.history);
        let u = self.sampler.draw();
        let choice = choice_margin(&self.scratch, record.token, u, self.sampler.params());
        let d = fp.max(choice);
        self.sum += f64::from(d);
        self.max = self.max.max(d);
        self.max_fp = self.max_fp.max(fp);
        self.max_choice = self.max_choice.max(choice);
        if d > self.tolerance {
            self.failed += 1;
            if self.first_failure.is_none() {
                self.first_failure = Some(Failure {
                    index: self.next as u32,
                    kind: if fp >= choice {
                        FailureKind::Fingerprint
                    } else {
                        FailureKind::Choice
                    },
                    distance: d,
                });
            }
        }
        self.history.push(record.token);
        self.next += 1;
    }

    /// Records judged so far.
    pub fn judged(&self) -> usize {
        self.next
    }

    /// The replay's own records so far: the claimed positions and tokens with the
    /// fingerprints the replay computed (the auditor's side of a dispute).
    pub fn replayed(&self) -> &[TokenRecord] {
        &self.replayed
    }

    /// The verdict; `claimed` is the commitment the receipt carries.
    pub fn finish(self, claimed: &TranscriptCommitment, replay_ms: u32) -> Verdict {
        let commitment = TranscriptCommitment::from_records(&self.records);
        let mut first_failure = self.first_failure;
        if commitment != *claimed {
            first_failure = Some(Failure {
                index: 0,
                kind: FailureKind::Commitment,
                distance: 0.0,
            });
        }
        let positions = self.records.len() as u32;
        Verdict {
            passed: first_failure.is_none() && self.next == self.records.len(),
            positions,
            first_failure,
            failed_positions: self.failed,
            max_distance: self.max,
            mean_distance: if self.next == 0 {
                0.0
            } else {
                (self.sum / self.next as f64) as f32
            },
            max_fingerprint_distance: self.max_fp,
            max_choice_margin: self.max_choice,
            commitment,
            tolerance: self.tolerance,
            replay_ms,
        }
    }

    /// A verdict for records that failed their shape check before any replay.
    pub fn structural(
        records: &[TokenRecord],
        failure: Failure,
        tolerance: f32,
        claimed: &TranscriptCommitment,
    ) -> Verdict {
        let commitment = TranscriptCommitment::from_records(records);
        let failure = if commitment != *claimed {
            Failure {
                index: 0,
                kind: FailureKind::Commitment,
                distance: 0.0,
            }
        } else {
            failure
        };
        Verdict {
            passed: false,
            positions: records.len() as u32,
            first_failure: Some(failure),
            failed_positions: records.len() as u32,
            max_distance: MAX_DISTANCE,
            mean_distance: MAX_DISTANCE,
            max_fingerprint_distance: MAX_DISTANCE,
            max_choice_margin: MAX_DISTANCE,
            commitment,
            tolerance,
            replay_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampled(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn exact_fingerprints_have_zero_distance_and_shifted_ones_do_not() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32 * 0.07).collect();
        let fp = Fingerprint::from_logits(&logits);
        assert_eq!(fingerprint_distance(&logits, &fp), 0.0);
        let mut moved = logits.clone();
        let top = fp.ids[0] as usize;
        moved[top] += 0.5;
        let d = fingerprint_distance(&moved, &fp);
        assert!((d - (0.5 - LOGIT_GRID / 2.0)).abs() < 0.02, "{d}");
        // A token the claim left out that the replay ranks first.
        let mut hidden = logits.clone();
        let outsider = (0..100).find(|i| !fp.ids.contains(&(*i as u32))).unwrap();
        hidden[outsider] = 20.0;
        assert!(fingerprint_distance(&hidden, &fp) > 10.0);
        // Duplicated or out-of-vocabulary ids are as wrong as it gets.
        let mut dup = fp;
        dup.ids[1] = dup.ids[0];
        assert_eq!(fingerprint_distance(&logits, &dup), MAX_DISTANCE);
        let mut oov = fp;
        oov.ids[3] = 1000;
        assert_eq!(fingerprint_distance(&logits, &oov), MAX_DISTANCE);
    }

    #[test]
    fn greedy_margin_is_half_the_gap_to_the_argmax() {
        let logits = [1.0, 3.0, 2.0, 2.9];
        let g = SamplingParams::greedy();
        assert_eq!(choice_margin(&logits, 1, None, &g), 0.0);
        assert!((choice_margin(&logits, 3, None, &g) - 0.05).abs() < 1e-6);
        assert!((choice_margin(&logits, 0, None, &g) - 1.0).abs() < 1e-6);
        assert_eq!(choice_margin(&logits, 9, None, &g), MAX_DISTANCE);
    }

    proptest! {
        /// Whatever the sampler draws from exact logits has margin 0; with the same logits and
        /// draw, a token the sampler did not choose has a positive margin unless near a boundary.
        #[test]
        fn the_samplers_own_choice_always_passes(
            seed in 0u64..1000,
            t in 0.2f32..2.0,
            top_k in prop_oneof![Just(0u32), 1u32..20],
            top_p in prop_oneof![Just(1.0f32), 0.3f32..1.0],
            raw in proptest::collection::vec(-5.0f32..5.0, 2..60),
        ) {
            let params = sampled(t, top_k, top_p, seed);
            let mut sampler = Sampler::new(params.clone());
            let mut probe = Sampler::new(params.clone());
            for _ in 0..5 {
                let chosen = sampler.sample(&mut raw.clone(), &[]);
                let u = probe.draw();
                prop_assert_eq!(choice_margin(&raw, chosen, u, &params), 0.0);
            }
        }
    }

    #[test]
    fn an_unlikely_claimed_token_needs_a_large_move() {
        // Token 0 holds nearly all the mass; claiming token 2 needs the logits to move a lot.
        let logits = [8.0, 0.0, -4.0];
        let params = sampled(1.0, 0, 1.0, 5);
        let mut probe = Sampler::new(params.clone());
        let u = probe.draw();
        let m = choice_margin(&logits, 2, u, &params);
        assert!(m > 2.0, "{m}");
        // Slightly perturbed honest logits stay within a small margin.
        let mut sampler = Sampler::new(params.clone());
        let chosen = sampler.sample(&mut logits.to_vec(), &[]);
        let nudged = [8.001, -0.001, -4.0];
        assert!(choice_margin(&nudged, chosen, u, &params) < 0.01);
    }

    #[test]
    fn judge_passes_an_exact_transcript_and_names_the_first_bad_position() {
        let prompt = [1u32, 2, 3];
        let params = sampled(0.8, 0, 1.0, 9);
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|r| {
                (0..40)
                    .map(|i| (((i * 13 + r * 7) % 17) as f32) * 0.3)
                    .collect()
            })
            .collect();
        let mut sampler = Sampler::new(params.clone());
        let mut history = prompt.to_vec();
        let mut records = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let fingerprint = Fingerprint::from_logits(row);
            let token = sampler.sample(&mut row.clone(), &history);
            records.push(TokenRecord {
                position: (prompt.len() + i) as u32,
                token,
                fingerprint,
            });
            history.push(token);
        }
        let root = TranscriptCommitment::from_records(&records);
        let mut judge = Judge::new(&prompt, &records, &params, 0.05);
        rows.iter().for_each(|r| judge.push(r));
        let v = judge.finish(&root, 1);
        assert!(v.passed, "{}", v.summary());
        assert_eq!(v.max_distance, 0.0);

        // Replayed logits that differ at position 4 by a full logit fail there.
        let mut judge = Judge::new(&prompt, &records, &params, 0.05);
        for (i, r) in rows.iter().enumerate() {
            let mut r = r.clone();
            if i == 4 {
                r.iter_mut()
                    .enumerate()
                    .for_each(|(j, l)| *l += (j % 3) as f32);
            }
            judge.push(&r);
        }
        let v = judge.finish(&root, 1);
        assert!(!v.passed);
        assert_eq!(v.first_failure.map(|f| f.index), Some(4));

        // A commitment that does not match the records fails as such.
        let judge = Judge::new(&prompt, &records, &params, 0.05);
        let v = judge.finish(&TranscriptCommitment([0; 32]), 1);
        assert_eq!(
            v.first_failure.map(|f| f.kind),
            Some(FailureKind::Commitment)
        );

        assert_eq!(
            Judge::check_shape(2, &records, 40).map(|f| f.kind),
            Some(FailureKind::Position)
        );
        assert_eq!(
            Judge::check_shape(3, &records, 2).map(|f| f.kind),
            Some(FailureKind::TokenOutOfVocabulary)
        );
    }
}
