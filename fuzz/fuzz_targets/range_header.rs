//! Request headers the mirror interprets: `Range` (`mirror::parse_range`, against several blob
//! sizes), `Accept` (`mirror::acceptable`) and an upstream's manifest media type
//! (`mirror::valid_media_type`, what may go into a Content-Type header). Input: the header
//! value; its first 8 bytes (little endian) also give one more blob size.
#![no_main]

use hb_mirror::{acceptable, parse_range, valid_media_type};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let size = data.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let Ok(s) = std::str::from_utf8(data) else { return };
    for size in [0, 1, 10, 1 << 20, u64::MAX, size] {
        if let Ok(Some((start, end))) = parse_range(Some(s), size) {
            assert!(start < end && end <= size, "range {start}..{end} of a {size}-byte blob from {s:?}");
        }
    }
    let _ = acceptable(Some(s), "application/vnd.oci.image.manifest.v1+json");
    let _ = acceptable(Some(s), "application/vnd.docker.distribution.manifest.v2+json");
    let _ = valid_media_type(s);
});
