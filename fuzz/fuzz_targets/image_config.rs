//! What `hb run` reads from an image: its config JSON (`ImageConfig::from_json`), then the
//! process arguments from it (`process_args`) and its `User` resolved against the image's own
//! /etc/passwd and /etc/group (`resolve_user`). Input: config JSON, NUL, passwd, NUL, group.
#![no_main]

use hb_runtime::{process_args, resolve_user, ImageConfig, RunOptions};
use libfuzzer_sys::fuzz_target;

fn text(b: Option<&[u8]>) -> Option<&str> {
    b.and_then(|b| std::str::from_utf8(b).ok())
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let config = parts.next().unwrap_or_default();
    let (passwd, group) = (text(parts.next()), text(parts.next()));
    let Ok(image) = ImageConfig::from_json(config) else { return };
    let _ = process_args(&image, &RunOptions::default());
    let _ = resolve_user(image.user.as_deref(), passwd, group);
});
