//! Chunks whose bytes have been checked against their id.
//!
//! Invariant 1 of DESIGN.md says nothing unverified is stored, served or
//! forwarded. [`VerifiedChunk`] makes that a type: the only way to build one
//! is to hash the bytes, and [`crate::Store::put_chunks`] takes nothing else.

use bytes::Bytes;

use crate::ChunkId;

/// Bytes that hash to the id they claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChunk {
    id: ChunkId,
    data: Bytes,
}

/// Bytes that do not hash to the id they claim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk {expected} failed verification: {len} bytes hash to {actual}")]
pub struct VerifyError {
    /// The id the sender claimed.
    pub expected: ChunkId,
    /// What the bytes hash to.
    pub actual: ChunkId,
    /// How many bytes there were.
    pub len: usize,
}

impl VerifiedChunk {
    /// Hash `data` and accept it only if it is `id`'s content.
    pub fn new(id: ChunkId, data: Bytes) -> Result<Self, VerifyError> {
        let actual = ChunkId::of(&data);
        if actual != id {
            return Err(VerifyError {
                expected: id,
                actual,
                len: data.len(),
            });
        }
        Ok(Self { id, data })
    }

    /// A chunk made from bytes in hand: its id is their hash, so it is
    /// verified by construction (one BLAKE3 pass).
    pub fn hash(data: Bytes) -> Self {
        Self {
            id: ChunkId::of(&data),
            data,
        }
    }

    /// The chunk's id.
    pub fn id(&self) -> &ChunkId {
        &self.id
    }

    /// The chunk's bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the chunk is empty (never, for chunks in a recipe).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Split into id and bytes.
    pub fn into_parts(self) -> (ChunkId, Bytes) {
        (self.id, self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_matching_bytes() {
        let data = Bytes::from_static(b"hello chunk");
        let id = ChunkId::of(&data);
        let v = VerifiedChunk::new(id, data.clone()).unwrap();
        assert_eq!(v.id(), &id);
        assert_eq!(v.data(), &data);
        let mut bad = data.to_vec();
        bad[0] ^= 1;
        let e = VerifiedChunk::new(id, Bytes::from(bad)).unwrap_err();
        assert_eq!(e.expected, id);
        assert_ne!(e.actual, id);
        assert_eq!(e.len, data.len());
    }
}
