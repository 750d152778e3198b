//! Layers whose chunks arrive later: a lazy layer's index is stored with records for its chunks
//! that say "known, not fetched" ([`Location::absent`]), plus where to fetch them
//! ([`LazySource`]). Fetched chunks are verified and filled in; refcounts never change on a fill.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;

use hb_core::{ChunkId, ChunkRef, ChunkTable, Digest, LayerIndex, LazySource};
use rocksdb::WriteBatch;

use crate::error::{Result, StoreError};
use crate::meta::*;
use crate::pack::{encode_chunk, Compression, Location};
use crate::Store;

/// What [`Store::import_lazy_layer`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LazyImport {
    pub diff_id: Digest,
    /// The layer was stored already (complete or lazy): nothing changed.
    pub already_present: bool,
    /// Chunks of the layer that are already local (shared with other layers).
    pub local_chunks: usize,
    pub remote_chunks: usize,
    pub remote_bytes: u64,
}

/// What [`Store::fill_chunks`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct FillReport {
    pub filled: usize,
    /// Chunks that were local already (another reader filled them first) or no layer uses.
    pub skipped: usize,
    pub stored_bytes: u64,
}

impl Store {
    /// Stores a layer index whose chunks stay remote until [`Store::fill_chunks`]. `blob` is the
    /// original layer blob's digest, recorded like an ordinary import's. Atomic, and durable with
    /// the store's next synced write (the image record that names the layer, or a fill).
    pub fn import_lazy_layer(
        &self,
        index: &LayerIndex,
        blob: &Digest,
        blob_compression: BlobCompression,
        blob_size: u64,
        source: &LazySource,
        pin: bool,
    ) -> Result<LazyImport> {
        self.writable()?;
        let _gate = self.gate.read().expect("gate lock");
        if !index.verify_merkle() {
            return Err(StoreError::Index {
                diff_id: index.diff_id,
                source: hb_core::IndexError::Malformed("Merkle hashes do not match the tree".into()),
            });
        }
        source
            .table
            .check_covers(index)
            .map_err(|e| StoreError::CorruptMeta(format!("lazy layer {}: {e}", index.diff_id)))?;
        let _w = self.writer.lock().expect("writer lock");
        let mut report = LazyImport {
            diff_id: index.diff_id,
            already_present: false,
            local_chunks: 0,
            remote_chunks: 0,
            remote_bytes: 0,
        };
        let mut batch = WriteBatch::default();
        let mut new_ids = Vec::new();
        report.already_present = self.db.get_pinned_cf(self.cf(CF_LAYERS), index.diff_id.as_bytes())?.is_some();
        if !report.already_present {
            batch.put_cf(self.cf(CF_LAYERS), index.diff_id.as_bytes(), index.encode());
            for c in in_id_order(&index.chunks, |c| c.id) {
                let rec = match self.chunk_record(&c.id)? {
                    Some(rec) => {
                        if rec.loc.is_absent() {
                            report.remote_chunks += 1;
                            report.remote_bytes += c.len as u64;
                        } else {
                            report.local_chunks += 1;
                        }
                        ChunkRecord { refcount: rec.refcount + 1, ..rec }
                    }
                    None => {
                        new_ids.push(c.id);
                        report.remote_chunks += 1;
                        report.remote_bytes += c.len as u64;
                        ChunkRecord { loc: Location::absent(c.len), refcount: 1 }
                    }
                };
                batch.put_cf(self.cf(CF_CHUNKS), c.id.as_bytes(), rec.encode());
            }
            if report.remote_chunks > 0 {
                batch.put(lazy_key(&index.diff_id), source.encode());
            }
        }
        batch.put_cf(
            self.cf(CF_BLOBS),
            blob.as_bytes(),
            BlobRecord { diff_id: index.diff_id, compression: blob_compression, size: blob_size }.encode(),
        );
        if pin {
            batch.put_cf(self.cf(CF_REFS), layer_ref(&index.diff_id), index.diff_id.as_bytes());
        }
        // Not synced (a cold start waited on one fsync per layer): the pull's image record,
        // written synced after its layers, makes these durable with it.
        self.logged_write(batch)?;
        let mut bloom = self.bloom.write().expect("bloom lock");
        new_ids.iter().for_each(|id| bloom.insert(id));
        drop(bloom);
        if !report.already_present {
            self.lazy_imports.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(report)
    }

    /// How many new lazy layers this handle has recorded ([`Store::import_lazy_layer`]) since it
    /// was opened: a process that waits for a pull to learn an image's chunks watches it change.
    pub fn lazy_imports(&self) -> u64 {
        self.lazy_imports.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Where a lazy layer's missing chunks are, or None for a complete layer.
    pub fn lazy_source(&self, diff_id: &Digest) -> Result<Option<LazySource>> {
        match self.db.get_pinned(lazy_key(diff_id))? {
            None => Ok(None),
            Some(raw) => LazySource::decode(&raw)
                .map(Some)
                .map_err(|e| StoreError::CorruptMeta(format!("lazy source of layer {diff_id}: {e}"))),
        }
    }

    /// True when the chunk's bytes are in the store (not merely known to a lazy layer).
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.chunk_record(id)?.is_some_and(|r| !r.loc.is_absent()))
    }

