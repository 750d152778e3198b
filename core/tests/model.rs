//! The layer index model: codec, builder rules, overlay merge, Merkle diff.

use hb_core::index::{IndexError, FORMAT_VERSION};
use hb_core::*;

fn meta(mode: u32, mtime: i64) -> Meta {
    Meta { mode, uid: 1000, gid: 100, mtime, mtime_nsec: 0, xattrs: vec![] }
}

fn chunk(tag: &str, len: u32) -> ChunkRef {
    ChunkRef { id: ChunkId::of(tag.as_bytes()), len }
}

fn file(tags: &[(&str, u32)]) -> NewEntry {
    NewEntry::File { chunks: tags.iter().map(|(t, l)| chunk(t, *l)).collect() }
}

/// A layer with every entry type, implied parents, xattrs, unicode and a hard link.
fn sample() -> LayerIndex {
    let mut b = TreeBuilder::new(ChunkerParams::default());
    b.add(b"./", meta(0o755, 1), NewEntry::Dir).unwrap();
    b.add(b"etc/", meta(0o755, 2), NewEntry::Dir).unwrap();
    let mut m = meta(0o644, 3);
    m.xattrs = vec![(b"security.capability".to_vec(), vec![1, 2, 3]), (b"user.x".to_vec(), b"y".to_vec())];
    m.mtime_nsec = 123_456_789;
    b.add(b"etc/passwd", m, file(&[("a", 10), ("b", 20)])).unwrap();
    b.add(b"usr/bin/tool", meta(0o4755, 4), file(&[("c", 30), ("a", 10)])).unwrap();
    b.add(b"usr/bin/tool-link", meta(0o777, 5), NewEntry::Hardlink { target: b"usr/bin/tool".to_vec() }).unwrap();
    b.add(b"usr/bin/sh", meta(0o777, 6), NewEntry::Symlink { target: b"/bin/busybox".to_vec() }).unwrap();
    b.add(b"dev/null", meta(0o666, 7), NewEntry::CharDev { major: 1, minor: 3 }).unwrap();
    b.add(b"dev/sda", meta(0o660, 7), NewEntry::BlockDev { major: 8, minor: 0 }).unwrap();
    b.add(b"run/fifo", meta(0o600, 8), NewEntry::Fifo).unwrap();
    b.add("ünï/😀.txt".as_bytes(), meta(0o600, -5), file(&[])).unwrap();
    b.add(b"gone/.wh.old", meta(0o600, 9), file(&[])).unwrap();
    b.add(b"opaque/.wh..wh..opq", meta(0o600, 9), file(&[])).unwrap();
    b.add(b"usr/", meta(0o700, 10), NewEntry::Dir).unwrap(); // listed after its children
    b.finish(Digest::of(b"layer"))
}

#[test]
fn encode_decode_round_trip_keeps_everything() {
    let idx = sample();
    let bytes = idx.encode();
    let back = LayerIndex::decode(&bytes).unwrap();
    assert_eq!(back, idx);
    assert!(back.verify_merkle());
    assert_eq!(back.chunks.len(), 3, "chunk table is de-duplicated");
    let tool = back.lookup(b"usr/bin/tool").unwrap();
    let link = back.lookup(b"usr/bin/tool-link").unwrap();
    assert_eq!(back.entries[link as usize].kind, Kind::Hardlink { target: tool });
    assert_eq!(back.entries[back.lookup(b"usr").unwrap() as usize].meta.mode, 0o700);
    assert!(back.entries[back.lookup(b"usr").unwrap() as usize].explicit);
    assert!(!back.entries[back.lookup(b"dev").unwrap() as usize].explicit, "implied dir");
    assert_eq!(back.entries[back.lookup(b"gone/.wh.old").unwrap() as usize].kind, Kind::Whiteout);
    assert_eq!(back.entries[back.lookup(b"opaque/.wh..wh..opq").unwrap() as usize].kind, Kind::Opaque);
    let uni = back.lookup("ünï/😀.txt".as_bytes()).unwrap();
    assert_eq!(back.entries[uni as usize].meta.mtime, -5);
    assert_eq!(back.content_bytes(), 70);
}

#[test]
fn decode_rejects_corruption_truncation_and_unknown_versions() {
    let bytes = sample().encode();
    for pos in [10, bytes.len() / 2, bytes.len() - 40] {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x40;
        assert_eq!(LayerIndex::decode(&bad).unwrap_err(), IndexError::Checksum, "flip at {pos}");
    }
    for len in [0, 3, 20, bytes.len() - 1] {
        assert!(LayerIndex::decode(&bytes[..len]).is_err(), "truncated to {len}");
    }
    let mut v2 = bytes.clone();
    v2[4..6].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    assert_eq!(LayerIndex::decode(&v2).unwrap_err(), IndexError::UnsupportedVersion(FORMAT_VERSION + 1));
    assert_eq!(LayerIndex::decode(b"NOPE........").unwrap_err(), IndexError::BadMagic);
}

