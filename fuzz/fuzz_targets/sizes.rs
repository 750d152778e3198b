//! Sizes and limits people write (`hb_core::parse_size`: `--max-size`, `--bandwidth`, the
//! proxy's `max_size`/`memory_cache` in hb.toml; `--memory` and `--cpus` of `hb run`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = hb_core::parse_size(s);
    let _ = hb_runtime::parse_memory(s);
    if let Ok(n) = hb_runtime::parse_cpus(s) {
        assert!(n > 0.0 && n.is_finite());
    }
});
