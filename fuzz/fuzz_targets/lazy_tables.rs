//! The lazy-image binary tables a lazy pull fetches from a registry: `ChunkTable` (both forms:
//! self-contained, and compact read against a layer's index), `StartupOrder`, and the store's
//! `LazySource` record around a chunk table; the index blob's zstd frame (`decode_index_blob`). Each input is
//! tried as is and sealed with its BLAKE3 trailer (to get past the checksum); decoded values
//! must survive encode -> decode unchanged.
#![no_main]

use std::sync::OnceLock;

use hb_core::{ChunkId, ChunkRef, ChunkTable, Digest, LayerIndex, LazySource, Meta, NewEntry, StartupOrder, TreeBuilder};
use libfuzzer_sys::fuzz_target;

/// A layer of three chunks, the index a compact table is read against.
fn index() -> &'static LayerIndex {
    static INDEX: OnceLock<LayerIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut b = TreeBuilder::new(hb_core::ChunkerParams::default());
        let chunks = (0..3u32).map(|i| ChunkRef { id: ChunkId::of(&i.to_le_bytes()), len: 100 + i }).collect();
        b.add(b"f", Meta { mode: 0o644, ..Meta::default() }, NewEntry::File { chunks }).unwrap();
        b.finish(Digest([1; 32]))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(ChunkId::of(data).as_bytes());
    for input in [data, &sealed[..]] {
        if let Ok(t) = ChunkTable::decode(input) {
            assert_eq!(ChunkTable::decode(&t.encode()).as_ref(), Ok(&t));
            let _ = t.data_size();
        }
        if let Ok(t) = ChunkTable::decode_for(input, index()) {
            if let Ok(compact) = t.encode_compact(index()) {
                assert_eq!(ChunkTable::decode_for(&compact, index()).as_ref(), Ok(&t));
            }
        }
        if let Ok(i) = hb_registry::decode_index_blob(input) {
            assert!(i.verify_merkle());
        }
        if let Ok(s) = StartupOrder::decode(input) {
            assert_eq!(StartupOrder::decode(&s.encode()).as_ref(), Ok(&s));
        }
        if let Ok(l) = LazySource::decode(input) {
            assert_eq!(LazySource::decode(&l.encode()).as_ref(), Ok(&l));
        }
    }
});
