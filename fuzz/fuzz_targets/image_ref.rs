//! Image references as users and `hb proxy` clients give them (`ImageRef::parse`, docker's
//! rules) and `--platform` values (`Platform::from_str`).
#![no_main]

use hb_registry::{ImageRef, Platform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(r) = ImageRef::parse(s) {
        let _ = (r.registry(), r.repository(), r.digest(), r.is_loopback(), r.to_string());
        let canonical = r.canonical();
        let _ = r.with_digest("sha256:0000000000000000000000000000000000000000000000000000000000000000");
        let _ = ImageRef::parse(&canonical);
    }
    if let Ok(p) = s.parse::<Platform>() {
        let _ = p.matches("linux", "amd64", None);
        let _ = p.to_string();
    }
});
