//! Store maintenance: `fsck` (verify everything), `gc` (free what nothing references, compact
//! packs that are mostly garbage) and `usage` (logical vs stored bytes).

use std::collections::{HashMap, HashSet};

use hb_core::{ChunkId, Digest, LayerIndex};
use rocksdb::{IteratorMode, WriteBatch};

use crate::backing::{add_backing_lists, check_backing, BackingEntry};
use crate::error::{Result, StoreError};
use crate::meta::*;
use crate::pack::{self, PackWriter};
use crate::{ChunkFilter, Progress, Store};

/// One problem fsck found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FsckIssue {
    /// A stable kind, e.g. `corrupt-chunk`, `missing-chunk`, `refcount`.
    pub kind: &'static str,
    /// What it is about: a chunk id, layer digest, pack file or ref name.
    pub subject: String,
    pub detail: String,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FsckReport {
    pub packs: usize,
    pub chunks: usize,
    pub layers: usize,
    pub blobs: usize,
    pub refs: usize,
    pub images: usize,
    /// Chunks known to lazy layers but not fetched yet.
    pub absent_chunks: usize,
    pub lazy_layers: usize,
    /// Raw objects (blobs kept byte for byte, e.g. by the mirror).
    pub raw_objects: usize,
    /// Accelerated forms' index and table blobs kept for LAN peers.
    pub form_blobs: usize,
    /// Uncompressed bytes read back and verified against their ids.
    pub verified_bytes: u64,
    /// Passthrough backing files a stored layer names, checked against their chunk lists.
    pub backing_files: usize,
    /// Backing files no stored layer names (`gc` removes them).
    pub backing_unused: usize,
    pub issues: Vec<FsckIssue>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.issues.is_empty()
    }
    pub(crate) fn issue(&mut self, kind: &'static str, subject: impl ToString, detail: impl ToString) {
        self.issues.push(FsckIssue { kind, subject: subject.to_string(), detail: detail.to_string() });
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    pub images_removed: usize,
    pub layers_removed: usize,
    pub chunks_removed: usize,
    pub packs_compacted: usize,
    pub packs_deleted: usize,
    /// Bytes of pack files returned to the filesystem.
    pub bytes_freed: u64,
    /// Passthrough backing files no stored layer names (and dead writers' temporary files)
    /// removed, and their bytes (not in `bytes_freed`).
    pub backing_removed: usize,
    pub backing_bytes_freed: u64,
}

/// What `fsck --repair` did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RepairReport {
    /// Damaged backing files removed (each is written again from verified chunks on its next use).
    pub backing_removed: usize,
    /// Damaged layer-form blobs forgotten (a later pull of their image reads them again).
    pub form_blobs_removed: usize,
}

