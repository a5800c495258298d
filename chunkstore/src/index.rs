//! What the RocksDB index holds, and how entries are encoded.
//!
//! Column families:
//! - `chunks`: chunk id → [`ChunkMeta`] (where the payload lives, or the
//!   payload itself for small chunks);
//! - `recipes`: object id → canonical recipe encoding;
//! - `objects`: object id → [`ObjectInfo`] (JSON: length and digests);
//! - `digests`: `"sha256:<hex>"` etc. → object id;
//! - `names`: name → object id and update time (names are GC roots);
//! - `pins`: pin key → object id (pins are GC roots and never evicted).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::{ChunkId, ObjectId};

pub(crate) const CF_CHUNKS: &str = "chunks";
pub(crate) const CF_RECIPES: &str = "recipes";
pub(crate) const CF_OBJECTS: &str = "objects";
pub(crate) const CF_DIGESTS: &str = "digests";
pub(crate) const CF_NAMES: &str = "names";
pub(crate) const CF_PINS: &str = "pins";
/// Small records the node keeps beside its chunks (site metadata).
pub(crate) const CF_META: &str = "meta";
pub(crate) const ALL_CFS: [&str; 7] = [
    CF_CHUNKS, CF_RECIPES, CF_OBJECTS, CF_DIGESTS, CF_NAMES, CF_PINS, CF_META,
];

/// Longest name or pin key.
pub const MAX_NAME_LEN: usize = 512;

/// Where a chunk's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// Small chunk stored in the index entry itself.
    Inline(Bytes),
    /// In segment `seg`, payload at `offset`, `stored_len` bytes on disk.
    Segment {
        /// Segment number.
        seg: u32,
        /// Payload offset.
        offset: u64,
        /// Bytes on disk (compressed length when compressed).
        stored_len: u32,
    },
}

/// An entry of the `chunks` column family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMeta {
    /// Uncompressed length.
    pub raw_len: u32,
    /// Payload is zstd-compressed.
    pub compressed: bool,
    /// Where it is.
    pub loc: Location,
}

const META_V1: u8 = 1;
const F_ZSTD: u8 = 1;
const F_INLINE: u8 = 2;

impl ChunkMeta {
    /// Bytes this chunk takes on disk.
    pub fn stored_len(&self) -> u64 {
        match &self.loc {
            Location::Inline(b) => b.len() as u64,
            Location::Segment { stored_len, .. } => u64::from(*stored_len),
        }
    }

    /// The stored form of this entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = 0;
        if self.compressed {
            flags |= F_ZSTD;
        }
        let mut v = Vec::with_capacity(22);
        match &self.loc {
            Location::Inline(b) => {
                v.extend_from_slice(&[META_V1, flags | F_INLINE]);
                v.extend_from_slice(&self.raw_len.to_le_bytes());
                v.extend_from_slice(b);
            }
            Location::Segment {
                seg,
                offset,
                stored_len,
            } => {
                v.extend_from_slice(&[META_V1, flags]);
                v.extend_from_slice(&self.raw_len.to_le_bytes());
                v.extend_from_slice(&seg.to_le_bytes());
                v.extend_from_slice(&offset.to_le_bytes());
                v.extend_from_slice(&stored_len.to_le_bytes());
            }
        }
        v
    }

    /// Decode an entry, refusing anything malformed.
    pub fn decode(id: &ChunkId, b: &[u8]) -> Result<Self> {
        let bad = |why: &str| StoreError::BadEntry {
            what: format!("chunk {id}"),
            why: why.to_owned(),
        };
        if b.len() < 6 || b[0] != META_V1 {
            return Err(bad("unknown version or truncated"));
        }
        let flags = b[1];
        let raw_len = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let compressed = flags & F_ZSTD != 0;
        let loc = if flags & F_INLINE != 0 {
            Location::Inline(Bytes::copy_from_slice(&b[6..]))
        } else {
            if b.len() != 22 {
                return Err(bad("segment entry has wrong length"));
            }
            let mut s = [0; 4];
            s.copy_from_slice(&b[6..10]);
            let mut o = [0; 8];
            o.copy_from_slice(&b[10..18]);
            let mut l = [0; 4];
            l.copy_from_slice(&b[18..22]);
            Location::Segment {
                seg: u32::from_le_bytes(s),
                offset: u64::from_le_bytes(o),
                stored_len: u32::from_le_bytes(l),
            }
        };
        Ok(Self {
            raw_len,
            compressed,
            loc,
        })
    }
}

