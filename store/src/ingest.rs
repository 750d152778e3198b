//! Layer ingest: a tar, tar+gzip or tar+zstd stream becomes chunks in packs plus a layer index,
//! committed atomically at the end. Nothing is held whole in memory but the index being built.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;
use std::sync::mpsc::SyncSender;

use hb_core::{ChunkId, ChunkRef, Digest, DigestHasher, Meta, NewEntry, TreeBuilder};
use rocksdb::WriteBatch;

use crate::error::{Result, StoreError};
use crate::meta::*;
use crate::pack::{encode_chunk, Location, PackWriter};
use crate::{Limits, Progress, Store};

/// Chunks that may wait between the parser and the pack writer (each at most 256 KiB).
const IN_FLIGHT: usize = 64;

/// How [`Store::import_blob`] treats a blob.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// The digest the blob must have (from a manifest); a mismatch stores nothing.
    pub expect_digest: Option<Digest>,
    /// Pin the layer with a `layer/<diff_id>` ref (`hb layer import`); pulled layers are kept
    /// by their image instead.
    pub pin: bool,
}

/// What an import did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportReport {
    /// SHA-256 of the bytes as given (the OCI layer blob digest).
    pub digest: Digest,
    /// SHA-256 of the uncompressed tar (the OCI diff_id).
    pub diff_id: Digest,
    pub compression: BlobCompression,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
    pub entries: usize,
    /// Regular-file content in the layer.
    pub content_bytes: u64,
    /// Chunk references of all files, and distinct chunks among them.
    pub chunk_refs: u64,
    pub unique_chunks: usize,
    /// Chunks (and their uncompressed bytes) the store did not have.
    pub new_chunks: usize,
    pub new_bytes: u64,
    /// Content bytes that were already stored (in the store or earlier in this layer).
    pub deduplicated_bytes: u64,
    /// Bytes appended to pack files (compressed chunks with headers).
    pub stored_bytes: u64,
    /// True when this layer (same diff_id) was already in the store.
    pub already_present: bool,
}

/// A fault seen below the tar reader, kept so the error the user sees names the real cause
/// rather than the tar reader's rewording of it.
type Fault = Rc<RefCell<Option<StoreError>>>;

/// Counts and hashes the bytes read through it.
pub(crate) struct Hashing<R> {
    pub inner: R,
    pub hasher: DigestHasher,
    pub count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decoder<R> {
    fn label(&self) -> &'static str {
        match self {
            Decoder::Plain(_) => "tar",
            Decoder::Gzip(_) => "gzip",
            Decoder::Zstd(_) => "zstd",
        }
    }
}

/// Decompresses, enforces the bomb limits, and records the precise fault.
struct Decoded<R: BufRead> {
    dec: Decoder<R>,
    limits: Limits,
    compressed: Rc<Cell<u64>>,
    total: u64,
    fault: Fault,
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match &mut self.dec {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        };
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                let label = self.dec.label();
                let msg = if label == "tar" {
                    format!("reading the layer failed: {e}")
                } else {
                    format!("{label} stream is corrupt or truncated: {e}")
                };
                *self.fault.borrow_mut() = Some(StoreError::BadStream(msg.clone()));
                return Err(io::Error::new(e.kind(), msg));
            }
        };
        self.total += n as u64;
        let err = if self.total > self.limits.max_layer_bytes {
            Some(StoreError::TooLarge { limit: self.limits.max_layer_bytes })
        } else if self.total > self.limits.ratio_grace
            && self.total > self.compressed.get().max(1).saturating_mul(self.limits.max_ratio)
        {
            Some(StoreError::RatioExceeded {
                limit: self.limits.max_ratio,
                uncompressed: self.total,
                compressed: self.compressed.get(),
            })
        } else {
            None
        };
        if let Some(e) = err {
            let msg = e.to_string();
            *self.fault.borrow_mut() = Some(e);
            return Err(io::Error::other(msg));
        }
        Ok(n)
    }
}

/// An ingest that has read its whole input and waits for its commit.
struct Staged {
    report: ImportReport,
    seen: HashMap<ChunkId, Seen>,
    /// Where the pack writer put each new chunk.
    locations: HashMap<ChunkId, Location>,
    encoded: Vec<u8>,
}

/// Chunk references an ingest made, and the chunks (and bytes) the store did not have.
#[derive(Default)]
pub(crate) struct ChunkTally {
    pub refs: u64,
    pub new_chunks: usize,
    pub new_bytes: u64,
}

