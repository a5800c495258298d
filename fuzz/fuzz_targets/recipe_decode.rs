#![no_main]
//! Hostile recipe encodings: decode must never panic, and whatever decodes
//! must re-encode to the same bytes (the encoding is canonical).
use cairn_chunkstore::Recipe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Recipe::decode(data) {
        assert_eq!(r.encode(), data);
        let _ = r.chunk_at(r.total_len() / 2);
    }
});
