//! The store through its library API: concurrent imports and digest checks.

use hb_core::Digest;
use hb_store::{ImportOptions, NoProgress, Store, StoreError, StoreOptions};

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A plain tar holding `files`.
fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |buf: &mut [u8], v: u64| {
            let s = format!("{:0w$o}\0", v, w = buf.len() - 1);
            buf.copy_from_slice(s.as_bytes());
        };
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 1_700_000_000);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

/// A store whose one layer, `tar`, is lazy (its chunks absent, as a lazy pull leaves them), and
/// `src`, a store holding it whole (what a fill would fetch). Bind `_dirs`: the folders go with it.
struct LazyCopy {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    src: Store,
    store: Store,
    report: hb_store::ImportReport,
    index: hb_core::LayerIndex,
}

fn lazy_copy(tar: &[u8]) -> LazyCopy {
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path(), StoreOptions::default()).unwrap();
    let report = src.import_layer(tar, &NoProgress).unwrap();
    let index = src.layer(&report.diff_id).unwrap().unwrap();
    let mut table = hb_core::ChunkTable::default();
    index.chunks.iter().for_each(|c| table.push(c.id, c.len, c.len, false));
    let source = hb_core::LazySource { repository: "h/x".into(), data: Digest::of(b"d"), table };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let compression = hb_store::BlobCompression::None;
    store.import_lazy_layer(&index, &report.digest, compression, tar.len() as u64, &source, true).unwrap();
    LazyCopy { _dirs: (src_dir, dir), src, store, report, index }
}

#[test]
fn concurrent_imports_of_overlapping_layers_count_every_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let shared = pseudo_random(1, 6 << 20);
    let layers: Vec<Vec<u8>> =
        (0..6u64).map(|i| layer(&[("shared", &shared), ("own", &pseudo_random(100 + i, 2 << 20))])).collect();
    std::thread::scope(|s| {
        for l in &layers {
            let store = &store;
            s.spawn(move || store.import_layer(&l[..], &NoProgress).unwrap());
        }
    });
    let r = store.fsck(&NoProgress).unwrap();
    assert!(r.is_clean(), "{:#?}", r.issues);
    assert_eq!(r.layers, 6);
    let u = store.usage().unwrap();
    // Each distinct chunk is referenced once however many ingests wrote it.
    assert!(u.unique_bytes < (6 + 6 * 2 + 1) << 20, "{u:?}");
    // Reopen: the same answers from disk.
    drop(store);
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert!(store.fsck(&NoProgress).unwrap().is_clean());
}

#[test]
fn a_blob_with_the_wrong_digest_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let l = layer(&[("f", &pseudo_random(5, 1 << 20))]);
    let wrong = Digest::of(b"something else");
    let err =
        store.import_blob(&l[..], &ImportOptions { expect_digest: Some(wrong), pin: true }, &NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&wrong.to_string()), "{err}");
    assert_eq!(store.usage().unwrap().chunks, 0);
    assert!(store.list_layers().unwrap().is_empty());
    let right = Digest::of(&l);
    let r = store.import_blob(&l[..], &ImportOptions { expect_digest: Some(right), pin: false }, &NoProgress).unwrap();
    assert_eq!(r.digest, right);
    assert!(!store.list_layers().unwrap()[0].pinned);
    assert!(store.fsck(&NoProgress).unwrap().is_clean());
}

#[test]
fn a_garbled_tar_header_is_reported_on_one_printable_line() {
    // Regression: the tar crate quotes a bad checksum field's bytes raw (a newline and control
    // characters reached the terminal).
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let mut l = layer(&[("f", b"data")]);
    l[148..156].copy_from_slice(b"\x12\n\xff,[\x01\x02\x03");
    let err = store.import_layer(&l[..], &NoProgress).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::BadStream(_)), "{msg}");
    assert!(msg.contains("not a valid tar stream"), "{msg}");
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    assert!(msg.contains("\\u{12}"), "the bad bytes are shown escaped: {msg}");
    assert_eq!(store.usage().unwrap().chunks, 0);
}