    /// Every chunk whose bytes are in the store (for a LAN peer's summary of what it holds).
    pub fn held_chunks(&self) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            if ChunkRecord::decode(&v)?.loc.is_absent() {
                continue;
            }
            out.push(ChunkId(
                k.as_ref().try_into().map_err(|_| StoreError::CorruptMeta("chunk key is not 32 bytes".into()))?,
            ));
        }
        Ok(out)
    }

    /// The chunks of a layer that are not local yet.
    pub fn missing_chunks(&self, diff_id: &Digest) -> Result<Vec<ChunkRef>> {
        let idx = self.layer(diff_id)?.ok_or_else(|| StoreError::UnknownLayer(diff_id.to_string()))?;
        let mut out = Vec::new();
        for c in &idx.chunks {
            if !self.has_chunk(&c.id)? {
                out.push(*c);
            }
        }
        Ok(out)
    }

    /// Stores fetched chunks that some lazy layer is waiting for. Each is verified against its
    /// id; one that does not match is refused (nothing of the batch is stored). The pack is
    /// fsynced before the one synced metadata write, as for an ingest.
    pub fn fill_chunks(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<FillReport> {
        self.fill_chunks_framed(chunks, &HashMap::new())
    }

    /// [`Store::fill_chunks`] for chunks given as zstd frames (id, length, frame), each decoded
    /// (to at most its length) and checked against its id, then kept as it came. A frame that
    /// does not decode is refused as a wrong chunk would be (nothing of the batch is stored).
    pub fn fill_frames(&self, frames: Vec<(ChunkId, u32, Vec<u8>)>) -> Result<FillReport> {
        let mut chunks = Vec::with_capacity(frames.len());
        let mut by_id = HashMap::with_capacity(frames.len());
        for (id, len, frame) in frames {
            let raw = crate::pack::decompress(&frame, len as usize)
                .map_err(|e| StoreError::CorruptChunk { id, reason: format!("its zstd frame does not decode: {e}") })?;
            chunks.push((id, raw));
            by_id.insert(id, frame);
        }
        self.fill_chunks_framed(&chunks, &by_id)
    }

    /// [`Store::fill_chunks`], keeping as it is the zstd frame `frames` holds for a chunk (the one
    /// its bytes were decoded from: an accelerated form's, compressed once by its publisher)
    /// instead of compressing the bytes again, ~3x the CPU of the rest of a fill, on the path
    /// of a cold start on two cores. A frame whose header does not give the chunk's length is
    /// not used. Reads check every chunk's bytes against its id, whichever way it was kept.
    pub fn fill_chunks_framed(
        &self,
        chunks: &[(ChunkId, Vec<u8>)],
        frames: &HashMap<ChunkId, Vec<u8>>,
    ) -> Result<FillReport> {
        self.writable()?;
        for (id, data) in chunks {
            if ChunkId::of(data) != *id {
                return Err(StoreError::CorruptChunk { id: *id, reason: "fetched bytes do not hash to the id".into() });
            }
        }
        let _gate = self.gate.read().expect("gate lock");
        let mut report = FillReport::default();
        let mut wanted = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (id, data) in chunks {
            // A batch may carry a chunk twice (two readers fetched it): store it once.
            if !seen.insert(*id) {
                report.skipped += 1;
                continue;
            }
            match self.chunk_record(id)? {
                Some(rec) if rec.loc.is_absent() && rec.loc.raw_len as usize == data.len() => wanted.push((id, data)),
                _ => report.skipped += 1,
            }
        }
        if wanted.is_empty() {
            return Ok(report);
        }
        let (mut pack, committed) = self.take_pack()?;
        let out = (|| {
            let mut locs = Vec::with_capacity(wanted.len());
            for (id, data) in &wanted {
                let frame = frames.get(*id).filter(|f| frame_holds(f, data.len()));
                let (compression, bytes) = match frame {
                    Some(f) => (Compression::Zstd, Cow::Borrowed(f.as_slice())),
                    None => {
                        let (c, b) = encode_chunk(data, self.opts.zstd_level);
                        (c, Cow::Owned(b))
                    }
                };
                locs.push((**id, pack.append(id, data.len() as u32, compression, &bytes)?));
            }
            pack.sync()?;
            let _w = self.writer.lock().expect("writer lock");
            let mut pack_rec = self.pack_records()?.remove(&pack.id).unwrap_or_default();
            let mut batch = WriteBatch::default();
            for (id, loc) in in_id_order(&locs, |(id, _)| *id) {
                // Re-read under the lock: a concurrent fill or ingest may have stored it.
                match self.chunk_record(id)? {
                    Some(rec) if rec.loc.is_absent() => {
                        batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), ChunkRecord { loc: *loc, ..rec }.encode());
                        pack_rec.live_bytes += loc.record_len();
                        pack_rec.live_chunks += 1;
                        report.filled += 1;
                        report.stored_bytes += loc.record_len();
                    }
                    _ => report.skipped += 1,
                }
            }
            pack_rec.committed_len = pack.len();
            batch.put(pack_key(pack.id), pack_rec.encode());
            self.sync_write(batch)?;
            Ok::<_, StoreError>(())
        })();
        if out.is_err() {
            pack.rollback(committed)?;
        }
        self.return_pack(pack);
        out.map(|_| report)
    }

    /// Turns a lazy layer whose chunks are all local into a complete one. Returns true if it is
    /// complete now.
    pub fn complete_lazy_layer(&self, diff_id: &Digest) -> Result<bool> {
        self.writable()?;
        if self.lazy_source(diff_id)?.is_none() {
            return Ok(true);
        }
        if !self.missing_chunks(diff_id)?.is_empty() {
            return Ok(false);
        }
        let _w = self.writer.lock().expect("writer lock");
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.delete_opt(lazy_key(diff_id), &wo).map_err(StoreError::from)?;
        Ok(true)
    }

    /// Every lazy layer (diff_id) still waiting for chunks.
    pub fn lazy_layers(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(b"lazy/") {
            let (k, _) = item?;
            let Some(rest) = k.strip_prefix(b"lazy/") else { break };
            out.push(digest_from_key(rest).map_err(|_| StoreError::Io {
                context: "listing lazy layers".into(),
                source: io::Error::other("bad key"),
            })?);
        }
        Ok(out)
    }
}

