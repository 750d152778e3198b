//! HyperBox's content-addressed chunk store.
//!
//! Every regular file of every layer is cut into FastCDC chunks; each chunk is stored once
//! (zstd-compressed unless that does not pay) in append-only pack files, found by its BLAKE3 id
//! through RocksDB, with a Bloom filter in front, and verified on every read. Layers are kept as
//! layer indexes (`hb_core::LayerIndex`).
//!
//! Invariants:
//! - An ingest becomes visible in one synced RocksDB write batch, after the pack bytes it needs
//!   are fsynced; a crash before that leaves only pack bytes past the committed length, which the
//!   next [`Store::open`] cuts off.
//! - A chunk's refcount is the number of stored layer indexes that reference it.
//! - One process owns a store at a time (an exclusive `flock` on `ROOT/LOCK`).
//!
//! What it must not do: network I/O, async runtimes, printing. Progress goes through
//! [`Progress`]; logs through `tracing`.

mod backing;
mod bloom;
mod error;
mod export;
mod forms;
mod images;
mod ingest;
mod lazy;
mod maint;
pub mod meta;
pub mod pack;
mod priority;
mod raw;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use hb_core::{ChunkId, ChunkSource, ChunkerParams, Digest, LayerIndex, SourceError};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, DB};

pub use bloom::{ChunkFilter, FP_RATE};
pub use error::{Result, StoreError};
pub use export::ExportReport;
pub use images::{ImageSize, NamedImage};
pub use ingest::{ImportOptions, ImportReport};
pub use lazy::{FillReport, LazyImport, StoredChunk};
pub use maint::{FsckIssue, FsckReport, GcReport, RepairReport, Usage};
pub use meta::{BlobCompression, BlobRecord, ChunkRecord, ImageLayer, ImageRecord};
pub use priority::in_background;
pub use raw::{RawRecord, RawReport};

use meta::*;
use pack::{Location, PackWriter};

/// Limits that protect the store from hostile layers.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest uncompressed layer accepted.
    pub max_layer_bytes: u64,
    /// Largest uncompressed/compressed ratio accepted once more than [`Limits::ratio_grace`]
    /// bytes were decompressed.
    pub max_ratio: u64,
    pub ratio_grace: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_layer_bytes: 64 << 30, max_ratio: 1000, ratio_grace: 64 << 20 }
    }
}

/// How a store is opened.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Chunker for a new store; an existing store keeps the one it was created with.
    pub chunker: ChunkerParams,
    pub zstd_level: i32,
    pub limits: Limits,
    /// A new pack is started once the active one is larger than this.
    pub pack_target_bytes: u64,
    /// The store serves a long-lived process (the daemon, the mirror): small memtables, so
    /// committed metadata does not pile up in memory between flushes (RocksDB's default lets
    /// each of the five column families grow to 64 MiB: the mirror's RSS climbed 20 MB in a
    /// 10-minute soak). Short commands keep the defaults: their memtables are written once, at
    /// close, inside the room packs leave for metadata on a nearly full disk.
    pub long_lived: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunker: ChunkerParams::default(),
            zstd_level: 3,
            limits: Limits::default(),
            pack_target_bytes: 1 << 30,
            long_lived: false,
        }
    }
}

/// Receives progress of long operations (bytes or items, as each operation documents).
pub trait Progress: Sync {
    fn set_total(&self, _total: u64) {}
    fn advance(&self, _n: u64) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Pack bookkeeping shared by ingests; its mutex also serialises commits.
struct Writer {
    /// Open packs no ingest is using.
    idle: Vec<PackWriter>,
    /// Packs an ingest is appending to.
    in_use: std::collections::HashSet<u32>,
    next_pack: u32,
}

/// An open store. Thread-safe; writes are serialised internally.
pub struct Store {
    root: PathBuf,
    packs_dir: PathBuf,
    db: DB,
    config: StoreConfigRecord,
    opts: StoreOptions,
    bloom: RwLock<ChunkFilter>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    writer: Mutex<Writer>,
    /// Ingests hold it shared; gc and fsck exclusively, so they never see half an ingest.
    gate: RwLock<()>,
    /// None for a read-only view ([`Store::open_read_only`]).
    _lock: Option<File>,
    /// Lazy layers this handle has recorded ([`Store::lazy_imports`]).
    lazy_imports: std::sync::atomic::AtomicU64,
}

/// A summary of one stored layer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerInfo {
    pub diff_id: Digest,
    pub blobs: Vec<Digest>,
    pub pinned: bool,
    pub entries: usize,
    pub content_bytes: u64,
    pub chunks: usize,
}