pub(crate) enum Seen {
    /// Written by this ingest.
    New,
    /// Already in the store.
    Stored,
}

impl Store {
    /// Imports one layer blob (tar, tar+gzip or tar+zstd, detected by magic bytes) from `input`,
    /// reporting compressed bytes read to `progress`. Bad input leaves the store unchanged and
    /// names the offending entry.
    pub fn import_layer(&self, input: impl Read, progress: &dyn Progress) -> Result<ImportReport> {
        self.import_blob(input, &ImportOptions { expect_digest: None, pin: true }, progress)
    }

    /// Imports one layer blob with options: the digest it must have (checked before anything
    /// becomes visible) and whether to pin it by a `layer/` ref. Several imports may run at once
    /// (each appends to its own pack; commits are serialised).
    pub fn import_blob(&self, input: impl Read, opts: &ImportOptions, progress: &dyn Progress) -> Result<ImportReport> {
        let _gate = self.gate.read().expect("gate lock");
        let (mut pack, committed) = self.take_pack()?;
        let out = self.ingest(input, progress, &mut pack).and_then(|staged| {
            if let Some(want) = opts.expect_digest {
                if staged.report.digest != want {
                    return Err(StoreError::DigestMismatch { expected: want, actual: staged.report.digest });
                }
            }
            self.commit(staged, &mut pack, committed, opts.pin)
        });
        if out.is_err() {
            // Drop what this ingest appended; the pack stays usable.
            pack.rollback(committed)?;
        }
        self.return_pack(pack);
        out
    }

    /// A pack for one ingest, with its committed length: an idle open pack below the target
    /// size, the newest pack on disk if nobody uses it and it is below the target, or a new one.
    pub(crate) fn take_pack(&self) -> Result<(PackWriter, u64)> {
        self.writable()?;
        let mut w = self.writer.lock().expect("writer lock");
        let packs = self.pack_records()?;
        let committed_of = |id: u32| packs.get(&id).map(|r| r.committed_len).unwrap_or(crate::pack::PACK_HEADER_LEN);
        if let Some(p) = w.idle.pop() {
            let c = committed_of(p.id);
            w.in_use.insert(p.id);
            return Ok((p, c));
        }
        if let Some((&id, rec)) = packs.iter().max_by_key(|(id, _)| **id) {
            if rec.committed_len < self.opts.pack_target_bytes && !w.in_use.contains(&id) && w.next_pack == id + 1 {
                w.in_use.insert(id);
                return Ok((PackWriter::open(&self.packs_dir, id, Some(rec.committed_len))?, rec.committed_len));
            }
        }
        let id = w.next_pack;
        w.next_pack += 1;
        w.in_use.insert(id);
        Ok((PackWriter::open(&self.packs_dir, id, None)?, crate::pack::PACK_HEADER_LEN))
    }

    pub(crate) fn return_pack(&self, pack: PackWriter) {
        let mut w = self.writer.lock().expect("writer lock");
        w.in_use.remove(&pack.id);
        if pack.len() < self.opts.pack_target_bytes {
            w.idle.push(pack);
        }
    }

    /// Runs the parse on this thread and zstd + pack appends on a second one, so decompression
    /// and chunking overlap with compression.
    fn ingest(&self, input: impl Read, progress: &dyn Progress, pack: &mut PackWriter) -> Result<Staged> {
        let (mut staged, locations, stored) = self.write_chunks(pack, |tx| self.parse(input, progress, tx))?;
        staged.report.stored_bytes = stored;
        staged.locations = locations;
        Ok(staged)
    }

