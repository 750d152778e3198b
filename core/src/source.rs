//! Where chunk bytes come from: the [`ChunkSource`] trait, and the [`SourceChain`] that puts
//! sources in order (the daemon, peers, a mirror, the registry) so a miss goes down one tier.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::digest::{ChunkId, Digest};

/// Why a source could not answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source could not be asked (I/O failure, unreachable peer, ...).
    #[error("chunk source {source_name} is unavailable: {reason}")]
    Unavailable { source_name: String, reason: String },
    /// The source answered with bytes that are not the chunk asked for.
    #[error("chunk {id} from {source_name} is corrupt: {reason}")]
    Corrupt { id: ChunkId, source_name: String, reason: String },
}

/// A place chunk bytes can be read from by id: the local store, a peer, a proxy, a registry.
///
/// Contract: `Ok(Some(bytes))` only with bytes whose BLAKE3 is `id`; `Ok(None)` is a clean miss
/// (ask the next source); an error says why the source failed.
pub trait ChunkSource: Send + Sync {
    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, SourceError>;

    /// Fetches several chunks at once, as the source sees fit (a remote source coalesces
    /// neighbours into one request). Returns the chunks it has, each verified; may return chunks
    /// it was not asked for when they came for free. The default asks one by one.
    fn fetch_many(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, SourceError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(b) = self.fetch(id)? {
                out.push((*id, b));
            }
        }
        Ok(out)
    }

    /// Whether this source keeps chunks offered to it ([`ChunkSource::keep`]).
    fn keeps(&self) -> bool {
        false
    }

    /// Keeps verified chunks a lower tier returned; returns how many were new here. `frames`
    /// holds the zstd frames some of them came in ([`ChunkSource::take_frame`]), for a tier that
    /// can keep those as they are. Only called when [`ChunkSource::keeps`] says so.
    fn keep(&self, chunks: &[(ChunkId, Vec<u8>)], frames: &HashMap<ChunkId, Vec<u8>>) -> Result<usize, SourceError> {
        let _ = (chunks, frames);
        Ok(0)
    }

    /// The zstd frame chunk `id`'s bytes were just decoded from by this source, if it fetched
    /// them so and was asked to hold frames (taken: a second call returns None). The bytes it
    /// returned for `id` were checked against `id` after decoding this very frame, so a store can
    /// keep the frame as it came instead of compressing the bytes again.
    fn take_frame(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let _ = id;
        None
    }
}

/// A tier before the registry for small blobs named by their SHA-256: an accelerated form's layer
/// indexes and chunk tables, which LAN peers that fetched them keep (a cold start with a holder on
/// the LAN then needs nothing of the image's layers from the registry).
///
/// Contract: `Some(bytes)` only when `bytes` are `size` long and their SHA-256 is `digest`; `None`
/// sends the caller to the registry. Blocking (as [`ChunkSource`]): call it off async threads.
pub trait BlobSource: Send + Sync {
    fn blob(&self, digest: &Digest, size: u64) -> Option<Vec<u8>>;

    /// The caller kept these blobs (checked, and where a tier like this one can find them): a
    /// tier that tells others what this host holds says so.
    fn kept(&self, digests: &[Digest]) {
        let _ = digests;
    }
}

/// The id under which a node's summary of what it holds lists a blob: the BLAKE3 of a
/// domain-separated name of it. (Were some chunk's bytes exactly that name, a lookup would find a
/// likely holder of the other, as a summary's false positives do: the answer is checked.)
pub fn blob_key(digest: &Digest) -> ChunkId {
    let mut name = b"hb blob key v1\0".to_vec();
    name.extend_from_slice(digest.as_bytes());
    ChunkId::of(&name)
}