/// An entry of the `objects` column family: what ingest learned of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// Length in bytes.
    pub len: u64,
    /// Number of chunks in the recipe.
    pub chunks: u64,
    /// sha256 of the whole object, hex.
    pub sha256: String,
    /// sha512 of the whole object, hex, when it was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha512: Option<String>,
    /// BLAKE3 of the whole object, hex (not the object id, which hashes the recipe).
    pub blake3: String,
    /// Unix seconds of the first ingest.
    pub created: u64,
}

/// A name's entry: the object, when it was set, and (for names replicated
/// between sites, such as OCI tags) a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameEntry {
    /// Target object.
    pub object: ObjectId,
    /// Unix milliseconds of the last update.
    pub updated_ms: u64,
    /// The writer's version (a hybrid logical clock reading), or 0 for a
    /// name that is not versioned. [`Store::set_name_versioned`] keeps the
    /// entry with the highest `(version, object)`.
    ///
    /// [`Store::set_name_versioned`]: crate::Store::set_name_versioned
    pub version: u64,
}

impl NameEntry {
    /// Encoded: object (32) | updated_ms (8) [| version (8), when non-zero].
    /// Entries written before versions existed are 40 bytes and read as 0.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = self.object.as_bytes().to_vec();
        v.extend_from_slice(&self.updated_ms.to_le_bytes());
        if self.version != 0 {
            v.extend_from_slice(&self.version.to_le_bytes());
        }
        v
    }

    pub(crate) fn decode(name: &[u8], b: &[u8]) -> Result<Self> {
        let bad = || StoreError::BadEntry {
            what: format!("name {}", String::from_utf8_lossy(name)),
            why: "wrong length".into(),
        };
        if b.len() != 40 && b.len() != 48 {
            return Err(bad());
        }
        let object = ObjectId::from_slice(&b[..32]).ok_or_else(bad)?;
        let mut t = [0; 8];
        t.copy_from_slice(&b[32..40]);
        let mut version = 0;
        if b.len() == 48 {
            let mut v = [0; 8];
            v.copy_from_slice(&b[40..48]);
            version = u64::from_le_bytes(v);
        }
        Ok(Self {
            object,
            updated_ms: u64::from_le_bytes(t),
            version,
        })
    }

    /// The order in which concurrent versions of one name win: the higher
    /// version, then (for equal versions) the higher object id. Total and
    /// the same at every site.
    pub fn wins_over(&self, other: &NameEntry) -> bool {
        (self.version, self.object.as_bytes()) > (other.version, other.object.as_bytes())
    }
}

/// Check a name or pin key: 1..=512 bytes of printable UTF-8 without
/// whitespace, and not 64 hex characters (which would read as an id).
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(StoreError::Invalid(format!(
            "a name is 1..={MAX_NAME_LEN} bytes, got {}",
            name.len()
        )));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(StoreError::Invalid(format!(
            "name {name:?} contains whitespace or control characters"
        )));
    }
    if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::Invalid(format!(
            "name {name:?} looks like an object id"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let id = ChunkId::of(b"x");
        for m in [
            ChunkMeta {
                raw_len: 9,
                compressed: false,
                loc: Location::Inline(Bytes::from_static(b"123456789")),
            },
            ChunkMeta {
                raw_len: 70000,
                compressed: true,
                loc: Location::Segment {
                    seg: 7,
                    offset: 1 << 40,
                    stored_len: 5000,
                },
            },
        ] {
            assert_eq!(ChunkMeta::decode(&id, &m.encode()).unwrap(), m);
        }
        assert!(ChunkMeta::decode(&id, &[9, 0, 0, 0, 0, 0]).is_err());
        assert!(ChunkMeta::decode(&id, &[1, 0, 0, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("demo/x:v1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"a".repeat(513)).is_err());
        assert!(validate_name(&"ab".repeat(32)).is_err());
    }
}
