//! Dedup of near-identical layers, the Merkle diff between them, and gc.

use std::path::PathBuf;

use hb_tests::*;

fn layer(hb: &Hb, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = file_header(data.len() as u64, 0o644);
        b.append_data(&mut h, path, *data).unwrap();
    }
    let p = hb.path(name);
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    p
}

#[test]
fn a_small_edit_stores_only_the_changed_chunks_and_diff_names_it() {
    let hb = Hb::new();
    let big = pseudo_random(10, 8 << 20);
    let mut big2 = big.clone();
    big2[4 << 20..(4 << 20) + 100].copy_from_slice(&[0xAB; 100]);
    let lib = pseudo_random(11, 2 << 20);
    let a = layer(&hb, "a.tar", &[("usr/lib/big.so", &big), ("usr/lib/other.so", &lib), ("etc/conf", b"v=1\n")]);
    let b = layer(&hb, "b.tar", &[("usr/lib/big.so", &big2), ("usr/lib/other.so", &lib), ("etc/conf", b"v=2\n")]);
    let ra = hb.import(&a);
    let rb = hb.import(&b);
    let new_chunks = rb["new_chunks"].as_u64().unwrap();
    let new_bytes = rb["new_bytes"].as_u64().unwrap();
    // The 100-byte edit touches one or two content-defined chunks; conf is one more.
    assert!((2..=3).contains(&new_chunks), "{rb:#}");
    assert!(new_bytes <= 2 * 256 * 1024 + 4, "{rb:#}");
    assert_eq!(rb["deduplicated_bytes"].as_u64().unwrap() + new_bytes, rb["content_bytes"].as_u64().unwrap());
    assert!(rb["deduplicated_bytes"].as_u64().unwrap() > 9 << 20);

    let (da, db) = (ra["digest"].as_str().unwrap(), rb["digest"].as_str().unwrap());
    assert_eq!(hb.ok(&["diff", da, db]), "C /etc/conf\nC /usr/lib/big.so\n");
    let d = hb.json(&["diff", da, db]);
    assert_eq!(d["needed_bytes"].as_u64().unwrap(), new_bytes, "diff predicts exactly what the import stored");
    assert_eq!(d["needed_chunks"].as_u64().unwrap(), new_chunks);
    assert_eq!(hb.json(&["diff", da, da])["changes"], serde_json::json!([]));

    let u = hb.json(&["du"]);
    assert!(u["dedup_ratio"].as_f64().unwrap() > 1.9, "{u:#}");
    hb.fsck_clean();
}

#[test]
fn gc_frees_only_what_removed_layers_used_and_compacts_packs() {
    let hb = Hb::new();
    let shared = pseudo_random(20, 2 << 20);
    let only_a = pseudo_random(21, 6 << 20);
    let only_b = pseudo_random(22, 3 << 20);
    let a = layer(&hb, "a.tar", &[("shared", &shared), ("a", &only_a)]);
    let b = layer(&hb, "b.tar", &[("shared", &shared), ("b", &only_b)]);
    let da = hb.import(&a)["diff_id"].as_str().unwrap().to_string();
    let db = hb.import(&b)["diff_id"].as_str().unwrap().to_string();
    let before = hb.json(&["du"]);
    // Nothing is freed while both are pinned.
    assert_eq!(hb.json(&["gc"])["chunks_removed"], 0);
    hb.ok(&["layer", "rm", &da]);
    let r = hb.json(&["gc"]);
    assert_eq!(r["layers_removed"], 1, "{r:#}");
    assert!(r["chunks_removed"].as_u64().unwrap() >= 20, "{r:#}");
    assert!(r["bytes_freed"].as_u64().unwrap() >= 5 << 20, "{r:#}");
    let after = hb.json(&["du"]);
    assert!(
        after["pack_bytes"].as_u64().unwrap() < before["pack_bytes"].as_u64().unwrap() / 2 + (1 << 20),
        "{before:#} {after:#}"
    );
    assert_eq!(after["layers"], 1);
    hb.fsck_clean();
    let out = hb.path("b.out.tar");
    hb.ok(&["layer", "export", &db, "-o", out.to_str().unwrap()]);
    assert_same_tree(
        "b after gc",
        &fingerprint_tar(&std::fs::read(&b).unwrap()),
        &fingerprint_tar(&std::fs::read(&out).unwrap()),
        false,
    );
    let err = hb.fails(&["layer", "export", &da, "-o", hb.path("a.out").to_str().unwrap()], 1);
    assert!(err.contains("no layer matches"), "{err}");
}
