//! Transcript commitments: for every generated position, the chosen token and a compact
//! fingerprint of the logits, hashed with blake3 into a Merkle root. A node commits to the
//! root in its receipt; a verifier that replays the transcript recomputes the fingerprints,
//! and a single position can be proved against the root with a [`MerkleProof`].
//!
//! Hashing rules (version 1, domain-separated so a leaf can never pass for a node):
//! - leaf  = blake3(0x00 ‖ record bytes), record bytes as in [`TokenRecord::to_bytes`];
//! - node  = blake3(0x01 ‖ left ‖ right); an odd node at the end of a level is promoted as is;
//! - root  = blake3(0x02 ‖ u64-le record count ‖ top node), or blake3(0x02 ‖ 0u64) when empty.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Number of top logits kept in each position's fingerprint.
pub const FINGERPRINT_TOP_K: usize = 8;

/// Logits are rounded to multiples of this before committing: fine enough that a verifier
/// sees deviations of a few hundredths of a logit (what a substituted quantization causes),
/// coarse enough that a fingerprint is a small integer. The verifier allows half a step of
/// rounding slack on top of its tolerance.
pub const LOGIT_GRID: f32 = 1.0 / 64.0;

/// The k most likely tokens at one position and their logits on the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Token ids, most likely first.
    pub ids: [u32; FINGERPRINT_TOP_K],
    /// Logits of those ids as integer multiples of [`LOGIT_GRID`].
    pub logits: [i32; FINGERPRINT_TOP_K],
}

impl Fingerprint {
    /// Takes the top-k of `logits` (ties broken by lower id) and rounds them to the grid.
    pub fn from_logits(logits: &[f32]) -> Self {
        let mut top: [(f32, u32); FINGERPRINT_TOP_K] =
            [(f32::NEG_INFINITY, u32::MAX); FINGERPRINT_TOP_K];
        for (id, &l) in logits.iter().enumerate() {
            let l = if l.is_nan() { f32::NEG_INFINITY } else { l };
            let last = top[FINGERPRINT_TOP_K - 1];
            if l > last.0 || (l == last.0 && (id as u32) < last.1) {
                let mut i = FINGERPRINT_TOP_K - 1;
                while i > 0
                    && (l > top[i - 1].0 || (l == top[i - 1].0 && (id as u32) < top[i - 1].1))
                {
                    top[i] = top[i - 1];
                    i -= 1;
                }
                top[i] = (l, id as u32);
            }
        }
        let mut fp = Self {
            ids: [u32::MAX; FINGERPRINT_TOP_K],
            logits: [i32::MIN; FINGERPRINT_TOP_K],
        };
        for (i, (l, id)) in top.into_iter().enumerate() {
            fp.ids[i] = id;
            fp.logits[i] = quantize_logit(l);
        }
        fp
    }
}

impl Fingerprint {
    /// How far apart two fingerprints of the same position must be, in logits, whatever
    /// the full logits were: a shared id's two values, or an id one lists above the other's
    /// lowest listed value (the other says every unlisted id is at most that). Both sides'
    /// rounding is allowed for. Lets a coordinator check an auditor's pass against the
    /// auditor's own replayed records without a model.
    pub fn gap(&self, other: &Fingerprint) -> f32 {
        let listed = |f: &Fingerprint| {
            f.ids
                .iter()
                .zip(&f.logits)
                .filter(|(&id, _)| id != u32::MAX)
                .map(|(&id, &l)| (id, l as f32 * LOGIT_GRID))
                .collect::<Vec<_>>()
        };
        let (a, b) = (listed(self), listed(other));
        let floor = |v: &[(u32, f32)]| v.iter().map(|x| x.1).fold(f32::INFINITY, f32::min);
        let (fa, fb) = (floor(&a), floor(&b));
        let one_way = |x: &[(u32, f32)], y: &[(u32, f32)], y_floor: f32| {
            x.iter()
                .map(|&(id, v)| match y.iter().find(|p| p.0 == id) {
                    Some(&(_, w)) => (v - w).abs(),
                    None => v - y_floor,
                })
                .fold(0f32, f32::max)
        };
        let d = one_way(&a, &b, fb).max(one_way(&b, &a, fa)) - LOGIT_GRID;
        if d.is_nan() {
            f32::INFINITY
        } else {
            d.max(0.0)
        }
    }
}

