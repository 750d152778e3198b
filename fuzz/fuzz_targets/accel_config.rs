//! `AccelConfig`, the accelerated manifest's config blob (JSON) a lazy pull reads from a
//! registry: decoded as hb decodes it (`serde_json` into hb-core's type, unknown fields refused).
#![no_main]

use hb_core::AccelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = serde_json::from_slice::<AccelConfig>(data) {
        let again: AccelConfig =
            serde_json::from_slice(&serde_json::to_vec(&cfg).expect("serialisable")).expect("round trip");
        assert_eq!(again, cfg);
    }
});
