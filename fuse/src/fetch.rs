//! Where a mount's chunk bytes come from: a small cache of decoded chunks, the local store, then
//! the remote tiers of a [`SourceChain`] (the daemon, a mirror, the registry; peers next).
//! Remote chunks are verified before use (by the chain), handed to the reader at once and
//! written in the background (batched: one fsync per batch) to the store, or when the store is a
//! read-only view to the first tier that keeps them (the daemon), so a second read is local.
//! Concurrent reads of one chunk fetch it once.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hb_core::{ChunkId, ChunkSource, SourceChain, SourceError, TierStats};
use hb_store::{Store, StoreError};

/// Why a chunk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("chunk {0} is not in the local store and there is no remote source for it")]
    NotFound(ChunkId),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    #[error("timed out after {secs} s waiting for chunk {id}")]
    Timeout { id: ChunkId, secs: u64 },
    #[error("fetching chunk {id} failed in another reader: {reason}")]
    Shared { id: ChunkId, reason: String },
}

/// Counters of one mount (all monotonic).
#[derive(Debug, Default)]
pub struct FetchStats {
    pub cache_hits: AtomicU64,
    pub local_chunks: AtomicU64,
    pub remote_chunks: AtomicU64,
    /// Uncompressed bytes of chunks fetched remotely.
    pub remote_bytes: AtomicU64,
    /// Batches asked of the remote source (it may make several HTTP requests for one).
    pub remote_requests: AtomicU64,
    pub prefetched_chunks: AtomicU64,
    pub errors: AtomicU64,
    /// Batches of fetched chunks the store could not keep (they are fetched again when read).
    pub fill_errors: AtomicU64,
    /// Uncompressed bytes of chunks read from the store.
    pub local_bytes: AtomicU64,
    /// Remote fetches by latency: one count per bucket of [`LATENCY_BUCKETS_MS`], then the rest.
    pub fetch_latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    pub fetch_latency_sum_ms: AtomicU64,
}

/// Upper bounds (milliseconds) of the remote fetch latency histogram's buckets.
pub const LATENCY_BUCKETS_MS: [u64; 10] = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000];

/// A snapshot of [`FetchStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub cache_hits: u64,
    pub local_chunks: u64,
    pub remote_chunks: u64,
    pub remote_bytes: u64,
    pub remote_requests: u64,
    pub prefetched_chunks: u64,
    pub errors: u64,
    pub fill_errors: u64,
    pub local_bytes: u64,
    pub fetch_latency: [u64; LATENCY_BUCKETS_MS.len() + 1],
    pub fetch_latency_sum_ms: u64,
}

impl FetchStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            cache_hits: g(&self.cache_hits),
            local_chunks: g(&self.local_chunks),
            remote_chunks: g(&self.remote_chunks),
            remote_bytes: g(&self.remote_bytes),
            remote_requests: g(&self.remote_requests),
            prefetched_chunks: g(&self.prefetched_chunks),
            errors: g(&self.errors),
            fill_errors: g(&self.fill_errors),
            local_bytes: g(&self.local_bytes),
            fetch_latency: std::array::from_fn(|i| g(&self.fetch_latency[i])),
            fetch_latency_sum_ms: g(&self.fetch_latency_sum_ms),
        }
    }
}

/// A remote fetch other readers wait for.
#[derive(Default)]
struct Pending {
    done: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
    /// Claimed by a background fetch (the start-up order): a reader waits for it only so long
    /// ([`BACKGROUND_WAIT`]), then fetches the chunk itself.
    background: bool,
}

/// How long a reader waits for a chunk a background fetch claimed before fetching it itself (a
/// chunk late in a long order, behind batches on a slow or failing link).
const BACKGROUND_WAIT: Duration = Duration::from_secs(2);