/// Rounds a logit onto the commitment grid, saturating at the i32 range.
pub fn quantize_logit(l: f32) -> i32 {
    if l.is_nan() {
        return i32::MIN;
    }
    // `as` saturates for out-of-range floats and infinities.
    (l / LOGIT_GRID).round() as i32
}

/// What the transcript records about one generated position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Absolute position of the token in the sequence (prompt tokens come first).
    pub position: u32,
    /// The token the sampler chose.
    pub token: u32,
    /// The logits the choice was made from.
    pub fingerprint: Fingerprint,
}

/// Size of [`TokenRecord::to_bytes`].
pub const RECORD_BYTES: usize = 8 + FINGERPRINT_TOP_K * 8;

impl TokenRecord {
    /// Canonical little-endian encoding: position, token, then (id, logit) pairs.
    pub fn to_bytes(&self) -> [u8; RECORD_BYTES] {
        let mut out = [0u8; RECORD_BYTES];
        out[0..4].copy_from_slice(&self.position.to_le_bytes());
        out[4..8].copy_from_slice(&self.token.to_le_bytes());
        for i in 0..FINGERPRINT_TOP_K {
            let o = 8 + i * 8;
            out[o..o + 4].copy_from_slice(&self.fingerprint.ids[i].to_le_bytes());
            out[o + 4..o + 8].copy_from_slice(&self.fingerprint.logits[i].to_le_bytes());
        }
        out
    }

    /// Merkle leaf hash of this record.
    pub fn leaf_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&[0x00]);
        h.update(&self.to_bytes());
        *h.finalize().as_bytes()
    }
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[0x01]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

fn seal(count: u64, top: Option<&[u8; 32]>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[0x02]);
    h.update(&count.to_le_bytes());
    if let Some(top) = top {
        h.update(top);
    }
    *h.finalize().as_bytes()
}

/// The Merkle root over a transcript's records: what receipts sign.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct TranscriptCommitment(pub [u8; 32]);

impl TranscriptCommitment {
    /// Commits to `records` in order.
    pub fn from_records(records: &[TokenRecord]) -> Self {
        let leaves: Vec<[u8; 32]> = records.iter().map(TokenRecord::leaf_hash).collect();
        Self::from_leaves(&leaves)
    }

    /// Commits to precomputed leaf hashes (lets a generator hash each record as it goes).
    pub fn from_leaves(leaves: &[[u8; 32]]) -> Self {
        if leaves.is_empty() {
            return Self(seal(0, None));
        }
        let mut level = leaves.to_vec();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    [single] => *single,
                    _ => unreachable!("chunks(2) yields one or two items"),
                })
                .collect();
        }
        Self(seal(leaves.len() as u64, Some(&level[0])))
    }

    /// Proof that the record at `index` is in the transcript of `records`.
    pub fn prove(records: &[TokenRecord], index: usize) -> Option<MerkleProof> {
        if index >= records.len() {
            return None;
        }
        let mut level: Vec<[u8; 32]> = records.iter().map(TokenRecord::leaf_hash).collect();
        let mut idx = index;
        let mut siblings = Vec::new();
        while level.len() > 1 {
            let sib = idx ^ 1;
            if sib < level.len() {
                siblings.push(level[sib]);
            }
            level = level
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    [single] => *single,
                    _ => unreachable!("chunks(2) yields one or two items"),
                })
                .collect();
            idx /= 2;
        }
        Some(MerkleProof {
            index: index as u64,
            count: records.len() as u64,
            siblings,
        })
    }

    /// Hex form for logs, JSON and receipts.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for TranscriptCommitment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TranscriptCommitment({})", self.to_hex())
    }
}

impl fmt::Display for TranscriptCommitment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl From<TranscriptCommitment> for String {
    fn from(c: TranscriptCommitment) -> Self {
        c.to_hex()
    }
}

impl TryFrom<String> for TranscriptCommitment {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out)
            .map_err(|_| format!("transcript commitment must be 64 hex digits, got {s:?}"))?;
        Ok(Self(out))
    }
}

/// Membership proof of one record: the sibling hashes from leaf to top.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleProof {
    /// Index of the record in the transcript.
    pub index: u64,
    /// Number of records in the transcript.
    pub count: u64,
    /// Sibling hashes, leaf level first; levels where the node was promoted have none.
    pub siblings: Vec<[u8; 32]>,
}