#[test]
fn named_images_keep_their_layers_until_unnamed() {
    use hb_store::{ImageLayer, ImageRecord};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let unpinned = ImportOptions { expect_digest: None, pin: false };
    let base = layer(&[("base", &pseudo_random(7, 1 << 20))]);
    let app = layer(&[("app", &pseudo_random(8, 1 << 20))]);
    let rb = store.import_blob(&base[..], &unpinned, &NoProgress).unwrap();
    let ra = store.import_blob(&app[..], &unpinned, &NoProgress).unwrap();
    let entry = |r: &hb_store::ImportReport| ImageLayer {
        digest: r.digest,
        diff_id: r.diff_id,
        size: r.compressed_bytes,
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
    };
    let rec = ImageRecord {
        manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        manifest: "{}".into(),
        config_digest: Digest::of(b"{}"),
        config: "{}".into(),
        layers: vec![entry(&rb), entry(&ra)],
        platform: "linux/amd64".into(),
    };
    let digest = Digest::of(b"manifest");
    store.put_image("example.com/app:1", &digest, &rec).unwrap();
    assert_eq!(store.image_by_name("example.com/app:1").unwrap(), Some(digest));
    assert_eq!(store.image(&digest).unwrap().unwrap(), rec);
    let gc = store.gc(&NoProgress).unwrap();
    assert_eq!((gc.images_removed, gc.layers_removed), (0, 0), "{gc:?}");
    assert!(store.fsck(&NoProgress).unwrap().is_clean());

    // A record naming a layer the store lacks is refused.
    let mut broken = rec.clone();
    broken.layers[0].diff_id = Digest::of(b"missing");
    assert!(store.put_image("example.com/broken:1", &Digest::of(b"m2"), &broken).is_err());

    assert!(store.remove_image_name("example.com/app:1").unwrap());
    assert!(!store.remove_image_name("example.com/app:1").unwrap());
    let gc = store.gc(&NoProgress).unwrap();
    assert_eq!((gc.images_removed, gc.layers_removed), (1, 2), "{gc:?}");
    assert_eq!(store.usage().unwrap().chunks, 0);
    assert!(store.fsck(&NoProgress).unwrap().is_clean());
}