    /// Runs `produce` on this thread, appending the chunks it sends (zstd, then the pack) on a
    /// second one. At most [`IN_FLIGHT`] chunks wait between them. Returns what `produce`
    /// returned, where each chunk went and the bytes appended.
    pub(crate) fn write_chunks<T>(
        &self,
        pack: &mut PackWriter,
        produce: impl FnOnce(&SyncSender<(ChunkId, Vec<u8>)>) -> Result<T>,
    ) -> Result<(T, HashMap<ChunkId, Location>, u64)> {
        let level = self.opts.zstd_level;
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(ChunkId, Vec<u8>)>(IN_FLIGHT);
            let writer = scope.spawn(move || -> Result<(HashMap<ChunkId, Location>, u64)> {
                let mut locations = HashMap::new();
                let mut stored = 0;
                for (id, data) in rx {
                    let (compression, bytes) = encode_chunk(&data, level);
                    let loc = pack.append(&id, data.len() as u32, compression, &bytes)?;
                    stored += loc.record_len();
                    locations.insert(id, loc);
                }
                Ok((locations, stored))
            });
            let produced = produce(&tx);
            drop(tx);
            let written = writer.join().expect("pack writer thread panicked");
            match (produced, written) {
                (Ok(t), Ok((locations, stored))) => Ok((t, locations, stored)),
                // A writer failure (disk full, I/O error) is the cause of the producer stopping.
                (_, Err(e)) => Err(e),
                (Err(e), Ok(_)) => Err(e),
            }
        })
    }

    fn parse(
        &self,
        input: impl Read,
        progress: &dyn Progress,
        writer: &SyncSender<(ChunkId, Vec<u8>)>,
    ) -> Result<Staged> {
        let compressed = Rc::new(Cell::new(0u64));
        let fault: Fault = Rc::new(RefCell::new(None));
        // Progress follows the compressed bytes consumed, reported between entries.
        let last = Cell::new(0u64);
        let report_progress = |c: &Rc<Cell<u64>>| {
            let now = c.get();
            progress.advance(now - last.get());
            last.set(now);
        };
        let raw = Hashing { inner: input, hasher: DigestHasher::new(), count: compressed.clone() };
        let mut buffered = BufReader::with_capacity(256 << 10, raw);
        let magic =
            buffered.fill_buf().map_err(|e| StoreError::BadStream(format!("reading the layer failed: {e}")))?.to_vec();
        if magic.is_empty() {
            return Err(StoreError::BadStream("the layer is empty (0 bytes): not a tar stream".into()));
        }
        let (compression, dec) = if magic.starts_with(&[0x1f, 0x8b]) {
            (BlobCompression::Gzip, Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(buffered))))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let d = zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| StoreError::BadStream(format!("zstd stream is corrupt: {e}")))?;
            (BlobCompression::Zstd, Decoder::Zstd(d))
        } else {
            (BlobCompression::None, Decoder::Plain(buffered))
        };
        let decoded = Decoded {
            dec,
            limits: self.opts.limits.clone(),
            compressed: compressed.clone(),
            total: 0,
            fault: fault.clone(),
        };
        let uncompressed = Rc::new(Cell::new(0u64));
        let tar_stream = Hashing { inner: decoded, hasher: DigestHasher::new(), count: uncompressed.clone() };
        let mut archive = tar::Archive::new(tar_stream);

        // `at` says where in the stream the error struck: in an entry, or after one.
        let stream_err = |fault: &Fault, e: io::Error, at: &str| -> StoreError {
            match fault.borrow_mut().take() {
                Some(StoreError::BadStream(m)) => StoreError::BadStream(format!("{m}{at}")),
                Some(other) => other,
                None if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("unexpected EOF") => {
                    StoreError::BadStream(format!("the tar stream is truncated{at}"))
                }
                // The tar crate quotes the bad header bytes as they are: escaped, to keep one line.
                None => StoreError::BadStream(format!("not a valid tar stream: {}{at}", e.to_string().escape_debug())),
            }
        };
        let in_entry = |p: &[u8]| format!(" (in entry {:?})", String::from_utf8_lossy(p));
        let mut after = String::new();

        let chunker = self.chunker();
        let mut builder = TreeBuilder::new(chunker);
        let mut seen: HashMap<ChunkId, Seen> = HashMap::new();
        let mut report = ImportReport {
            digest: Digest([0; 32]),
            diff_id: Digest([0; 32]),
            compression,
            compressed_bytes: 0,
            uncompressed_bytes: 0,
            entries: 0,
            content_bytes: 0,
            chunk_refs: 0,
            unique_chunks: 0,
            new_chunks: 0,
            new_bytes: 0,
            deduplicated_bytes: 0,
            stored_bytes: 0,
            already_present: false,
        };
        let mut tally = ChunkTally::default();
        let entries = archive.entries().map_err(|e| stream_err(&fault, e, ""))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| stream_err(&fault, e, &after))?;
            report_progress(&compressed);
            let path = entry.path_bytes().into_owned();
            let bad =
                |reason: String| StoreError::BadEntry { path: String::from_utf8_lossy(&path).into_owned(), reason };
            let etype = entry.header().entry_type();
            if matches!(etype, tar::EntryType::XGlobalHeader) {
                continue;
            }
            let meta = entry_meta(&mut entry).map_err(&bad)?;
            let new = match etype {
                tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                    let mut chunks = Vec::new();
                    let cdc = self.cut(&mut entry);
                    for c in cdc {
                        let c = c.map_err(|e| match e {
                            fastcdc::v2020::Error::IoError(e) => stream_err(&fault, e, &in_entry(&path)),
                            other => bad(format!("chunking failed: {other:?}")),
                        })?;
                        chunks.push(self.add_chunk(c.data, &mut seen, &mut tally, writer)?);
                        report_progress(&compressed);
                    }
                    NewEntry::File { chunks }
                }
                tar::EntryType::Directory => NewEntry::Dir,
                tar::EntryType::Symlink => NewEntry::Symlink {
                    target: entry.link_name_bytes().ok_or_else(|| bad("symlink without a target".into()))?.into_owned(),
                },
                tar::EntryType::Link => NewEntry::Hardlink {
                    target: entry
                        .link_name_bytes()
                        .ok_or_else(|| bad("hard link without a target".into()))?
                        .into_owned(),
                },
                tar::EntryType::Char | tar::EntryType::Block => {
                    let h = entry.header();
                    let major = h.device_major().ok().flatten().ok_or_else(|| bad("bad device major number".into()))?;
                    let minor = h.device_minor().ok().flatten().ok_or_else(|| bad("bad device minor number".into()))?;
                    if etype == tar::EntryType::Char {
                        NewEntry::CharDev { major, minor }
                    } else {
                        NewEntry::BlockDev { major, minor }
                    }
                }
                tar::EntryType::Fifo => NewEntry::Fifo,
                other => return Err(bad(format!("unsupported tar entry type {other:?}"))),
            };
            builder.add(&path, meta, new)?;
            report.entries += 1;
            after = format!(" (after entry {:?})", String::from_utf8_lossy(&path));
        }
        // The tar reader stops at the end-of-archive marker: read the rest so the digests cover
        // the whole blob and the decompressor checks its trailer.
        let mut tar_stream = archive.into_inner();
        io::copy(&mut tar_stream, &mut io::sink()).map_err(|e| stream_err(&fault, e, &after))?;
        report_progress(&compressed);
        let Hashing { inner: decoded, hasher: diff_hasher, .. } = tar_stream;
        let raw = match decoded.dec {
            Decoder::Plain(r) => r.into_inner(),
            Decoder::Gzip(r) => r.into_inner().into_inner(),
            Decoder::Zstd(r) => r.finish().into_inner(),
        };
        report.digest = raw.hasher.finish();
        report.diff_id = diff_hasher.finish();
        report.compressed_bytes = compressed.get();
        report.uncompressed_bytes = uncompressed.get();
        (report.chunk_refs, report.new_chunks, report.new_bytes) = (tally.refs, tally.new_chunks, tally.new_bytes);
        let index = builder.finish(report.diff_id);
        report.content_bytes = index.content_bytes();
        report.unique_chunks = index.chunks.len();
        report.deduplicated_bytes = report.content_bytes - report.new_bytes;
        Ok(Staged { report, seen, locations: HashMap::new(), encoded: index.encode() })
    }

    /// Stores one chunk unless the store or this ingest already has it.
    pub(crate) fn add_chunk(
        &self,
        data: Vec<u8>,
        seen: &mut HashMap<ChunkId, Seen>,
        tally: &mut ChunkTally,
        writer: &SyncSender<(ChunkId, Vec<u8>)>,
    ) -> Result<ChunkRef> {
        let id = ChunkId::of(&data);
        let len = data.len() as u32;
        tally.refs += 1;
        if let std::collections::hash_map::Entry::Vacant(slot) = seen.entry(id) {
            let s = match self.chunk_record(&id)? {
                Some(rec) if !rec.loc.is_absent() => Seen::Stored,
                _ => {
                    tally.new_chunks += 1;
                    tally.new_bytes += len as u64;
                    writer.send((id, data)).map_err(|_| StoreError::Io {
                        context: "writing chunks".into(),
                        source: io::Error::other("the pack writer stopped"),
                    })?;
                    Seen::New
                }
            };
            slot.insert(s);
        }
        Ok(ChunkRef { id, len })
    }

    /// Makes the ingest visible: fsync the pack, then one synced batch with the layer, its
    /// chunks' records and refcounts, the blob record, the pin and the pack's bookkeeping.
    fn commit(&self, staged: Staged, pack: &mut PackWriter, committed: u64, pin: bool) -> Result<ImportReport> {
        let Staged { mut report, seen, locations, encoded } = staged;
        // Commits are serialised; records are re-read under the lock because another ingest may
        // have committed some of the same chunks (or this very layer) since they were looked up.
        let _w = self.writer.lock().expect("writer lock");
        let mut batch = WriteBatch::default();
        let mut new_ids = Vec::new();
        let mut pack_rec = self.pack_records()?.remove(&pack.id).unwrap_or_default();
        report.already_present = self.db.get_pinned_cf(self.cf(CF_LAYERS), report.diff_id.as_bytes())?.is_some();
        let completes_lazy = report.already_present && self.db.get_pinned(lazy_key(&report.diff_id))?.is_some();
        let mut place = |id: &ChunkId| placed(&locations, &mut pack_rec, id);
        if completes_lazy {
            // The layer was pulled lazily: keep its index and refcounts, fill in every chunk that
            // is still absent, and it becomes an ordinary complete layer.
            let mut filled = 0;
            for (id, s) in in_id_order(&seen, |(id, _)| **id) {
                let Seen::New = s else { continue };
                let Some(rec) = self.chunk_record(id)?.filter(|r| r.loc.is_absent()) else { continue };
                let loc = place(id)?;
                filled += 1;
                batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), ChunkRecord { loc, ..rec }.encode());
            }
            batch.delete(lazy_key(&report.diff_id));
            report.new_chunks = filled;
            report.deduplicated_bytes = report.content_bytes;
        } else if report.already_present {
            // Same content again (perhaps compressed differently): nothing new to keep.
            pack.rollback(committed)?;
            report.new_chunks = 0;
            report.new_bytes = 0;
            report.stored_bytes = 0;
            report.deduplicated_bytes = report.content_bytes;
        } else {
            batch.put_cf(self.cf(CF_LAYERS), report.diff_id.as_bytes(), &encoded);
            self.reference_chunks(&seen, &mut place, &mut batch, &mut new_ids)?;
        }
        batch.put_cf(
            self.cf(CF_BLOBS),
            report.digest.as_bytes(),
            BlobRecord { diff_id: report.diff_id, compression: report.compression, size: report.compressed_bytes }
                .encode(),
        );
        if pin {
            batch.put_cf(self.cf(CF_REFS), layer_ref(&report.diff_id), report.diff_id.as_bytes());
        }
        self.write_commit(batch, pack, committed, pack_rec, &new_ids)?;
        tracing::info!(diff_id = %report.diff_id, new_chunks = report.new_chunks, "layer committed");
        Ok(report)
    }
}

