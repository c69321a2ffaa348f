//! A sparse Merkle tree of fixed depth 32 over keccak256, laid out so the EVM checks a
//! proof with nothing but `keccak256(abi.encodePacked(left, right))`:
//!
//! - 2^32 leaf slots, indexed by a `u32`; an empty slot holds 32 zero bytes;
//! - an inner node is `keccak256(left ‖ right)` (64 bytes in);
//! - `EMPTY[0]` is the zero leaf and `EMPTY[h + 1] = keccak256(EMPTY[h] ‖ EMPTY[h])`, the
//!   root of an empty subtree of height `h + 1`; the empty tree's root is `EMPTY[32]`;
//! - a proof lists the siblings from the leaf up, leaving out those equal to the empty
//!   subtree of their height, with bit `h` of a `u32` bitmap set when the sibling at
//!   height `h` is present. A leaf's index, read bit by bit from the bottom, says at each
//!   height whether the path goes right (1) or left (0).
//!
//! Only non-empty nodes are stored, so memory grows with the leaves set, and an update
//! rehashes the 32 nodes above one leaf.

use std::collections::HashMap;
use std::sync::OnceLock;

/// A 32-byte hash or leaf value.
pub type H256 = [u8; 32];

/// Levels between a leaf and the root.
pub const DEPTH: usize = 32;

/// keccak256, the EVM's hash.
pub fn keccak256(data: &[u8]) -> H256 {
    use tiny_keccak::Hasher;
    let mut k = tiny_keccak::Keccak::v256();
    k.update(data);
    let mut out = [0u8; 32];
    k.finalize(&mut out);
    out
}

/// An inner node: `keccak256(left ‖ right)`.
pub fn hash_pair(left: &H256, right: &H256) -> H256 {
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(left);
    buf[32..].copy_from_slice(right);
    keccak256(&buf)
}

/// `EMPTY[h]`: the root of an empty subtree of height `h` (0 = the zero leaf).
pub fn empty_hashes() -> &'static [H256; DEPTH + 1] {
    static EMPTY: OnceLock<[H256; DEPTH + 1]> = OnceLock::new();
    EMPTY.get_or_init(|| {
        let mut e = [[0u8; 32]; DEPTH + 1];
        for h in 0..DEPTH {
            e[h + 1] = hash_pair(&e[h], &e[h]);
        }
        e
    })
}

/// A membership proof for one leaf slot (which may be empty: that proves absence).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerkleProof {
    /// Bit `h` set: the sibling at height `h` is in `siblings`; clear: it is `EMPTY[h]`.
    pub bitmap: u32,
    /// The non-empty siblings, from the leaf's level up.
    pub siblings: Vec<H256>,
}

/// Why a proof could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The bitmap announces a different number of siblings than the proof carries.
    #[error("proof bitmap announces {announced} siblings but {carried} are given")]
    Malformed {
        /// Set bits in the bitmap.
        announced: u32,
        /// Siblings carried.
        carried: usize,
    },
}

impl MerkleProof {
    /// The root that `leaf` at `index` implies under this proof.
    pub fn root(&self, index: u32, leaf: &H256) -> Result<H256, ProofError> {
        if self.bitmap.count_ones() as usize != self.siblings.len() {
            return Err(ProofError::Malformed {
                announced: self.bitmap.count_ones(),
                carried: self.siblings.len(),
            });
        }
        let empty = empty_hashes();
        let mut present = self.siblings.iter();
        let mut node = *leaf;
        for (h, empty_h) in empty.iter().enumerate().take(DEPTH) {
            let sibling = if self.bitmap >> h & 1 == 1 {
                present.next().copied().unwrap_or(*empty_h)
            } else {
                *empty_h
            };
            node = if index >> h & 1 == 0 {
                hash_pair(&node, &sibling)
            } else {
                hash_pair(&sibling, &node)
            };
        }
        Ok(node)
    }

    /// Whether `leaf` sits at `index` in the tree whose root is `root`.
    pub fn verify(&self, root: &H256, index: u32, leaf: &H256) -> bool {
        self.root(index, leaf).is_ok_and(|r| &r == root)
    }

    /// Bytes a contract call carries for this proof (bitmap word + siblings).
    pub fn calldata_len(&self) -> usize {
        32 + 32 * self.siblings.len()
    }
}

/// The tree: every non-empty node by (height, index at that height).
#[derive(Clone, Debug, Default)]
pub struct SparseMerkleTree {
    nodes: HashMap<(u8, u32), H256>,
}

impl SparseMerkleTree {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    fn node(&self, height: usize, index: u32) -> H256 {
        self.nodes
            .get(&(height as u8, index))
            .copied()
            .unwrap_or(empty_hashes()[height])
    }

    /// The root hash.
    pub fn root(&self) -> H256 {
        self.node(DEPTH, 0)
    }

    /// The value in slot `index` (zero when empty).
    pub fn get(&self, index: u32) -> H256 {
        self.node(0, index)
    }

    /// How many slots hold a non-zero value.
    pub fn len(&self) -> usize {
        self.nodes.keys().filter(|(h, _)| *h == 0).count()
    }

