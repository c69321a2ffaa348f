//! The vocabulary every Tessera crate speaks: module ids, sampling parameters and
//! transcript commitments. Kept small and dependency-light on purpose (iroh-base is the
//! model): anything with behaviour beyond encoding belongs in a higher crate.

pub mod module;
pub mod sampling;
pub mod transcript;

pub use module::{ModuleId, ModuleIdError, Quantization, WeightsHash};
pub use sampling::{FinishReason, SamplingParams, SamplingParamsError};
pub use transcript::{
    Fingerprint, MerkleProof, TokenRecord, TranscriptCommitment, FINGERPRINT_TOP_K, LOGIT_GRID,
};
