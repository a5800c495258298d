#![no_main]
//! Hostile wire frames: decoding must never panic, in either direction, over
//! a stream of several frames; every frame that decodes must re-encode and
//! decode to an equal value.
use bytes::BytesMut;
use cairn_transport::wire::{decode_request, decode_response, encode_request, encode_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(req)) = decode_request(&mut buf) {
        let mut again = BytesMut::new();
        encode_request(&req, &mut again);
        assert_eq!(decode_request(&mut again), Ok(Some(req)));
        assert!(again.is_empty());
    }

    let mut buf = BytesMut::from(data);
    while let Ok(Some(resp)) = decode_response(&mut buf) {
        let mut again = BytesMut::new();
        encode_response(&resp, &mut again);
        assert_eq!(decode_response(&mut again), Ok(Some(resp)));
        assert!(again.is_empty());
    }
});
