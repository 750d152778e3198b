//! Crafted layers with every entry type, as tar, tar+gzip and tar+zstd.

use std::io::Write;

use hb_tests::*;

pub(crate) struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    pub(crate) fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }
    fn header(t: tar::EntryType, mode: u32, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(t);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }
    pub(crate) fn pax(&mut self, recs: &[(&str, &[u8])]) -> &mut Self {
        self.0.append_pax_extensions(recs.iter().copied()).unwrap();
        self
    }
    pub(crate) fn dir(&mut self, path: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 1_600_000_000);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    pub(crate) fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, 1_600_000_001);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    pub(crate) fn link(&mut self, t: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(t, 0o777, 1_600_000_002);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn dev(&mut self, t: tar::EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(t, 0o660, 1_600_000_003);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    pub(crate) fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn long_dir() -> String {
    format!("deep/{}", "d".repeat(120))
}

/// A layer with every entry type and awkward metadata.
pub(crate) fn every_entry_type() -> Vec<u8> {
    let big = pseudo_random(7, 3 << 20);
    let long_dir = long_dir();
    let long_file = format!("{long_dir}/{}", "f".repeat(200));
    let long_target = format!("/opt/{}", "t".repeat(150));
    let mut t = Tar::new();
    t.dir("./").dir("etc/").dir("bin/").dir("usr/").dir("usr/lib/").dir("dev/").dir("run/").dir("var/");
    t.dir("var/cache/").dir("deep/").dir(&long_dir).dir("ünïcødé/");
    t.pax(&[("SCHILY.xattr.user.hb", b"hello"), ("SCHILY.xattr.trusted.hb", &[0, 1, 2, 255])]);
    t.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    t.file("bin/busybox", 0o4755, &big);
    t.link(tar::EntryType::Symlink, "bin/sh", "/bin/busybox");
    t.link(tar::EntryType::Symlink, "bin/escape", "../../../../etc/shadow");
    t.link(tar::EntryType::Symlink, "bin/dangling", "nowhere");
    t.link(tar::EntryType::Symlink, "bin/longlink", &long_target);
    t.link(tar::EntryType::Link, "usr/lib/hard", "bin/busybox");
    t.link(tar::EntryType::Link, "etc/hard2", "bin/busybox");
    t.dev(tar::EntryType::Char, "dev/null", 1, 3);
    t.dev(tar::EntryType::Block, "dev/loop0", 7, 0);
    t.dev(tar::EntryType::Fifo, "run/fifo", 0, 0);
    t.file(&long_file, 0o600, b"long name");
    t.file("ünïcødé/名前.txt", 0o640, "unicode ✓".as_bytes());
    t.file("var/zeros", 0o644, &vec![0u8; 1 << 20]);
    t.file("empty", 0o000, b"");
    t.pax(&[("mtime", b"1700000000.123456789")]).file("nsec", 0o644, b"n");
    t.pax(&[("mtime", b"-86400.5")]).file("old", 0o644, b"o");
    t.pax(&[("uid", b"3000000"), ("gid", b"4000000")]).file("biguid", 0o644, b"u");
    t.file("etc/.wh.shadow", 0o600, b"");
    t.file("var/cache/.wh..wh..opq", 0o600, b"");
    t.finish()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn every_entry_type_round_trips_in_every_compression() {
    let raw = every_entry_type();
    let hb = Hb::new();
    let want = fingerprint_tar(&raw);
    assert!(want.len() > 25, "crafted layer has {} entries", want.len());
    let mut diff_ids = Vec::new();
    for (name, bytes, label) in [
        ("l.tar", raw.clone(), "none"),
        ("l.tar.gz", gzip(&raw), "gzip"),
        ("l.tar.zst", zstd::encode_all(&raw[..], 3).unwrap(), "zstd"),
    ] {
        let p = hb.path(name);
        std::fs::write(&p, &bytes).unwrap();
        let r = hb.import(&p);
        assert_eq!(r["compression"], label, "{r:#}");
        assert_eq!(r["compressed_bytes"], bytes.len() as u64);
        diff_ids.push(r["diff_id"].clone());
        let out = hb.path(&format!("{name}.out"));
        hb.ok(&["layer", "export", r["digest"].as_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_same_tree(name, &want, &fingerprint_tar(&std::fs::read(&out).unwrap()), false);
    }
    assert!(diff_ids.iter().all(|d| *d == diff_ids[0]), "one uncompressed layer: {diff_ids:?}");
    assert_eq!(diff_ids[0].as_str().unwrap(), format!("sha256:{}", sha256_hex(&raw)));
    assert_eq!(hb.json(&["layer", "ls"]).as_array().unwrap().len(), 1, "three blobs, one layer");
    hb.fsck_clean();
}

fn sha256_hex(data: &[u8]) -> String {
    // The layer's own digest function is what is under test; compute the expectation with an
    // independent tool.
    let mut c = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[test]
fn rootfs_export_materialises_every_entry_type() {
    let raw = every_entry_type();
    let hb = Hb::new();
    let p = hb.path("l.tar");
    std::fs::write(&p, &raw).unwrap();
    let r = hb.import(&p);
    let out = hb.path("rootfs");
    hb.ok(&["layer", "export", r["digest"].as_str().unwrap(), "--dir", out.to_str().unwrap()]);
    let mut want = fingerprint_tar(&raw);
    // Whiteouts and opaque markers act on lower layers; a merged tree does not show them.
    want.retain(|p, _| !p.ends_with(b".wh.shadow") && !p.ends_with(b".wh..wh..opq"));
    let got = fingerprint_dir(&out, &[]);
    assert_same_tree("rootfs of the crafted layer", &want, &got, true);
    // The escaping symlink was recreated as a link, never followed.
    assert_eq!(std::fs::read_link(out.join("bin/escape")).unwrap().to_str().unwrap(), "../../../../etc/shadow");
}

#[test]
fn layers_merge_with_whiteouts_and_opaque_dirs() {
    let mut lower = Tar::new();
    lower.dir("a/").dir("cache/").file("a/keep", 0o644, b"k").file("a/drop", 0o644, b"d");
    lower.file("cache/x", 0o644, b"x").file("cache/y", 0o644, b"y").file("replaced", 0o644, b"old");
    let mut upper = Tar::new();
    upper.dir("a/").dir("cache/").file("a/.wh.drop", 0o644, b"").file("cache/.wh..wh..opq", 0o644, b"");
    upper.file("cache/new", 0o644, b"n").file("replaced", 0o600, b"new");
    let hb = Hb::new();
    let (lp, up) = (hb.path("lower.tar"), hb.path("upper.tar"));
    std::fs::write(&lp, lower.finish()).unwrap();
    std::fs::write(&up, upper.finish()).unwrap();
    let l = hb.import(&lp)["digest"].as_str().unwrap().to_string();
    let u = hb.import(&up)["digest"].as_str().unwrap().to_string();
    let out = hb.path("rootfs");
    hb.ok(&["layer", "export", &l, &u, "--dir", out.to_str().unwrap()]);
    let got: Vec<String> = fingerprint_dir(&out, &[]).keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert_eq!(got, ["", "a", "a/keep", "cache", "cache/new", "replaced"]);
    assert_eq!(std::fs::read(out.join("replaced")).unwrap(), b"new");
}