    /// Whether every slot is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Sets slot `index` to `value` (zero empties it) and rehashes the path to the root.
    pub fn set(&mut self, index: u32, value: H256) {
        let empty = empty_hashes();
        let put = |nodes: &mut HashMap<(u8, u32), H256>, h: usize, i: u32, v: H256| {
            if v == empty[h] {
                nodes.remove(&(h as u8, i));
            } else {
                nodes.insert((h as u8, i), v);
            }
        };
        put(&mut self.nodes, 0, index, value);
        let mut i = index;
        let mut node = value;
        for h in 0..DEPTH {
            let sibling = self.node(h, i ^ 1);
            node = if i & 1 == 0 {
                hash_pair(&node, &sibling)
            } else {
                hash_pair(&sibling, &node)
            };
            i >>= 1;
            put(&mut self.nodes, h + 1, i, node);
        }
    }

    /// The proof for slot `index` against the current root.
    pub fn prove(&self, index: u32) -> MerkleProof {
        let empty = empty_hashes();
        let mut bitmap = 0u32;
        let mut siblings = Vec::new();
        let mut i = index;
        for (h, empty_h) in empty.iter().enumerate().take(DEPTH) {
            let sibling = self.node(h, i ^ 1);
            if sibling != *empty_h {
                bitmap |= 1 << h;
                siblings.push(sibling);
            }
            i >>= 1;
        }
        MerkleProof { bitmap, siblings }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn h(s: &str) -> H256 {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).expect("hex");
        out
    }

    /// The tree computed the slow way: recursively over the whole index space, skipping
    /// empty subtrees.
    fn naive_root(leaves: &BTreeMap<u32, H256>) -> H256 {
        fn go(leaves: &BTreeMap<u32, H256>, height: usize, start: u64) -> H256 {
            let span = 1u64 << height;
            let end = start + span;
            if leaves
                .range(start as u32..=(end - 1) as u32)
                .next()
                .is_none()
            {
                return empty_hashes()[height];
            }
            if height == 0 {
                return leaves[&(start as u32)];
            }
            let half = span / 2;
            hash_pair(
                &go(leaves, height - 1, start),
                &go(leaves, height - 1, start + half),
            )
        }
        go(leaves, DEPTH, 0)
    }

    #[test]
    fn keccak_is_the_evm_one_not_sha3() {
        assert_eq!(
            keccak256(b""),
            h("c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470")
        );
        assert_eq!(
            keccak256(b"abc"),
            h("4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45")
        );
    }

    #[test]
    fn the_empty_tree_has_the_precomputed_root_and_proves_absence() {
        let t = SparseMerkleTree::new();
        assert_eq!(t.root(), empty_hashes()[DEPTH]);
        assert_eq!(t.root(), naive_root(&BTreeMap::new()));
        let p = t.prove(12345);
        assert_eq!((p.bitmap, p.siblings.len()), (0, 0));
        assert!(p.verify(&t.root(), 12345, &[0; 32]));
        assert!(!p.verify(&t.root(), 12345, &[1; 32]));
    }

    #[test]
    fn emptying_a_slot_restores_the_earlier_root_and_frees_its_nodes() {
        let mut t = SparseMerkleTree::new();
        t.set(7, [7; 32]);
        let one = t.root();
        t.set(u32::MAX, [9; 32]);
        assert_ne!(t.root(), one);
        t.set(u32::MAX, [0; 32]);
        assert_eq!(t.root(), one);
        t.set(7, [0; 32]);
        assert!(t.is_empty(), "no node left behind");
        assert_eq!(t.root(), empty_hashes()[DEPTH]);
    }

    #[test]
    fn a_malformed_proof_is_an_error_not_a_panic() {
        let p = MerkleProof {
            bitmap: 0b11,
            siblings: vec![[1; 32]],
        };
        assert!(matches!(
            p.root(0, &[0; 32]),
            Err(ProofError::Malformed {
                announced: 2,
                carried: 1
            })
        ));
        assert!(!p.verify(&[0; 32], 0, &[0; 32]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn roots_match_the_naive_tree_and_every_proof_verifies(
            entries in proptest::collection::vec((prop_oneof![0u32..64, any::<u32>()], any::<[u8; 32]>()), 0..24),
            probe in any::<u32>(),
        ) {
            let mut t = SparseMerkleTree::new();
            let mut reference = BTreeMap::new();
            for (i, v) in &entries {
                t.set(*i, *v);
                if *v == [0; 32] { reference.remove(i); } else { reference.insert(*i, *v); }
            }
            let root = t.root();
            prop_assert_eq!(root, naive_root(&reference));
            prop_assert_eq!(t.len(), reference.len());
            for (i, v) in &reference {
                let p = t.prove(*i);
                prop_assert!(p.verify(&root, *i, v));
                prop_assert_eq!(p.calldata_len(), 32 + 32 * p.siblings.len());
                // Another value, or the same value at another slot, does not verify.
                let mut w = *v;
                w[0] ^= 1;
                prop_assert!(!p.verify(&root, *i, &w));
                prop_assert!(!p.verify(&root, i ^ 1, v) || t.get(i ^ 1) == *v);
            }
            // Any slot, set or not, has a proof of what it holds.
            let p = t.prove(probe);
            prop_assert!(p.verify(&root, probe, &t.get(probe)));
        }
    }
}
