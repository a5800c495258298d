//! Access traces: the order in which a client first touched an object's
//! chunks, with the time since the export was opened. Prefetch learns from
//! them (issue 6/8); here they are recorded and stored.
//!
//! Recording is cheap: one uncontended lock, a binary search in the recipe
//! and a bit test per read; a chunk is appended only on its first touch, so
//! a trace holds at most one entry per chunk.
//!
//! When an export closes, a non-empty trace is stored as a small object
//! named `trace/<OBJECT>/<SEQ>` (a store name, so GC keeps it); only the
//! newest [`KEEP_TRACES`] per object are kept. Encoding (little-endian):
//! magic `CTR1`, u32 entry count, then per entry u32 chunk index (in the
//! recipe) and u32 milliseconds since open.

use std::time::Instant;

use cairn_chunkstore::{ObjectId, PutOptions, Recipe, Store, StoreError};
use serde::Serialize;

/// Store name prefix of traces.
pub const TRACE_PREFIX: &str = "trace/";
/// Traces kept per object.
pub const KEEP_TRACES: usize = 8;
const MAGIC: &[u8; 4] = b"CTR1";

/// One first touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TraceEntry {
    /// Index of the chunk in the object's recipe.
    pub chunk: u32,
    /// Milliseconds since the export was opened.
    pub ms: u32,
}

/// Records first touches of one object's chunks.
#[derive(Debug)]
pub struct TraceRecorder {
    start: Instant,
    inner: parking_lot::Mutex<Rec>,
}

#[derive(Debug)]
struct Rec {
    seen: Vec<u64>,
    entries: Vec<TraceEntry>,
}

impl TraceRecorder {
    /// A recorder for an object of `chunks` chunks.
    pub fn new(chunks: usize) -> Self {
        Self {
            start: Instant::now(),
            inner: parking_lot::Mutex::new(Rec {
                seen: vec![0; chunks.div_ceil(64)],
                entries: Vec::new(),
            }),
        }
    }

    /// Note a read of `[offset, offset + len)` of `recipe`'s object.
    pub fn record(&self, recipe: &Recipe, offset: u64, len: u64) {
        let Some(mut i) = recipe.chunk_at(offset) else {
            return;
        };
        let end = offset.saturating_add(len);
        let ms = u32::try_from(self.start.elapsed().as_millis()).unwrap_or(u32::MAX);
        let chunks = recipe.chunks();
        let mut r = self.inner.lock();
        while let Some(c) = chunks.get(i) {
            if c.offset >= end {
                break;
            }
            let (w, b) = (i / 64, 1u64 << (i % 64));
            if let Some(word) = r.seen.get_mut(w) {
                if *word & b == 0 {
                    *word |= b;
                    r.entries.push(TraceEntry {
                        chunk: i as u32,
                        ms,
                    });
                }
            }
            i += 1;
        }
    }

    /// The entries so far.
    pub fn entries(&self) -> Vec<TraceEntry> {
        self.inner.lock().entries.clone()
    }
}

/// Encode a trace.
pub fn encode(entries: &[TraceEntry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + entries.len() * 8);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        v.extend_from_slice(&e.chunk.to_le_bytes());
        v.extend_from_slice(&e.ms.to_le_bytes());
    }
    v
}

/// Decode a trace; `None` if the bytes are not one.
pub fn decode(b: &[u8]) -> Option<Vec<TraceEntry>> {
    let rest = b.strip_prefix(MAGIC)?;
    let (n, rest) = rest.split_first_chunk::<4>()?;
    let n = u32::from_le_bytes(*n) as usize;
    if rest.len() != n.checked_mul(8)? {
        return None;
    }
    Some(
        rest.chunks_exact(8)
            .map(|e| TraceEntry {
                chunk: u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                ms: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect(),
    )
}

fn prefix(object: &ObjectId) -> String {
    format!("{TRACE_PREFIX}{object}/")
}

/// Store a trace of `object`, dropping the oldest beyond [`KEEP_TRACES`].
pub fn save(store: &Store, object: &ObjectId, entries: &[TraceEntry]) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let p = prefix(object);
    // Sorted by the store; sequence numbers are zero-padded.
    let names: Vec<String> = store
        .names_with_prefix(&p)?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let next = names
        .last()
        .and_then(|n| n[p.len()..].parse::<u64>().ok())
        .map_or(0, |s| s + 1);
    store.put_bytes(
        &encode(entries),
        &PutOptions {
            name: Some(format!("{p}{next:010}")),
            pin: false,
            ..Default::default()
        },
    )?;
    let excess = (names.len() + 1).saturating_sub(KEEP_TRACES);
    for old in names.iter().take(excess) {
        let _ = store.remove(old);
    }
    Ok(())
}

/// Store a trace when an export closes: on a blocking thread of the
/// current runtime if there is one (the export is dropped on an async
/// thread), else right here. A failure is logged; traces are advisory.
pub fn save_on_close(store: std::sync::Arc<Store>, object: ObjectId, entries: Vec<TraceEntry>) {
    if entries.is_empty() {
        return;
    }
    let save = move || {
        if let Err(e) = save(&store, &object, &entries) {
            tracing::warn!(object = %object.fmt_short(), error = %e, "cannot store the access trace");
            return;
        }
        // Publish what this site has learned, for sites that fetch from us.
        if let Err(e) = crate::prefetcher::publish(&store, &object) {
            tracing::warn!(object = %object.fmt_short(), error = %e, "cannot publish the prefetch model");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(save);
        }
        Err(_) => save(),
    }
}

/// The stored traces of `object`, oldest first.
pub fn load(store: &Store, object: &ObjectId) -> Result<Vec<Vec<TraceEntry>>, StoreError> {
    let p = prefix(object);
    let mut out = Vec::new();
    for (_, e) in store.names_with_prefix(&p)? {
        if let Some(t) = read_small(store, &e.object, 64 << 20)?.and_then(|b| decode(&b)) {
            out.push(t);
        }
    }
    Ok(out)
}

/// The bytes of a small object (a trace, a prefetch model); `None` when it
/// is over `max` bytes.
pub fn read_small(store: &Store, id: &ObjectId, max: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let h = store.open_object(id)?;
    if h.len() > max {
        return Ok(None);
    }
    let mut b = vec![0u8; h.len() as usize];
    h.read_at(0, &mut b)?;
    Ok(Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_chunkstore::ChunkId;
    use proptest::prelude::*;

    #[test]
    fn records_first_touches_in_order() {
        let mut r = Recipe::new();
        for i in 0u8..10 {
            r.push(ChunkId::from_bytes([i; 32]), 100);
        }
        let t = TraceRecorder::new(10);
        t.record(&r, 550, 10); // chunk 5
        t.record(&r, 150, 200); // 1, 2, 3
        t.record(&r, 520, 300); // 5 again, then 6, 7, 8
        t.record(&r, 5000, 1); // past the end
        let got: Vec<u32> = t.entries().iter().map(|e| e.chunk).collect();
        assert_eq!(got, vec![5, 1, 2, 3, 6, 7, 8]);
        let enc = encode(&t.entries());
        assert_eq!(decode(&enc).unwrap(), t.entries());
    }

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&b);
            let mut m = MAGIC.to_vec();
            m.extend_from_slice(&b);
            let _ = decode(&m);
        }

        #[test]
        fn round_trips(e in proptest::collection::vec((any::<u32>(), any::<u32>()), 0..50)) {
            let e: Vec<TraceEntry> = e.into_iter().map(|(chunk, ms)| TraceEntry { chunk, ms }).collect();
            prop_assert_eq!(decode(&encode(&e)).unwrap(), e);
        }
    }
}
