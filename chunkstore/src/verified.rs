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
    /// A zstd frame that decompresses to `data`, when the chunk arrived
    /// compressed: the store keeps it as it is instead of compressing again.
    zstd: Option<Bytes>,
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
        Ok(Self {
            id,
            data,
            zstd: None,
        })
    }

    /// Decompress a zstd `payload` of `raw_len` bytes and accept it only if
    /// the result is `id`'s content. The chunk remembers the payload, so a
    /// store keeps the compressed bytes rather than compressing them again.
    #[cfg(feature = "store")]
    pub fn from_zstd(id: ChunkId, payload: Bytes, raw_len: usize) -> Result<Self, FromZstdError> {
        let data = zstd::bulk::decompress(&payload, raw_len)
            .map_err(|e| FromZstdError::Decompress(id, e.to_string()))?;
        if data.len() != raw_len {
            return Err(FromZstdError::Decompress(
                id,
                format!("{} bytes where {raw_len} were announced", data.len()),
            ));
        }
        let mut v = Self::new(id, Bytes::from(data))?;
        if payload.len() < raw_len {
            v.zstd = Some(payload);
        }
        Ok(v)
    }

    /// A chunk made from bytes in hand: its id is their hash, so it is
    /// verified by construction (one BLAKE3 pass).
    pub fn hash(data: Bytes) -> Self {
        Self {
            id: ChunkId::of(&data),
            data,
            zstd: None,
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

    /// The zstd frame the chunk arrived as, if it came compressed (see
    /// [`VerifiedChunk::from_zstd`]); it decompresses to [`Self::data`].
    pub fn zstd(&self) -> Option<&Bytes> {
        self.zstd.as_ref()
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

/// A compressed chunk that could not be accepted.
#[cfg(feature = "store")]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FromZstdError {
    /// The payload is not a zstd frame of the announced length.
    #[error("chunk {0}: bad zstd payload: {1}")]
    Decompress(ChunkId, String),
    /// It decompressed, but to other bytes.
    #[error(transparent)]
    Verify(#[from] VerifyError),
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

    #[cfg(feature = "store")]
    #[test]
    fn from_zstd_keeps_the_frame_and_checks_the_bytes() {
        let data = Bytes::from(b"compressible ".repeat(100));
        let id = ChunkId::of(&data);
        let frame = Bytes::from(zstd::bulk::compress(&data, 1).unwrap());
        let v = VerifiedChunk::from_zstd(id, frame.clone(), data.len()).unwrap();
        assert_eq!(v.data(), &data);
        assert_eq!(v.zstd(), Some(&frame));
        // Wrong announced length, garbage, and other content are refused.
        assert!(matches!(
            VerifiedChunk::from_zstd(id, frame.clone(), data.len() - 1),
            Err(FromZstdError::Decompress(..))
        ));
        assert!(matches!(
            VerifiedChunk::from_zstd(id, Bytes::from_static(b"not zstd"), 8),
            Err(FromZstdError::Decompress(..))
        ));
        let other = Bytes::from(zstd::bulk::compress(&b"other ".repeat(200), 1).unwrap());
        assert!(matches!(
            VerifiedChunk::from_zstd(id, other, 1200),
            Err(FromZstdError::Verify(_))
        ));
    }
}
