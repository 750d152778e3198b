//! Chunks of lazy layers read straight from registry blobs by HTTP Range: the chunk source a
//! lazy mount uses. Adjacent chunks are coalesced into one request; every chunk is decoded and
//! verified against its BLAKE3 id before it is returned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::{stream, StreamExt};
use hb_core::{ChunkId, ChunkSource, Digest, LazySource, SourceError, TableEntry};

use crate::client::Registry;
use crate::reference::ImageRef;

/// Largest single Range request.
const MAX_RUN_BYTES: u64 = 8 << 20;
/// Range requests in flight at once for one batch.
const CONCURRENT_RANGES: usize = 8;
/// A batch of more than this many chunks (a prefetch) bridges gaps between wanted chunks: one
/// request instead of several (registries answer each in milliseconds), and the chunks in the gap
/// come along, verified like the rest. How wide a gap: what the link carries in the time one more
/// request costs, measured (`link.rs`: 256 KiB on loopback, ~110-200 KiB over 100 Mbit/s).
const BATCH_CHUNKS: usize = 16;

/// Chunks with their verified bytes.
type Chunks = Vec<(ChunkId, Vec<u8>)>;

/// One data blob in one repository.
struct Blob {
    repo: usize,
    digest: Digest,
}

/// Range reads over the data blobs of lazy layers.
pub struct RangeSource {
    rt: tokio::runtime::Handle,
    repos: Vec<(Arc<Registry>, ImageRef)>,
    blobs: Vec<Blob>,
    /// Each blob's table, in offset order.
    tables: Vec<Vec<TableEntry>>,
    chunks: HashMap<ChunkId, (usize, TableEntry)>,
    /// HTTP requests made and compressed bytes received.
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    /// The widest gap bridged between wanted chunks in large batches (the link's measure
    /// decides below it; [`RangeSource::exact`] sets 0).
    gap: AtomicU64,
    /// Frames of chunks just fetched, for [`ChunkSource::take_frame`] (when
    /// [`RangeSource::keep_frames`] asked for them).
    frames: std::sync::Mutex<Option<Frames>>,
}

/// The zstd frames of chunks fetched and not yet taken, oldest first out past [`Frames::CAP`].
#[derive(Default)]
struct Frames {
    by_id: HashMap<ChunkId, Vec<u8>>,
    order: std::collections::VecDeque<ChunkId>,
    bytes: usize,
}

impl Frames {
    /// Frames held at most: a taker normally takes each as soon as its fetch returns.
    const CAP: usize = 64 << 20;

    fn put(&mut self, id: ChunkId, frame: &[u8]) {
        if let Some(old) = self.by_id.insert(id, frame.to_vec()) {
            self.bytes -= old.len();
        } else {
            self.order.push_back(id);
        }
        self.bytes += frame.len();
        // Ids whose frames were taken stay in `order` until they reach its front: drop them in
        // bulk before they outnumber the frames held.
        if self.order.len() > 2 * self.by_id.len() + 1024 {
            let by_id = &self.by_id;
            self.order.retain(|id| by_id.contains_key(id));
        }
        while self.bytes > Self::CAP {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(f) = self.by_id.remove(&old) {
                self.bytes -= f.len();
            }
        }
    }

    fn take(&mut self, id: &ChunkId) -> Option<Vec<u8>> {
        let f = self.by_id.remove(id)?;
        self.bytes -= f.len();
        // (Its place in `order` goes when it reaches the front, or in `put`'s sweep.)
        Some(f)
    }
}

