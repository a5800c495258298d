#![no_main]
//! Hostile chunk-index entries: decode must never panic, and what decodes
//! must round-trip.
use cairn_chunkstore::index::ChunkMeta;
use cairn_chunkstore::ChunkId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = ChunkId::of(b"fuzz");
    if let Ok(m) = ChunkMeta::decode(&id, data) {
        assert_eq!(ChunkMeta::decode(&id, &m.encode()).ok(), Some(m));
    }
});
