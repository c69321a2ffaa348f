//! Signed messages: a body, the ed25519 key that signed it, and the signature over a
//! domain tag followed by the body's postcard encoding. The domain tag keeps a signature on
//! one kind of message from being replayed as another; re-encoding the body to verify means
//! a receipt stored as JSON still verifies.

use libp2p_identity::{ed25519, Keypair, PeerId, PublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A message kind that is signed, with the domain tag its signatures commit to.
pub trait SignedMessage: Serialize + DeserializeOwned {
    /// Unique per message kind and version, e.g. `b"tessera/advert/1"`.
    const DOMAIN: &'static [u8];
}

/// An ed25519 signature (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::bytes::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::bytes::deserialize(d).map(Signature)
    }
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signer field is not a valid ed25519 public key.
    #[error("signer is not a valid ed25519 public key")]
    BadKey,
    /// The signature does not match the body and signer.
    #[error("signature does not verify")]
    Invalid,
    /// Signing needs an ed25519 key.
    #[error("only ed25519 keys can sign Tessera messages")]
    UnsupportedKey,
    /// The body could not be encoded (it always can for well-formed types).
    #[error("could not encode the signed body: {0}")]
    Encode(String),
}

/// A body with its signer and signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signed<T> {
    /// What was signed.
    pub body: T,
    /// The signer's ed25519 public key; the signer's peer id derives from it.
    #[serde(with = "crate::bytes")]
    pub signer: [u8; 32],
    /// Signature over `T::DOMAIN ‖ postcard(body)`.
    pub signature: Signature,
}

fn signing_bytes<T: SignedMessage>(body: &T) -> Result<Vec<u8>, SignatureError> {
    let mut bytes = T::DOMAIN.to_vec();
    let encoded = postcard::to_allocvec(body).map_err(|e| SignatureError::Encode(e.to_string()))?;
    bytes.extend_from_slice(&encoded);
    Ok(bytes)
}

impl<T: SignedMessage> Signed<T> {
    /// Signs `body` with `key` (an ed25519 identity).
    pub fn sign(body: T, key: &Keypair) -> Result<Self, SignatureError> {
        let ed = key
            .clone()
            .try_into_ed25519()
            .map_err(|_| SignatureError::UnsupportedKey)?;
        let sig = ed.sign(&signing_bytes(&body)?);
        let signature = Signature(sig.try_into().map_err(|_| SignatureError::Invalid)?);
        Ok(Self {
            body,
            signer: ed.public().to_bytes(),
            signature,
        })
    }

    /// The signer's peer id, without checking the signature.
    pub fn signer_peer(&self) -> Result<PeerId, SignatureError> {
        let key =
            ed25519::PublicKey::try_from_bytes(&self.signer).map_err(|_| SignatureError::BadKey)?;
        Ok(PublicKey::from(key).to_peer_id())
    }

    /// Checks the signature and returns the signer's peer id.
    pub fn verify(&self) -> Result<PeerId, SignatureError> {
        let key =
            ed25519::PublicKey::try_from_bytes(&self.signer).map_err(|_| SignatureError::BadKey)?;
        if !key.verify(&signing_bytes(&self.body)?, &self.signature.0) {
            return Err(SignatureError::Invalid);
        }
        Ok(PublicKey::from(key).to_peer_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Note {
        text: String,
    }
    impl SignedMessage for Note {
        const DOMAIN: &'static [u8] = b"tessera/test-note/1";
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Other {
        text: String,
    }
    impl SignedMessage for Other {
        const DOMAIN: &'static [u8] = b"tessera/test-other/1";
    }

    #[test]
    fn signature_binds_body_signer_and_domain() {
        let key = Keypair::generate_ed25519();
        let signed = Signed::sign(Note { text: "hi".into() }, &key).expect("sign");
        assert_eq!(signed.verify(), Ok(key.public().to_peer_id()));

        let mut tampered = signed.clone();
        tampered.body.text = "ho".into();
        assert_eq!(tampered.verify(), Err(SignatureError::Invalid));

        let mut other_signer = signed.clone();
        other_signer.signer = Keypair::generate_ed25519()
            .try_into_ed25519()
            .expect("ed25519")
            .public()
            .to_bytes();
        assert_eq!(other_signer.verify(), Err(SignatureError::Invalid));

        let replayed = Signed {
            body: Other { text: "hi".into() },
            signer: signed.signer,
            signature: signed.signature,
        };
        assert_eq!(
            replayed.verify(),
            Err(SignatureError::Invalid),
            "domain separation"
        );
    }

    #[test]
    fn json_round_trip_still_verifies() {
        let key = Keypair::generate_ed25519();
        let signed = Signed::sign(
            Note {
                text: "receipt".into(),
            },
            &key,
        )
        .expect("sign");
        let json = serde_json::to_string(&signed).expect("json");
        let back: Signed<Note> = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.verify(), Ok(key.public().to_peer_id()));
    }
}