impl RangeSource {
    /// A source over `layers`, with a registry client for each repository they name
    /// (`registry_for` builds one, with the reference to ask it: the repository's own, or
    /// [`ImageRef::via_mirror`] for a mirror). Blocking calls run on `rt`.
    pub fn new(
        rt: tokio::runtime::Handle,
        layers: &[LazySource],
        mut registry_for: impl FnMut(&ImageRef) -> Result<(Arc<Registry>, ImageRef), crate::RegistryError>,
    ) -> Result<Self, crate::RegistryError> {
        let mut repos: Vec<(Arc<Registry>, ImageRef)> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut blobs = Vec::new();
        let mut tables = Vec::new();
        let mut chunks = HashMap::new();
        for l in layers {
            let repo = match by_name.get(&l.repository) {
                Some(&i) => i,
                None => {
                    let r = ImageRef::parse(&l.repository)?;
                    repos.push(registry_for(&r)?);
                    by_name.insert(l.repository.clone(), repos.len() - 1);
                    repos.len() - 1
                }
            };
            blobs.push(Blob { repo, digest: l.data });
            tables.push(l.table.entries.clone());
            for e in &l.table.entries {
                chunks.entry(e.id).or_insert((blobs.len() - 1, *e));
            }
        }
        Ok(RangeSource {
            rt,
            repos,
            blobs,
            tables,
            chunks,
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            gap: AtomicU64::new(u64::MAX),
            frames: std::sync::Mutex::new(None),
        })
    }

    /// Holds the zstd frame of each chunk it fetches until [`ChunkSource::take_frame`] takes it
    /// (a mount that keeps what it fetches in a store stores the frames as they came).
    pub fn keep_frames(&self) {
        self.frames.lock().expect("frames lock").get_or_insert_with(Frames::default);
    }

    /// Fetches exactly the chunks asked for, never the ones between them (a pull that said
    /// beforehand what it would download; a mount's prefetch trades those bytes for requests).
    pub fn exact(&self) {
        self.gap.store(0, Ordering::Relaxed);
    }

    /// The chunks of blob `b` lying within `[start, end)`, in offset order.
    fn entries_in(&self, b: usize, start: u64, end: u64) -> Vec<TableEntry> {
        let t = &self.tables[b];
        let from = t.partition_point(|e| e.offset < start);
        t[from..].iter().take_while(|e| e.offset < end).copied().collect()
    }

    /// Offers a learned start-up order for image `manifest` to the registries this source reads
    /// from (an hb mirror keeps it for its later clients; others have no such path). Blocks.
    /// Ok(true) when one kept it, Ok(false) when one had an order already.
    pub fn offer_startup(&self, manifest: &hb_core::Digest, order: &[u8]) -> Result<bool, crate::RegistryError> {
        let mut last = None;
        for (registry, r) in &self.repos {
            match self.rt.block_on(registry.offer_startup(r, manifest, order.to_vec())) {
                Ok(kept) => return Ok(kept),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| crate::RegistryError::NotFound { reference: "(no registry)".into() }))
    }

    /// Every chunk this source can serve, blob by blob in blob order (for a full prefetch).
    pub fn all_chunks(&self) -> Vec<ChunkId> {
        let mut v: Vec<(usize, u64, ChunkId)> = self.chunks.iter().map(|(id, (b, e))| (*b, e.offset, *id)).collect();
        v.sort_unstable();
        v.into_iter().map(|(_, _, id)| id).collect()
    }

    /// `ids` in where their bytes lie (blob, then offset), group by group of `group` chunks: a
    /// start-up order's neighbours fetched in one run each, its coarse order kept. Chunks this
    /// source does not know keep their place at their group's end.
    pub fn by_position(&self, ids: &[ChunkId], group: usize) -> Vec<ChunkId> {
        let mut out = Vec::with_capacity(ids.len());
        for g in ids.chunks(group.max(1)) {
            let mut v: Vec<(usize, u64, ChunkId)> = g
                .iter()
                .map(|id| self.chunks.get(id).map_or((usize::MAX, 0, *id), |(b, e)| (*b, e.offset, *id)))
                .collect();
            v.sort_by_key(|&(b, o, _)| (b, o));
            out.extend(v.into_iter().map(|(_, _, id)| id));
        }
        out
    }

    fn name(&self, blob: usize) -> String {
        let b = &self.blobs[blob];
        format!("{}@{}", self.repos[b.repo].1.canonical(), b.digest.short())
    }

