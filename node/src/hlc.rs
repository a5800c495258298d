//! A hybrid logical clock: versions for records written at several sites
//! (OCI tags today; the site metadata of issue 7/8 later).
//!
//! A reading is one `u64`: wall-clock Unix milliseconds in the high 48 bits
//! (good until the year 10889) and a logical counter in the low 16. Readings
//! from one clock strictly increase, even when the wall clock steps back,
//! and a clock that has seen a remote reading never issues a lower one, so
//! a write made after another site's write (causally) always carries the
//! higher version. Concurrent writes compare by wall time, which is as good
//! as the sites' clocks; ties are broken by the caller (by object id for
//! names), so every site picks the same winner.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of the logical counter.
const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    /// A clock that has issued nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The wall clock as a reading with a zero counter.
    fn wall() -> u64 {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (ms & ((1 << (64 - LOGICAL_BITS)) - 1)) << LOGICAL_BITS
    }

    /// A new reading, higher than every reading this clock issued or saw.
    pub fn now(&self) -> u64 {
        let wall = Self::wall();
        let mut cur = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(cur + 1);
            match self
                .last
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Take a remote reading into account: later readings exceed it.
    pub fn observe(&self, remote: u64) {
        self.last.fetch_max(remote, Ordering::AcqRel);
    }

    /// The wall-clock milliseconds of a reading.
    pub fn millis(reading: u64) -> u64 {
        reading >> LOGICAL_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_increase_and_pass_what_was_seen() {
        let c = Hlc::new();
        let a = c.now();
        let b = c.now();
        assert!(b > a);
        // A reading from a clock far ahead: ours jumps past it.
        let remote = a + (1_000_000 << LOGICAL_BITS);
        c.observe(remote);
        let d = c.now();
        assert!(d > remote);
        assert!(Hlc::millis(d) >= Hlc::millis(a));
        // Many readings from threads are all distinct.
        let c = std::sync::Arc::new(Hlc::new());
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).map(|_| c.now()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = hs
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        assert_eq!(n, 4000);
    }
}
