//! The mirror's request routing (`mirror::route::route`): a request target `PATH[?QUERY]` as a
//! client sends it, against a fixed set of upstreams (one with an alias, Docker Hub as default).
#![no_main]

use hb_mirror::route::{route, valid_name, valid_tag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let hosts: Vec<String> = vec!["127.0.0.1:15000".into(), "registry-1.docker.io".into(), "ghcr.io".into()];
    let aliases = vec![Some("local".to_string()), None, None];
    let (path, query) = match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    };
    for default in [Some(1), None] {
        if let Ok(r) = route(path, query, &hosts, &aliases, default) {
            assert!(r.upstream < hosts.len());
            let _ = r.object;
        }
    }
    let _ = (valid_name(s), valid_tag(s));
});