/// Where an ingest wrote chunk `id`, counted as live in its pack's record.
pub(crate) fn placed(
    locations: &HashMap<ChunkId, Location>,
    pack_rec: &mut PackRecord,
    id: &ChunkId,
) -> Result<Location> {
    let loc = *locations.get(id).ok_or_else(|| StoreError::Io {
        context: format!("committing chunk {id}"),
        source: io::Error::other("the pack writer lost a chunk"),
    })?;
    pack_rec.live_bytes += loc.record_len();
    pack_rec.live_chunks += 1;
    Ok(loc)
}

impl Store {
    /// Makes a commit durable, in order: the pack's bytes past `committed` synced and its new
    /// committed length added to `batch` (when it grew: a rolled-back pack did not), `batch`
    /// written synced, then the new chunk ids added to the Bloom filter.
    pub(crate) fn write_commit(
        &self,
        mut batch: WriteBatch,
        pack: &mut PackWriter,
        committed: u64,
        mut pack_rec: PackRecord,
        new_ids: &[ChunkId],
    ) -> Result<()> {
        if pack.len() > committed {
            pack.sync()?;
            pack_rec.committed_len = pack.len();
            batch.put(pack_key(pack.id), pack_rec.encode());
        }
        self.sync_write(batch)?;
        let mut bloom = self.bloom.write().expect("bloom lock");
        new_ids.iter().for_each(|id| bloom.insert(id));
        Ok(())
    }

