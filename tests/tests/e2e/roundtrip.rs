//! Ingest then export is identical in content and metadata, on real rootfs trees.

use hb_tests::*;

/// Imports `layer`, exports it as a rootfs and as a tar, and compares both with the source.
fn round_trip(source_dir: &std::path::Path, layer: &std::path::Path) {
    let hb = Hb::new();
    let r = hb.import(layer);
    let digest = r["digest"].as_str().unwrap().to_string();
    let out = hb.path("rootfs");
    hb.ok(&["layer", "export", &digest, "--dir", out.to_str().unwrap()]);
    let want = fingerprint_dir(source_dir, &[".hb-complete"]);
    assert_same_tree("rootfs export vs source tree", &want, &fingerprint_dir(&out, &[]), true);

    let tar_out = hb.path("layer.tar");
    hb.ok(&["layer", "export", &digest, "-o", tar_out.to_str().unwrap()]);
    let want = fingerprint_tar(&std::fs::read(layer).unwrap());
    let got = fingerprint_tar(&std::fs::read(&tar_out).unwrap());
    assert_same_tree("tar export vs source tar", &want, &got, false);

    // The exported tar is the same layer content: importing it stores nothing new.
    let again = hb.import(&tar_out);
    assert_eq!(again["new_bytes"], 0, "{again:#}");
    hb.fsck_clean();
}

#[test]
fn debian_minbase_rootfs_round_trips_exactly() {
    round_trip(&testdata("minbase"), &testdata("minbase.tar.gz"));
}

#[test]
fn busybox_rootfs_round_trips_exactly() {
    round_trip(&testdata("busybox"), &testdata("busybox.tar"));
}