/// The store as a chunk source (what mounts and peers will read through): verified bytes for a
/// stored chunk, a clean miss for an absent one, `Corrupt` (never bytes) for a damaged one.
#[test]
fn the_store_as_a_chunk_source_translates_every_outcome() {
    use hb_core::{ChunkId, ChunkSource, SourceError};
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let data = pseudo_random(9, 10_000);
    store.import_layer(&layer(&[("f", &data)])[..], &NoProgress).unwrap();
    let id = ChunkId::of(&data); // 10 kB is below the 16 KiB minimum cut: one chunk
    assert!(store.fetch(&id).unwrap().as_deref() == Some(&data[..]), "stored chunk not returned intact");
    assert!(store.fetch(&ChunkId::of(b"absent")).unwrap().is_none());
    let pack = std::fs::read_dir(dir.path().join("packs")).unwrap().next().unwrap().unwrap().path();
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    let len = f.metadata().unwrap().len();
    f.write_all_at(&[0x5a; 16], len - 100).unwrap(); // inside the chunk's data
    match store.fetch(&id) {
        Err(SourceError::Corrupt { id: got, .. }) => assert_eq!(got, id),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// A lazy layer: index first, chunks filled later (verified), completed by a full import.
#[test]
fn lazy_layers_fill_on_demand_and_complete() {
    use hb_core::{ChunkId, ChunkTable, LazySource};
    use hb_store::BlobCompression;
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path(), StoreOptions::default()).unwrap();
    let shared = pseudo_random(7, 1 << 20);
    let tar = layer(&[("a", &pseudo_random(8, 3 << 20)), ("b", &shared)]);
    let r = src.import_layer(&tar[..], &NoProgress).unwrap();
    let index = src.layer(&r.diff_id).unwrap().unwrap();
    let mut table = ChunkTable::default();
    for c in &index.chunks {
        table.push(c.id, c.len, c.len, false);
    }
    let source = LazySource { repository: "127.0.0.1:1/x".into(), data: Digest::of(b"data"), table };

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    // A layer sharing `b` is already complete: those chunks count as local.
    store.import_layer(&layer(&[("other", &shared)])[..], &NoProgress).unwrap();
    let li =
        store.import_lazy_layer(&index, &r.digest, BlobCompression::None, tar.len() as u64, &source, true).unwrap();
    assert!(li.local_chunks > 0 && li.remote_chunks > 0, "{li:?}");
    assert!(!store.has_layer(&r.diff_id).unwrap(), "a lazy layer is not complete");
    let fsck = store.fsck(&NoProgress).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.issues);
    assert_eq!(fsck.absent_chunks, li.remote_chunks);
    let missing = store.missing_chunks(&r.diff_id).unwrap();
    assert_eq!(missing.len(), li.remote_chunks);
    assert!(matches!(store.read_chunk(&missing[0].id), Err(StoreError::MissingChunk(_))));

    // Wrong bytes are refused and change nothing.
    let wrong = vec![(missing[0].id, vec![0u8; missing[0].len as usize])];
    assert!(matches!(store.fill_chunks(&wrong), Err(StoreError::CorruptChunk { .. })));
    // Fill one chunk: it reads back; fsck stays clean.
    let one = vec![(missing[0].id, src.read_chunk(&missing[0].id).unwrap())];
    assert_eq!(store.fill_chunks(&one).unwrap().filled, 1);
    assert_eq!(store.fill_chunks(&one).unwrap().skipped, 1, "a second fill of the same chunk is a no-op");
    // Regression: a batch holding one chunk twice stored it twice in the pack accounting.
    let twice = vec![
        (missing[1].id, src.read_chunk(&missing[1].id).unwrap()),
        (missing[1].id, src.read_chunk(&missing[1].id).unwrap()),
    ];
    let r2 = store.fill_chunks(&twice).unwrap();
    assert_eq!((r2.filled, r2.skipped), (1, 1));
    assert_eq!(ChunkId::of(&store.read_chunk(&missing[0].id).unwrap()), missing[0].id);
    // What a LAN peer's summary says the store holds: filled chunks, never the known-but-absent.
    let held: std::collections::HashSet<ChunkId> = store.held_chunks().unwrap().into_iter().collect();
    assert!(held.contains(&missing[0].id) && held.contains(&missing[1].id));
    assert!(missing[2..].iter().all(|c| !held.contains(&c.id)), "an absent chunk listed as held");
    let absent: std::collections::HashSet<ChunkId> = missing[2..].iter().map(|c| c.id).collect();
    let expected: std::collections::HashSet<ChunkId> =
        index.chunks.iter().map(|c| c.id).filter(|id| !absent.contains(id)).collect();
    assert_eq!(held, expected);
    assert!(!store.complete_lazy_layer(&r.diff_id).unwrap());
    let fsck = store.fsck(&NoProgress).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.issues);

    // The full blob fills the rest and the layer becomes complete, refcounts unchanged.
    let full = store.import_layer(&tar[..], &NoProgress).unwrap();
    assert_eq!(full.new_chunks, li.remote_chunks - 2);
    assert!(store.has_layer(&r.diff_id).unwrap());
    assert!(store.missing_chunks(&r.diff_id).unwrap().is_empty());
    let fsck = store.fsck(&NoProgress).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.issues);
    assert_eq!((fsck.absent_chunks, fsck.lazy_layers), (0, 0));
}

