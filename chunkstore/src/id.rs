//! Identities: [`ChunkId`] (BLAKE3 of a chunk's bytes) and [`ObjectId`]
//! (BLAKE3 of an object's canonical recipe encoding).

use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    /// The string is not 64 characters long.
    #[error("an id is 64 hex characters, got {0}")]
    Length(usize),
    /// The string has a character outside `[0-9a-fA-F]`.
    #[error("an id is hex, got {0:?}")]
    NotHex(String),
}

macro_rules! hash_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Length of the raw id in bytes.
            pub const LEN: usize = 32;

            /// Wrap raw bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Parse from exactly 32 raw bytes.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(b).ok().map(Self)
            }

            /// Full lowercase hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first 10 hex characters, for logs and tables.
            pub fn fmt_short(&self) -> String {
                hex::encode(&self.0[..5])
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.fmt_short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                if s.len() != 64 {
                    return Err(ParseIdError::Length(s.len()));
                }
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError::NotHex(s.to_owned()))?;
                Ok(Self(out))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hash_newtype!(
    /// The identity of a chunk: BLAKE3-256 of its uncompressed bytes.
    ChunkId
);
hash_newtype!(
    /// The identity of an object: BLAKE3-256 of its canonical recipe encoding
    /// (see [`crate::Recipe::encode`]).
    ObjectId
);

impl ChunkId {
    /// The id of the empty chunk.
    pub const EMPTY: Self = Self([
        0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc, 0xc9,
        0x49, 0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f,
        0x32, 0x62,
    ]);

    /// Hash `data` into its id.
    pub fn of(data: &[u8]) -> Self {
        blake3::hash(data).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_constant_matches_blake3() {
        assert_eq!(ChunkId::EMPTY, ChunkId::of(b""));
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let id = ChunkId::of(b"hello");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ChunkId>(), Ok(id));
        assert_eq!(id.fmt_short(), &s[..10]);
        assert_eq!("abc".parse::<ChunkId>(), Err(ParseIdError::Length(3)));
        assert!(matches!(
            "z".repeat(64).parse::<ChunkId>(),
            Err(ParseIdError::NotHex(_))
        ));
    }
}