/// Counters of one tier of a [`SourceChain`] (a snapshot).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TierStats {
    pub name: String,
    /// Batches this tier was asked.
    pub requests: u64,
    /// Chunks it returned (verified), and their uncompressed bytes.
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks asked of it that it did not have (they went down a tier).
    pub misses: u64,
    /// Failed batches, and chunks it returned that did not hash to their ids.
    pub errors: u64,
    pub corrupt: u64,
    /// Batches it was skipped for while down.
    pub skipped: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    chunks: AtomicU64,
    bytes: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    corrupt: AtomicU64,
    skipped: AtomicU64,
    /// Batches still to skip after the tier failed.
    down_for: AtomicU64,
}

struct Tier {
    name: String,
    source: Arc<dyn ChunkSource>,
    counters: Counters,
}

/// Ordered, named sources. A batch goes to the first tier; what it lacks (or everything, when it
/// fails) goes to the next, and so on. Every chunk a tier returns is checked against its id here,
/// whatever the tier promised: a corrupt chunk is counted against the tier and asked of the next.
///
/// A tier that fails is skipped for the next [`SourceChain::DOWN_FOR`] batches, then tried again:
/// a dead mirror or peer costs one failed request now and then, not one per chunk. (Counted in
/// batches, not seconds: this crate reads no clock.)
pub struct SourceChain {
    tiers: Vec<Tier>,
}

impl Default for SourceChain {
    fn default() -> Self {
        Self::new()
    }
}

impl SourceChain {
    /// Batches a failed tier is skipped for before it is tried again.
    pub const DOWN_FOR: u64 = 64;

    pub fn new() -> Self {
        SourceChain { tiers: Vec::new() }
    }

    /// Adds `source` below the tiers already there.
    pub fn with(mut self, name: impl Into<String>, source: Arc<dyn ChunkSource>) -> Self {
        self.push(name, source);
        self
    }

    /// Adds `source` below the tiers already there.
    pub fn push(&mut self, name: impl Into<String>, source: Arc<dyn ChunkSource>) {
        self.tiers.push(Tier { name: name.into(), source, counters: Counters::default() });
    }

    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tiers.len()
    }

    /// The tiers' names, top first.
    pub fn names(&self) -> Vec<&str> {
        self.tiers.iter().map(|t| t.name.as_str()).collect()
    }

    /// Each tier's counters, top first.
    pub fn stats(&self) -> Vec<TierStats> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.tiers
            .iter()
            .map(|t| {
                let c = &t.counters;
                TierStats {
                    name: t.name.clone(),
                    requests: g(&c.requests),
                    chunks: g(&c.chunks),
                    bytes: g(&c.bytes),
                    misses: g(&c.misses),
                    errors: g(&c.errors),
                    corrupt: g(&c.corrupt),
                    skipped: g(&c.skipped),
                }
            })
            .collect()
    }

    /// Whether some tier keeps what is offered.
    pub fn keeps(&self) -> bool {
        self.tiers.iter().any(|t| t.source.keeps())
    }

    /// Offers verified chunks (and the frames some came in) to the first tier that keeps them;
    /// returns how many were new there (0 when no tier keeps).
    pub fn keep(
        &self,
        chunks: &[(ChunkId, Vec<u8>)],
        frames: &HashMap<ChunkId, Vec<u8>>,
    ) -> Result<usize, SourceError> {
        match self.tiers.iter().find(|t| t.source.keeps()) {
            Some(t) => t.source.keep(chunks, frames),
            None => Ok(0),
        }
    }

    /// Whether tier `t` is skipped for this batch (it failed recently).
    fn skip(&self, t: &Tier) -> bool {
        let c = &t.counters;
        let left = c.down_for.load(Ordering::Relaxed);
        if left == 0 {
            return false;
        }
        // Racing batches may both take the last skip: harmless, one more probe.
        c.down_for.store(left - 1, Ordering::Relaxed);
        c.skipped.fetch_add(1, Ordering::Relaxed);
        true
    }
}