impl MerkleProof {
    /// Checks that `record` sits at `self.index` under `root`.
    pub fn verify(&self, record: &TokenRecord, root: &TranscriptCommitment) -> bool {
        if self.index >= self.count {
            return false;
        }
        let mut hash = record.leaf_hash();
        let (mut idx, mut len) = (self.index, self.count);
        let mut sibs = self.siblings.iter();
        while len > 1 {
            let sib = idx ^ 1;
            if sib < len {
                let Some(s) = sibs.next() else { return false };
                hash = if idx % 2 == 0 {
                    node_hash(&hash, s)
                } else {
                    node_hash(s, &hash)
                };
            }
            idx /= 2;
            len = len.div_ceil(2);
        }
        sibs.next().is_none() && seal(self.count, Some(&hash)) == root.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(i: u32) -> TokenRecord {
        let logits: Vec<f32> = (0..50)
            .map(|j| ((i * 31 + j * 17) % 23) as f32 * 0.3)
            .collect();
        TokenRecord {
            position: 10 + i,
            token: i % 7,
            fingerprint: Fingerprint::from_logits(&logits),
        }
    }

    #[test]
    fn fingerprint_keeps_the_top_k_in_order_with_lowest_id_on_ties() {
        let logits = [0.0, 5.0, 1.0, 5.0, -2.0, 3.0, 3.0, 2.0, 7.5, 0.5];
        let fp = Fingerprint::from_logits(&logits);
        assert_eq!(fp.ids, [8, 1, 3, 5, 6, 7, 2, 9]);
        assert_eq!(fp.logits[0], 480);
        assert_eq!(fp.logits[1], 320);
    }

    #[test]
    fn the_gap_between_fingerprints_bounds_their_logit_distance() {
        let logits: Vec<f32> = (0..40).map(|i| ((i * 7) % 13) as f32 * 0.5).collect();
        let fp = Fingerprint::from_logits(&logits);
        assert_eq!(fp.gap(&fp), 0.0);
        let mut moved = logits.clone();
        moved[fp.ids[0] as usize] += 1.0;
        let g = fp.gap(&Fingerprint::from_logits(&moved));
        assert!((0.9..=1.0).contains(&g), "{g}");
        // An id listed on one side only, far above the other side's lowest value.
        let mut other = logits.clone();
        let outsider = (0..40u32)
            .find(|i| !fp.ids.contains(i))
            .expect("unlisted id");
        other[outsider as usize] = 30.0;
        assert!(fp.gap(&Fingerprint::from_logits(&other)) > 20.0);
    }

    #[test]
    fn fingerprint_of_short_vocab_pads_with_sentinels() {
        let fp = Fingerprint::from_logits(&[1.0, 2.0]);
        assert_eq!(&fp.ids[..3], &[1, 0, u32::MAX]);
        assert_eq!(fp.logits[2], quantize_logit(f32::NEG_INFINITY));
    }

    #[test]
    fn commitment_changes_with_any_record_and_with_order() {
        let recs: Vec<_> = (0..5).map(record).collect();
        let root = TranscriptCommitment::from_records(&recs);
        let mut swapped = recs.clone();
        swapped.swap(1, 2);
        assert_ne!(root, TranscriptCommitment::from_records(&swapped));
        let mut changed = recs.clone();
        changed[4].fingerprint.logits[7] += 1;
        assert_ne!(root, TranscriptCommitment::from_records(&changed));
        assert_ne!(root, TranscriptCommitment::from_records(&recs[..4]));
        assert_ne!(
            TranscriptCommitment::from_records(&[]),
            TranscriptCommitment::from_records(&recs[..1])
        );
    }

    #[test]
    fn tampered_proofs_fail() {
        let recs: Vec<_> = (0..6).map(record).collect();
        let root = TranscriptCommitment::from_records(&recs);
        let mut proof = TranscriptCommitment::prove(&recs, 3).expect("in range");
        assert!(proof.verify(&recs[3], &root));
        assert!(!proof.verify(&recs[2], &root));
        proof.siblings[0][0] ^= 1;
        assert!(!proof.verify(&recs[3], &root));
        assert!(TranscriptCommitment::prove(&recs, 6).is_none());
    }

    proptest! {
        #[test]
        fn every_record_proves_against_the_root(n in 1usize..70) {
            let recs: Vec<_> = (0..n as u32).map(record).collect();
            let root = TranscriptCommitment::from_records(&recs);
            for (i, r) in recs.iter().enumerate() {
                let p = TranscriptCommitment::prove(&recs, i).expect("in range");
                prop_assert!(p.verify(r, &root));
            }
        }
    }
}
