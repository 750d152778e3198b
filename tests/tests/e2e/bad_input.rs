//! Every bad layer is refused with an error naming what is wrong, and the store is unchanged.

use std::io::Write;

use hb_tests::*;

/// A tar entry written header by header, so names tar writers refuse can be produced.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], t: tar::EntryType, link: &[u8], data: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(t);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(data.len() as u64);
    h.set_mtime(1);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// (name, type, link target, data) of one raw entry.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn tar_of(entries: &[RawEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, t, link, data) in entries {
        raw_entry(&mut out, name, *t, link, data);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn gzip_best(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Imports `layer` into a store that already holds a good layer, expects exit 1 with every
/// `needles` in the message, and checks nothing changed.
fn refused(hb: &Hb, name: &str, layer: &[u8], needles: &[&str]) {
    let before = hb.state();
    let p = hb.path(name);
    std::fs::write(&p, layer).unwrap();
    let err = hb.fails(&["layer", "import", p.to_str().unwrap()], 1);
    for n in needles {
        assert!(err.contains(n), "{name}: error should mention {n:?}, got:\n{err}");
        // Regression: the cause was printed twice ("...: reason: ...: reason").
        let without_path = err.replace(p.to_str().unwrap(), "");
        assert!(without_path.matches(n).count() <= 1, "{name}: {n:?} repeated in:\n{err}");
    }
    assert_eq!(hb.state(), before, "{name}: the store changed");
    hb.fsck_clean();
}

fn store_with_a_layer(config: Option<&str>) -> Hb {
    let hb = config.map(Hb::with_config).unwrap_or_default();
    let good = tar_of(&[(b"good", tar::EntryType::Regular, b"", &pseudo_random(1, 300_000))]);
    let p = hb.path("good.tar");
    std::fs::write(&p, good).unwrap();
    hb.import(&p);
    hb
}

#[test]
fn malicious_and_broken_layers_are_refused_by_name() {
    use tar::EntryType::{Link, Regular, Symlink};
    let hb = store_with_a_layer(None);
    let data = pseudo_random(2, 600_000);
    let valid = tar_of(&[(b"dir/file", Regular, b"", &data), (b"dir/other", Regular, b"", b"x")]);
    let long_pax = {
        let mut b = tar::Builder::new(Vec::new());
        let name = "x".repeat(300);
        b.append_pax_extensions([("path", name.as_bytes())]).unwrap();
        let mut h = file_header(0, 0o644);
        h.set_path("short").unwrap();
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        b.into_inner().unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("dotdot.tar", tar_of(&[(b"../evil", Regular, b"", b"x")]), vec!["../evil", "'..'"]),
        ("nested-dotdot.tar", tar_of(&[(b"a/../../evil", Regular, b"", b"x")]), vec!["a/../../evil", "'..'"]),
        ("absolute.tar", tar_of(&[(b"/etc/passwd", Regular, b"", b"x")]), vec!["/etc/passwd", "absolute"]),
        (
            "hardlink-out.tar",
            tar_of(&[(b"h", Link, b"../../etc/shadow", b"")]),
            vec!["\"h\"", "hard link target", "../../etc/shadow"],
        ),
        ("hardlink-missing.tar", tar_of(&[(b"h", Link, b"nowhere", b"")]), vec!["hard link target", "nowhere"]),
        (
            "through-symlink.tar",
            tar_of(&[(b"etc", Symlink, b"/etc", b""), (b"etc/passwd", Regular, b"", b"pwned")]),
            vec!["etc/passwd", "symlink, not a directory"],
        ),
        (
            "duplicate.tar",
            tar_of(&[(b"a", Regular, b"", b"1"), (b"./a", Regular, b"", b"2")]),
            vec!["./a", "duplicate"],
        ),
        ("aufs.tar", tar_of(&[(b".wh..wh.plnk", Regular, b"", b"")]), vec![".wh..wh.plnk", "AUFS"]),
        ("long-name.tar", long_pax, vec!["longer than 255"]),
        ("truncated.tar", valid[..valid.len() / 2].to_vec(), vec!["truncated", "after entry \"dir/file\""]),
        (
            "truncated.tar.gz",
            {
                let g = gzip(&valid);
                g[..g.len() * 2 / 3].to_vec()
            },
            vec!["gzip stream is corrupt or truncated"],
        ),
        (
            "corrupt.tar.gz",
            {
                let mut g = gzip(&valid);
                let m = g.len() / 2;
                g[m..m + 8].fill(0x55);
                g
            },
            vec!["gzip stream is corrupt or truncated"],
        ),
        (
            "truncated.tar.zst",
            {
                let z = zstd::encode_all(&valid[..], 3).unwrap();
                z[..z.len() * 2 / 3].to_vec()
            },
            vec!["zstd stream is corrupt or truncated"],
        ),
        ("garbage.bin", pseudo_random(3, 10_000), vec!["not a valid tar stream"]),
        ("empty.tar", Vec::new(), vec!["empty (0 bytes)"]),
    ];
    for (name, layer, needles) in cases {
        refused(&hb, name, &layer, &needles);
    }
}

#[test]
fn decompression_bombs_hit_the_configured_limits() {
    let hb = store_with_a_layer(Some("[store]\nmax_layer_bytes = 8000000\nmax_ratio = 50\n"));
    let zeros = tar_of(&[(b"zeros", tar::EntryType::Regular, b"", &vec![0u8; 20_000_000])]);
    refused(&hb, "big.tar", &zeros, &["exceeds the limit of 8000000 bytes", "max_layer_bytes"]);

    let hb = store_with_a_layer(Some("[store]\nmax_ratio = 50\n"));
    let bomb = gzip_best(&tar_of(&[(b"zeros", tar::EntryType::Regular, b"", &vec![0u8; 100_000_000])]));
    assert!(bomb.len() < 200_000, "a real bomb: {} bytes", bomb.len());
    refused(&hb, "bomb.tar.gz", &bomb, &["expands more than 50:1", "max_ratio"]);
}