    /// Fetches the byte range `run` spans and returns its chunks, each decoded and verified, with
    /// the moment its bytes had arrived (before they were decoded: the link's time, not ours).
    async fn fetch_run(&self, blob: usize, run: Vec<TableEntry>) -> Result<(Chunks, Instant), SourceError> {
        let b = &self.blobs[blob];
        let (registry, r) = &self.repos[b.repo];
        let start = run[0].offset;
        let end = run.last().map(|e| e.offset + e.stored_len as u64).expect("non-empty run");
        let unavailable = |reason: String| SourceError::Unavailable { source_name: self.name(blob), reason };
        registry.ensure_connected(r).await.map_err(|e| unavailable(e.to_string()))?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let data =
            registry.fetch_range(r, &b.digest, start, end - start).await.map_err(|e| unavailable(e.to_string()))?;
        let arrived = Instant::now();
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut out = Vec::with_capacity(run.len());
        for e in &run {
            let at = (e.offset - start) as usize;
            let stored = &data[at..at + e.stored_len as usize];
            let raw = if e.zstd {
                zstd_decode(stored, e.raw_len as usize).map_err(|reason| SourceError::Corrupt {
                    id: e.id,
                    source_name: self.name(blob),
                    reason,
                })?
            } else {
                stored.to_vec()
            };
            if raw.len() != e.raw_len as usize || ChunkId::of(&raw) != e.id {
                return Err(SourceError::Corrupt {
                    id: e.id,
                    source_name: self.name(blob),
                    reason: "bytes do not hash to the chunk id".into(),
                });
            }
            out.push((e.id, raw));
        }
        // The frames whose bytes were just checked, for a store to keep as they are.
        if let Some(frames) = self.frames.lock().expect("frames lock").as_mut() {
            for e in run.iter().filter(|e| e.zstd) {
                let at = (e.offset - start) as usize;
                frames.put(e.id, &data[at..at + e.stored_len as usize]);
            }
        }
        Ok((out, arrived))
    }
}

/// Decodes one zstd frame of at most `raw_len` bytes (more is an error, not an allocation).
fn zstd_decode(data: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    zstd::bulk::decompress(data, raw_len).map_err(|e| format!("zstd: {e}"))
}

