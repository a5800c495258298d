//! Splitting a byte stream into chunks.
//!
//! Sans-IO: [`Chunker::push`] bytes in, [`Chunker::next_chunk`] chunks out.
//! Content-defined boundaries use FastCDC 2020 (the `fastcdc` crate's `cut`
//! function with normalization level 1). The chunker always holds at least
//! `max` bytes before it cuts (or has seen the end), so boundaries depend only
//! on the content and never on how the reader happened to split the stream.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020;

/// Largest chunk the store accepts, whatever the configuration. DESIGN.md
/// says chunks are "up to 256 KiB"; this leaves room for experiments.
pub const MAX_CHUNK_LEN: u32 = 4 << 20;

/// How to cut a stream into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ChunkerConfig {
    /// Content-defined chunking (FastCDC) for images and blobs.
    Cdc {
        /// Smallest chunk, except the last one.
        min: u32,
        /// Target average.
        avg: u32,
        /// Largest chunk.
        max: u32,
    },
    /// Fixed-size blocks, for volume overlays. The last block may be short.
    Fixed {
        /// Block size in bytes.
        size: u32,
    },
}

impl Default for ChunkerConfig {
    /// 16/64/256 KiB content-defined chunks (DESIGN.md).
    fn default() -> Self {
        Self::Cdc {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        }
    }
}

/// A chunker configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunker configuration: {0}")]
pub struct ChunkerConfigError(String);

impl ChunkerConfig {
    /// Check the sizes against FastCDC's limits and [`MAX_CHUNK_LEN`].
    pub fn validate(&self) -> Result<(), ChunkerConfigError> {
        match *self {
            Self::Cdc { min, avg, max } => {
                if !(min <= avg && avg <= max) {
                    return Err(ChunkerConfigError(format!(
                        "need min <= avg <= max, got {min}/{avg}/{max}"
                    )));
                }
                if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
                    || !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
                    || !(v2020::MAXIMUM_MIN..=MAX_CHUNK_LEN).contains(&max)
                {
                    return Err(ChunkerConfigError(format!(
                        "sizes out of range: min {}..={}, avg {}..={}, max {}..={}",
                        v2020::MINIMUM_MIN,
                        v2020::MINIMUM_MAX,
                        v2020::AVERAGE_MIN,
                        v2020::AVERAGE_MAX,
                        v2020::MAXIMUM_MIN,
                        MAX_CHUNK_LEN
                    )));
                }
                Ok(())
            }
            Self::Fixed { size } => {
                if size == 0 || size > MAX_CHUNK_LEN {
                    return Err(ChunkerConfigError(format!(
                        "fixed size must be 1..={MAX_CHUNK_LEN}, got {size}"
                    )));
                }
                Ok(())
            }
        }
    }