/// Logical vs stored size of everything in the store.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Usage {
    pub layers: usize,
    pub blobs: usize,
    pub chunks: usize,
    /// Sum of the regular-file bytes of every layer (what unpacking them all would write).
    pub logical_bytes: u64,
    /// Sum of the sizes of every layer blob as it came in (compressed).
    pub blob_bytes: u64,
    /// Uncompressed bytes of the distinct chunks held locally.
    pub unique_bytes: u64,
    /// Chunks lazy layers use that are not fetched yet, and their uncompressed bytes.
    pub absent_chunks: usize,
    pub absent_bytes: u64,
    /// Bytes in pack files (committed), and how much of it is still referenced.
    pub pack_bytes: u64,
    pub live_pack_bytes: u64,
    /// Size of the metadata database and Bloom filter on disk.
    pub metadata_bytes: u64,
    /// Passthrough backing files (`files/`: whole copies of fully-local files) and their bytes.
    pub backing_files: usize,
    pub backing_bytes: u64,
    /// logical / unique: what chunk dedup saves.
    pub dedup_ratio: f64,
    /// logical / (pack + metadata): what the whole store saves.
    pub total_ratio: f64,
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|it| {
            it.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl Store {
    fn chunk_records(&self) -> impl Iterator<Item = Result<(ChunkId, ChunkRecord)>> + '_ {
        self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start).map(|item| {
            let (k, v) = item?;
            let id = ChunkId(
                k.as_ref().try_into().map_err(|_| StoreError::CorruptMeta("chunk key is not 32 bytes".into()))?,
            );
            Ok((id, ChunkRecord::decode(&v)?))
        })
    }

    /// Checks every chunk (read back, decompressed, hashed), every layer index (checksum,
    /// structure, Merkle hashes, chunk references), refcounts, pack bookkeeping, blob and ref
    /// targets and the Bloom filter. `progress` counts pack bytes verified.
    pub fn fsck(&self, progress: &dyn Progress) -> Result<FsckReport> {
        // A writer may be appending past its packs' committed ends: only the owner checks.
        self.writable()?;
        let _gate = self.gate.write().expect("gate lock");
        let _w = self.writer.lock().expect("writer lock");
        let mut r = FsckReport::default();
        let packs = self.pack_records()?;
        r.packs = packs.len();
        progress.set_total(packs.values().map(|p| p.live_bytes).sum());
        for (&id, rec) in &packs {
            let path = pack::pack_path(&self.packs_dir, id);
            match std::fs::metadata(&path) {
                Err(e) => r.issue("missing-pack", path.display(), e),
                Ok(m) if m.len() != rec.committed_len => r.issue(
                    "pack-length",
                    path.display(),
                    format!("{} bytes on disk, {} committed", m.len(), rec.committed_len),
                ),
                Ok(_) => {}
            }
        }
        let mut live: HashMap<u32, (u64, u64)> = HashMap::new();
        let mut stored_refs: HashMap<ChunkId, (u32, u32)> = HashMap::new();
        let mut absent: HashSet<ChunkId> = HashSet::new();
        {
            let bloom = self.bloom.read().expect("bloom lock");
            for item in self.chunk_records() {
                let (id, rec) = item?;
                r.chunks += 1;
                stored_refs.insert(id, (rec.refcount, rec.loc.raw_len));
                if rec.loc.is_absent() {
                    r.absent_chunks += 1;
                    absent.insert(id);
                    if !bloom.maybe_contains(&id) {
                        r.issue("bloom", id, "the Bloom filter says this known chunk is absent");
                    }
                    continue;
                }
                let l = live.entry(rec.loc.pack).or_default();
                l.0 += rec.loc.record_len();
                l.1 += 1;
                if !bloom.maybe_contains(&id) {
                    r.issue("bloom", id, "the Bloom filter says this stored chunk is absent");
                }
                match packs.get(&rec.loc.pack) {
                    None => r.issue("missing-pack", id, format!("chunk is in unregistered pack {}", rec.loc.pack)),
                    Some(p) if rec.loc.offset + rec.loc.record_len() > p.committed_len => {
                        r.issue("corrupt-chunk", id, "record lies past the committed end of its pack")
                    }
                    Some(_) => match self.read_at(&id, &rec.loc) {
                        Ok(b) => r.verified_bytes += b.len() as u64,
                        Err(e) => r.issue("corrupt-chunk", id, e),
                    },
                }
                progress.advance(rec.loc.record_len());
            }
        }
        for (&id, rec) in &packs {
            let (bytes, n) = live.get(&id).copied().unwrap_or_default();
            if (bytes, n) != (rec.live_bytes, rec.live_chunks) {
                r.issue(
                    "pack-accounting",
                    pack::pack_path(&self.packs_dir, id).display(),
                    format!(
                        "records say {} bytes in {} chunks, the pack record {} in {}",
                        bytes, n, rec.live_bytes, rec.live_chunks
                    ),
                );
            }
        }
        let mut expected: HashMap<ChunkId, u32> = HashMap::new();
        let mut layers: HashSet<Digest> = HashSet::new();
        // Backing-file name -> the chunk list it must hold.
        let mut backing: HashMap<String, Vec<hb_core::ChunkRef>> = HashMap::new();
        for item in self.db.iterator_cf(self.cf(CF_LAYERS), IteratorMode::Start) {
            let (k, v) = item?;
            r.layers += 1;
            let diff_id = digest_from_key(&k)?;
            layers.insert(diff_id);
            let idx = match LayerIndex::decode(&v) {
                Ok(i) => i,
                Err(e) => {
                    r.issue("corrupt-index", diff_id, e);
                    continue;
                }
            };
            if idx.diff_id != diff_id {
                r.issue("corrupt-index", diff_id, format!("index names diff_id {}", idx.diff_id));
            }
            add_backing_lists(&idx, &mut backing);
            for c in &idx.chunks {
                *expected.entry(c.id).or_default() += 1;
                match stored_refs.get(&c.id) {
                    None => r.issue("missing-chunk", c.id, format!("used by layer {diff_id}")),
                    Some(&(_, len)) if len != c.len => {
                        r.issue("corrupt-chunk", c.id, format!("layer {diff_id} says {} bytes, the store {len}", c.len))
                    }
                    Some(_) => {}
                }
            }
        }
        self.check_form_blobs(&mut r)?;
        for (digest, rec) in self.raw_objects()? {
            r.raw_objects += 1;
            let mut counted = HashSet::new();
            for c in &rec.chunks {
                if counted.insert(c.id) {
                    *expected.entry(c.id).or_default() += 1;
                }
                match stored_refs.get(&c.id) {
                    Some(&(_, len)) if len == c.len && !absent.contains(&c.id) => {}
                    Some(&(_, len)) if len != c.len => r.issue(
                        "corrupt-chunk",
                        c.id,
                        format!("raw object {digest} says {} bytes, the store {len}", c.len),
                    ),
                    _ => r.issue("missing-chunk", c.id, format!("used by raw object {digest}")),
                }
            }
        }
        // Every chunk that is not local must be wanted by a lazy layer that knows where it is.
        for diff_id in self.lazy_layers()? {
            r.lazy_layers += 1;
            if !layers.contains(&diff_id) {
                r.issue("dangling-lazy", diff_id, "lazy source of a missing layer");
                continue;
            }
            match self.lazy_source(&diff_id) {
                Err(e) => r.issue("corrupt-lazy", diff_id, e),
                Ok(Some(src)) => {
                    for e in &src.table.entries {
                        absent.remove(&e.id);
                    }
                }
                Ok(None) => {}
            }
        }
        for id in &absent {
            r.issue("missing-chunk", id, "not fetched, and no lazy layer says where to fetch it");
        }
        for (id, (stored, _)) in &stored_refs {
            let want = expected.get(id).copied().unwrap_or(0);
            if *stored != want {
                r.issue("refcount", id, format!("refcount {stored}, but {want} layers and raw objects use it"));
            }
        }
        for item in self.db.iterator_cf(self.cf(CF_BLOBS), IteratorMode::Start) {
            let (k, v) = item?;
            r.blobs += 1;
            let rec = BlobRecord::decode(&v)?;
            if !layers.contains(&rec.diff_id) {
                r.issue("dangling-blob", digest_from_key(&k)?, format!("points to missing layer {}", rec.diff_id));
            }
        }
        let mut images: HashSet<Digest> = HashSet::new();
        for item in self.db.iterator_cf(self.cf(CF_IMAGES), IteratorMode::Start) {
            let (k, v) = item?;
            r.images += 1;
            let digest = digest_from_key(&k)?;
            images.insert(digest);
            match ImageRecord::decode(&v) {
                Err(e) => r.issue("corrupt-image", digest, e),
                Ok(rec) => {
                    for l in rec.layers.iter().filter(|l| !layers.contains(&l.diff_id)) {
                        r.issue(
                            "missing-layer",
                            digest,
                            format!("image needs layer {} (blob {})", l.diff_id, l.digest),
                        );
                    }
                }
            }
        }
        for item in self.db.iterator_cf(self.cf(CF_REFS), IteratorMode::Start) {
            let (k, v) = item?;
            r.refs += 1;
            let name = String::from_utf8_lossy(&k).into_owned();
            let (targets, what) =
                if name.starts_with(IMAGE_REF_PREFIX) { (&images, "image") } else { (&layers, "layer") };
            match digest_from_key(&v) {
                Ok(d) if targets.contains(&d) => {}
                _ => r.issue("dangling-ref", name, format!("points to a missing {what}")),
            }
        }
        self.fsck_backing(&backing, &mut r)?;
        Ok(r)
    }

    /// Checks every backing file a stored layer names against its chunk list (`backing`).
    fn fsck_backing(&self, backing: &HashMap<String, Vec<hb_core::ChunkRef>>, r: &mut FsckReport) -> Result<()> {
        for e in self.backing_entries()? {
            let BackingEntry::File { name, path, .. } = e else { continue };
            let Some(chunks) = backing.get(&name) else {
                r.backing_unused += 1;
                continue;
            };
            r.backing_files += 1;
            match check_backing(&path, chunks) {
                Ok(None) => {}
                Ok(Some(fault)) => r.issue("corrupt-backing", path.display(), fault),
                Err(e) => r.issue("corrupt-backing", path.display(), format!("cannot be read: {e}")),
            }
        }
        Ok(())
    }

    /// Mends what `report` found that can be mended without loss: damaged backing files are
    /// removed (they are caches, written again from verified chunks on their next use).
    /// Everything else needs a pull or an import again, and stays reported.
    pub fn repair(&self, report: &FsckReport) -> Result<RepairReport> {
        let mut done = RepairReport::default();
        let dir = self.backing_dir();
        for i in report.issues.iter().filter(|i| i.kind == "corrupt-backing") {
            let path = std::path::Path::new(&i.subject);
            // Only ever a file directly in the backing folder.
            if path.parent() != Some(dir.as_path()) {
                continue;
            }
            match std::fs::remove_file(path) {
                Ok(()) => done.backing_removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io { context: format!("removing {}", path.display()), source: e }),
            }
        }
        for i in report.issues.iter().filter(|i| i.kind == "corrupt-form-blob") {
            if let Ok(d) = i.subject.parse::<Digest>() {
                self.forget_form_blob(&d)?;
                done.form_blobs_removed += 1;
            }
        }
        Ok(done)
    }

    /// Removes backing files no stored layer names, and dead writers' temporary files.
    fn gc_backing(&self, report: &mut GcReport) -> Result<()> {
        let mut needed = HashMap::new();
        for item in self.db.iterator_cf(self.cf(CF_LAYERS), IteratorMode::Start) {
            let (k, v) = item?;
            let diff_id = digest_from_key(&k)?;
            add_backing_lists(
                &LayerIndex::decode(&v).map_err(|source| StoreError::Index { diff_id, source })?,
                &mut needed,
            );
        }
        for e in self.backing_entries()? {
            let (path, len) = match e {
                BackingEntry::File { name, path, len } if !needed.contains_key(&name) => (path, len),
                BackingEntry::Temp { path, len, stale: true } => (path, len),
                _ => continue,
            };
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    report.backing_removed += 1;
                    report.backing_bytes_freed += len;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io { context: format!("removing {}", path.display()), source: e }),
            }
        }
        Ok(())
    }

    /// Removes layers no ref pins, frees chunks no layer uses, and rewrites packs whose live
    /// bytes fell below half of their size. Each step commits atomically; a crash between steps
    /// leaves a consistent store (an unregistered new pack is removed at the next open).
    pub fn gc(&self, progress: &dyn Progress) -> Result<GcReport> {
        self.writable()?;
        let _gate = self.gate.write().expect("gate lock");
        let mut w = self.writer.lock().expect("writer lock");
        let mut report = GcReport::default();
        // 1. Unnamed images, unreferenced layers and the chunks only they used.
        let mut batch = WriteBatch::default();
        let mut named_images: HashSet<Digest> = HashSet::new();
        let mut roots: HashSet<Digest> = HashSet::new();
        for item in self.db.iterator_cf(self.cf(CF_REFS), IteratorMode::Start) {
            let (k, v) = item?;
            if let Ok(d) = digest_from_key(&v) {
                if k.starts_with(IMAGE_REF_PREFIX.as_bytes()) {
                    named_images.insert(d);
                } else {
                    roots.insert(d);
                }
            }
        }
        for item in self.db.iterator_cf(self.cf(CF_IMAGES), IteratorMode::Start) {
            let (k, v) = item?;
            if named_images.contains(&digest_from_key(&k)?) {
                roots.extend(ImageRecord::decode(&v)?.layers.iter().map(|l| l.diff_id));
            } else {
                batch.delete_cf(self.cf(CF_IMAGES), k);
                report.images_removed += 1;
            }
        }
        let mut decrements: HashMap<ChunkId, u32> = HashMap::new();
        let mut dropped: HashSet<Digest> = HashSet::new();
        for item in self.db.iterator_cf(self.cf(CF_LAYERS), IteratorMode::Start) {
            let (k, v) = item?;
            let diff_id = digest_from_key(&k)?;
            if roots.contains(&diff_id) {
                continue;
            }
            let idx = LayerIndex::decode(&v).map_err(|source| StoreError::Index { diff_id, source })?;
            for c in &idx.chunks {
                *decrements.entry(c.id).or_default() += 1;
            }
            batch.delete_cf(self.cf(CF_LAYERS), k);
            batch.delete(lazy_key(&diff_id));
            dropped.insert(diff_id);
            report.layers_removed += 1;
        }
        for item in self.db.iterator_cf(self.cf(CF_BLOBS), IteratorMode::Start) {
            let (k, v) = item?;
            if dropped.contains(&BlobRecord::decode(&v)?.diff_id) {
                batch.delete_cf(self.cf(CF_BLOBS), k);
            }
        }
        self.drop_form_blobs(&mut batch, &dropped)?;
        let mut packs = self.pack_records()?;
        for item in self.chunk_records() {
            let (id, rec) = item?;
            let dec = decrements.get(&id).copied().unwrap_or(0);
            if dec == 0 && rec.refcount > 0 {
                continue;
            }
            let left = rec.refcount.saturating_sub(dec);
            if left == 0 {
                batch.delete_cf(self.cf(CF_CHUNKS), id.as_bytes());
                if let Some(p) = packs.get_mut(&rec.loc.pack) {
                    p.live_bytes = p.live_bytes.saturating_sub(rec.loc.record_len());
                    p.live_chunks = p.live_chunks.saturating_sub(1);
                }
                report.chunks_removed += 1;
            } else {
                batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), ChunkRecord { refcount: left, ..rec }.encode());
            }
        }
        for (id, p) in &packs {
            batch.put(pack_key(*id), p.encode());
        }
        self.sync_write(batch)?;

        // 2. Compact packs that are mostly garbage into one new pack.
        w.idle.clear();
        let victims: HashSet<u32> =
            packs.iter().filter(|(_, p)| p.live_bytes * 2 < p.committed_len).map(|(id, _)| *id).collect();
        if !victims.is_empty() {
            let moving: Vec<(ChunkId, ChunkRecord)> = self
                .chunk_records()
                .filter(|item| item.as_ref().map_or(true, |(_, rec)| victims.contains(&rec.loc.pack)))
                .collect::<Result<_>>()?;
            progress.set_total(moving.iter().map(|(_, r)| r.loc.record_len()).sum());
            let mut batch = WriteBatch::default();
            if !moving.is_empty() {
                let id = w.next_pack;
                w.next_pack += 1;
                let mut out = PackWriter::open(&self.packs_dir, id, None)?;
                let mut rec = PackRecord::default();
                for (cid, old) in &moving {
                    // Verified on the way: a corrupt chunk stops the compaction, losing nothing.
                    let (_, stored) = pack::read_record(&*self.pack_file(old.loc.pack)?, cid, &old.loc)?;
                    let loc = out.append(cid, old.loc.raw_len, old.loc.compression, &stored)?;
                    rec.live_bytes += loc.record_len();
                    rec.live_chunks += 1;
                    batch.put_cf(
                        self.cf(CF_CHUNKS),
                        cid.as_bytes(),
                        ChunkRecord { loc, refcount: old.refcount }.encode(),
                    );
                    progress.advance(old.loc.record_len());
                }
                out.sync()?;
                rec.committed_len = out.len();
                batch.put(pack_key(id), rec.encode());
            }
            for v in &victims {
                batch.delete(pack_key(*v));
            }
            self.sync_write(batch)?;
            let mut readers = self.readers.write().expect("readers lock");
            for v in &victims {
                let path = pack::pack_path(&self.packs_dir, *v);
                report.bytes_freed += packs[v].committed_len;
                readers.remove(v);
                std::fs::remove_file(&path).map_err(StoreError::io(format!("removing {}", path.display())))?;
                if packs[v].live_chunks == 0 {
                    report.packs_deleted += 1;
                } else {
                    report.packs_compacted += 1;
                }
            }
            report.bytes_freed =
                report.bytes_freed.saturating_sub(moving.iter().map(|(_, r)| r.loc.record_len()).sum());
        }
        // 3. A fresh filter: removed chunks would otherwise stay as false positives.
        let fresh: ChunkFilter = self.rebuild_bloom()?;
        *self.bloom.write().expect("bloom lock") = fresh;
        // 4. Backing files of files no stored layer has.
        self.gc_backing(&mut report)?;
        Ok(report)
    }

    /// Logical vs stored bytes.
    /// Bytes the store takes on disk (packs, metadata, passthrough files), as [`Store::usage`]
    /// counts them, without reading every chunk's record: cheap enough to ask every few seconds.
    pub fn disk_bytes(&self) -> Result<u64> {
        let packs: u64 = self.pack_records()?.values().map(|p| p.committed_len).sum();
        let meta = dir_size(&self.root.join("meta"))
            + std::fs::metadata(self.root.join("bloom.bin")).map(|m| m.len()).unwrap_or(0);
        let backing: u64 = self
            .backing_entries()?
            .iter()
            .map(|e| match e {
                BackingEntry::File { len, .. } | BackingEntry::Temp { len, .. } => *len,
            })
            .sum();
        Ok(packs + meta + backing)
    }

    pub fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        for item in self.db.iterator_cf(self.cf(CF_LAYERS), IteratorMode::Start) {
            let (k, v) = item?;
            let diff_id = digest_from_key(&k)?;
            let idx = LayerIndex::decode(&v).map_err(|source| StoreError::Index { diff_id, source })?;
            u.layers += 1;
            u.logical_bytes += idx.content_bytes();
        }
        for item in self.db.iterator_cf(self.cf(CF_BLOBS), IteratorMode::Start) {
            let (_, v) = item?;
            u.blobs += 1;
            u.blob_bytes += BlobRecord::decode(&v)?.size;
        }
        for item in self.chunk_records() {
            let (_, rec) = item?;
            u.chunks += 1;
            if rec.loc.is_absent() {
                u.absent_chunks += 1;
                u.absent_bytes += rec.loc.raw_len as u64;
            } else {
                u.unique_bytes += rec.loc.raw_len as u64;
            }
        }
        for p in self.pack_records()?.values() {
            u.pack_bytes += p.committed_len;
            u.live_pack_bytes += p.live_bytes;
        }
        u.metadata_bytes = dir_size(&self.root.join("meta"))
            + std::fs::metadata(self.root.join("bloom.bin")).map(|m| m.len()).unwrap_or(0);
        u.dedup_ratio = ratio(u.logical_bytes, u.unique_bytes);
        for e in self.backing_entries()? {
            let (BackingEntry::File { len, .. } | BackingEntry::Temp { len, .. }) = e;
            u.backing_files += 1;
            u.backing_bytes += len;
        }
        u.total_ratio = ratio(u.logical_bytes, u.pack_bytes + u.metadata_bytes + u.backing_bytes);
        Ok(u)
    }
}