    /// Adds one reference to each chunk in `seen` to `batch`: chunks this ingest wrote get their
    /// record (`place` says where; new ids are collected for the Bloom filter), stored ones a
    /// higher refcount. Records are read again: another commit may have stored some meanwhile.
    pub(crate) fn reference_chunks(
        &self,
        seen: &HashMap<ChunkId, Seen>,
        place: &mut dyn FnMut(&ChunkId) -> Result<Location>,
        batch: &mut WriteBatch,
        new_ids: &mut Vec<ChunkId>,
    ) -> Result<()> {
        for (id, s) in in_id_order(seen, |(id, _)| **id) {
            let current = match s {
                Seen::Stored => Some(self.chunk_record(id)?.ok_or(StoreError::MissingChunk(*id))?),
                Seen::New => self.chunk_record(id)?,
            };
            let rec = match (s, current) {
                // Stored meanwhile by another ingest: share that copy; ours stays dead weight
                // in the pack until gc compacts it.
                (_, Some(rec)) if !rec.loc.is_absent() => ChunkRecord { refcount: rec.refcount + 1, ..rec },
                // Known to a lazy layer but not fetched: ours becomes the copy.
                (Seen::New, Some(rec)) => ChunkRecord { loc: place(id)?, refcount: rec.refcount + 1 },
                (Seen::Stored, Some(_)) => return Err(StoreError::MissingChunk(*id)),
                (Seen::New, None) => {
                    new_ids.push(*id);
                    ChunkRecord { loc: place(id)?, refcount: 1 }
                }
                (Seen::Stored, None) => unreachable!("checked above"),
            };
            batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), rec.encode());
        }
        Ok(())
    }
}

