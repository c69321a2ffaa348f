//! Batches: the transactions the sequencer posts to L1 with the state root after each
//! one, the *steps* commitment the contract keeps, and the single-step fraud proof a
//! watchtower builds when a posted root is wrong.
//!
//! Step `i` is the leaf `keccak256(keccak256(tx_i) ‖ root before ‖ root after)`; the
//! steps commitment is the binary keccak256 Merkle root of the step leaves, padded with
//! zero leaves to a power of two. The contract computes it from the calldata at
//! `submitBatch`, so the chain of roots it commits to is consistent by construction, and
//! a challenge names one step with a short path instead of re-sending the batch.

use crate::smt::{hash_pair, keccak256, H256};
use crate::state::{DepositQueue, State, Witness};
use crate::tx::{DecodeError, Tx};

/// A batch as posted: transactions and the state root after each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The root the batch starts from (the previous batch's last root).
    pub prev_root: H256,
    /// The transactions.
    pub txs: Vec<Tx>,
    /// The root after each transaction.
    pub roots: Vec<H256>,
}

/// Why posted batch data cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The transaction bytes do not decode.
    #[error("batch transaction data: {0}")]
    Data(#[from] DecodeError),
    /// Transactions and roots differ in number.
    #[error("batch carries {txs} transactions but {roots} roots")]
    Count {
        /// Transactions.
        txs: usize,
        /// Roots.
        roots: usize,
    },
    /// A batch needs at least one transaction.
    #[error("empty batch")]
    Empty,
}

/// A single-step fraud proof: the step, its place under the steps commitment, and the
/// leaves the transaction touches with their proofs against the root before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FraudProof {
    /// The step's index in the batch.
    pub step: u32,
    /// The transaction's encoding.
    pub tx: Vec<u8>,
    /// The root before the step, as posted.
    pub pre_root: H256,
    /// The root after the step, as posted (the wrong one).
    pub post_root: H256,
    /// Siblings of the step leaf under the steps commitment, from the bottom.
    pub step_path: Vec<H256>,
    /// The leaves the transaction reads and writes.
    pub witnesses: Vec<Witness>,
}

impl Batch {
    /// Applies `txs` to `state` and records the roots: what the sequencer posts.
    pub fn build(state: &mut State, txs: Vec<Tx>, queue: &(impl DepositQueue + ?Sized)) -> Self {
        let prev_root = state.root();
        let roots = txs
            .iter()
            .map(|tx| {
                state.apply(tx, queue);
                state.root()
            })
            .collect();
        Self {
            prev_root,
            txs,
            roots,
        }
    }

    /// Reads a batch from what L1 holds: the previous root, the transaction bytes and
    /// the roots.
    pub fn from_posted(prev_root: H256, data: &[u8], roots: Vec<H256>) -> Result<Self, BatchError> {
        let txs = Tx::decode_all(data)?;
        if txs.is_empty() {
            return Err(BatchError::Empty);
        }
        if txs.len() != roots.len() {
            return Err(BatchError::Count {
                txs: txs.len(),
                roots: roots.len(),
            });
        }
        Ok(Self {
            prev_root,
            txs,
            roots,
        })
    }

    /// The transaction bytes, back to back.
    pub fn data(&self) -> Vec<u8> {
        Tx::encode_all(&self.txs)
    }

    /// The root after the last transaction.
    pub fn new_root(&self) -> H256 {
        self.roots.last().copied().unwrap_or(self.prev_root)
    }

    /// The root before step `i`.
    pub fn pre_root(&self, i: usize) -> H256 {
        if i == 0 {
            self.prev_root
        } else {
            self.roots[i - 1]
        }
    }

    /// Step `i`'s leaf.
    pub fn step_leaf(&self, i: usize) -> H256 {
        step_leaf(&self.txs[i].encode(), &self.pre_root(i), &self.roots[i])
    }

    fn levels(&self) -> Vec<Vec<H256>> {
        let n = self.txs.len().max(1).next_power_of_two();
        let mut level: Vec<H256> = (0..n)
            .map(|i| {
                if i < self.txs.len() {
                    self.step_leaf(i)
                } else {
                    [0; 32]
                }
            })
            .collect();
        let mut levels = Vec::new();
        while level.len() > 1 {
            let up = level.chunks(2).map(|p| hash_pair(&p[0], &p[1])).collect();
            levels.push(std::mem::replace(&mut level, up));
        }
        levels.push(level);
        levels
    }

    /// The steps commitment.
    pub fn steps_root(&self) -> H256 {
        self.levels().last().map(|l| l[0]).unwrap_or([0; 32])
    }

    /// Step `i`'s path to the steps commitment.
    pub fn step_path(&self, i: usize) -> Vec<H256> {
        let levels = self.levels();
        let mut at = i;
        let mut path = Vec::new();
        for level in &levels[..levels.len() - 1] {
            path.push(level[at ^ 1]);
            at >>= 1;
        }
        path
    }

