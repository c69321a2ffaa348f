//! Node adverts: what a node serves, at what price, how loaded it is and how fast it has
//! been. Signed by the node's key, gossiped on [`ADVERTS_TOPIC`], re-published on load
//! changes and every heartbeat; a node leaving publishes one with [`AdvertStatus::Leaving`],
//! and a silent node's last advert expires after its TTL.

use crate::money::{Address, Price};
use crate::signed::{SignatureError, Signed, SignedMessage};
use crate::wire::{decode, encode, WireError, PROTOCOL_VERSION};
use crate::ModuleId;
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

/// Gossipsub topic of adverts and load heartbeats.
pub const ADVERTS_TOPIC: &str = "tessera/adverts/1";
/// Largest encoded advert, far under gossipsub's 64 KiB message limit.
pub const MAX_ADVERT_BYTES: usize = 8 * 1024;
/// Most modules one advert lists.
pub const MAX_MODULES: usize = 16;
/// Most listen addresses one advert lists.
pub const MAX_ADDRS: usize = 8;
/// Longest alias or address, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Shortest and longest TTL a node may ask for, in seconds.
pub const TTL_RANGE_SECS: std::ops::RangeInclusive<u32> = 2..=3600;
/// How far in the future an advert's clock may be before it is refused.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// Online, or saying goodbye.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdvertStatus {
    /// Serving; replaces any earlier advert of the node.
    Online,
    /// Leaving the network: drop the node now rather than at TTL.
    Leaving,
}

/// Jobs a node holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Generating now.
    pub running: u32,
    /// Admitted, waiting for the engine.
    pub waiting: u32,
}

/// Measured latency of one module on this node (p95 over recent jobs; `None` before any).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Jobs the figures are drawn from.
    pub samples: u32,
    /// 95th percentile time to first token, milliseconds.
    pub p95_ttft_ms: Option<u32>,
    /// 95th percentile time per output token after the first, microseconds.
    pub p95_tpot_us: Option<u32>,
}

/// One module on offer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleOffer {
    /// Family, quantization, context length and weights hash, in one id.
    pub module: ModuleId,
    /// Name people use (`smollm2-135m-instruct`).
    pub alias: String,
    /// Asking price.
    pub price: Price,
    /// Measured speed.
    pub latency: LatencyStats,
    /// The engine's arithmetic (kernel generation, e.g. `tessera-tiles-2`): replays are
    /// exact only between nodes of the same numerics, so auditors are chosen among them.
    pub numerics: String,
}

/// What a node tells the network about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeAdvert {
    /// Wire protocol version the node speaks.
    pub version: u16,
    /// The node; must be the signer.
    pub node: PeerId,
    /// Increases with every advert of this node; older ones are ignored.
    pub seq: u64,
    /// When it was made (unix milliseconds, node's clock).
    pub timestamp_ms: u64,
    /// Seconds after `timestamp_ms` during which it stays valid without a newer one.
    pub ttl_secs: u32,
    /// Online or leaving.
    pub status: AdvertStatus,
    /// Where the node is paid.
    pub payout: Address,
    /// Multiaddrs the node listens on (as text), so a receiver can dial it.
    pub addrs: Vec<String>,
    /// What it serves.
    pub modules: Vec<ModuleOffer>,
    /// Most jobs it admits at once (running and waiting).
    pub capacity: u32,
    /// Jobs held now.
    pub load: Load,
    /// Tokens generated since the node started (a counter; shows progress between adverts).
    pub tokens_generated: u64,
}

impl SignedMessage for NodeAdvert {
    const DOMAIN: &'static [u8] = b"tessera/advert/1";
}

/// Why an advert was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdvertError {
    /// Bytes that are not an advert, or too many of them.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Signature or signer problem.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// Signed by a key other than the node it names.
    #[error("advert names node {named} but is signed by {signer}")]
    WrongSigner {
        /// Node in the body.
        named: String,
        /// Key that signed.
        signer: String,
    },
    /// From another protocol version.
    #[error("advert speaks protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// Dated in the future beyond the allowed skew.
    #[error("advert is dated {ahead_ms} ms in the future")]
    FromTheFuture {
        /// How far ahead.
        ahead_ms: u64,
    },
    /// Older than its TTL.
    #[error("advert expired {late_ms} ms ago")]
    Expired {
        /// How long ago.
        late_ms: u64,
    },
    /// A field over its limit or out of range.
    #[error("advert field {0} is out of bounds")]
    Bounds(&'static str),
}

impl NodeAdvert {
    /// Unix milliseconds at which this advert lapses.
    pub fn expires_at_ms(&self) -> u64 {
        self.timestamp_ms
            .saturating_add(u64::from(self.ttl_secs) * 1000)
    }

    fn check_bounds(&self) -> Result<(), AdvertError> {
        if !TTL_RANGE_SECS.contains(&self.ttl_secs) {
            return Err(AdvertError::Bounds("ttl_secs"));
        }
        if self.modules.len() > MAX_MODULES {
            return Err(AdvertError::Bounds("modules"));
        }
        if self.addrs.len() > MAX_ADDRS || self.addrs.iter().any(|a| a.len() > MAX_NAME_BYTES) {
            return Err(AdvertError::Bounds("addrs"));
        }
        if self.modules.iter().any(|m| m.alias.len() > MAX_NAME_BYTES) {
            return Err(AdvertError::Bounds("alias"));
        }
        if self.load.running.saturating_add(self.load.waiting) > self.capacity {
            return Err(AdvertError::Bounds("load"));
        }
        Ok(())
    }
}