/// Column families sharing one block cache of [`BLOCK_CACHE_BYTES`] (RocksDB's default is a cache
/// of 8 MiB per family: 40 MiB for a long-lived daemon's five).
fn cf_descriptors(long_lived: bool) -> Vec<ColumnFamilyDescriptor> {
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES).ok();
    COLUMN_FAMILIES
        .iter()
        .map(|n| {
            let mut table = rocksdb::BlockBasedOptions::default();
            if let Some(c) = &cache {
                table.set_block_cache(c);
            }
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            if long_lived {
                o.set_write_buffer_size(MEMTABLE_BYTES);
            }
            ColumnFamilyDescriptor::new(*n, o)
        })
        .collect()
}

/// Options every open of the metadata database shares. Opening is on the path of every cold
/// start (`hb run`, each mount server), so it does only what hb's small database needs: its
/// table files are opened on the calling thread (RocksDB's default starts 16 threads per column
/// family to open them, ~0.1 ms each, for a database of a few files), and no table's statistics
/// are read at open (they only tune compaction).
fn db_options() -> Options {
    let mut dbo = Options::default();
    dbo.set_max_file_opening_threads(1);
    dbo.set_skip_stats_update_on_db_open(true);
    dbo
}

/// Free space [`Store::open`] needs on the store's filesystem (RocksDB writes as it opens).
const OPEN_RESERVE: u64 = 1 << 20;

/// The metadata block cache, shared by all column families.
const BLOCK_CACHE_BYTES: usize = 8 << 20;

/// One column family's memtable before it is flushed, in a long-lived process
/// ([`StoreOptions::long_lived`]); hb's metadata writes are small (a 200 MB image is a few
/// hundred KiB of records), so small memtables cost nothing there.
const MEMTABLE_BYTES: usize = 2 << 20;

/// All memtables together (long-lived processes): RocksDB flushes the largest past this.
const MEMTABLES_TOTAL_BYTES: usize = 8 << 20;