type Chunk = Arc<Vec<u8>>;
/// A batch of fetched chunks on its way to the store, with the zstd frames their bytes were
/// decoded from where the remote held them (kept as they came).
type FillBatch = (Vec<(ChunkId, Chunk)>, HashMap<ChunkId, Vec<u8>>);

/// Decoded chunks kept in memory, and the ones not yet written to the store.
struct Memory {
    cache: lru::LruCache<ChunkId, Chunk>,
    unfilled: HashMap<ChunkId, Chunk>,
}

/// The first-read order of chunks, for `hb optimize`.
#[derive(Default)]
struct Recorder {
    order: Vec<ChunkId>,
    seen: HashSet<ChunkId>,
}

pub struct Fetcher {
    store: Arc<Store>,
    /// The tiers below the store; empty when everything is local.
    remote: SourceChain,
    inflight: Mutex<HashMap<ChunkId, Arc<Pending>>>,
    memory: Mutex<Memory>,
    fill_tx: Mutex<Option<Sender<FillBatch>>>,
    filler: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// On-demand reads in progress; background work yields while it is non-zero.
    foreground: AtomicUsize,
    recorder: Mutex<Option<Recorder>>,
    /// Chunks a start-up guess fetched before they were read (see [`Fetcher::record_guessed`]).
    guessed: Mutex<HashSet<ChunkId>>,
    timeout: Duration,
    pub stats: Arc<FetchStats>,
}

/// Chunks decoded in memory (about 64 MiB at the default chunk size).
const CACHE_CHUNKS: usize = 1024;
/// Largest batch the background filler writes with one fsync.
const FILL_BATCH_BYTES: usize = 16 << 20;

impl Fetcher {
    /// A fetcher reading `store`, then the tiers of `remote` in order. `timeout` bounds every
    /// wait for a chunk. With a read-only store, what is fetched is offered to `remote`'s first
    /// tier that keeps chunks.
    pub fn new(store: Arc<Store>, remote: SourceChain, timeout: Duration) -> Arc<Fetcher> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(FetchStats::default());
        let f = Arc::new(Fetcher {
            store,
            remote,
            inflight: Mutex::new(HashMap::new()),
            memory: Mutex::new(Memory {
                cache: lru::LruCache::new(NonZeroUsize::new(CACHE_CHUNKS).expect("non-zero")),
                unfilled: HashMap::new(),
            }),
            fill_tx: Mutex::new(Some(tx)),
            filler: Mutex::new(None),
            foreground: AtomicUsize::new(0),
            recorder: Mutex::new(None),
            guessed: Mutex::new(HashSet::new()),
            timeout,
            stats,
        });
        let weak = Arc::downgrade(&f);
        let handle = std::thread::Builder::new()
            .name("hb-fill".into())
            .spawn(move || fill_loop(weak, rx))
            .expect("spawning the fill thread");
        *f.filler.lock().expect("filler lock") = Some(handle);
        f
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn has_remote(&self) -> bool {
        !self.remote.is_empty()
    }

    /// The remote tiers' counters, top first.
    pub fn sources(&self) -> Vec<TierStats> {
        self.remote.stats()
    }

    /// Starts recording the order in which chunks are first read (a recording under way goes on).
    pub fn start_recording(&self) {
        self.recorder.lock().expect("recorder lock").get_or_insert_with(Recorder::default);
    }

    /// Notes chunks a start-up guess fetches before anything reads them.
    pub fn mark_guessed(&self, ids: &[ChunkId]) {
        self.guessed.lock().expect("guessed lock").extend(ids.iter().copied());
    }

    /// Adds those of `ids` a start-up guess fetched to the recording, as if read now: a file
    /// the guess made local is served by passthrough when opened, its reads unseen by the
    /// recorder. (Only those: a file local for another reason is not a start's to learn.)
    pub fn record_guessed(&self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut rec = self.recorder.lock().expect("recorder lock");
        let Some(r) = rec.as_mut() else { return };
        let guessed = self.guessed.lock().expect("guessed lock");
        for id in ids.into_iter().filter(|id| guessed.contains(id)) {
            if r.seen.insert(id) {
                r.order.push(id);
            }
        }
    }

