//! Fixed-size byte strings on the wire: raw bytes in binary formats (postcard), lowercase
//! hex in human-readable ones (JSON receipts, logs), so one type serves both.

use serde::de::{Error as _, Visitor};
use serde::{Deserializer, Serializer};
use std::fmt;

/// Serializes `bytes` as raw bytes, or as hex for human-readable formats.
pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
    if s.is_human_readable() {
        s.serialize_str(&hex::encode(bytes))
    } else {
        s.serialize_bytes(bytes)
    }
}

/// Reads what [`serialize`] wrote, refusing any other length.
pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
    struct Fixed<const N: usize>;
    impl<const N: usize> Visitor<'_> for Fixed<N> {
        type Value = [u8; N];
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{N} bytes, or {} hex digits", 2 * N)
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            let v = v.strip_prefix("0x").unwrap_or(v);
            let mut out = [0u8; N];
            hex::decode_to_slice(v, &mut out)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))?;
            Ok(out)
        }
    }
    if d.is_human_readable() {
        d.deserialize_str(Fixed::<N>)
    } else {
        d.deserialize_bytes(Fixed::<N>)
    }
    .map_err(D::Error::custom)
}