/// A fill keeps the zstd frame a chunk was fetched as, byte for byte (no second compression);
/// a frame that does not say it holds the chunk's length is not used, the bytes are compressed
/// as before. Either way the chunk reads back and fsck is clean.
#[test]
fn fills_keep_the_frame_a_chunk_came_in() {
    use hb_core::ChunkId;
    let text: Vec<u8> =
        (0..200_000u32).flat_map(|i| format!("line {} of a text file\n", i % 977).into_bytes()).collect();
    let LazyCopy { _dirs, src, store, report: r, .. } = lazy_copy(&layer(&[("t", &text)]));
    let missing = store.missing_chunks(&r.diff_id).unwrap();
    assert!(missing.len() >= 3, "{}", missing.len());
    let raw = |c: &hb_core::ChunkRef| src.read_chunk(&c.id).unwrap();
    // At a level the store does not write at: its bytes differ from what a fill would make.
    let (a, b) = (raw(&missing[0]), raw(&missing[1]));
    let frame = zstd::bulk::compress(&a, 19).unwrap();
    assert_ne!(frame, zstd::bulk::compress(&a, 3).unwrap());
    // A frame of other bytes (one short) for the second chunk.
    let wrong = zstd::bulk::compress(&b[..b.len() - 1], 19).unwrap();
    let frames: std::collections::HashMap<ChunkId, Vec<u8>> =
        [(missing[0].id, frame.clone()), (missing[1].id, wrong.clone())].into_iter().collect();
    let filled = store.fill_chunks_framed(&[(missing[0].id, a.clone()), (missing[1].id, b.clone())], &frames).unwrap();
    assert_eq!(filled.filled, 2);
    let kept = store.read_chunk_stored(&missing[0].id).unwrap();
    assert!(kept.zstd && kept.bytes == frame, "the frame kept as it came");
    assert_eq!(store.read_chunk(&missing[0].id).unwrap(), a);
    let other = store.read_chunk_stored(&missing[1].id).unwrap();
    assert_ne!(other.bytes, wrong, "a frame of other bytes is not kept");
    assert_eq!(store.read_chunk(&missing[1].id).unwrap(), b);
    // Handed over as frames alone (a mount server to its daemon): decoded, checked, kept as
    // they came; one that does not decode to its chunk is refused, nothing of its batch kept.
    let c = raw(&missing[2]);
    let frame = zstd::bulk::compress(&c, 19).unwrap();
    let bad = vec![(missing[2].id, c.len() as u32, frame[..frame.len() - 3].to_vec())];
    assert!(matches!(store.fill_frames(bad), Err(StoreError::CorruptChunk { .. })));
    let other = zstd::bulk::compress(&b, 19).unwrap();
    let lying = vec![(missing[2].id, b.len() as u32, other)];
    assert!(matches!(store.fill_frames(lying), Err(StoreError::CorruptChunk { .. })));
    assert!(matches!(store.read_chunk(&missing[2].id), Err(StoreError::MissingChunk(_))));
    assert_eq!(store.fill_frames(vec![(missing[2].id, c.len() as u32, frame.clone())]).unwrap().filled, 1);
    assert_eq!(store.read_chunk_stored(&missing[2].id).unwrap().bytes, frame);
    assert_eq!(store.read_chunk(&missing[2].id).unwrap(), c);
    let fsck = store.fsck(&NoProgress).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.issues);
}

/// Unpinning a lazy layer lets gc drop its source record and its never-fetched chunks.
#[test]
fn gc_drops_unused_lazy_layers() {
    let LazyCopy { _dirs, store, report: r, index, .. } = lazy_copy(&layer(&[("a", &pseudo_random(9, 1 << 20))]));
    assert!(store.unpin_layer(&r.diff_id).unwrap());
    let gc = store.gc(&NoProgress).unwrap();
    assert_eq!((gc.layers_removed, gc.chunks_removed), (1, index.chunks.len()));
    assert!(store.lazy_layers().unwrap().is_empty());
    let fsck = store.fsck(&NoProgress).unwrap();
    assert!(fsck.is_clean() && fsck.chunks == 0, "{fsck:?}");
}

