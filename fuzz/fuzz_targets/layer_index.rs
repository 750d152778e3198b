//! `LayerIndex::decode`: the layer index a lazy pull fetches from a registry (and the store keeps).
//! The input is tried as is (checksum path), then as a body sealed with its BLAKE3 trailer so
//! the fuzzer reaches the structure checks behind the checksum. A decoded index must survive
//! encode -> decode unchanged.
#![no_main]

use hb_core::{ChunkId, LayerIndex};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = LayerIndex::decode(data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(ChunkId::of(data).as_bytes());
    if let Ok(idx) = LayerIndex::decode(&sealed) {
        let again = LayerIndex::decode(&idx.encode()).expect("a decoded index re-encodes to a valid one");
        assert_eq!(again, idx, "encode/decode round trip");
        // Whatever decodes is covered by its Merkle hashes, every directory's.
        assert!(idx.verify_merkle(), "a decoded index's directory hashes match its entries");
        let _ = idx.content_bytes();
    }
});
