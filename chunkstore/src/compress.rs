//! Deciding when zstd is worth trying.
//!
//! Most bytes a node moves (gzip image layers, encrypted or already
//! compressed disk blocks) do not compress, and zstd spends about as much
//! CPU failing on them as it does succeeding elsewhere. A [`CompressProbe`]
//! watches a stream of chunks: after [`GIVE_UP`] chunks in a row that did not
//! shrink by 10%, it tries only one chunk in [`PROBE_EVERY`]; the first one
//! that pays puts it back to trying every chunk. Incompressible data then
//! costs almost no compression CPU, and compressible data later in the same
//! stream is still noticed (at worst [`PROBE_EVERY`] chunks late).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Chunks in a row that must fail to shrink before the probe backs off.
pub const GIVE_UP: u32 = 8;
/// While backed off, one chunk in this many is still tried.
pub const PROBE_EVERY: u64 = 64;
/// zstd level used for chunks (fast; the ratio gain of higher levels does
/// not pay for their CPU on the data path).
pub const LEVEL: i32 = 1;

/// Per-stream record of whether zstd has been paying. Cheap to share
/// between threads (two relaxed atomics).
#[derive(Debug, Default)]
pub struct CompressProbe {
    misses: AtomicU32,
    seq: AtomicU64,
}

impl CompressProbe {
    /// A probe that starts by trying every chunk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to try compressing the next chunk.
    pub fn should_try(&self) -> bool {
        self.misses.load(Relaxed) < GIVE_UP || self.seq.fetch_add(1, Relaxed) % PROBE_EVERY == 0
    }

    /// Record whether a tried chunk shrank enough.
    pub fn record(&self, paid: bool) {
        if paid {
            self.misses.store(0, Relaxed);
        } else {
            let _ = self
                .misses
                .fetch_update(Relaxed, Relaxed, |m| Some(m.saturating_add(1)));
        }
    }

    /// `data` compressed, when the probe says to try and the result saves at
    /// least 10%; `None` otherwise (store or send the bytes as they are).
    pub fn compress(&self, data: &[u8]) -> Option<Vec<u8>> {
        if !self.should_try() {
            return None;
        }
        let c = zstd::bulk::compress(data, LEVEL)
            .ok()
            .filter(|c| pays(c.len(), data.len()));
        self.record(c.is_some());
        c
    }
}

/// Whether a compressed form of `compressed` bytes is worth keeping for
/// `raw` bytes: it must save at least 10%.
pub fn pays(compressed: usize, raw: usize) -> bool {
    compressed * 10 <= raw * 9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn backs_off_on_noise_and_comes_back_for_text() {
        let p = CompressProbe::new();
        let mut tried = 0;
        for i in 0..1000 {
            if p.should_try() {
                tried += 1;
                let c = zstd::bulk::compress(&noise(4096, i), LEVEL).unwrap();
                p.record(pays(c.len(), 4096));
            }
        }
        // GIVE_UP tries, then about one in PROBE_EVERY.
        assert!(
            tried <= GIVE_UP as usize + 1000 / PROBE_EVERY as usize + 1,
            "{tried}"
        );
        assert!(tried > GIVE_UP as usize);
        // Compressible data is noticed within PROBE_EVERY chunks and then
        // every chunk is compressed again.
        let text = b"the same words again and again ".repeat(200);
        let first = (0..PROBE_EVERY + 1)
            .position(|_| p.compress(&text).is_some())
            .expect("compressible data noticed");
        assert!(first as u64 <= PROBE_EVERY);
        assert!((0..20).all(|_| p.compress(&text).is_some()));
    }
}
