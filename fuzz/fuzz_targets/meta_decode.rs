#![no_main]
//! Hostile bytes into every cairn-meta decoder: anti-entropy frames
//! (`Message::decode`, `frame_len`), entries, keys, site records and
//! inventory entries. The first byte picks the decoder (all of them for
//! values above 5). Nothing may panic; whatever decodes must re-encode to
//! something that decodes to the same value.
use bytes::Bytes;
use cairn_meta::record::{Entry, InventoryEntry, Key, SiteRecord};
use cairn_meta::sync::{frame_len, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let all = first > 5;
    if all || first == 0 {
        let _ = frame_len(rest);
        if let Ok(m) = Message::decode(Bytes::copy_from_slice(rest)) {
            let again = m.encode().expect("a decoded message re-encodes");
            assert_eq!(Message::decode(again).expect("re-decodes"), m);
        }
    }
    if all || first == 1 {
        // A frame header in front, so bodies are reached directly.
        for ty in 1..=7u8 {
            let mut f = vec![1u8, ty];
            f.extend_from_slice(&(rest.len() as u32).to_le_bytes());
            f.extend_from_slice(rest);
            let _ = Message::decode(Bytes::from(f));
        }
    }
    if all || first == 2 {
        if let Ok(e) = Entry::decode(Bytes::copy_from_slice(rest)) {
            let mut out = Vec::new();
            e.encode(&mut out);
            assert_eq!(out.len(), e.encoded_len());
            assert_eq!(Entry::decode(Bytes::from(out)).expect("re-decodes"), e);
        }
    }
    if all || first == 3 {
        if let Ok(k) = Key::decode(rest) {
            let mut out = Vec::new();
            k.encode(&mut out);
            assert_eq!(Key::decode(&out).expect("re-decodes"), k);
        }
    }
    if all || first == 4 {
        if let Ok(s) = SiteRecord::decode(rest) {
            let enc = s.encode().expect("a decoded record re-encodes");
            assert_eq!(SiteRecord::decode(&enc).expect("re-decodes"), s);
        }
    }
    if all || first == 5 {
        if let Ok(i) = InventoryEntry::decode(rest) {
            let enc = i.encode().expect("re-encodes");
            assert_eq!(InventoryEntry::decode(&enc).expect("re-decodes"), i);
        }
    }
});
