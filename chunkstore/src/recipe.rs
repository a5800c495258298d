//! Recipes: the ordered list of chunks that makes an object.
//!
//! Canonical encoding (little endian), whose BLAKE3 is the [`ObjectId`]:
//! ```text
//! magic "CRCP" | version u8 = 1 | total_len u64 | count u32 | count × (chunk id [32] | len u32)
//! ```
//! Offsets are implied by the lengths, so two encodings of one recipe cannot
//! differ.

use crate::{ChunkId, ObjectId};

const MAGIC: &[u8; 4] = b"CRCP";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 8 + 4;
const ENTRY: usize = 32 + 4;

/// Most chunks one recipe may list: 16 Mi chunks, i.e. 1 TiB at the default
/// 64 KiB average. Bounds what a hostile encoding can make us allocate.
pub const MAX_RECIPE_CHUNKS: usize = 16 << 20;

/// One chunk's place in an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk.
    pub id: ChunkId,
    /// Its offset in the object.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u32,
}

/// An object's recipe. Built by ingest; immutable afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recipe {
    chunks: Vec<ChunkRef>,
    total_len: u64,
}

/// A recipe encoding that is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecipeError {
    /// Too short for its header or its declared entries.
    #[error("recipe truncated: {0} bytes")]
    Truncated(usize),
    /// Wrong magic bytes.
    #[error("not a recipe (bad magic)")]
    BadMagic,
    /// A version this build does not know.
    #[error("unsupported recipe version {0}")]
    Version(u8),
    /// More chunks than [`MAX_RECIPE_CHUNKS`].
    #[error("recipe lists {0} chunks, limit {MAX_RECIPE_CHUNKS}")]
    TooManyChunks(u64),
    /// The chunk lengths do not add up to the total, or a chunk is empty.
    #[error("recipe lengths are inconsistent")]
    Inconsistent,
    /// Bytes after the last entry.
    #[error("recipe has {0} trailing bytes")]
    Trailing(usize),
}

impl Recipe {
    /// Start an empty recipe.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a chunk of `len` bytes (must be non-zero).
    pub fn push(&mut self, id: ChunkId, len: u32) {
        debug_assert!(len > 0);
        self.chunks.push(ChunkRef {
            id,
            offset: self.total_len,
            len,
        });
        self.total_len += u64::from(len);
    }

    /// The chunks in order.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// The object's length in bytes.
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// Index of the chunk holding byte `offset`, if `offset < total_len`.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.total_len {
            return None;
        }
        Some(
            self.chunks
                .partition_point(|c| c.offset + u64::from(c.len) <= offset),
        )
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.chunks.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.total_len.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(c.id.as_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
        }
        out
    }

    /// The object id: BLAKE3 of [`Recipe::encode`].
    pub fn object_id(&self) -> ObjectId {
        blake3::hash(&self.encode()).into()
    }

    /// Parse a canonical encoding, checking every length.
    pub fn decode(b: &[u8]) -> Result<Self, RecipeError> {
        if b.len() < HEADER {
            return Err(RecipeError::Truncated(b.len()));
        }
        if &b[..4] != MAGIC {
            return Err(RecipeError::BadMagic);
        }
        if b[4] != VERSION {
            return Err(RecipeError::Version(b[4]));
        }
        let total = u64::from_le_bytes(le8(&b[5..13]));
        let count = u32::from_le_bytes(le4(&b[13..17])) as u64;
        if count as usize > MAX_RECIPE_CHUNKS {
            return Err(RecipeError::TooManyChunks(count));
        }
        let need = HEADER + ENTRY * count as usize;
        if b.len() < need {
            return Err(RecipeError::Truncated(b.len()));
        }
        if b.len() > need {
            return Err(RecipeError::Trailing(b.len() - need));
        }
        let mut r = Recipe {
            chunks: Vec::with_capacity(count as usize),
            total_len: 0,
        };
        for e in b[HEADER..].chunks_exact(ENTRY) {
            let id = ChunkId::from_bytes(
                <[u8; 32]>::try_from(&e[..32]).map_err(|_| RecipeError::Inconsistent)?,
            );
            let len = u32::from_le_bytes(le4(&e[32..36]));
            if len == 0 {
                return Err(RecipeError::Inconsistent);
            }
            r.push(id, len);
        }
        if r.total_len != total {
            return Err(RecipeError::Inconsistent);
        }
        Ok(r)
    }
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0; 8];
    a.copy_from_slice(b);
    a
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0; 4];
    a.copy_from_slice(b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunk_at_finds_the_right_chunk() {
        let mut r = Recipe::new();
        r.push(ChunkId::of(b"a"), 10);
        r.push(ChunkId::of(b"b"), 5);
        assert_eq!(r.chunk_at(0), Some(0));
        assert_eq!(r.chunk_at(9), Some(0));
        assert_eq!(r.chunk_at(10), Some(1));
        assert_eq!(r.chunk_at(14), Some(1));
        assert_eq!(r.chunk_at(15), None);
        assert_eq!(Recipe::new().chunk_at(0), None);
    }

    #[test]
    fn hostile_encodings_are_refused() {
        assert_eq!(Recipe::decode(b"CR"), Err(RecipeError::Truncated(2)));
        let mut e = Recipe::new().encode();
        e[0] = b'X';
        assert_eq!(Recipe::decode(&e), Err(RecipeError::BadMagic));
        let mut e = Recipe::new().encode();
        e[13..17].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Recipe::decode(&e),
            Err(RecipeError::TooManyChunks(_))
        ));
        let mut r = Recipe::new();
        r.push(ChunkId::of(b"x"), 7);
        let mut e = r.encode();
        e[5] = 8; // total no longer matches
        assert_eq!(Recipe::decode(&e), Err(RecipeError::Inconsistent));
        let mut e = r.encode();
        e.push(0);
        assert_eq!(Recipe::decode(&e), Err(RecipeError::Trailing(1)));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(lens in proptest::collection::vec(1u32..300_000, 0..50)) {
            let mut r = Recipe::new();
            for (i, l) in lens.iter().enumerate() {
                r.push(ChunkId::of(&i.to_le_bytes()), *l);
            }
            let d = Recipe::decode(&r.encode()).unwrap();
            prop_assert_eq!(d.object_id(), r.object_id());
            prop_assert_eq!(d, r);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Recipe::decode(&bytes);
        }
    }
}
