//! Module identity: the unit that is advertised, routed and priced. A module names a model
//! family, its quantization, the context length it is served with, and the exact weights
//! (blake3 of the GGUF file), so two nodes serving the same module id serve the same bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// blake3 of a model file; the identity of its exact weights.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WeightsHash(pub [u8; 32]);

impl WeightsHash {
    /// Hex form used in module ids, logs and file listings.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for WeightsHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WeightsHash({})", self.to_hex())
    }
}

impl fmt::Display for WeightsHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for WeightsHash {
    type Err = ModuleIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ModuleIdError::BadHash(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl From<blake3::Hash> for WeightsHash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

/// Quantization scheme of a model file, in llama.cpp's lower-case naming (`q4_1`, `q4_k_m`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Quantization(String);

impl Quantization {
    /// Maps GGUF's `general.file_type` (llama.cpp's `llama_ftype`) to its name.
    pub fn from_gguf_file_type(file_type: u32) -> Self {
        let name = match file_type {
            0 => "f32",
            1 => "f16",
            2 => "q4_0",
            3 => "q4_1",
            7 => "q8_0",
            8 => "q5_0",
            9 => "q5_1",
            10 => "q2_k",
            11 => "q3_k_s",
            12 => "q3_k_m",
            13 => "q3_k_l",
            14 => "q4_k_s",
            15 => "q4_k_m",
            16 => "q5_k_s",
            17 => "q5_k_m",
            18 => "q6_k",
            32 => "bf16",
            other => return Self(format!("ftype{other}")),
        };
        Self(name.to_owned())
    }

    /// The name as it appears in module ids.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Quantization {
    type Error = ModuleIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if is_token(&s) {
            Ok(Self(s))
        } else {
            Err(ModuleIdError::BadField("quantization", s))
        }
    }
}

impl From<Quantization> for String {
    fn from(q: Quantization) -> Self {
        q.0
    }
}

/// Why a module id string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleIdError {
    /// The string does not have the `family/quant/ctxN/b3-HASH` shape.
    #[error("malformed module id {0:?}: expected FAMILY/QUANT/ctxN/b3-HASH, e.g. llama/q4_1/ctx8192/b3-9f…")]
    Malformed(String),
    /// One field holds characters outside `[a-z0-9_.-]` or is empty.
    #[error("bad {0} in module id: {1:?}")]
    BadField(&'static str, String),
    /// The weights hash is not 64 hex digits.
    #[error("bad weights hash {0:?}: expected 64 hex digits")]
    BadHash(String),
}

/// A servable module: family, quantization, context length and exact weights.
///
/// Its string form, `llama/q4_1/ctx8192/b3-<64 hex>`, is what adverts, routes and receipts carry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModuleId {
    /// Model architecture family as named in GGUF (`llama`, `gemma3`).
    pub family: String,
    /// Quantization of the weights.
    pub quantization: Quantization,
    /// Context length (tokens) the module is served with.
    pub context_length: u32,
    /// blake3 of the GGUF file.
    pub weights: WeightsHash,
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

impl ModuleId {
    /// Builds a module id, checking the family name's alphabet.
    pub fn new(
        family: impl Into<String>,
        quantization: Quantization,
        context_length: u32,
        weights: WeightsHash,
    ) -> Result<Self, ModuleIdError> {
        let family = family.into();
        if !is_token(&family) {
            return Err(ModuleIdError::BadField("family", family));
        }
        Ok(Self {
            family,
            quantization,
            context_length,
            weights,
        })
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/ctx{}/b3-{}",
            self.family, self.quantization, self.context_length, self.weights
        )
    }
}

impl FromStr for ModuleId {
    type Err = ModuleIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || ModuleIdError::Malformed(s.to_owned());
        let mut parts = s.split('/');
        let (Some(family), Some(quant), Some(ctx), Some(hash), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed());
        };
        let context_length = ctx
            .strip_prefix("ctx")
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(malformed)?;
        let weights = hash.strip_prefix("b3-").ok_or_else(malformed)?.parse()?;
        Self::new(
            family,
            Quantization::try_from(quant.to_owned())?,
            context_length,
            weights,
        )
    }
}

impl TryFrom<String> for ModuleId {
    type Error = ModuleIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ModuleId> for String {
    fn from(m: ModuleId) -> Self {
        m.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> ModuleId {
        ModuleId::new(
            "llama",
            Quantization::from_gguf_file_type(3),
            8192,
            WeightsHash(*blake3::hash(b"weights").as_bytes()),
        )
        .expect("valid family")
    }

    #[test]
    fn module_id_round_trips_through_string_and_json() {
        let id = sample();
        let s = id.to_string();
        assert!(s.starts_with("llama/q4_1/ctx8192/b3-"), "{s}");
        assert_eq!(s.parse::<ModuleId>(), Ok(id.clone()));
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(serde_json::from_str::<ModuleId>(&json).expect("parse"), id);
    }

    #[test]
    fn malformed_module_ids_are_rejected_with_a_reason() {
        for bad in [
            "",
            "llama",
            "llama/q4_1/8192/b3-00",
            "llama/q4_1/ctx8192/b3-zz",
            "Llama/q4_1/ctx8192/b3-0000000000000000000000000000000000000000000000000000000000000000",
            "llama/q4_1/ctx8192/b3-0000000000000000000000000000000000000000000000000000000000000000/x",
        ] {
            assert!(bad.parse::<ModuleId>().is_err(), "{bad:?} parsed");
        }
    }

    proptest! {
        #[test]
        fn module_id_parse_never_panics(s in ".{0,200}") {
            let _ = s.parse::<ModuleId>();
        }
    }
}
