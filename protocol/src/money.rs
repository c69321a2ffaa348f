//! Money and payees: amounts in the token's smallest unit (never a float), prices per
//! thousand tokens, and EVM payout addresses.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An amount in the token's smallest unit. Human-readable formats carry it as an integer
/// string, so JavaScript clients never round it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(pub u128);

impl Amount {
    /// Nothing.
    pub const ZERO: Amount = Amount(0);

    /// Sum, or `None` on overflow.
    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Amount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<u128>()
            .map(Amount)
            .map_err(|_| format!("amount must be a non-negative integer in base units, got {s:?}"))
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(&self.0)
        } else {
            s.serialize_u128(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            u128::deserialize(d).map(Amount)
        }
    }
}

/// What a module costs: per thousand prompt tokens and per thousand generated tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Price {
    /// Per 1,000 input (prompt) tokens.
    pub per_1k_input: Amount,
    /// Per 1,000 output (generated) tokens.
    pub per_1k_output: Amount,
}

impl Price {
    /// The cost of a job that read `input` and wrote `output` tokens, rounded up to a
    /// whole base unit so that a node is never paid less than its price; `None` on overflow.
    pub fn cost(&self, input: u32, output: u32) -> Option<Amount> {
        let total = self
            .per_1k_input
            .0
            .checked_mul(u128::from(input))?
            .checked_add(self.per_1k_output.0.checked_mul(u128::from(output))?)?;
        Some(Amount(total.div_ceil(1000)))
    }

    /// Whether a caller willing to pay `max` accepts this price (both components).
    pub fn within(&self, max: &Price) -> bool {
        self.per_1k_input <= max.per_1k_input && self.per_1k_output <= max.per_1k_output
    }
}

/// A 20-byte EVM address where a node is paid.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Address(#[serde(with = "crate::bytes")] pub [u8; 20]);

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hexpart = s.strip_prefix("0x").unwrap_or(s);
        let mut out = [0u8; 20];
        hex::decode_to_slice(hexpart, &mut out)
            .map_err(|_| format!("address must be 0x and 40 hex digits, got {s:?}"))?;
        Ok(Address(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_and_refuses_overflow() {
        let p = Price {
            per_1k_input: Amount(3),
            per_1k_output: Amount(10),
        };
        assert_eq!(p.cost(0, 0), Some(Amount(0)));
        assert_eq!(
            p.cost(1, 0),
            Some(Amount(1)),
            "a fraction of a unit rounds up"
        );
        assert_eq!(p.cost(1000, 1000), Some(Amount(13)));
        let huge = Price {
            per_1k_input: Amount(u128::MAX),
            per_1k_output: Amount(0),
        };
        assert_eq!(huge.cost(2, 0), None);
    }

    #[test]
    fn amounts_are_strings_in_json_and_integers_in_binary() {
        let a = Amount(340_282_366_920_938_463_463_374_607_431_768_211_455);
        let json = serde_json::to_string(&a).expect("json");
        assert_eq!(json, "\"340282366920938463463374607431768211455\"");
        assert_eq!(serde_json::from_str::<Amount>(&json).expect("back"), a);
        let bin = postcard::to_allocvec(&Amount(300)).expect("postcard");
        assert_eq!(
            postcard::from_bytes::<Amount>(&bin).expect("back"),
            Amount(300)
        );
        assert!(serde_json::from_str::<Amount>("\"-1\"").is_err());
    }

    #[test]
    fn addresses_round_trip_as_hex() {
        let a: Address = "0x00000000000000000000000000000000000000aa"
            .parse()
            .expect("parse");
        assert_eq!(a.0[19], 0xaa);
        let json = serde_json::to_string(&a).expect("json");
        assert_eq!(json, "\"00000000000000000000000000000000000000aa\"");
        assert_eq!(serde_json::from_str::<Address>(&json).expect("back"), a);
        assert!("0x12".parse::<Address>().is_err());
    }
}