/// `raw` (whose stored form is `stored`) encoded with `z`, when that is smaller than `stored`.
fn smaller(stored: &StoredChunk, raw: &[u8], z: &mut zstd::bulk::Compressor<'static>) -> Result<StoredChunk> {
    let c = z.compress(raw).map_err(|e| StoreError::Io { context: "encoding a chunk with zstd".into(), source: e })?;
    Ok(match c.len() < stored.bytes.len() {
        true => StoredChunk { raw_len: stored.raw_len, zstd: true, bytes: c },
        false => stored.clone(),
    })
}

/// A chunk as the store keeps it: compressed (zstd) or raw, verified through its decoding.
#[derive(Clone, Debug)]
pub struct StoredChunk {
    pub raw_len: u32,
    pub zstd: bool,
    pub bytes: Vec<u8>,
}

impl Store {
    /// Reads a chunk's stored bytes (for copying them verbatim into a registry data blob),
    /// checked as every read is: its record names `id` and its bytes decode to what `id` hashes.
    pub fn read_chunk_stored(&self, id: &ChunkId) -> Result<StoredChunk> {
        self.read_chunk_stored_checked(id).map(|(s, _)| s)
    }

    /// A stored layer's chunks as an accelerated image's data blob holds them: each is checked
    /// (decoded, hashed) before `sink` gets its bytes, in index order; returns the layer's index
    /// and the table of those bytes.
    ///
    /// `level` 0 (or below) gives each chunk's stored bytes verbatim (zstd at the store's level, or
    /// raw: what a mirror serves straight from its store). Above 0, each chunk is encoded again at
    /// that zstd level, on up to 8 cores, and the smaller of the two forms kept: a published form is
    /// written once and read by every client (64 KiB chunks of a Go binary: 6 % fewer bytes at 9
    /// than at the store's 3; decoding is as fast).
    pub fn layer_data(
        &self,
        diff_id: &Digest,
        level: i32,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(LayerIndex, ChunkTable)> {
        let index = self.layer(diff_id)?.ok_or(StoreError::UnknownLayer(diff_id.to_string()))?;
        let mut table = ChunkTable::default();
        let mut put = |id: ChunkId, s: &StoredChunk| {
            table.push(id, s.bytes.len() as u32, s.raw_len, s.zstd);
            sink(&s.bytes);
        };
        if level <= 0 {
            for c in &index.chunks {
                put(c.id, &self.read_chunk_stored_checked(&c.id)?.0);
            }
            return Ok((index, table));
        }
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        // A group at a time (bounded memory), its chunks shared out among the workers.
        for group in index.chunks.chunks(64 * workers) {
            let read: Vec<(StoredChunk, Vec<u8>)> =
                group.iter().map(|c| self.read_chunk_stored_checked(&c.id)).collect::<Result<_>>()?;
            let per = read.len().div_ceil(workers);
            let encoded: Vec<StoredChunk> = std::thread::scope(|sc| {
                let handles: Vec<_> = read
                    .chunks(per)
                    .map(|part| {
                        sc.spawn(move || {
                            let mut z = zstd::bulk::Compressor::new(level).map_err(|e| StoreError::Io {
                                context: format!("a zstd encoder at level {level}"),
                                source: e,
                            })?;
                            part.iter().map(|(stored, raw)| smaller(stored, raw, &mut z)).collect::<Result<Vec<_>>>()
                        })
                    })
                    .collect();
                let mut out = Vec::with_capacity(read.len());
                for h in handles {
                    out.extend(h.join().expect("encoding does not panic")?);
                }
                Ok::<_, StoreError>(out)
            })?;
            for (c, s) in group.iter().zip(&encoded) {
                put(c.id, s);
            }
        }
        Ok((index, table))
    }

    /// [`Store::read_chunk_stored`] and the chunk's decoded bytes (the check decoded them).
    pub fn read_chunk_stored_checked(&self, id: &ChunkId) -> Result<(StoredChunk, Vec<u8>)> {
        match self.chunk_record(id)? {
            Some(rec) if !rec.loc.is_absent() => {
                let (raw, bytes) = crate::pack::read_record(&*self.pack_file(rec.loc.pack)?, id, &rec.loc)?;
                let zstd = rec.loc.compression == crate::pack::Compression::Zstd;
                Ok((StoredChunk { raw_len: rec.loc.raw_len, zstd, bytes }, raw))
            }
            _ => Err(StoreError::MissingChunk(*id)),
        }
    }

    /// [`Store::put_aux`] without waiting for the disk: atomic, survives a killed process, and
    /// durable with the store's next synced write (a pull's image record, written after it).
    pub fn stage_aux(&self, key: &str, value: &[u8]) -> Result<()> {
        self.writable()?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(aux_key(key), value);
        self.logged_write(batch)
    }

    /// Saves a small auxiliary record (e.g. an image's start-up order) under `key`.
    pub fn put_aux(&self, key: &str, value: &[u8]) -> Result<()> {
        self.writable()?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.put_opt(aux_key(key), value, &wo)?;
        Ok(())
    }

    pub fn aux(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(aux_key(key))?)
    }
}

/// Where auxiliary record `key` is kept.
fn aux_key(key: &str) -> String {
    format!("aux/{key}")
}

/// Whether `frame` is exactly one zstd frame that says it holds `len` bytes, fewer than them.
fn frame_holds(frame: &[u8], len: usize) -> bool {
    frame.len() < len
        && zstd::zstd_safe::get_frame_content_size(frame).ok().flatten() == Some(len as u64)
        && zstd::zstd_safe::find_frame_compressed_size(frame).ok() == Some(frame.len())
}
