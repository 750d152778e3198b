//! Manifests, indexes and configs as a registry or a mirror sends them
//! (`hb_registry::manifest::parse`, `pair_layers`): the input is the manifest or index, then a NUL
//! byte, then the config.
#![no_main]

use hb_registry::manifest::{pair_layers, parse, Parsed};
use hb_registry::Platform;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (manifest, config) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    for platform in [Platform::default(), "linux/arm64/v8".parse().unwrap()] {
        match parse("fuzz/image:latest", manifest, &platform) {
            Ok(Parsed::Index(chosen)) => {
                assert!(chosen.digest.parse::<hb_core::Digest>().is_ok(), "an index chose a non-digest");
            }
            Ok(Parsed::Image(image)) => {
                if let Ok(layers) = pair_layers("fuzz/image:latest", &image, config) {
                    assert_eq!(layers.len(), image.layers.len());
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