/// A read-only view of a store another handle holds: reads work, writes are refused, nothing on
/// disk changes.
#[test]
fn a_read_only_view_reads_while_the_owner_holds_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let owner = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let tar = layer(&[("f", &pseudo_random(11, 400_000))]);
    let r = owner.import_layer(&tar[..], &NoProgress).unwrap();
    assert!(matches!(Store::open(dir.path(), StoreOptions::default()), Err(StoreError::Locked(_))));
    let view = Store::open_read_only(dir.path(), StoreOptions::default()).unwrap();
    assert!(!view.is_writable());
    let idx = view.layer(&r.diff_id).unwrap().unwrap();
    for c in &idx.chunks {
        assert_eq!(hb_core::ChunkId::of(&view.read_chunk(&c.id).unwrap()), c.id);
        // The view has no Bloom filter of its own (it asks RocksDB): every stored chunk is found.
        assert!(view.has_chunk(&c.id).unwrap());
        assert!(view.chunk_record(&c.id).unwrap().is_some());
    }
    assert!(!view.has_chunk(&hb_core::ChunkId::of(b"never stored")).unwrap());
    assert!(view.chunk_record(&hb_core::ChunkId::of(b"never stored")).unwrap().is_none());
    let packs = || {
        let mut v: Vec<_> = std::fs::read_dir(dir.path().join("packs"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name(), e.metadata().unwrap().len())
            })
            .collect();
        v.sort();
        v
    };
    let before = packs();
    let other = layer(&[("g", &pseudo_random(12, 100_000))]);
    assert!(matches!(view.import_layer(&other[..], &NoProgress), Err(StoreError::ReadOnly(_))));
    assert!(matches!(view.gc(&NoProgress), Err(StoreError::ReadOnly(_))));
    assert!(matches!(view.unpin_layer(&r.diff_id), Err(StoreError::ReadOnly(_))));
    drop(view);
    assert_eq!(packs(), before, "a read-only view changed the packs");
    assert!(owner.fsck(&NoProgress).unwrap().is_clean());
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(Store::open_read_only(empty.path(), StoreOptions::default()), Err(StoreError::NoStore(_))));
}

/// Raw objects: stored byte for byte, deduplicated by chunk, checked by digest before anything is
/// visible; removal and gc free only what nothing else uses; fsck counts their references.
#[test]
fn raw_objects_are_verified_deduplicated_and_freed_by_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let a = pseudo_random(1, 3 << 20);
    let mut b = a.clone();
    b.extend_from_slice(&pseudo_random(2, 1 << 20));
    let (da, db) = (Digest::of(&a), Digest::of(&b));
    // A wrong digest stores nothing.
    let err = store.put_raw(&a[..], &db, &NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(store.raw(&db).unwrap().is_none());
    assert!(store.fsck(&NoProgress).unwrap().is_clean());
    let ra = store.put_raw(&a[..], &da, &NoProgress).unwrap();
    assert_eq!((ra.size, ra.already_present), (a.len() as u64, false));
    let rb = store.put_raw(&b[..], &db, &NoProgress).unwrap();
    assert!(rb.new_bytes < (3 << 20) / 2 + (1 << 20), "the shared 3 MiB is stored once: {rb:?}");
    assert!(store.put_raw(&a[..], &da, &NoProgress).unwrap().already_present);
    let read = |d: &Digest| -> Vec<u8> {
        store.raw(d).unwrap().unwrap().chunks.iter().flat_map(|c| store.read_chunk(&c.id).unwrap()).collect()
    };
    assert!(read(&da) == a && read(&db) == b, "bytes round trip exactly");
    let report = store.fsck(&NoProgress).unwrap();
    assert!(report.is_clean() && report.raw_objects == 2, "{:?}", report.issues);
    // Removing b frees its own tail only; a still reads back.
    assert!(store.remove_raw(&db).unwrap());
    assert!(!store.remove_raw(&db).unwrap());
    let gc = store.gc(&NoProgress).unwrap();
    assert!(gc.chunks_removed > 0, "{gc:?}");
    assert_eq!(read(&da), a);
    assert!(store.fsck(&NoProgress).unwrap().is_clean());
    store.remove_raw(&da).unwrap();
    store.gc(&NoProgress).unwrap();
    let report = store.fsck(&NoProgress).unwrap();
    assert_eq!((report.chunks, report.raw_objects), (0, 0));
}