impl ChunkSource for RangeSource {
    fn take_frame(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.frames.lock().expect("frames lock").as_mut()?.take(id)
    }

    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(self.fetch_many(std::slice::from_ref(id))?.into_iter().find(|(c, _)| c == id).map(|(_, b)| b))
    }

    fn fetch_many(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, SourceError> {
        // Group by blob, sort by offset, cut into runs of adjacent chunks (batches bridge gaps).
        let mut wanted: Vec<(usize, TableEntry)> = ids.iter().filter_map(|id| self.chunks.get(id).copied()).collect();
        wanted.sort_unstable_by_key(|(b, e)| (*b, e.offset));
        wanted.dedup_by_key(|(b, e)| (*b, e.offset));
        let batch = wanted.len() > BATCH_CHUNKS;
        let cap = self.gap.load(Ordering::Relaxed);
        let registry = |b: usize| &self.repos[self.blobs[b].repo].0;
        let mut gaps: HashMap<usize, u64> = HashMap::new();
        let mut runs: Vec<(usize, u64, u64)> = Vec::new(); // blob, start, end
        for (b, e) in &wanted {
            let gap = match batch {
                true => *gaps.entry(*b).or_insert_with(|| registry(*b).bridge_gap().min(cap)),
                false => 0,
            };
            let end = e.offset + e.stored_len as u64;
            match runs.last_mut() {
                Some((rb, start, rend)) if rb == b && e.offset <= *rend + gap && end - *start <= MAX_RUN_BYTES => {
                    *rend = end
                }
                _ => runs.push((*b, e.offset, end)),
            }
        }
        if batch {
            let gaps: Vec<u64> = gaps.values().copied().collect();
            tracing::debug!(chunks = wanted.len(), ranges = runs.len(), ?gaps, "a batch of range reads, gaps bridged");
        }
        // The bytes each registry sends for this batch, for its throughput (ranges in flight at
        // once share the link: their sum over the batch's time is what the link carries).
        let mut spans: HashMap<usize, u64> = HashMap::new();
        for (b, start, end) in &runs {
            *spans.entry(self.blobs[*b].repo).or_default() += end - start;
        }
        let runs: Vec<(usize, Vec<TableEntry>)> =
            runs.into_iter().map(|(b, start, end)| (b, self.entries_in(b, start, end))).collect();
        let sent = Instant::now();
        let results: Vec<Result<(Chunks, Instant), SourceError>> = self.rt.block_on(
            stream::iter(runs).map(|(b, run)| self.fetch_run(b, run)).buffer_unordered(CONCURRENT_RANGES).collect(),
        );
        // The link's throughput: the batch's bytes over the time until the last of them arrived
        // (decoding and checking them is this machine's work, not the link's; counting it made a
        // fast link look slow, and the gaps bridged over it narrow). The runs are polled in this
        // one task, so a run decoded meanwhile can still delay another's arrival being seen:
        // the measure is nearer the link's, not exact.
        let arrived = results.iter().map(|r| r.as_ref().map(|(_, at)| *at)).collect::<Result<Vec<_>, _>>();
        if let Ok(Some(last)) = arrived.map(|a| a.into_iter().max()) {
            let took = last.saturating_duration_since(sent);
            for (repo, bytes) in spans {
                self.repos[repo].0.link.transfer(bytes, took);
            }
        }
        // What arrived is kept even when another range of the batch failed (the chain asks the
        // next tier for the rest); the batch fails only when nothing arrived.
        let mut out = Vec::new();
        let mut failed = None;
        for r in results {
            match r {
                Ok((chunks, _)) => out.extend(chunks),
                Err(e) => {
                    tracing::warn!(error = %e, "a range read failed; its chunks are asked of the next source");
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_taken_once_and_held_within_their_bound() {
        let id = |n: u32| ChunkId::of(&n.to_le_bytes());
        let mut f = Frames::default();
        f.put(id(1), b"one");
        assert_eq!(f.take(&id(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(f.take(&id(1)), None, "taken once");
        // Frames taken as they come leave nothing behind.
        for n in 0..10_000 {
            f.put(id(n), b"x");
            f.take(&id(n));
        }
        assert!(f.order.len() <= 1025 && f.by_id.is_empty() && f.bytes == 0, "{}", f.order.len());
        // Frames nobody takes: the oldest go first past the bound.
        let big = vec![0u8; Frames::CAP / 2 + 1];
        f.put(id(1), &big);
        f.put(id(2), &big);
        assert!(f.bytes <= Frames::CAP);
        assert_eq!(f.take(&id(1)), None);
        assert_eq!(f.take(&id(2)).map(|b| b.len()), Some(big.len()));
    }

    #[test]
    fn what_is_fetched_at_once_goes_in_the_order_its_bytes_lie() {
        let id = |n: u8| ChunkId::of(&[n]);
        let layer = |repo: &str, ns: &[u8]| {
            let mut table = hb_core::ChunkTable { entries: Vec::new() };
            ns.iter().for_each(|&n| table.push(id(n), 100, 200, true));
            LazySource { repository: repo.into(), data: Digest::of(repo.as_bytes()), table }
        };
        // Blob 0 holds chunks 1..=4 in that order, blob 1 chunks 5..=6.
        let layers = [layer("127.0.0.1:1/a", &[1, 2, 3, 4]), layer("127.0.0.1:1/a", &[5, 6])];
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let src = RangeSource::new(rt.handle().clone(), &layers, |r| {
            Ok((Arc::new(Registry::new(r, Default::default())?), r.clone()))
        })
        .unwrap();
        let read_order = [id(6), id(3), id(1), id(9), id(4), id(2), id(5)];
        // One window: sorted by blob, then offset; a chunk it does not know goes last.
        assert_eq!(src.by_position(&read_order, 100), [id(1), id(2), id(3), id(4), id(5), id(6), id(9)]);
        // Windows of three: each sorted, their order kept.
        assert_eq!(src.by_position(&read_order, 3), [id(1), id(3), id(6), id(2), id(4), id(9), id(5)]);
        assert_eq!(src.by_position(&[], 3), Vec::<ChunkId>::new());
    }
}
