//! The daemon API's chunk bodies (`hb_cli::api::decode_chunks`, `/v1/chunks/fill` and the
//! answer of `/v1/chunks/get`; `decode_ids`, the body of `/v1/chunks/get`). A decoded frame
//! list re-encodes to the same bytes.
#![no_main]

use hb_cli::api::{decode_chunks, decode_ids, encode_chunks};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(chunks) = decode_chunks(data) {
        assert_eq!(encode_chunks(chunks.iter().map(|(id, b)| (id, &b[..]))), data);
    }
    if let Ok(ids) = decode_ids(data) {
        assert_eq!(ids.len() * 32, data.len());
    }
});