/// The chunk list of `name` in the stored layer `diff_id`.
fn chunks_of(store: &Store, diff_id: &Digest, name: &str) -> Vec<hb_core::ChunkRef> {
    let idx = store.layer(diff_id).unwrap().unwrap();
    let i = idx.lookup(name.as_bytes()).unwrap();
    idx.file_chunks(i).copied().collect()
}

/// Regression (hardening issue): a backing file was reused when its length matched, so 4
/// overwritten bytes went to every later mount, and fsck said "clean".
#[test]
fn a_damaged_backing_file_is_never_reused_and_fsck_finds_and_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let data = pseudo_random(7, 8 << 20);
    let r = store.import_layer(&layer(&[("big", &data)])[..], &NoProgress).unwrap();
    let chunks = chunks_of(&store, &r.diff_id, "big");
    assert!(chunks.len() > 4, "the file spans several chunks");
    let path = store.backing_file(&chunks).unwrap().expect("all chunks are local");
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let fsck = store.fsck(&NoProgress).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.issues);
    assert_eq!((fsck.backing_files, fsck.backing_unused), (1, 0));
    assert_eq!(store.usage().unwrap().backing_bytes, data.len() as u64);

    // 4 bytes overwritten in the middle, the length unchanged.
    let damage = |p: &std::path::Path| {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(p).unwrap().write_all_at(b"EVIL", 5 << 20).unwrap();
    };
    damage(&path);
    let fsck = store.fsck(&NoProgress).unwrap();
    assert_eq!(fsck.issues.len(), 1, "{:?}", fsck.issues);
    assert_eq!(fsck.issues[0].kind, "corrupt-backing");
    assert!(fsck.issues[0].detail.contains("does not match its id"), "{:?}", fsck.issues[0]);
    let fixed = store.repair(&fsck).unwrap();
    assert_eq!(fixed.backing_removed, 1);
    assert!(!path.exists());
    assert!(store.fsck(&NoProgress).unwrap().is_clean());

    // The next use writes it again; a damaged one found at use is written again, not served.
    let again = store.backing_file(&chunks).unwrap().unwrap();
    assert_eq!(again, path);
    damage(&path);
    let used = store.backing_file(&chunks).unwrap().unwrap();
    assert_eq!(std::fs::read(&used).unwrap(), data, "the bytes a mount gets are the file's own");
    // A shorter file is refused as well.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1 << 20).unwrap();
    assert_eq!(std::fs::read(store.backing_file(&chunks).unwrap().unwrap()).unwrap(), data);
}

#[test]
fn gc_removes_the_backing_files_no_stored_layer_needs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (a, b) = (pseudo_random(8, 2 << 20), pseudo_random(9, 2 << 20));
    let kept = store.import_layer(&layer(&[("a", &a)])[..], &NoProgress).unwrap();
    let gone = store.import_layer(&layer(&[("b", &b)])[..], &NoProgress).unwrap();
    let pa = store.backing_file(&chunks_of(&store, &kept.diff_id, "a")).unwrap().unwrap();
    let pb = store.backing_file(&chunks_of(&store, &gone.diff_id, "b")).unwrap().unwrap();
    // A dead writer's temporary file, old enough to be one.
    let tmp = store.backing_dir().join(".tmpDEAD");
    std::fs::write(&tmp, b"half").unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(old).unwrap();
    assert!(store.unpin_layer(&gone.diff_id).unwrap());
    let r = store.gc(&NoProgress).unwrap();
    assert_eq!(r.layers_removed, 1);
    assert_eq!(r.backing_removed, 2, "{r:?}");
    assert_eq!(r.backing_bytes_freed, b.len() as u64 + 4);
    assert!(pa.exists() && !pb.exists() && !tmp.exists());
    assert!(store.fsck(&NoProgress).unwrap().is_clean());
}