impl ChunkSource for SourceChain {
    fn take_frame(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.tiers.iter().find_map(|t| t.source.take_frame(id))
    }

    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(self.fetch_many(std::slice::from_ref(id))?.into_iter().find(|(c, _)| c == id).map(|(_, b)| b))
    }

    /// Returns what the tiers had, verified. Fails only when nothing was found and some tier
    /// failed (the last failure is returned); a chunk no tier has is simply absent.
    fn fetch_many(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, SourceError> {
        let mut out: Vec<(ChunkId, Vec<u8>)> = Vec::with_capacity(ids.len());
        let mut have: HashSet<ChunkId> = HashSet::with_capacity(ids.len());
        let mut wanted: Vec<ChunkId> = Vec::with_capacity(ids.len());
        for id in ids {
            if have.insert(*id) {
                wanted.push(*id);
            }
        }
        have.clear();
        let mut last_error = None;
        let count = self.tiers.len();
        for (i, t) in self.tiers.iter().enumerate() {
            if wanted.is_empty() {
                break;
            }
            // The last tier is always asked: there is nothing to fall back to.
            if i + 1 < count && self.skip(t) {
                continue;
            }
            let c = &t.counters;
            c.requests.fetch_add(1, Ordering::Relaxed);
            let got = match t.source.fetch_many(&wanted) {
                Ok(got) => {
                    c.down_for.store(0, Ordering::Relaxed);
                    got
                }
                Err(e) => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    c.down_for.store(Self::DOWN_FOR, Ordering::Relaxed);
                    last_error = Some(e);
                    continue;
                }
            };
            for (id, bytes) in got {
                if have.contains(&id) {
                    continue;
                }
                if ChunkId::of(&bytes) != id {
                    c.corrupt.fetch_add(1, Ordering::Relaxed);
                    last_error = Some(SourceError::Corrupt {
                        id,
                        source_name: t.name.clone(),
                        reason: "bytes do not hash to the chunk id".into(),
                    });
                    continue;
                }
                c.chunks.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                have.insert(id);
                out.push((id, bytes));
            }
            let before = wanted.len();
            wanted.retain(|id| !have.contains(id));
            c.misses.fetch_add(wanted.len().min(before) as u64, Ordering::Relaxed);
        }
        match last_error {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    fn keeps(&self) -> bool {
        SourceChain::keeps(self)
    }

    fn keep(&self, chunks: &[(ChunkId, Vec<u8>)], frames: &HashMap<ChunkId, Vec<u8>>) -> Result<usize, SourceError> {
        SourceChain::keep(self, chunks, frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A scripted tier: has some chunks (maybe with wrong bytes), may be failing.
    #[derive(Default)]
    struct Fake {
        chunks: HashMap<ChunkId, Vec<u8>>,
        failing: Mutex<bool>,
        asked: Mutex<Vec<Vec<ChunkId>>>,
        kept: Mutex<Vec<ChunkId>>,
        keeps: bool,
    }

    impl Fake {
        fn with(chunks: &[&[u8]]) -> Arc<Fake> {
            Arc::new(Fake { chunks: chunks.iter().map(|b| (ChunkId::of(b), b.to_vec())).collect(), ..Fake::default() })
        }
    }

    impl ChunkSource for Fake {
        fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, SourceError> {
            Ok(self.fetch_many(std::slice::from_ref(id))?.pop().map(|(_, b)| b))
        }

        fn fetch_many(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, SourceError> {
            self.asked.lock().unwrap().push(ids.to_vec());
            if *self.failing.lock().unwrap() {
                return Err(SourceError::Unavailable { source_name: "fake".into(), reason: "down".into() });
            }
            Ok(ids.iter().filter_map(|id| self.chunks.get(id).map(|b| (*id, b.clone()))).collect())
        }

        fn keeps(&self) -> bool {
            self.keeps
        }

        fn keep(&self, chunks: &[(ChunkId, Vec<u8>)], _: &HashMap<ChunkId, Vec<u8>>) -> Result<usize, SourceError> {
            self.kept.lock().unwrap().extend(chunks.iter().map(|(id, _)| *id));
            Ok(chunks.len())
        }
    }

    fn id(b: &[u8]) -> ChunkId {
        ChunkId::of(b)
    }

    #[test]
    fn a_miss_goes_down_one_tier_and_each_tier_is_counted() {
        let top = Fake::with(&[b"a"]);
        let low = Fake::with(&[b"a", b"b"]);
        let chain = SourceChain::new().with("top", top.clone()).with("low", low.clone());
        let got = chain.fetch_many(&[id(b"a"), id(b"b"), id(b"c")]).unwrap();
        let ids: HashSet<ChunkId> = got.iter().map(|(i, _)| *i).collect();
        assert_eq!(ids, HashSet::from([id(b"a"), id(b"b")]));
        // The lower tier was asked only for what the top lacked.
        assert_eq!(low.asked.lock().unwrap().as_slice(), &[vec![id(b"b"), id(b"c")]]);
        let s = chain.stats();
        assert_eq!((s[0].name.as_str(), s[0].chunks, s[0].bytes, s[0].misses), ("top", 1, 1, 2));
        assert_eq!((s[1].name.as_str(), s[1].chunks, s[1].misses), ("low", 1, 1));
    }

    #[test]
    fn a_corrupt_chunk_is_counted_against_its_tier_and_fetched_below() {
        let mut bad = Fake::default();
        bad.chunks.insert(id(b"x"), b"not x".to_vec());
        let bad = Arc::new(bad);
        let good = Fake::with(&[b"x"]);
        let chain = SourceChain::new().with("peer", bad).with("registry", good);
        let got = chain.fetch_many(&[id(b"x")]).unwrap();
        assert_eq!(got, vec![(id(b"x"), b"x".to_vec())]);
        let s = chain.stats();
        assert_eq!((s[0].corrupt, s[0].chunks, s[1].chunks), (1, 0, 1));
    }

    #[test]
    fn a_failed_tier_falls_through_and_is_skipped_for_a_while() {
        let mirror = Fake::with(&[b"a"]);
        *mirror.failing.lock().unwrap() = true;
        let registry = Fake::with(&[b"a"]);
        let chain = SourceChain::new().with("mirror", mirror.clone()).with("registry", registry.clone());
        for _ in 0..=SourceChain::DOWN_FOR {
            assert_eq!(chain.fetch(&id(b"a")).unwrap(), Some(b"a".to_vec()));
        }
        // Asked once, skipped DOWN_FOR times, then not again until the skips ran out.
        assert_eq!(mirror.asked.lock().unwrap().len(), 1);
        let s = chain.stats();
        assert_eq!((s[0].errors, s[0].skipped), (1, SourceChain::DOWN_FOR));
        // Back up: probed on the next batch, and used.
        *mirror.failing.lock().unwrap() = false;
        chain.fetch(&id(b"a")).unwrap();
        assert_eq!(mirror.asked.lock().unwrap().len(), 2);
        assert_eq!(chain.stats()[0].chunks, 1);
    }

    #[test]
    fn the_last_tiers_failure_is_the_error_when_nothing_was_found() {
        let a = Fake::with(&[]);
        *a.failing.lock().unwrap() = true;
        let chain = SourceChain::new().with("registry", a.clone());
        // The last tier is never skipped, however often it failed.
        for _ in 0..3 {
            assert!(matches!(chain.fetch(&id(b"q")), Err(SourceError::Unavailable { .. })));
        }
        assert_eq!(a.asked.lock().unwrap().len(), 3);
        // A plain miss is not an error.
        let chain = SourceChain::new().with("registry", Fake::with(&[]));
        assert_eq!(chain.fetch(&id(b"q")).unwrap(), None);
    }

    #[test]
    fn offered_chunks_go_to_the_first_tier_that_keeps() {
        let daemon = Arc::new(Fake { keeps: true, ..Fake::default() });
        let chain = SourceChain::new().with("mirror", Fake::with(&[])).with("daemon", daemon.clone());
        assert!(chain.keeps());
        assert_eq!(chain.keep(&[(id(b"k"), b"k".to_vec())], &HashMap::new()).unwrap(), 1);
        assert_eq!(daemon.kept.lock().unwrap().as_slice(), &[id(b"k")]);
        assert!(!SourceChain::new().with("registry", Fake::with(&[])).keeps());
    }
}
