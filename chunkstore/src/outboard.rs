//! Verifying part of a chunk without reading all of it.
//!
//! A chunk's id is the root of BLAKE3's own hash tree over its bytes. Every
//! aligned 4 KiB group of a chunk longer than 4 KiB is a complete subtree of
//! that tree, so its chaining value (CV) can be recomputed from the group's
//! bytes alone. An [`Outboard`] keeps the CVs of all groups; it is trusted
//! only after the CVs merge back to the chunk id.
//!
//! The store computes outboards lazily, the first time a chunk is read at
//! random, from a whole-chunk read that is itself verified, and caches them
//! in memory (32 bytes per 4 KiB, under 1% of the data). After that, a 4 KiB
//! read costs one 4 KiB pread and one 4 KiB hash, which is what keeps NBD-style
//! random reads close to plain `pread` while still checking every byte.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::ChunkId;

/// Verification granularity: 4 KiB, four BLAKE3 chunks.
pub const GROUP_LEN: usize = 4096;

/// Chaining values of every group of one chunk.
#[derive(Clone, PartialEq, Eq)]
pub struct Outboard {
    len: u64,
    cvs: Box<[ChainingValue]>,
}

impl std::fmt::Debug for Outboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outboard")
            .field("len", &self.len)
            .field("groups", &self.cvs.len())
            .finish()
    }
}

fn group_cv(index: usize, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset((index * GROUP_LEN) as u64);
    h.update(data);
    h.finalize_non_root()
}

fn merge(cvs: &[ChainingValue], start: u64, len: u64) -> ChainingValue {
    if len <= GROUP_LEN as u64 {
        return cvs[(start / GROUP_LEN as u64) as usize];
    }
    let l = left_subtree_len(len);
    merge_subtrees_non_root(
        &merge(cvs, start, l),
        &merge(cvs, start + l, len - l),
        Mode::Hash,
    )
}

fn root(cvs: &[ChainingValue], len: u64) -> blake3::Hash {
    let l = left_subtree_len(len);
    merge_subtrees_root(&merge(cvs, 0, l), &merge(cvs, l, len - l), Mode::Hash)
}

impl Outboard {
    /// Build the outboard of a whole chunk and return it with the chunk's id.
    /// `None` for chunks of at most [`GROUP_LEN`] bytes: they are verified whole.
    pub fn compute(data: &[u8]) -> (ChunkId, Option<Outboard>) {
        if data.len() <= GROUP_LEN {
            return (ChunkId::of(data), None);
        }
        let cvs: Box<[ChainingValue]> = data
            .chunks(GROUP_LEN)
            .enumerate()
            .map(|(i, g)| group_cv(i, g))
            .collect();
        let len = data.len() as u64;
        let id = root(&cvs, len).into();
        (id, Some(Outboard { len, cvs }))
    }

    /// The chunk length this outboard covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: outboards exist only for chunks longer than one group.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes of memory held.
    pub fn mem_size(&self) -> usize {
        self.cvs.len() * 32 + 24
    }

    /// The byte range of whole groups covering `[start, end)` of the chunk.
    pub fn group_span(&self, start: u64, end: u64) -> (u64, u64) {
        let g = GROUP_LEN as u64;
        let s = start / g * g;
        let e = end.div_ceil(g).saturating_mul(g).min(self.len);
        (s, e)
    }

    /// Check bytes that start at group boundary `start` and cover whole groups
    /// (the last group of the chunk may be short). True when every group's
    /// CV matches.
    pub fn verify_span(&self, start: u64, data: &[u8]) -> bool {
        let g = GROUP_LEN as u64;
        if start % g != 0 || start + data.len() as u64 > self.len {
            return false;
        }
        let first = (start / g) as usize;
        let end = start + data.len() as u64;
        if end % g != 0 && end != self.len {
            return false;
        }
        // Hash the span as the largest aligned, complete subtrees it holds:
        // two groups at an even index are one 8 KiB subtree, which BLAKE3
        // hashes at full SIMD width, and its expected CV is one merge of the
        // two stored CVs.
        let full = data.len() / GROUP_LEN;
        let mut i = 0;
        while i < full {
            let mut k = 1;
            while i + 2 * k <= full && (first + i) % (2 * k) == 0 && k < 8 {
                k *= 2;
            }
            let bytes = &data[i * GROUP_LEN..(i + k) * GROUP_LEN];
            let start = ((first + i) * GROUP_LEN) as u64;
            let expect = merge(&self.cvs, start, bytes.len() as u64);
            let mut h = blake3::Hasher::new();
            h.set_input_offset(start);
            h.update(bytes);
            if h.finalize_non_root() != expect {
                return false;
            }
            i += k;
        }
        let tail = &data[full * GROUP_LEN..];
        tail.is_empty() || self.cvs.get(first + full) == Some(&group_cv(first + full, tail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The merged root equals blake3::hash for every length, and every
        /// group span verifies, while a flipped byte does not.
        #[test]
        fn root_matches_blake3_and_spans_verify(len in 0usize..70_000, seed in any::<u8>(), a in 0usize..70_000, b in 0usize..70_000) {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let (id, ob) = Outboard::compute(&data);
            prop_assert_eq!(id, ChunkId::of(&data));
            if let Some(ob) = ob {
                let (x, y) = (a as u64 % ob.len(), b as u64 % ob.len());
                let (lo, hi) = (x.min(y), x.max(y) + 1);
                let (s, e) = ob.group_span(lo, hi);
                prop_assert!(s <= lo && e >= hi);
                let mut span = data[s as usize..e as usize].to_vec();
                prop_assert!(ob.verify_span(s, &span));
                let flip = (hi - 1 - s) as usize;
                span[flip] ^= 1;
                prop_assert!(!ob.verify_span(s, &span));
            } else {
                prop_assert!(len <= GROUP_LEN);
            }
        }
    }

    #[test]
    fn misaligned_spans_are_refused() {
        let data = vec![7u8; 10_000];
        let (_, ob) = Outboard::compute(&data);
        let ob = ob.unwrap();
        assert!(!ob.verify_span(1, &data[1..4097]));
        assert!(!ob.verify_span(0, &data[..100]));
        assert!(ob.verify_span(8192, &data[8192..]));
        assert!(!ob.verify_span(8192, &data[8192..9999]));
    }
}