    /// Stops recording; returns the order recorded.
    pub fn take_recording(&self) -> Vec<ChunkId> {
        self.recorder.lock().expect("recorder lock").take().map(|r| r.order).unwrap_or_default()
    }

    /// True while on-demand reads are in progress.
    pub fn busy(&self) -> bool {
        self.foreground.load(Ordering::Relaxed) > 0
    }

    /// Reads one chunk for a reader, with `ahead` as chunks worth fetching in the same request if
    /// it has to go remote (read-ahead). The bytes are verified.
    pub fn read(&self, id: &ChunkId, ahead: &[ChunkId]) -> Result<Chunk, FetchError> {
        if let Some(r) = self.recorder.lock().expect("recorder lock").as_mut() {
            if r.seen.insert(*id) {
                r.order.push(*id);
            }
        }
        self.foreground.fetch_add(1, Ordering::Relaxed);
        let out = self.get_counted(id, ahead);
        self.foreground.fetch_sub(1, Ordering::Relaxed);
        out
    }

    /// [`Fetcher::get`], an error counted.
    fn get_counted(&self, id: &ChunkId, ahead: &[ChunkId]) -> Result<Chunk, FetchError> {
        let out = self.get(id, ahead);
        if out.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// Reads one chunk for hb itself (a start-up guess reading a program's headers): like
    /// [`Fetcher::read`], but not recorded as the program's read.
    pub fn read_unrecorded(&self, id: &ChunkId) -> Result<Chunk, FetchError> {
        self.get_counted(id, &[])
    }

    fn in_memory(&self, id: &ChunkId) -> Option<Chunk> {
        let mut m = self.memory.lock().expect("memory lock");
        if let Some(c) = m.cache.get(id) {
            return Some(c.clone());
        }
        m.unfilled.get(id).cloned()
    }

    fn get(&self, id: &ChunkId, ahead: &[ChunkId]) -> Result<Chunk, FetchError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(c) = self.in_memory(id) {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(c);
            }
            match self.store.read_chunk(id) {
                Ok(b) => {
                    self.stats.local_chunks.fetch_add(1, Ordering::Relaxed);
                    self.stats.local_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    let c = Arc::new(b);
                    self.memory.lock().expect("memory lock").cache.put(*id, c.clone());
                    return Ok(c);
                }
                Err(StoreError::MissingChunk(_)) => {}
                // A read-only view is a snapshot: the owner may have moved the chunk since (gc
                // compacts packs). The remote side (the owner first, when there is one) has it.
                Err(e) if !self.store.is_writable() && self.has_remote() => {
                    tracing::debug!(chunk = %id, error = %e, "read-only store view missed; asking the remote side");
                }
                Err(e) => return Err(e.into()),
            }
            if !self.has_remote() {
                return Err(FetchError::NotFound(*id));
            }
            // Claim the chunk (and read-ahead that nobody fetches), or wait for whoever has it.
            let claim = {
                let mut inflight = self.inflight.lock().expect("inflight lock");
                match inflight.get(id) {
                    Some(p) => Err(p.clone()),
                    None => {
                        let mut mine = vec![*id];
                        inflight.insert(*id, Arc::new(Pending::default()));
                        for a in ahead {
                            if a != id && !inflight.contains_key(a) && !self.store.has_chunk(a).unwrap_or(true) {
                                inflight.insert(*a, Arc::new(Pending::default()));
                                mine.push(*a);
                            }
                        }
                        Ok(mine)
                    }
                }
            };
            match claim {
                Err(pending) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let limit = if pending.background { left.min(BACKGROUND_WAIT) } else { left };
                    let guard = pending.done.lock().expect("pending lock");
                    let (guard, res) =
                        pending.cv.wait_timeout_while(guard, limit, |d| d.is_none()).expect("pending lock");
                    if res.timed_out() && pending.background && limit < left {
                        drop(guard);
                        tracing::debug!(chunk = %id, "the background fetch is slow to reach this chunk; reading it now");
                        let got = self.fetch_remote(&[*id], true);
                        return match got {
                            Ok(map) => map.get(id).cloned().ok_or(FetchError::NotFound(*id)),
                            Err(e) => Err(FetchError::Source(e)),
                        };
                    }
                    if res.timed_out() {
                        return Err(FetchError::Timeout { id: *id, secs: self.timeout.as_secs() });
                    }
                    if let Some(Err(reason)) = guard.as_ref() {
                        if self.in_memory(id).is_none() {
                            return Err(FetchError::Shared { id: *id, reason: reason.clone() });
                        }
                    }
                    // Fetched by the other reader: loop to take it from memory.
                }
                Ok(mine) => {
                    let got = self.fetch_remote(&mine, true);
                    let out = match &got {
                        Ok(map) => map.get(id).cloned().ok_or(FetchError::NotFound(*id)),
                        Err(e) => Err(FetchError::Source(e.clone())),
                    };
                    self.release(&mine, got.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                    return out;
                }
            }
        }
    }

    /// Fetches `ids` remotely; keeps what came (verified by the chain) in memory and queues it
    /// for the store.
    fn fetch_remote(&self, ids: &[ChunkId], cache: bool) -> Result<HashMap<ChunkId, Chunk>, SourceError> {
        let remote = &self.remote;
        self.stats.remote_requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let got = remote.fetch_many(ids);
        let ms = started.elapsed().as_millis() as u64;
        let bucket = LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.stats.fetch_latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.stats.fetch_latency_sum_ms.fetch_add(ms, Ordering::Relaxed);
        let got = got?;
        let mut map = HashMap::with_capacity(got.len());
        let mut batch = Vec::with_capacity(got.len());
        for (cid, bytes) in got {
            self.stats.remote_chunks.fetch_add(1, Ordering::Relaxed);
            self.stats.remote_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let c = Arc::new(bytes);
            batch.push((cid, c.clone()));
            map.insert(cid, c);
        }
        // A read-only view of the store (another process holds it) cannot keep what was fetched:
        // the read cache serves it while it lasts. Nor can it read back what it handed to the
        // daemon (its view is a snapshot): prefetched chunks go to the read cache too, or each
        // first read of one would be a round trip to the daemon (90 of 226 chunks of a cold
        // python start through containerd did that).
        let keep = self.store.is_writable() || self.remote.keeps();
        let cache = cache || !self.store.is_writable();
        {
            let mut m = self.memory.lock().expect("memory lock");
            for (cid, c) in &batch {
                if keep {
                    m.unfilled.insert(*cid, c.clone());
                }
                if cache || !keep {
                    m.cache.put(*cid, c.clone());
                }
            }
        }
        if keep {
            // The frames they came in, for this process's store or the tier that keeps them.
            let frames: HashMap<ChunkId, Vec<u8>> =
                batch.iter().filter_map(|(cid, _)| self.remote.take_frame(cid).map(|f| (*cid, f))).collect();
            if let Some(tx) = self.fill_tx.lock().expect("fill lock").as_ref() {
                let _ = tx.send((batch, frames));
            }
        }
        Ok(map)
    }

    fn release(&self, ids: &[ChunkId], result: Result<(), String>) {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        for id in ids {
            if let Some(p) = inflight.remove(id) {
                *p.done.lock().expect("pending lock") = Some(result.clone());
                p.cv.notify_all();
            }
        }
    }

    /// Claims `ids` that are neither local nor being fetched for a background fetch: they are
    /// in flight from now on, so a reader of one waits for it rather than fetching it again. The
    /// claimer must pass them to [`Fetcher::fetch_claimed`] or [`Fetcher::unclaim`].
    pub fn claim(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, FetchError> {
        if !self.has_remote() {
            return Ok(Vec::new());
        }
        let mut inflight = self.inflight.lock().expect("inflight lock");
        let mut mine = Vec::new();
        for id in ids {
            let held = match self.store.has_chunk(id) {
                Ok(held) => held,
                Err(e) => {
                    // Nothing stays claimed that nobody will fetch.
                    drop(inflight);
                    self.release(&mine, Ok(()));
                    return Err(e.into());
                }
            };
            if !inflight.contains_key(id) && !held && self.in_unfilled(id).is_none() {
                inflight.insert(*id, Arc::new(Pending { background: true, ..Pending::default() }));
                mine.push(*id);
            }
        }
        Ok(mine)
    }

    /// Fetches chunks [`Fetcher::claim`]ed. On failure their readers fetch them themselves (with
    /// their own retries) instead of sharing the error.
    pub fn fetch_claimed(&self, mine: &[ChunkId]) -> Result<(usize, u64), FetchError> {
        if mine.is_empty() {
            return Ok((0, 0));
        }
        let got = self.fetch_remote(mine, false);
        self.release(mine, Ok(()));
        let got = got?;
        self.stats.prefetched_chunks.fetch_add(got.len() as u64, Ordering::Relaxed);
        Ok((got.len(), got.values().map(|c| c.len() as u64).sum()))
    }

    /// Gives claimed chunks back unfetched: their readers fetch them.
    pub fn unclaim(&self, mine: &[ChunkId]) {
        self.release(mine, Ok(()));
    }

    /// Background fetch of `ids` that are neither local nor being fetched; returns how many
    /// chunks and bytes arrived. Does not fill the read cache.
    pub fn prefetch(&self, ids: &[ChunkId]) -> Result<(usize, u64), FetchError> {
        let mine = self.claim(ids)?;
        self.fetch_claimed(&mine)
    }

    fn in_unfilled(&self, id: &ChunkId) -> Option<Chunk> {
        self.memory.lock().expect("memory lock").unfilled.get(id).cloned()
    }

    /// Writes every fetched chunk to the store and stops the background writer.
    pub fn shutdown(&self) {
        drop(self.fill_tx.lock().expect("fill lock").take());
        if let Some(h) = self.filler.lock().expect("filler lock").take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Writes fetched chunks to the store in batches (one fsync each).
fn fill_loop(fetcher: std::sync::Weak<Fetcher>, rx: Receiver<FillBatch>) {
    while let Ok((first, mut frames)) = rx.recv() {
        let mut batch = first;
        let mut bytes: usize = batch.iter().map(|(_, c)| c.len()).sum();
        while bytes < FILL_BATCH_BYTES {
            match rx.try_recv() {
                Ok((more, more_frames)) => {
                    bytes += more.iter().map(|(_, c)| c.len()).sum::<usize>();
                    batch.extend(more);
                    frames.extend(more_frames);
                }
                Err(_) => break,
            }
        }
        let Some(f) = fetcher.upgrade() else { return };
        let owned: Vec<(ChunkId, Vec<u8>)> = batch.iter().map(|(id, c)| (*id, c.as_ref().clone())).collect();
        // Keeping can wait; the reads it keeps up with cannot (hb run of a python image: median
        // first output 0.505 s at nice 19, 0.540 s without).
        let kept = hb_store::in_background(|| {
            if f.store.is_writable() {
                f.store.fill_chunks_framed(&owned, &frames).map(|r| r.filled).map_err(|e| e.to_string())
            } else {
                f.remote.keep(&owned, &frames).map_err(|e| e.to_string())
            }
        });
        match kept {
            Ok(n) => tracing::debug!(filled = n, chunks = owned.len(), "stored fetched chunks"),
            Err(e) => {
                f.stats.fill_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, chunks = batch.len(), "could not store fetched chunks; they will be fetched again");
            }
        }
        let mut m = f.memory.lock().expect("memory lock");
        for (id, _) in &batch {
            m.unfilled.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hb_core::{ChunkTable, LayerIndex, LazySource, Meta, NewEntry, TreeBuilder};
    use std::sync::atomic::AtomicUsize;

    /// A remote that serves `chunks`, counts calls and can lie; with `frames`, it hands out each
    /// chunk's zstd frame once it has served the chunk (as a registry's range source does).
    struct FakeRemote {
        chunks: HashMap<ChunkId, Vec<u8>>,
        calls: AtomicUsize,
        corrupt: bool,
        frames: Option<Mutex<HashMap<ChunkId, Vec<u8>>>>,
    }

    impl ChunkSource for FakeRemote {
        fn take_frame(&self, id: &ChunkId) -> Option<Vec<u8>> {
            self.frames.as_ref()?.lock().unwrap().remove(id)
        }

        fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, SourceError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            let mut b = self.chunks.get(id).cloned();
            if self.corrupt {
                if let Some(b) = b.as_mut() {
                    b[0] ^= 1;
                }
            }
            Ok(b)
        }
    }

    /// A store holding one lazy layer of three chunks, and the remote that has them.
    fn setup(corrupt: bool) -> (tempfile::TempDir, Arc<Store>, LayerIndex, Arc<FakeRemote>) {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        setup_with(corrupt, data, false)
    }

    fn setup_with(
        corrupt: bool,
        data: Vec<u8>,
        frames: bool,
    ) -> (tempfile::TempDir, Arc<Store>, LayerIndex, Arc<FakeRemote>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Default::default()).unwrap());
        let params = store.chunker();
        let cuts: Vec<Vec<u8>> = data.chunks(100_000).map(|c| c.to_vec()).collect();
        let mut b = TreeBuilder::new(params);
        let refs = cuts.iter().map(|c| hb_core::ChunkRef { id: ChunkId::of(c), len: c.len() as u32 }).collect();
        b.add(b"f", Meta { mode: 0o644, ..Meta::default() }, NewEntry::File { chunks: refs }).unwrap();
        let index = b.finish(hb_core::Digest::of(b"layer"));
        let mut table = ChunkTable::default();
        index.chunks.iter().for_each(|c| table.push(c.id, c.len, c.len, false));
        let source = LazySource { repository: "h/r".into(), data: hb_core::Digest::of(b"d"), table };
        store
            .import_lazy_layer(&index, &hb_core::Digest::of(b"blob"), hb_store::BlobCompression::None, 1, &source, true)
            .unwrap();
        let frames = frames
            .then(|| Mutex::new(cuts.iter().map(|c| (ChunkId::of(c), zstd::bulk::compress(c, 19).unwrap())).collect()));
        let remote = Arc::new(FakeRemote {
            chunks: cuts.into_iter().map(|c| (ChunkId::of(&c), c)).collect(),
            calls: AtomicUsize::new(0),
            corrupt,
            frames,
        });
        (dir, store, index, remote)
    }

    /// What came as a zstd frame is stored as that frame (no second compression); what came
    /// without one is compressed by the store as before.
    #[test]
    fn a_fetched_chunks_frame_is_stored_as_it_came() {
        let text: Vec<u8> = (0..300_000u32).map(|i| b"some text, "[(i % 11) as usize]).collect();
        let (_d, store, index, remote) = setup_with(false, text, true);
        let (with, without) = (index.chunks[0].id, index.chunks[1].id);
        let frame = remote.frames.as_ref().unwrap().lock().unwrap()[&with].clone();
        remote.frames.as_ref().unwrap().lock().unwrap().remove(&without);
        let f =
            Fetcher::new(store.clone(), SourceChain::new().with("registry", remote.clone()), Duration::from_secs(30));
        f.read(&with, &[]).unwrap();
        f.read(&without, &[]).unwrap();
        f.shutdown();
        assert_eq!(store.read_chunk_stored(&with).unwrap().bytes, frame, "kept as it came");
        let other = store.read_chunk_stored(&without).unwrap();
        assert!(other.zstd && ChunkId::of(&store.read_chunk(&without).unwrap()) == without);
        assert!(remote.frames.as_ref().unwrap().lock().unwrap().get(&with).is_none(), "taken");
        assert!(store.fsck(&hb_store::NoProgress).unwrap().is_clean());
    }

    #[test]
    fn concurrent_reads_of_one_chunk_fetch_it_once_and_it_is_stored() {
        let (_d, store, index, remote) = setup(false);
        let f =
            Fetcher::new(store.clone(), SourceChain::new().with("registry", remote.clone()), Duration::from_secs(30));
        let id = index.chunks[0].id;
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| assert_eq!(ChunkId::of(&f.read(&id, &[]).unwrap()), id));
            }
        });
        assert_eq!(remote.calls.load(Ordering::SeqCst), 1, "one fetch for eight readers");
        f.shutdown();
        assert!(store.has_chunk(&id).unwrap(), "the fetched chunk was written to the store");
        assert!(store.fsck(&hb_store::NoProgress).unwrap().is_clean());
        // A second fetcher reads it locally.
        let g =
            Fetcher::new(store.clone(), SourceChain::new().with("registry", remote.clone()), Duration::from_secs(30));
        g.read(&id, &[]).unwrap();
        assert_eq!(remote.calls.load(Ordering::SeqCst), 1);
        assert_eq!(g.stats.snapshot().local_chunks, 1);
    }

    /// Cold-start issue: a start-up chunk claimed by the prefetch makes its reader wait, not fetch
    /// it again; claimed chunks given back unfetched (a stopped or failed prefetch) are fetched by
    /// their readers, not failed.
    #[test]
    fn a_reader_of_a_claimed_chunk_waits_and_fetches_it_itself_when_it_is_given_back() {
        let (_d, store, index, remote) = setup(false);
        let f = Fetcher::new(store, SourceChain::new().with("registry", remote.clone()), Duration::from_secs(30));
        let id = index.chunks[0].id;
        let mine = f.claim(&[id]).unwrap();
        assert_eq!(mine, vec![id]);
        assert!(f.claim(&[id]).unwrap().is_empty(), "claimed once");
        std::thread::scope(|s| {
            let reader = s.spawn(|| f.read(&id, &[]));
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(remote.calls.load(Ordering::SeqCst), 0, "the reader waits for the claim");
            f.unclaim(&mine);
            assert_eq!(ChunkId::of(&reader.join().unwrap().unwrap()), id);
        });
        assert_eq!(remote.calls.load(Ordering::SeqCst), 1, "the reader fetched it itself");
        // A claimed chunk that is fetched is read from memory by its waiting reader.
        let other = index.chunks[1].id;
        let mine = f.claim(&[other]).unwrap();
        assert_eq!(f.fetch_claimed(&mine).unwrap().0, 1);
        assert_eq!(ChunkId::of(&f.read(&other, &[]).unwrap()), other);
        assert_eq!(remote.calls.load(Ordering::SeqCst), 2);
        // A claim nobody fetches (a prefetch stuck behind a slow link) holds its reader only a
        // while: the reader then fetches the chunk itself rather than failing.
        let (_d2, store2, index2, remote2) = setup(false);
        let g = Fetcher::new(store2, SourceChain::new().with("registry", remote2.clone()), Duration::from_secs(30));
        let stuck = index2.chunks[0].id;
        let claimed = g.claim(&[stuck]).unwrap();
        assert_eq!(ChunkId::of(&g.read(&stuck, &[]).unwrap()), stuck);
        assert_eq!(remote2.calls.load(Ordering::SeqCst), 1);
        g.unclaim(&claimed);
        f.shutdown();
        g.shutdown();
    }

    #[test]
    fn wrong_bytes_from_a_remote_are_an_error_and_never_stored() {
        let (_d, store, index, remote) = setup(true);
        let f = Fetcher::new(store.clone(), SourceChain::new().with("registry", remote), Duration::from_secs(30));
        let id = index.chunks[0].id;
        assert!(matches!(f.read(&id, &[]), Err(FetchError::Source(SourceError::Corrupt { .. }))));
        f.shutdown();
        assert!(!store.has_chunk(&id).unwrap());
        assert_eq!(f.stats.snapshot().errors, 1);
    }

    /// The daemon as a tier: keeps what it is offered, counts what it is asked.
    #[derive(Default)]
    struct FakeDaemon {
        kept: Mutex<HashMap<ChunkId, Vec<u8>>>,
        asked: AtomicUsize,
    }

    impl ChunkSource for FakeDaemon {
        fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, SourceError> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            Ok(self.kept.lock().unwrap().get(id).cloned())
        }

        fn keeps(&self) -> bool {
            true
        }

        fn keep(&self, chunks: &[(ChunkId, Vec<u8>)], _: &HashMap<ChunkId, Vec<u8>>) -> Result<usize, SourceError> {
            let mut k = self.kept.lock().unwrap();
            chunks.iter().for_each(|(id, b)| drop(k.insert(*id, b.clone())));
            Ok(chunks.len())
        }
    }

    /// Regression: a mount on a read-only view (the daemon owns the store) handed prefetched
    /// chunks to the daemon and forgot them, so the first read of each was a round trip to the
    /// daemon. They stay in the read cache now.
    #[test]
    fn on_a_read_only_view_a_prefetched_chunk_is_read_from_memory_not_asked_of_the_daemon() {
        let (d, store, index, remote) = setup(false);
        let view = Arc::new(Store::open_read_only(d.path(), Default::default()).unwrap());
        assert!(!view.is_writable());
        let daemon = Arc::new(FakeDaemon::default());
        let chain = SourceChain::new().with("hb daemon", daemon.clone()).with("registry", remote.clone());
        let f = Fetcher::new(view, chain, Duration::from_secs(30));
        let id = index.chunks[1].id;
        assert_eq!(f.prefetch(&[id]).unwrap().0, 1);
        f.shutdown(); // the filler has handed it to the daemon
        assert!(daemon.kept.lock().unwrap().contains_key(&id), "the daemon was offered the chunk");
        let asked = daemon.asked.load(Ordering::SeqCst);
        assert_eq!(ChunkId::of(&f.read(&id, &[]).unwrap()), id);
        assert_eq!(daemon.asked.load(Ordering::SeqCst), asked, "read from memory, not from the daemon");
        assert_eq!(remote.calls.load(Ordering::SeqCst), 1);
        drop(store);
    }

    #[test]
    fn without_a_remote_a_missing_chunk_is_not_found() {
        let (_d, store, index, _) = setup(false);
        let f = Fetcher::new(store, SourceChain::new(), Duration::from_secs(1));
        assert!(matches!(f.read(&index.chunks[0].id, &[]), Err(FetchError::NotFound(_))));
    }

    #[test]
    fn a_recording_takes_opened_files_chunks_only_where_a_guess_fetched_them() {
        let (_d, store, _, _) = setup(false);
        let f = Fetcher::new(store, SourceChain::new(), Duration::from_secs(1));
        let (a, b, c) = (ChunkId::of(b"a"), ChunkId::of(b"b"), ChunkId::of(b"c"));
        f.mark_guessed(&[a, c]);
        f.record_guessed([a, b]);
        assert!(f.take_recording().is_empty(), "nothing is recorded unless recording");
        f.start_recording();
        f.record_guessed([b, a]);
        f.start_recording(); // (goes on)
        f.record_guessed([c, a, b]);
        assert_eq!(f.take_recording(), [a, c], "only guessed chunks, each once, in order");
    }
}