/// Text-like bytes (words from a small vocabulary): zstd finds more in them at higher levels.
fn prose(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] =
        ["layer", "chunk", "image", "store", "mount", "peer", "index", "order", "blob", "zstd", "fsck", "lazy"];
    let r = pseudo_random(seed, len);
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[(r[i % r.len()] as usize) % WORDS.len()].as_bytes());
        out.push(if r[(i + 1) % r.len()].is_multiple_of(9) { b'\n' } else { b' ' });
        i += 2;
    }
    out.truncate(len);
    out
}

/// A published data blob: level 0 is the store's own bytes; a higher level is never larger,
/// smaller on compressible data, and every chunk still decodes to its id.
#[test]
fn a_data_blob_at_a_higher_level_is_smaller_and_still_decodes_to_every_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    // Small files too: more chunks than one group of encoders takes (64 a core, 8 cores at most).
    let small: Vec<(String, Vec<u8>)> = (0..700).map(|i| (format!("etc/f{i}"), prose(100 + i, 1500))).collect();
    let mut files: Vec<(&str, &[u8])> = small.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    let (text, random) = (prose(3, 3 << 20), pseudo_random(4, 1 << 20));
    files.extend([("text", text.as_slice()), ("random", random.as_slice())]);
    let tar = layer(&files);
    let r = store.import_layer(&tar[..], &NoProgress).unwrap();
    let blob = |level| {
        let mut data = Vec::new();
        let (index, table) = store.layer_data(&r.diff_id, level, |b| data.extend_from_slice(b)).unwrap();
        (index, table, data)
    };
    let (index, stored, stored_data) = blob(0);
    for (c, e) in index.chunks.iter().zip(&stored.entries) {
        assert_eq!(store.read_chunk_stored(&c.id).unwrap().bytes.len() as u32, e.stored_len, "level 0 is verbatim");
    }
    assert!(index.chunks.len() > 512, "{} chunks", index.chunks.len());
    let (_, strong, strong_data) = blob(19);
    assert_eq!(stored.entries.len(), strong.entries.len());
    assert!(
        strong_data.len() < stored_data.len(),
        "level 19 saves bytes on text: {} vs {}",
        strong_data.len(),
        stored_data.len()
    );
    let mut at = 0usize;
    for (c, (s, e)) in index.chunks.iter().zip(stored.entries.iter().zip(&strong.entries)) {
        assert!(e.stored_len <= s.stored_len, "never larger than the stored form");
        let bytes = &strong_data[at..at + e.stored_len as usize];
        at += e.stored_len as usize;
        let raw = if e.zstd { zstd::bulk::decompress(bytes, e.raw_len as usize).unwrap() } else { bytes.to_vec() };
        assert_eq!(hb_core::ChunkId::of(&raw), c.id);
    }
    assert_eq!(at, strong_data.len());
}