    /// The largest chunk this configuration produces.
    pub fn max_len(&self) -> u32 {
        match *self {
            Self::Cdc { max, .. } => max,
            Self::Fixed { size } => size,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Masks {
    s: u64,
    l: u64,
}

/// Streaming chunker; see the module docs.
#[derive(Debug)]
pub struct Chunker {
    cfg: ChunkerConfig,
    masks: Masks,
    buf: BytesMut,
    eof: bool,
}

impl Chunker {
    /// A chunker for a valid configuration.
    pub fn new(cfg: ChunkerConfig) -> Result<Self, ChunkerConfigError> {
        cfg.validate()?;
        let masks = match cfg {
            ChunkerConfig::Cdc { avg, .. } => {
                // Normalization level 1, as `fastcdc::v2020::FastCDC::new`.
                let bits = v2020::logarithm2(avg);
                Masks {
                    s: v2020::MASKS[(bits + 1) as usize],
                    l: v2020::MASKS[(bits - 1) as usize],
                }
            }
            ChunkerConfig::Fixed { .. } => Masks { s: 0, l: 0 },
        };
        let cap = cfg.max_len() as usize * 2;
        Ok(Self {
            cfg,
            masks,
            buf: BytesMut::with_capacity(cap),
            eof: false,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> ChunkerConfig {
        self.cfg
    }

    /// Append stream bytes. Call [`Chunker::next_chunk`] until it returns `None`
    /// after each push, so the buffer stays small.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Declare the end of the stream: the remaining bytes become the last chunk(s).
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// Bytes pushed but not yet returned as chunks.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete chunk, if one can be cut yet.
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        let max = self.cfg.max_len() as usize;
        if self.buf.len() < max && !self.eof {
            return None;
        }
        let n = match self.cfg {
            ChunkerConfig::Fixed { size } => (size as usize).min(self.buf.len()),
            ChunkerConfig::Cdc { min, avg, max } => {
                let (_, n) = v2020::cut(
                    &self.buf,
                    min as usize,
                    avg as usize,
                    max as usize,
                    self.masks.s,
                    self.masks.l,
                    self.masks.s << 1,
                    self.masks.l << 1,
                );
                if n == 0 {
                    self.buf.len().min(max as usize)
                } else {
                    n
                }
            }
        };
        Some(self.buf.split_to(n).freeze())
    }
}

/// Chunk boundaries of a whole in-memory buffer: `(offset, len)` pairs.
pub fn chunk_boundaries(
    cfg: ChunkerConfig,
    data: &[u8],
) -> Result<Vec<(usize, usize)>, ChunkerConfigError> {
    let mut c = Chunker::new(cfg)?;
    let mut out = Vec::new();
    let mut off = 0;
    // Feed in odd-sized pieces on purpose: boundaries must not depend on them.
    for piece in data.chunks(100_003) {
        c.push(piece);
        while let Some(ch) = c.next_chunk() {
            out.push((off, ch.len()));
            off += ch.len();
        }
    }
    c.finish();
    while let Some(ch) = c.next_chunk() {
        out.push((off, ch.len()));
        off += ch.len();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{RngCore, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn small_cdc() -> ChunkerConfig {
        ChunkerConfig::Cdc {
            min: 1024,
            avg: 4096,
            max: 16384,
        }
    }

    #[test]
    fn default_sizes_hold_on_random_data() {
        let data = random(8 << 20, 1);
        let b = chunk_boundaries(ChunkerConfig::default(), &data).unwrap();
        let total: usize = b.iter().map(|x| x.1).sum();
        assert_eq!(total, data.len());
        for (i, &(_, len)) in b.iter().enumerate() {
            assert!(len <= 256 << 10);
            if i + 1 < b.len() {
                assert!(len >= 16 << 10, "chunk {i} is {len} bytes");
            }
        }
        let avg = data.len() / b.len();
        assert!((32 << 10..=128 << 10).contains(&avg), "average {avg}");
    }

    #[test]
    fn zeros_cut_at_max_and_fixed_mode_is_fixed() {
        let data = vec![0u8; 1 << 20];
        let b = chunk_boundaries(ChunkerConfig::default(), &data).unwrap();
        assert_eq!(b.len(), 4);
        assert!(b.iter().all(|x| x.1 == 256 << 10));
        let b = chunk_boundaries(ChunkerConfig::Fixed { size: 65536 }, &data[..200_000]).unwrap();
        assert_eq!(
            b.iter().map(|x| x.1).collect::<Vec<_>>(),
            vec![65536, 65536, 65536, 3392]
        );
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(chunk_boundaries(ChunkerConfig::default(), &[])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(ChunkerConfig::Cdc {
            min: 10,
            avg: 20,
            max: 30
        }
        .validate()
        .is_err());
        assert!(ChunkerConfig::Cdc {
            min: 4096,
            avg: 1024,
            max: 65536
        }
        .validate()
        .is_err());
        assert!(ChunkerConfig::Cdc {
            min: 4096,
            avg: 8192,
            max: 64 << 20
        }
        .validate()
        .is_err());
        assert!(ChunkerConfig::Fixed { size: 0 }.validate().is_err());
        assert!(Chunker::new(ChunkerConfig::Fixed { size: 0 }).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// The same bytes always give the same boundaries, however they are fed.
        #[test]
        fn deterministic_whatever_the_feed(seed in any::<u64>(), len in 0usize..200_000, piece in 1usize..70_000) {
            let data = random(len, seed);
            let a = chunk_boundaries(small_cdc(), &data).unwrap();
            let mut c = Chunker::new(small_cdc()).unwrap();
            let mut b = Vec::new();
            let mut off = 0;
            for p in data.chunks(piece) {
                c.push(p);
                while let Some(ch) = c.next_chunk() { b.push((off, ch.len())); off += ch.len(); }
            }
            c.finish();
            while let Some(ch) = c.next_chunk() { b.push((off, ch.len())); off += ch.len(); }
            prop_assert_eq!(a, b);
        }

        /// Inserting bytes in the middle changes only boundaries near the edit:
        /// chunks well before it are identical, and the chunker resynchronises
        /// after it, so most chunk ids survive.
        #[test]
        fn insertion_shifts_only_nearby_boundaries(seed in any::<u64>(), at_frac in 0.2f64..0.8, ins in 1usize..5000) {
            let data = random(400_000, seed);
            let at = (data.len() as f64 * at_frac) as usize;
            let mut edited = data[..at].to_vec();
            edited.extend_from_slice(&random(ins, seed ^ 0xdead));
            edited.extend_from_slice(&data[at..]);
            let cfg = small_cdc();
            let ids = |d: &[u8]| -> Vec<ChunkId> {
                chunk_boundaries(cfg, d).unwrap().iter().map(|&(o, l)| ChunkId::of(&d[o..o + l])).collect()
            };
            let a = ids(&data);
            let b = ids(&edited);
            // Everything before the chunk containing the edit is unchanged.
            let before: Vec<_> = chunk_boundaries(cfg, &data).unwrap().into_iter().take_while(|&(o, l)| o + l <= at).collect();
            prop_assert_eq!(&a[..before.len()], &b[..before.len()]);
            // Few chunks differ: the edit touches at most a handful.
            let set: std::collections::HashSet<_> = a.iter().collect();
            let new = b.iter().filter(|id| !set.contains(id)).count();
            // Only bytes near the edit are re-chunked: the new chunks cover the
            // inserted bytes plus at most a few max-size chunks around them
            // until the cut points line up again (counting chunks was flaky:
            // small chunks near the edit can split several ways).
            let new_bytes: usize = chunk_boundaries(cfg, &edited).unwrap().iter()
                .filter(|&&(o, l)| !set.contains(&ChunkId::of(&edited[o..o + l])))
                .map(|&(_, l)| l).sum();
            let bound = ins + 8 * 16384;
            prop_assert!(new_bytes <= bound, "{} new bytes of {} (bound {}, {} chunks)", new_bytes, edited.len(), bound, new);
        }
    }

    use crate::ChunkId;
}