#[test]
fn builder_refuses_bad_entries_naming_them() {
    let mut b = TreeBuilder::new(ChunkerParams::default());
    b.add(b"a", meta(0o644, 0), file(&[("x", 1)])).unwrap();
    b.add(b"d/", meta(0o755, 0), NewEntry::Dir).unwrap();
    let cases: Vec<(&[u8], NewEntry, &str)> = vec![
        (b"../etc/passwd", file(&[]), "'..'"),
        (b"/etc/passwd", file(&[]), "absolute"),
        (b"a", file(&[]), "duplicate"),
        (b"d", NewEntry::Dir, "duplicate"),
        (b"a/b", file(&[]), "not a directory"),
        (b"h1", NewEntry::Hardlink { target: b"../../etc/shadow".to_vec() }, "hard link target"),
        (b"h2", NewEntry::Hardlink { target: b"missing".to_vec() }, "hard link target"),
        (b"h3", NewEntry::Hardlink { target: b"d".to_vec() }, "hard link target"),
        (b"x/.wh.gone", file(&[("z", 3)]), "whiteout must be"),
        (b".wh..wh.plnk", file(&[]), "AUFS"),
        (b"./", file(&[]), "root"),
    ];
    for (path, entry, want) in cases {
        let err = b.add(path, meta(0o644, 0), entry).unwrap_err().to_string();
        assert!(err.contains(want), "{:?}: {err}", String::from_utf8_lossy(path));
        assert!(
            err.contains(&*String::from_utf8_lossy(path).trim_end_matches('/').to_string()) || err.contains("entry"),
            "{err}"
        );
    }
}

fn layer(entries: &[(&str, NewEntry)]) -> LayerIndex {
    let mut b = TreeBuilder::new(ChunkerParams::default());
    for (p, e) in entries {
        b.add(p.as_bytes(), meta(if *e == NewEntry::Dir { 0o755 } else { 0o644 }, 1), e.clone()).unwrap();
    }
    b.finish(Digest::of(format!("{entries:?}").as_bytes()))
}

#[test]
fn merge_applies_whiteouts_opaque_dirs_and_replacements() {
    let lower = layer(&[
        ("etc/keep", file(&[("k", 1)])),
        ("etc/drop", file(&[("d", 1)])),
        ("var/cache/a", file(&[("a", 1)])),
        ("var/cache/b", file(&[("b", 1)])),
        ("opt/dir/x", file(&[("x", 1)])),
        ("data/orig", file(&[("o", 4)])),
        ("data/link", NewEntry::Hardlink { target: b"data/orig".to_vec() }),
        ("data/link2", NewEntry::Hardlink { target: b"data/orig".to_vec() }),
    ]);
    let upper = layer(&[
        ("etc/.wh.drop", file(&[])),
        ("var/cache/.wh..wh..opq", file(&[])),
        ("var/cache/new", file(&[("n", 1)])),
        ("opt/dir", file(&[("f", 2)])),
        ("data/.wh.orig", file(&[])),
    ]);
    let m = merge_layers(ChunkerParams::default(), [&lower, &upper]);
    let has = |p: &str| m.lookup(p.as_bytes()).is_some();
    assert!(has("etc/keep") && !has("etc/drop"));
    assert!(has("var/cache/new") && !has("var/cache/a") && !has("var/cache/b"));
    assert!(matches!(m.entries[m.lookup(b"opt/dir").unwrap() as usize].kind, Kind::File { size: 2, .. }));
    assert!(!has("opt/dir/x"));
    // The whited-out target's content survives in its remaining hard links, still linked.
    assert!(!has("data/orig"));
    let l1 = m.lookup(b"data/link").unwrap();
    let l2 = m.lookup(b"data/link2").unwrap();
    assert!(matches!(m.entries[l1 as usize].kind, Kind::File { size: 4, .. }));
    assert_eq!(m.entries[l2 as usize].kind, Kind::Hardlink { target: l1 });
    assert!(m.entries.iter().all(|e| !matches!(e.kind, Kind::Whiteout | Kind::Opaque)));
    assert!(LayerIndex::decode(&m.encode()).unwrap().verify_merkle());

    // The view a mount serves is the same tree, its directory hashes left zero.
    let served = hb_core::merge_layers_to_serve(ChunkerParams::default(), [&lower, &upper]);
    assert_eq!(served.chunks, m.chunks);
    assert_eq!(served.entries.len(), m.entries.len());
    for (i, (s, e)) in served.entries.iter().zip(&m.entries).enumerate() {
        assert_eq!((s.parent, &s.name, &s.meta), (e.parent, &e.name, &e.meta));
        match (&s.kind, &e.kind) {
            (Kind::Dir { hash }, Kind::Dir { .. }) => assert_eq!(*hash, [0; 32], "entry {i}"),
            (a, b) => assert_eq!(a, b),
        }
        assert_eq!(served.children(i as u32), m.children(i as u32));
    }
    assert!(!served.verify_merkle(), "no hashes: never one to store or diff");
    assert!(m.is_hashed() && !served.is_hashed());
    let refused = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
    assert!(refused(&|| drop(served.encode())), "never encoded");
    assert!(refused(&|| drop(hb_core::diff(&m, &served))), "never diffed");
}

