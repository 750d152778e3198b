//! The snapshotter's containerd filters (`Filters::parse`, from a Walk request; one filter per
//! line of input), matched against two snapshots.
#![no_main]

use std::collections::BTreeMap;

use hb_snapshotter::meta::{Filters, Kind, Snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let filters: Vec<String> = s.split('\n').map(str::to_string).collect();
    let Ok(f) = Filters::parse(&filters) else { return };
    let mut labels = BTreeMap::new();
    labels.insert("containerd.io/snapshot.ref".to_string(), "sha256:abc".to_string());
    labels.insert("a.b".to_string(), "c".to_string());
    let snap = Snapshot {
        name: "layer1".into(),
        parent: String::new(),
        kind: Kind::Committed,
        id: 1,
        created: (0, 0),
        updated: (0, 0),
        labels,
        usage: None,
        remote: None,
    };
    let _ = f.matches(&snap);
    let _ = f.matches(&Snapshot {
        name: "k".into(),
        parent: "layer1".into(),
        kind: Kind::Active,
        labels: BTreeMap::new(),
        ..snap
    });
});
