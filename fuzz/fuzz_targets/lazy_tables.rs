//! The lazy-image binary tables a lazy pull fetches from a registry: `ChunkTable`,
//! `StartupOrder`, and the store's `LazySource` record around a chunk table. Each input is
//! tried as is and sealed with its BLAKE3 trailer (to get past the checksum); decoded values
//! must survive encode -> decode unchanged.
#![no_main]

use hb_core::{ChunkId, ChunkTable, LazySource, StartupOrder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(ChunkId::of(data).as_bytes());
    for input in [data, &sealed[..]] {
        if let Ok(t) = ChunkTable::decode(input) {
            assert_eq!(ChunkTable::decode(&t.encode()).as_ref(), Ok(&t));
            let _ = t.data_size();
        }
        if let Ok(s) = StartupOrder::decode(input) {
            assert_eq!(StartupOrder::decode(&s.encode()).as_ref(), Ok(&s));
        }
        if let Ok(l) = LazySource::decode(input) {
            assert_eq!(LazySource::decode(&l.encode()).as_ref(), Ok(&l));
        }
    }
});