/// Signs and encodes `advert` for gossip, refusing one over [`MAX_ADVERT_BYTES`].
pub fn encode_advert(
    advert: NodeAdvert,
    key: &libp2p_identity::Keypair,
) -> Result<Vec<u8>, AdvertError> {
    advert.check_bounds()?;
    let signed = Signed::sign(advert, key)?;
    Ok(encode(&signed, MAX_ADVERT_BYTES)?)
}

/// Decodes and checks gossiped bytes at `now_ms`: size, encoding, version, signature,
/// signer, clock and bounds. Only an advert that passes all of them is returned.
pub fn decode_advert(bytes: &[u8], now_ms: u64) -> Result<NodeAdvert, AdvertError> {
    let signed: Signed<NodeAdvert> = decode(bytes, MAX_ADVERT_BYTES)?;
    let signer = signed.verify()?;
    let advert = signed.body;
    if advert.node != signer {
        return Err(AdvertError::WrongSigner {
            named: advert.node.to_string(),
            signer: signer.to_string(),
        });
    }
    if advert.version != PROTOCOL_VERSION {
        return Err(AdvertError::Version(advert.version));
    }
    advert.check_bounds()?;
    if advert.timestamp_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(AdvertError::FromTheFuture {
            ahead_ms: advert.timestamp_ms - now_ms,
        });
    }
    if advert.expires_at_ms() < now_ms {
        return Err(AdvertError::Expired {
            late_ms: now_ms - advert.expires_at_ms(),
        });
    }
    Ok(advert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Amount;
    use crate::{Quantization, WeightsHash};
    use libp2p_identity::Keypair;

    pub(crate) fn sample(key: &Keypair, modules: usize) -> NodeAdvert {
        let module = ModuleId::new(
            "llama",
            Quantization::from_gguf_file_type(3),
            8192,
            WeightsHash([7; 32]),
        )
        .expect("module id");
        NodeAdvert {
            version: PROTOCOL_VERSION,
            node: key.public().to_peer_id(),
            seq: 1,
            timestamp_ms: 1_000_000,
            ttl_secs: 30,
            status: AdvertStatus::Online,
            payout: Address([1; 20]),
            addrs: vec![
                "/ip4/127.0.0.1/tcp/4001".into(),
                "/ip4/127.0.0.1/udp/4001/quic-v1".into(),
            ],
            modules: (0..modules)
                .map(|_| ModuleOffer {
                    module: module.clone(),
                    alias: "smollm2-135m-instruct".into(),
                    price: Price {
                        per_1k_input: Amount(1_000_000_000_000),
                        per_1k_output: Amount(4_000_000_000_000),
                    },
                    latency: LatencyStats {
                        samples: 20,
                        p95_ttft_ms: Some(120),
                        p95_tpot_us: Some(15_000),
                    },
                    numerics: "tessera-tiles-2".into(),
                })
                .collect(),
            capacity: 4,
            load: Load {
                running: 1,
                waiting: 2,
            },
            tokens_generated: 12345,
        }
    }

    #[test]
    fn a_full_advert_fits_well_under_the_cap() {
        let key = Keypair::generate_ed25519();
        let mut advert = sample(&key, MAX_MODULES);
        advert.addrs = vec!["/ip6/2001:db8::1/udp/65535/quic-v1/p2p/12D3KooWQYV9dGMFoRzNStwpXztXaBUjtPqi6aU76ZgUriHhKust".into(); MAX_ADDRS];
        let bytes = encode_advert(advert.clone(), &key).expect("encode");
        assert!(bytes.len() < MAX_ADVERT_BYTES / 2, "{} bytes", bytes.len());
        assert_eq!(decode_advert(&bytes, 1_000_000).expect("decode"), advert);
    }

    #[test]
    fn adverts_are_checked_for_signer_clock_and_bounds() {
        let key = Keypair::generate_ed25519();
        let good = encode_advert(sample(&key, 1), &key).expect("encode");
        assert!(decode_advert(&good, 1_000_000 + 29_000).is_ok());
        assert!(matches!(
            decode_advert(&good, 1_000_000 + 31_000),
            Err(AdvertError::Expired { .. })
        ));
        assert!(matches!(
            decode_advert(&good, 1_000),
            Err(AdvertError::FromTheFuture { .. })
        ));

        let other = Keypair::generate_ed25519();
        let forged = encode_advert(sample(&key, 1), &other).expect("encode");
        assert!(matches!(
            decode_advert(&forged, 1_000_000),
            Err(AdvertError::WrongSigner { .. })
        ));

        let mut tampered = good.clone();
        let n = tampered.len();
        tampered[n / 2] ^= 1;
        assert!(decode_advert(&tampered, 1_000_000).is_err());

        let mut too_many = sample(&key, MAX_MODULES + 1);
        assert!(matches!(
            encode_advert(too_many.clone(), &key),
            Err(AdvertError::Bounds("modules"))
        ));
        too_many.modules.truncate(1);
        too_many.ttl_secs = 0;
        assert!(matches!(
            encode_advert(too_many, &key),
            Err(AdvertError::Bounds("ttl_secs"))
        ));

        assert!(decode_advert(&[0xff; 100], 1_000_000).is_err());
        assert!(matches!(
            decode_advert(&vec![1u8; MAX_ADVERT_BYTES + 1], 1_000_000),
            Err(AdvertError::Wire(WireError::TooLarge { .. }))
        ));
    }
}