impl Store {
    /// Opens the store at `root`, creating it when missing, and recovers from an interrupted
    /// write: uncommitted pack bytes are cut off and orphaned pack files removed.
    pub fn open(root: &Path, opts: StoreOptions) -> Result<Store> {
        let packs_dir = root.join("packs");
        std::fs::create_dir_all(&packs_dir).map_err(StoreError::io(format!("creating store {}", root.display())))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("LOCK"))
            .map_err(StoreError::io(format!("opening {}/LOCK", root.display())))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| StoreError::Locked(root.to_path_buf()))?;
        // RocksDB writes as it opens (a new log and manifest), and must not meet a full disk.
        if let Some(free) = pack::free_bytes(&lock).filter(|f| *f < OPEN_RESERVE) {
            return Err(StoreError::Full { root: root.to_path_buf(), free });
        }

        let mut dbo = db_options();
        dbo.create_if_missing(true);
        dbo.create_missing_column_families(true);
        dbo.set_compression_type(rocksdb::DBCompressionType::None);
        dbo.set_keep_log_file_num(2);
        dbo.set_max_log_file_size(1 << 20);
        if opts.long_lived {
            dbo.set_db_write_buffer_size(MEMTABLES_TOTAL_BYTES);
        }
        let cfs = cf_descriptors(opts.long_lived);
        let db = DB::open_cf_descriptors(&dbo, root.join("meta"), cfs)?;

        let config = match db.get(KEY_CONFIG)? {
            Some(raw) => serde_json::from_slice::<StoreConfigRecord>(&raw)
                .map_err(|e| StoreError::CorruptMeta(format!("store config: {e}")))?,
            None => {
                let seed = blake3::hash(
                    format!("{:?}{}{}", std::time::SystemTime::now(), std::process::id(), root.display()).as_bytes(),
                );
                let c = StoreConfigRecord {
                    format: STORE_FORMAT,
                    chunker_algorithm: "fastcdc-2020".into(),
                    chunk_min: opts.chunker.min_size,
                    chunk_avg: opts.chunker.avg_size,
                    chunk_max: opts.chunker.max_size,
                    bloom_seed: seed.to_hex().to_string(),
                };
                let mut wo = rocksdb::WriteOptions::default();
                wo.set_sync(true);
                db.put_opt(KEY_CONFIG, serde_json::to_vec(&c).expect("serialisable"), &wo)?;
                c
            }
        };
        let incompatible = |why: String| StoreError::Incompatible {
            root: root.to_path_buf(),
            stored: format!(
                "{}/{}/{}/{}",
                config.chunker_algorithm, config.chunk_min, config.chunk_avg, config.chunk_max
            ),
            why,
        };
        if config.format != STORE_FORMAT {
            return Err(incompatible(format!("store format {} (this build knows {STORE_FORMAT})", config.format)));
        }
        if config.chunker_algorithm != "fastcdc-2020" {
            return Err(incompatible("unknown algorithm".into()));
        }
        config.chunker().validate().map_err(incompatible)?;

        let mut store = Store::assemble(root, db, config, opts, Some(lock));
        let next = store.recover_packs()?;
        store.writer.get_mut().expect("not shared yet").next_pack = next;
        let seq = store.db.latest_sequence_number();
        let bloom = match ChunkFilter::load(&store.bloom_path(), seq) {
            Some(f) if !f.overfull() => f,
            _ => store.rebuild_bloom()?,
        };
        *store.bloom.get_mut().expect("not shared yet") = bloom;
        Ok(store)
    }

    /// Opens a read-only view of a store another process may be writing (e.g. one an `hb mount`
    /// holds): what was committed when it was opened, readable; every write fails with
    /// [`StoreError::ReadOnly`]. Nothing on disk is touched (no recovery, no Bloom filter save);
    /// it has no Bloom filter of its own (its chunk lookups ask RocksDB).
    pub fn open_read_only(root: &Path, opts: StoreOptions) -> Result<Store> {
        if !root.join("meta").is_dir() {
            return Err(StoreError::NoStore(root.to_path_buf()));
        }
        // The owner may be recovering its log into tables this instant (its open moves records
        // from the log it deletes into a new table): a view opened then can miss records, so a
        // view without the store's config record is opened again, for up to a second.
        let mut attempts = 0;
        let (db, config) = loop {
            let dbo = db_options();
            let db = DB::open_cf_descriptors_read_only(&dbo, root.join("meta"), cf_descriptors(false), false)?;
            match db.get(KEY_CONFIG)? {
                Some(raw) => {
                    let config = serde_json::from_slice::<StoreConfigRecord>(&raw)
                        .map_err(|e| StoreError::CorruptMeta(format!("store config: {e}")))?;
                    break (db, config);
                }
                None if attempts < 20 => {
                    attempts += 1;
                    drop(db);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                None => return Err(StoreError::NoStore(root.to_path_buf())),
            }
        };
        // No Bloom filter: building one read every chunk key of the store twice, on the path of
        // every mount server's start (a snapshotter's Prepare to mounted went 186 -> ~110 ms
        // without it on a py-app store of 14,564 chunks; it grows with the store); a view's
        // lookups ask RocksDB (its own filters) instead.
        let mut store = Store::assemble(root, db, config, opts, None);
        *store.bloom.get_mut().expect("not shared yet") = ChunkFilter::pass_through();
        Ok(store)
    }

    /// A store around an open database; its Bloom filter and next pack id are set by the caller.
    fn assemble(root: &Path, db: DB, config: StoreConfigRecord, opts: StoreOptions, lock: Option<File>) -> Store {
        Store {
            root: root.to_path_buf(),
            packs_dir: root.join("packs"),
            db,
            config,
            opts,
            bloom: RwLock::new(ChunkFilter::with_capacity(0, &[0; 32])),
            readers: RwLock::new(HashMap::new()),
            writer: Mutex::new(Writer { idle: Vec::new(), in_use: Default::default(), next_pack: 1 }),
            gate: RwLock::new(()),
            _lock: lock,
            lazy_imports: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Writes the metadata held in memory (RocksDB memtables) to tables and frees it: for a
    /// long-lived owner after a burst of writes, and so read-only views replay less log.
    pub fn flush_metadata(&self) -> Result<()> {
        self.writable()?;
        for name in crate::meta::COLUMN_FAMILIES {
            if let Some(cf) = self.db.cf_handle(name) {
                self.db.flush_cf(&cf)?;
            }
        }
        self.db.flush()?;
        Ok(())
    }

    /// False for a read-only view.
    pub fn is_writable(&self) -> bool {
        self._lock.is_some()
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.is_writable() {
            Ok(())
        } else {
            Err(StoreError::ReadOnly(self.root.clone()))
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The chunker this store cuts with (fixed when the store was created).
    pub fn chunker(&self) -> ChunkerParams {
        self.config.chunker()
    }

    /// `input` cut with this store's (pinned) chunker.
    pub(crate) fn cut<R: std::io::Read>(&self, input: R) -> fastcdc::v2020::StreamCDC<R> {
        let p = self.chunker();
        fastcdc::v2020::StreamCDC::new(input, p.min_size as usize, p.avg_size as usize, p.max_size as usize)
    }

    fn bloom_path(&self) -> PathBuf {
        self.root.join("bloom.bin")
    }

    fn bloom_seed(&self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        if hex::decode_to_slice(&self.config.bloom_seed, &mut seed).is_err() {
            seed = *blake3::hash(self.config.bloom_seed.as_bytes()).as_bytes();
        }
        seed
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    /// Cuts registered packs back to their committed length and deletes unregistered pack files
    /// (left by an ingest or compaction that died before its commit). Returns the next pack id.
    fn recover_packs(&self) -> Result<u32> {
        let packs = self.pack_records()?;
        let mut max_id = packs.keys().copied().max().unwrap_or(0);
        let dir = std::fs::read_dir(&self.packs_dir)
            .map_err(StoreError::io(format!("listing {}", self.packs_dir.display())))?;
        for ent in dir {
            let ent = ent.map_err(StoreError::io(format!("listing {}", self.packs_dir.display())))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(id) = pack::parse_pack_name(&name) else { continue };
            max_id = max_id.max(id);
            let path = ent.path();
            match packs.get(&id) {
                None => {
                    tracing::warn!(pack = %path.display(), "removing pack file left by an interrupted write");
                    std::fs::remove_file(&path).map_err(StoreError::io(format!("removing {}", path.display())))?;
                }
                Some(rec) => {
                    let len = ent.metadata().map_err(StoreError::io(format!("stat {}", path.display())))?.len();
                    if len > rec.committed_len {
                        tracing::warn!(pack = %path.display(), bytes = len - rec.committed_len, "cutting uncommitted bytes left by an interrupted write");
                        File::options()
                            .write(true)
                            .open(&path)
                            .and_then(|f| f.set_len(rec.committed_len).and_then(|_| f.sync_all()))
                            .map_err(StoreError::io(format!("truncating {}", path.display())))?;
                    }
                }
            }
        }
        Ok(max_id + 1)
    }

    pub(crate) fn pack_records(&self) -> Result<HashMap<u32, PackRecord>> {
        let mut out = HashMap::new();
        for item in self.db.prefix_iterator(b"pack/") {
            let (k, v) = item?;
            let Some(id) = parse_pack_key(&k) else { break };
            out.insert(id, PackRecord::decode(&v)?);
        }
        Ok(out)
    }

    /// Builds a fresh Bloom filter from every chunk key.
    fn rebuild_bloom(&self) -> Result<ChunkFilter> {
        let count = self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start).count() as u64;
        let mut f = ChunkFilter::with_capacity(count, &self.bloom_seed());
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (k, _) = item?;
            f.insert(&ChunkId(
                k.as_ref().try_into().map_err(|_| StoreError::CorruptMeta("chunk key is not 32 bytes".into()))?,
            ));
        }
        tracing::debug!(chunks = count, "rebuilt the chunk Bloom filter");
        Ok(f)
    }

    /// Where a chunk is and its refcount, if stored.
    pub fn chunk_record(&self, id: &ChunkId) -> Result<Option<ChunkRecord>> {
        if !self.bloom.read().expect("bloom lock").maybe_contains(id) {
            return Ok(None);
        }
        match self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes())? {
            Some(v) => Ok(Some(ChunkRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn pack_file(&self, pack: u32) -> Result<Arc<File>> {
        if let Some(f) = self.readers.read().expect("readers lock").get(&pack) {
            return Ok(f.clone());
        }
        let path = pack::pack_path(&self.packs_dir, pack);
        let f = Arc::new(File::open(&path).map_err(StoreError::io(format!("opening pack {}", path.display())))?);
        self.readers.write().expect("readers lock").insert(pack, f.clone());
        Ok(f)
    }

    pub(crate) fn read_at(&self, id: &ChunkId, loc: &Location) -> Result<Vec<u8>> {
        pack::read_chunk(&*self.pack_file(loc.pack)?, id, loc)
    }

    /// Reads a chunk, verified against its id.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        match self.chunk_record(id)? {
            Some(rec) if !rec.loc.is_absent() => self.read_at(id, &rec.loc),
            _ => Err(StoreError::MissingChunk(*id)),
        }
    }

    /// The index of a stored layer.
    pub fn layer(&self, diff_id: &Digest) -> Result<Option<LayerIndex>> {
        match self.db.get_pinned_cf(self.cf(CF_LAYERS), diff_id.as_bytes())? {
            Some(raw) => {
                LayerIndex::decode(&raw).map(Some).map_err(|source| StoreError::Index { diff_id: *diff_id, source })
            }
            None => Ok(None),
        }
    }

    /// Finds a layer by blob digest or diff_id, full (`sha256:...`) or an unambiguous hex prefix.
    pub fn resolve_layer(&self, query: &str) -> Result<Digest> {
        let hex = query.strip_prefix("sha256:").unwrap_or(query).to_ascii_lowercase();
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) || hex.len() > 64 {
            return Err(StoreError::UnknownLayer(query.to_string()));
        }
        let mut found: Vec<Digest> = Vec::new();
        for cf in [CF_LAYERS, CF_BLOBS] {
            for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
                let (k, v) = item?;
                if hex::encode(&k).starts_with(&hex) {
                    let d = if cf == CF_LAYERS { digest_from_key(&k)? } else { BlobRecord::decode(&v)?.diff_id };
                    if !found.contains(&d) {
                        found.push(d);
                    }
                }
            }
        }
        match found.len() {
            0 => Err(StoreError::UnknownLayer(query.to_string())),
            1 => Ok(found[0]),
            _ => Err(StoreError::AmbiguousLayer {
                query: query.to_string(),
                candidates: found.iter().map(|d| d.short()).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// Every stored layer with its blobs and sizes.
    pub fn list_layers(&self) -> Result<Vec<LayerInfo>> {
        let mut blobs: HashMap<Digest, Vec<Digest>> = HashMap::new();
        for item in self.db.iterator_cf(self.cf(CF_BLOBS), IteratorMode::Start) {
            let (k, v) = item?;
            blobs.entry(BlobRecord::decode(&v)?.diff_id).or_default().push(digest_from_key(&k)?);
        }
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_LAYERS), IteratorMode::Start) {
            let (k, v) = item?;
            let diff_id = digest_from_key(&k)?;
            let idx = LayerIndex::decode(&v).map_err(|source| StoreError::Index { diff_id, source })?;
            out.push(LayerInfo {
                diff_id,
                blobs: blobs.remove(&diff_id).unwrap_or_default(),
                pinned: self.db.get_pinned_cf(self.cf(CF_REFS), layer_ref(&diff_id))?.is_some(),
                entries: idx.entries.len(),
                content_bytes: idx.content_bytes(),
                chunks: idx.chunks.len(),
            });
        }
        Ok(out)
    }

    /// Unpins a layer imported with [`Store::import_layer`]; `gc` then frees what only it used.
    /// Returns false when it was not pinned.
    pub fn unpin_layer(&self, diff_id: &Digest) -> Result<bool> {
        self.writable()?;
        let _w = self.writer.lock().expect("writer lock");
        let key = layer_ref(diff_id);
        if self.db.get_pinned_cf(self.cf(CF_REFS), &key)?.is_none() {
            return Ok(false);
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.delete_cf_opt(self.cf(CF_REFS), key, &wo)?;
        Ok(true)
    }

    fn sync_write(&self, batch: rocksdb::WriteBatch) -> Result<()> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Writes `batch` atomically to the log without waiting for the disk: it survives a killed
    /// process (the log is in the kernel's hands), and a crash of the machine loses it whole or
    /// not at all; the next [`Store::sync_write`] makes it durable (a synced write syncs every
    /// live log file, and recovery keeps the log's order). For records the caller commits with a
    /// synced write after them.
    fn logged_write(&self, batch: rocksdb::WriteBatch) -> Result<()> {
        self.db.write(batch)?;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if !self.is_writable() {
            return;
        }
        let seq = self.db.latest_sequence_number();
        let bloom = self.bloom.read().expect("bloom lock");
        // A store only read from (`hb images`, `hb ps`, a pull of what it holds) leaves its
        // filter file as it found it, rather than writing the same 1.2 MB again at every exit.
        if bloom.saved_at(seq) {
            return;
        }
        if let Err(e) = bloom.save(&self.bloom_path(), seq) {
            tracing::warn!(error = %e, "could not save the Bloom filter; it will be rebuilt");
        }
    }
}

impl ChunkSource for Store {
    fn fetch(&self, id: &ChunkId) -> std::result::Result<Option<Vec<u8>>, SourceError> {
        match self.read_chunk(id) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::MissingChunk(_)) => Ok(None),
            Err(StoreError::CorruptChunk { id, reason }) => {
                Err(SourceError::Corrupt { id, source_name: "local store".into(), reason })
            }
            Err(e) => Err(SourceError::Unavailable { source_name: "local store".into(), reason: e.to_string() }),
        }
    }
}