    /// Replays the batch from `state` (the state at `prev_root`). On success returns the
    /// state after it; at the first wrong root, the fraud proof of that step.
    pub fn check(
        &self,
        state: &State,
        queue: &(impl DepositQueue + ?Sized),
    ) -> Result<State, Box<FraudProof>> {
        let mut s = state.clone();
        for (i, tx) in self.txs.iter().enumerate() {
            let pre = s.clone();
            s.apply(tx, queue);
            if s.root() != self.roots[i] {
                return Err(Box::new(FraudProof {
                    step: i as u32,
                    tx: tx.encode(),
                    pre_root: self.pre_root(i),
                    post_root: self.roots[i],
                    step_path: self.step_path(i),
                    witnesses: pre.witnesses(tx, queue),
                }));
            }
        }
        Ok(s)
    }
}

/// `keccak256(keccak256(tx) ‖ pre ‖ post)`.
pub fn step_leaf(tx: &[u8], pre: &H256, post: &H256) -> H256 {
    let mut b = [0u8; 96];
    b[..32].copy_from_slice(&keccak256(tx));
    b[32..64].copy_from_slice(pre);
    b[64..].copy_from_slice(post);
    keccak256(&b)
}

/// Whether `leaf` is step `index` under `root` by `path`.
pub fn verify_step(root: &H256, index: u32, leaf: &H256, path: &[H256]) -> bool {
    let mut node = *leaf;
    for (h, sibling) in path.iter().enumerate() {
        node = if index >> h & 1 == 0 {
            hash_pair(&node, sibling)
        } else {
            hash_pair(sibling, &node)
        };
    }
    path.len() < 32 && index >> path.len() == 0 && &node == root
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leaf::DELEGATION_BASE;
    use crate::state::tests::{World, DOMAIN, FEE_OWNER};
    use crate::state::Outcome;
    use crate::tx::Action;

    #[test]
    fn every_step_is_provable_under_the_steps_commitment() {
        for n in [1usize, 2, 3, 5, 8, 13] {
            let mut w = World::new(100);
            let txs: Vec<Tx> = (0..n)
                .map(|i| w.queue_deposit(1 + (i % 3) as u8, 10))
                .collect();
            let batch = Batch::build(&mut w.state, txs, &w.queue);
            assert_eq!(batch.roots.len(), n);
            let root = batch.steps_root();
            for i in 0..n {
                let path = batch.step_path(i);
                assert_eq!(path.len(), n.next_power_of_two().trailing_zeros() as usize);
                assert!(verify_step(&root, i as u32, &batch.step_leaf(i), &path));
                assert!(!verify_step(&root, (i as u32) ^ 1, &batch.step_leaf(i), &path) || n == 1);
            }
            let again = Batch::from_posted(batch.prev_root, &batch.data(), batch.roots.clone())
                .expect("decodes");
            assert_eq!(again, batch);
        }
    }

    #[test]
    fn a_wrong_root_is_found_at_its_step_with_a_proof_that_the_honest_replay_refutes() {
        let mut w = World::new(100);
        let genesis = w.state.clone();
        let mut txs = vec![w.queue_deposit(1, 1_000), w.queue_deposit(2, 50)];
        txs.push(Tx::Settle {
            payer: 2,
            node: 3,
            amount: 400,
            receipts_root: [3; 32],
        });
        let mut batch = Batch::build(&mut w.state, txs, &w.queue);
        assert!(
            batch.check(&genesis, &w.queue).is_ok(),
            "an honest batch replays"
        );
        // A sequencer that pays the node twice: its root after step 2 is wrong, and so
        // is every root after it.
        let mut cheat = genesis.clone();
        for tx in &batch.txs[..2] {
            cheat.apply(tx, &w.queue);
        }
        let double = Tx::Settle {
            payer: 2,
            node: 3,
            amount: 800,
            receipts_root: [3; 32],
        };
        assert_eq!(cheat.apply(&double, &w.queue), Outcome::Applied);
        batch.roots[2] = cheat.root();
        let proof = batch.check(&genesis, &w.queue).expect_err("caught");
        assert_eq!(proof.step, 2);
        assert_eq!(proof.post_root, cheat.root());
        assert!(verify_step(
            &batch.steps_root(),
            2,
            &step_leaf(&proof.tx, &proof.pre_root, &proof.post_root),
            &proof.step_path
        ));
        assert_eq!(
            proof.witnesses.iter().map(|x| x.slot).collect::<Vec<_>>(),
            vec![0, 2, 3, 1]
        );
    }

    #[test]
    fn batch_data_that_does_not_decode_or_count_is_refused() {
        assert_eq!(
            Batch::from_posted([0; 32], &[], vec![]),
            Err(BatchError::Empty)
        );
        let data = Tx::encode_all(&[Tx::Epoch { epoch: 1 }]);
        assert_eq!(
            Batch::from_posted([0; 32], &data, vec![]),
            Err(BatchError::Count { txs: 1, roots: 0 })
        );
        assert!(matches!(
            Batch::from_posted([0; 32], &[99], vec![[0; 32]]),
            Err(BatchError::Data(_))
        ));
        let _ = (
            DOMAIN,
            FEE_OWNER,
            DELEGATION_BASE,
            Action::Stake { amount: 1 },
        );
    }
}