/// An accelerated form's index and table blobs, kept for LAN peers: given out only checked and
/// while their layer is stored; gc drops those of layers it removes and of layers never stored.
#[test]
fn layer_form_blobs_are_given_out_checked_while_their_layer_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let unpinned = ImportOptions { expect_digest: None, pin: false };
    let kept = store.import_blob(&layer(&[("a", &pseudo_random(3, 300_000))])[..], &unpinned, &NoProgress).unwrap();
    let (index, table, orphan) = (b"an index blob".to_vec(), b"a table blob".to_vec(), b"of no layer".to_vec());
    let (di, dt, dor) = (Digest::of(&index), Digest::of(&table), Digest::of(&orphan));
    // Bytes that do not match their digest are refused.
    let e = store.keep_form_blob(&di, &kept.diff_id, &table).unwrap_err();
    assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
    store.keep_form_blob(&di, &kept.diff_id, &index).unwrap();
    store.keep_form_blob(&dt, &kept.diff_id, &table).unwrap();
    store.keep_form_blob(&di, &kept.diff_id, &index).unwrap();
    store.keep_form_blob(&dor, &Digest::of(b"a layer never stored"), &orphan).unwrap();
    assert_eq!(store.form_blob(&di).unwrap(), Some(index.clone()));
    assert_eq!(store.form_blob(&dt).unwrap(), Some(table.clone()));
    assert_eq!(store.form_blob(&dor).unwrap(), None, "its layer is not stored");
    assert_eq!(store.form_blob(&Digest::of(b"unknown")).unwrap(), None);
    assert_eq!(store.form_blobs().unwrap().len(), 3);

    // The layer is pinned by a named image: gc keeps its blobs, drops the orphan.
    use hb_store::{ImageLayer, ImageRecord};
    let rec = ImageRecord {
        manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        manifest: "{}".into(),
        config_digest: Digest::of(b"{}"),
        config: "{}".into(),
        layers: vec![ImageLayer {
            digest: kept.digest,
            diff_id: kept.diff_id,
            size: kept.compressed_bytes,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        }],
        platform: "linux/amd64".into(),
    };
    store.put_image("example.com/app:1", &Digest::of(b"manifest"), &rec).unwrap();
    store.gc(&NoProgress).unwrap();
    let left: Vec<Digest> = store.form_blobs().unwrap().into_iter().map(|(d, _)| d).collect();
    assert!(left.contains(&di) && left.contains(&dt) && !left.contains(&dor), "{left:?}");
    assert!(store.fsck(&NoProgress).unwrap().is_clean());
    // Unnamed, the layer goes and its blobs with it.
    store.remove_image_name("example.com/app:1").unwrap();
    let gc = store.gc(&NoProgress).unwrap();
    assert_eq!(gc.layers_removed, 1, "{gc:?}");
    assert!(store.form_blobs().unwrap().is_empty());
    assert_eq!(store.form_blob(&di).unwrap(), None);
}

#[test]
fn a_store_only_read_from_leaves_its_bloom_filter_file_as_it_was() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let bloom = dir.path().join("bloom.bin");
    let stamp = || {
        let m = std::fs::metadata(&bloom).unwrap();
        (m.ino(), m.mtime_nsec(), m.len())
    };
    let tar = layer(&[("a", &pseudo_random(1, 200_000))]);
    let diff_id = {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        store.import_layer(&tar[..], &NoProgress).unwrap().diff_id
    };
    let saved = stamp();
    // Read only: opened, a layer and its chunks looked up, closed. The file is the one written.
    {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let chunks = chunks_of(&store, &diff_id, "a");
        assert!(!chunks.is_empty());
        assert!(chunks.iter().all(|c| store.has_chunk(&c.id).unwrap()));
    }
    assert_eq!(stamp(), saved, "nothing was written: the filter file is left as it was");
    // Written to: the filter is saved again (a new file, renamed over the old one), and the next
    // open loads it (it matches the database) rather than rebuilding it.
    {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        store.import_layer(&layer(&[("b", &pseudo_random(2, 200_000))])[..], &NoProgress).unwrap();
    }
    let rewritten = stamp();
    assert_ne!(rewritten, saved, "a written store saves its filter");
    {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert!(chunks_of(&store, &diff_id, "a").iter().all(|c| store.has_chunk(&c.id).unwrap()));
    }
    assert_eq!(stamp(), rewritten);
}