#[test]
fn diff_reports_changed_paths_and_only_missing_chunks() {
    let a = layer(&[
        ("usr/lib/big", file(&[("c1", 100), ("c2", 100), ("c3", 100)])),
        ("usr/share/doc/x", file(&[("d", 5)])),
        ("etc/old", file(&[("o", 7)])),
    ]);
    let b = layer(&[
        ("usr/lib/big", file(&[("c1", 100), ("c2x", 100), ("c3", 100)])),
        ("usr/share/doc/x", file(&[("d", 5)])),
        ("etc/new/conf", file(&[("n", 9), ("c1", 100)])),
    ]);
    let d = diff(&a, &b);
    let got: Vec<(char, String)> =
        d.changes.iter().map(|c| (c.change.letter(), String::from_utf8_lossy(&c.path).into_owned())).collect();
    assert_eq!(
        got,
        vec![
            ('A', "etc/new".into()),
            ('A', "etc/new/conf".into()),
            ('D', "etc/old".into()),
            ('C', "usr/lib/big".into()),
        ]
    );
    let ids: Vec<ChunkId> = d.needed_chunks.iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![ChunkId::of(b"n"), ChunkId::of(b"c2x")], "c1 is already in a");
    assert_eq!(d.needed_bytes, 109);
    // usr/share is identical and is never entered: root, etc, usr, usr/lib.
    assert_eq!(d.dirs_visited, 4);
    let same = diff(&a, &a);
    assert!(same.changes.is_empty() && same.needed_bytes == 0 && same.dirs_visited == 0);
}

/// Regression: decode compared the header's root hash with the root entry's stored hash only, so
/// an index whose entries were changed (a file pointed at other chunks, a mode, a name) but whose
/// directory hashes were left as they were decoded fine. Every directory hash is checked now.
#[test]
fn decode_refuses_entries_their_directory_hashes_do_not_cover() {
    let good = sample();
    type Edit = Box<dyn Fn(&mut LayerIndex)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "a file's chunks",
            Box::new(|idx: &mut LayerIndex| {
                let i = idx.lookup(b"etc/passwd").unwrap() as usize;
                idx.entries[i].kind = Kind::File { size: 20, chunks: vec![1] };
            }),
        ),
        (
            "a mode",
            Box::new(|idx: &mut LayerIndex| {
                let i = idx.lookup(b"usr/bin/tool").unwrap() as usize;
                idx.entries[i].meta.mode = 0o6777;
            }),
        ),
        (
            "a symlink's target",
            Box::new(|idx: &mut LayerIndex| {
                let i = idx.lookup(b"usr/bin/sh").unwrap() as usize;
                idx.entries[i].kind = Kind::Symlink { target: b"/etc/shadow".to_vec() };
            }),
        ),
    ];
    for (what, edit) in edits {
        let mut bad = good.clone();
        edit(&mut bad);
        assert_eq!(bad.root_hash(), good.root_hash(), "{what}: the root hash was left as it was");
        let err = LayerIndex::decode(&bad.encode()).unwrap_err();
        assert!(matches!(&err, IndexError::Malformed(m) if m.contains("hash does not match")), "{what}: {err:?}");
    }
    assert!(LayerIndex::decode(&good.encode()).is_ok());
}

/// Hostile indexes (they will come from registries): structurally corrupted encodings with a
/// valid checksum never make the decoder panic, and whatever it accepts is internally consistent.
#[test]
fn decode_survives_corrupted_structure_behind_a_valid_checksum() {
    let good = sample().encode();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let (mut accepted, mut refused) = (0, 0);
    for round in 0..5000 {
        let mut body = good[..good.len() - 32].to_vec();
        match round % 3 {
            0 => {
                for _ in 0..1 + rnd(4) {
                    let i = 8 + rnd(body.len() - 8);
                    body[i] ^= 1 << rnd(8);
                }
            }
            1 => body.truncate(8 + rnd(body.len() - 8)),
            _ => {
                let i = 8 + rnd(body.len() - 8);
                body.insert(i, rnd(256) as u8);
            }
        }
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        match LayerIndex::decode(&body) {
            Ok(idx) => {
                accepted += 1;
                // Accepted means usable: every path resolves back to its entry.
                for i in 0..idx.entries.len() as u32 {
                    assert_eq!(idx.lookup(&idx.path(i)), Some(i), "round {round}");
                }
            }
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 4000, "{refused} refused, {accepted} accepted");
}