/// Reads an entry's ownership, mode, times and xattrs, PAX records taking precedence.
fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let h = entry.header();
    let field = |name: &str, e: io::Error| format!("invalid {name} field: {e}");
    let mut meta = Meta {
        mode: h.mode().map_err(|e| field("mode", e))? & 0o7777,
        uid: u32::try_from(h.uid().map_err(|e| field("uid", e))?)
            .map_err(|_| "uid does not fit 32 bits".to_string())?,
        gid: u32::try_from(h.gid().map_err(|e| field("gid", e))?)
            .map_err(|_| "gid does not fit 32 bits".to_string())?,
        mtime: i64::try_from(h.mtime().map_err(|e| field("mtime", e))?)
            .map_err(|_| "mtime out of range".to_string())?,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    if let Some(exts) = entry.pax_extensions().map_err(|e| format!("bad PAX header: {e}"))? {
        for ext in exts {
            let ext = ext.map_err(|e| format!("bad PAX header: {e}"))?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"mtime" {
                (meta.mtime, meta.mtime_nsec) = parse_pax_time(value).ok_or("bad PAX mtime")?;
            } else if key == b"uid" || key == b"gid" {
                let v: u32 = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).ok_or("bad PAX uid/gid")?;
                if key == b"uid" {
                    meta.uid = v;
                } else {
                    meta.gid = v;
                }
            }
        }
    }
    meta.xattrs.sort();
    if meta.xattrs.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err("the same xattr is set twice".into());
    }
    Ok(meta)
}

/// Parses a PAX time (`1700000000.5`, `-3.25`) into seconds and nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut secs: i64 = secs.parse().ok()?;
    if frac.is_empty() {
        return Some((secs, 0));
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let mut nsec: u32 = digits.parse().ok()?;
    if s.starts_with('-') && nsec > 0 {
        // -3.25 is 3.25 s before the epoch: -4 s + 0.75 s.
        secs -= 1;
        nsec = 1_000_000_000 - nsec;
    }
    Some((secs, nsec))
}

#[cfg(test)]
mod tests {
    use super::parse_pax_time;

    /// Cut points are part of the store format: the same bytes must always give the same chunks,
    /// whatever fastcdc version is linked. Pinned on 8 MiB of deterministic data.
    #[test]
    fn cut_points_are_pinned() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..8 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Skewed bytes, so the data has structure like real files.
                (x % 251) as u8 & if x & 0x300 == 0 { 0 } else { 0xff }
            })
            .collect();
        let p = hb_core::ChunkerParams::default();
        let cuts =
            fastcdc::v2020::StreamCDC::new(&data[..], p.min_size as usize, p.avg_size as usize, p.max_size as usize);
        let mut h = blake3::Hasher::new();
        let mut n = 0;
        for c in cuts {
            let c = c.unwrap();
            h.update(&c.offset.to_le_bytes());
            h.update(&(c.length as u64).to_le_bytes());
            n += 1;
        }
        assert_eq!(
            (n, h.finalize().to_hex().to_string()),
            (110, "7a6bd54d0b8b2e13b483848be6deeb8e99f5d615aaf7d1ae521217d8868091ec".to_string()),
            "cut points changed"
        );
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_pax_time(b"1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(parse_pax_time(b"1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-3.25"), Some((-4, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
