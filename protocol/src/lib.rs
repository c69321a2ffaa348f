//! The vocabulary every Tessera crate speaks: module ids, sampling parameters, transcript
//! commitments, money, signed messages, and the wire protocol between nodes and
//! coordinators (adverts, jobs, receipts, framing). Kept small and dependency-light on
//! purpose (iroh-base is the model): the swarm itself lives in `tessera-net`.

pub mod advert;
pub mod audit;
pub mod bytes;
pub mod chat;
pub mod job;
pub mod module;
pub mod money;
pub mod sampling;
pub mod signed;
pub mod transcript;
pub mod wire;

pub use advert::{
    decode_advert, encode_advert, AdvertError, AdvertStatus, LatencyStats, Load, ModuleOffer,
    NodeAdvert, ADVERTS_TOPIC,
};
pub use audit::{Failure, FailureKind, ReplayClaim, Verdict};
pub use chat::ChatMessage;
pub use job::{
    ErrorCode, JobError, JobEvent, JobId, JobInput, JobRequest, JobResult, Receipt, Usage,
    JOB_PROTOCOL,
};
pub use libp2p_identity::{Keypair, PeerId};
pub use module::{ModuleId, ModuleIdError, Quantization, WeightsHash};
pub use money::{Address, Amount, Price};
pub use sampling::{FinishReason, SamplingParams, SamplingParamsError};
pub use signed::{SignatureError, Signed, SignedMessage};
pub use transcript::{
    Fingerprint, MerkleProof, TokenRecord, TranscriptCommitment, FINGERPRINT_TOP_K, LOGIT_GRID,
};
pub use wire::{WireError, PROTOCOL_VERSION};

/// The wall clock in unix milliseconds: the time base of adverts, deadlines and receipts.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
