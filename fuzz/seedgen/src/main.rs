//! Seeds for the binary formats, made by hb's own encoders: layer indexes built by the
//! `TreeBuilder`, chunk tables, start-up orders, lazy sources, an accelerated config, and daemon
//! API chunk frames. Checksummed formats are written without their 32-byte BLAKE3 trailer: the
//! targets seal each input themselves (and also try it as is).
//!
//! Usage: hb-fuzz-seedgen CORPUS_DIR (writes CORPUS_DIR/<target>/<name>).

use std::path::Path;

use hb_core::{
    AccelConfig, AccelLayer, ChunkId, ChunkRef, ChunkTable, ChunkerParams, Digest, LayerIndex, LazySource, Meta,
    NewEntry, StartupOrder, TreeBuilder,
};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus folder");
    std::fs::write(d.join(name), bytes).expect("seed");
}

fn unsealed(mut v: Vec<u8>) -> Vec<u8> {
    v.truncate(v.len() - 32);
    v
}

fn meta(mode: u32) -> Meta {
    Meta { mode, uid: 0, gid: 0, mtime: 1_700_000_000, mtime_nsec: 0, xattrs: Vec::new() }
}

fn chunk(data: &[u8]) -> ChunkRef {
    ChunkRef { id: ChunkId::of(data), len: data.len() as u32 }
}

fn index_small() -> LayerIndex {
    let mut b = TreeBuilder::new(ChunkerParams::default());
    b.add(b"etc/", meta(0o755), NewEntry::Dir).unwrap();
    b.add(b"etc/hostname", meta(0o644), NewEntry::File { chunks: vec![chunk(b"hb\n")] }).unwrap();
    b.finish(Digest::of(b"small"))
}

fn index_every_kind() -> LayerIndex {
    let mut b = TreeBuilder::new(ChunkerParams::default());
    let mut xattr = meta(0o755);
    xattr.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2]), (b"user.a".to_vec(), b"b".to_vec())];
    xattr.mtime = -3;
    xattr.mtime_nsec = 250_000_000;
    b.add(b"./", meta(0o755), NewEntry::Dir).unwrap();
    b.add(b"bin/", xattr.clone(), NewEntry::Dir).unwrap();
    b.add(b"bin/busybox", meta(0o4755), NewEntry::File { chunks: vec![chunk(b"a"), chunk(b"bb"), chunk(b"a")] })
        .unwrap();
    b.add(b"bin/sh", meta(0o777), NewEntry::Symlink { target: b"busybox".to_vec() }).unwrap();
    b.add(b"bin/ls", meta(0o755), NewEntry::Hardlink { target: b"bin/busybox".to_vec() }).unwrap();
    b.add(b"dev/null", meta(0o666), NewEntry::CharDev { major: 1, minor: 3 }).unwrap();
    b.add(b"dev/sda", meta(0o660), NewEntry::BlockDev { major: 8, minor: 0 }).unwrap();
    b.add(b"run/fifo", meta(0o600), NewEntry::Fifo).unwrap();
    b.add(b"var/.wh..wh..opq", meta(0o644), NewEntry::File { chunks: vec![] }).unwrap();
    b.add(b"etc/.wh.motd", meta(0o644), NewEntry::File { chunks: vec![] }).unwrap();
    b.add(b"empty", xattr, NewEntry::File { chunks: vec![] }).unwrap();
    b.finish(Digest::of(b"every kind"))
}

fn table() -> ChunkTable {
    let mut t = ChunkTable::default();
    t.push(ChunkId::of(b"a"), 10, 20, true);
    t.push(ChunkId::of(b"b"), 5, 5, false);
    t.push(ChunkId::of(b"c"), 65536, 262144, true);
    t
}

fn main() {
    let dir = std::env::args_os().nth(1).expect("usage: hb-fuzz-seedgen CORPUS_DIR");
    let dir = Path::new(&dir);

    let root_only = TreeBuilder::new(ChunkerParams::default()).finish(Digest::of(b"empty"));
    for (name, idx) in [("root-only", root_only), ("small", index_small()), ("every-kind", index_every_kind())] {
        assert_eq!(LayerIndex::decode(&idx.encode()).as_ref(), Ok(&idx));
        write(dir, "layer_index", name, &unsealed(idx.encode()));
    }

    write(dir, "lazy_tables", "table-empty", &unsealed(ChunkTable::default().encode()));
    write(dir, "lazy_tables", "table", &unsealed(table().encode()));
    // The compact table, against the three-chunk index the `lazy_tables` target reads it with.
    let mut b = TreeBuilder::new(ChunkerParams::default());
    let chunks = (0..3u32).map(|i| ChunkRef { id: ChunkId::of(&i.to_le_bytes()), len: 100 + i }).collect();
    b.add(b"f", Meta { mode: 0o644, ..Meta::default() }, NewEntry::File { chunks }).unwrap();
    let three = b.finish(Digest([1; 32]));
    let mut compact = ChunkTable::default();
    for (i, c) in three.chunks.iter().enumerate() {
        compact.push(c.id, if i == 1 { c.len } else { 60 }, c.len, i != 1);
    }
    write(dir, "lazy_tables", "table-compact", &unsealed(compact.encode_compact(&three).unwrap()));
    let order = StartupOrder { chunks: vec![ChunkId::of(b"a"), ChunkId::of(b"c")] };
    write(dir, "lazy_tables", "startup", &unsealed(order.encode()));
    let source = LazySource { repository: "127.0.0.1:5000/busybox".into(), data: Digest::of(b"data"), table: table() };
    write(dir, "lazy_tables", "source", &unsealed(source.encode()));

    let layer = |n: &[u8]| AccelLayer {
        diff_id: Digest::of(n),
        blob: Digest::of(b"blob"),
        index: Digest::of(b"index"),
        index_size: 1234,
        table: Digest::of(b"table"),
        table_size: 80,
        data: Digest::of(b"data"),
        data_size: 1 << 20,
    };
    let cfg = AccelConfig {
        version: 1,
        manifest: Digest::of(b"manifest"),
        config: Digest::of(b"config"),
        layers: vec![layer(b"1"), layer(b"2")],
        startup: Some((Digest::of(b"startup"), 64)),
    };
    write(dir, "accel_config", "two-layers", &serde_json::to_vec_pretty(&cfg).unwrap());
    let bare = AccelConfig { layers: vec![], startup: None, ..cfg };
    write(dir, "accel_config", "no-layers", &serde_json::to_vec(&bare).unwrap());

    // Daemon API chunk frames: id (32 bytes), length (u32 LE), bytes; and a bare id list.
    let mut frames = Vec::new();
    for data in [&b"hello"[..], b"", &[0u8; 300][..]] {
        frames.extend_from_slice(ChunkId::of(data).as_bytes());
        frames.extend_from_slice(&(data.len() as u32).to_le_bytes());
        frames.extend_from_slice(data);
    }
    write(dir, "api_chunks", "frames", &frames);
    let ids: Vec<u8> = [b"a", b"b"].iter().flat_map(|d| *ChunkId::of(*d).as_bytes()).collect();
    write(dir, "api_chunks", "ids", &ids);
}
