//! Chunk-level pulls: a layer the store lacks arrives as only the chunks the store lacks, read by
//! Range from the data blob of the image's accelerated form (or of the lazy layer already stored)
//! through the same source chain as a mount ([`crate::sources::sources`]: mirrors, then the
//! registry). A layer whose chunks are mostly new comes whole, as before: one stream of its blob
//! is then the cheaper download.
//!
//! The layer's tree (its index) comes from the accelerated form, as for a lazy pull; every chunk
//! is verified against its id before it is stored. The layer keeps the original blob digest and
//! diff_id, so exports are the same as after a whole pull. A layer is recorded as a lazy layer
//! first and becomes complete when its last chunk is in: a pull that dies half way leaves no
//! image, and the next pull fetches only what is still missing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::{stream, StreamExt, TryStreamExt};
use hb_core::{AccelLayer, BlobSource, ChunkId, ChunkRef, ChunkSource, Digest, LayerIndex, LazySource, TableEntry};
use hb_registry::{LayerDesc, Registry, ResolvedImage};
use hb_store::Store;

use crate::{ImagesError, Registries, Reporter, Result, Within};

/// A layer comes by chunks when they (with its index and table) cost at most this share of its
/// blob; else whole, where one stream beats many ranges for little saving.
pub const MAX_SHARE: f64 = 0.9;
/// The same when LAN peers are connected: chunks may come from them, or be fetched once for the
/// whole team by their owner (docs/p2p.md), so a pull goes by chunks unless that costs well over
/// the blob.
pub const PEER_SHARE: f64 = 1.5;
/// Chunks asked of the source chain at once (the ranges of one batch go in parallel).
const BATCH: usize = 128;
/// A pull is cut into at least this many batches (by bytes, within the bounds below), so what
/// came is stored while the link still carries the rest: by count alone, a 17 MB binary's
/// 64 KiB chunks made six batches, all in flight together and all stored at the end (four hosts
/// pulling it at once on two cores: 1.9-2.2 s, now 1.8-2.0 s). Smaller batches on a large image
/// cost more requests than they save (2 MiB batches: a 190 MB image pulled by four hosts at
/// once, 19-20 s -> 20-21 s), so large pulls keep full batches.
const MIN_BATCHES: u64 = 24;
const BATCH_BYTES: std::ops::RangeInclusive<u64> = (1 << 20)..=(8 << 20);
/// Batches being fetched at once: the next batches' ranges are on the wire while the slowest range
/// of the one before still comes, and while this thread stores what came. Small batches, many
/// in flight: what came is stored while the link still carries the rest (hosts pulling one
/// image at once on few cores: with 512-chunk batches a 17 MB image came in one or two batches,
/// all stored at the end).
const BATCHES_IN_FLIGHT: usize = 6;
/// Indexes and tables fetched at once.
const CONCURRENT_META: usize = 4;

/// How one layer of a pull arrives.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum Via {
    /// The store has the layer.
    Present,
    /// Only the chunks the store lacks, by Range.
    Chunks {
        /// Chunks to fetch, of the layer's distinct chunks.
        chunks: usize,
        of: usize,
        /// Compressed bytes of those chunks; bytes of the layer's index and chunk table (0 when
        /// the store has them: a lazy layer).
        chunk_bytes: u64,
        meta_bytes: u64,
    },
    /// The layer blob, whole.
    Whole { reason: String },
}

impl Via {
    /// Bytes this layer downloads (`size`: its blob's).
    pub fn bytes(&self, size: u64) -> u64 {
        match self {
            Via::Present => 0,
            Via::Chunks { chunk_bytes, meta_bytes, .. } => chunk_bytes + meta_bytes,
            Via::Whole { .. } => size,
        }
    }
}

/// One layer of a pull: how it arrives, and what its chunk path needs.
pub struct Layer {
    pub desc: LayerDesc,
    pub via: Via,
    /// A layer the store does not know yet that comes by chunks: its index and chunk source.
    new_lazy: Option<(LayerIndex, LazySource)>,
}

/// What is known of a layer before deciding.
enum Known {
    Present,
    /// A lazy layer already in the store.
    Lazy(LazySource),
    /// From the accelerated form: index, source, bytes of both.
    Accelerated(LayerIndex, LazySource, u64),
    NoForm,
}

/// Decides, layer by layer, how a pull of `resolved` fetches what the store lacks; reads the
/// accelerated form's index and chunk table of each such layer (small). A form that does not
/// describe the image is refused (nothing is stored).
///
/// `forms` says where those come from (and whether they are kept for LAN peers).
pub fn prepare(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    forms: &Forms<'_>,
    resolved: &ResolvedImage,
    max_share: f64,
) -> Result<Vec<Layer>> {
    let registry = forms.registry;
    let r = &resolved.reference;
    let name = crate::image_name(r);
    // Each distinct layer once (an image may list a blob twice).
    let mut seen_layers = HashSet::new();
    let layers: Vec<LayerDesc> = resolved.layers.iter().filter(|l| seen_layers.insert(l.diff_id)).cloned().collect();
    let mut known: Vec<Known> = Vec::with_capacity(layers.len());
    let mut wanted: Vec<usize> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if store.has_layer(&l.diff_id)? {
            known.push(Known::Present);
        } else if let Some(src) = store.lazy_source(&l.diff_id)? {
            known.push(Known::Lazy(src));
        } else {
            known.push(Known::NoForm);
            wanted.push(i);
        }
    }
    if let (Some(accel), false) = (&resolved.accelerated, wanted.is_empty()) {
        let cfg = rt
            .block_on(registry.fetch_accel_config(r, accel, &resolved.manifest_digest))
            .within(|| format!("reading the accelerated form of {name}"))?;
        if cfg.layers.len() != resolved.layers.len()
            || cfg.layers.iter().zip(&resolved.layers).any(|(a, l)| a.blob != l.digest || a.diff_id != l.diff_id)
        {
            return Err(ImagesError::Invalid(format!(
                "{name}: the accelerated form's layers do not match the image's"
            )));
        }
        let repository = format!("{}/{}", r.registry(), r.repository());
        let todo: Vec<(usize, AccelLayer)> = wanted
            .iter()
            .map(|&i| {
                let a = cfg.layers.iter().find(|a| a.diff_id == layers[i].diff_id).expect("matched above");
                (i, a.clone())
            })
            .collect();
        let fetched: Vec<(usize, LayerIndex, LazySource, u64)> = rt.block_on(async {
            stream::iter(todo)
                .map(|(i, a)| {
                    let repository = repository.clone();
                    async move {
                        let (index, source, bytes) = forms.fetch(r, &a, repository).await?;
                        Ok::<_, ImagesError>((i, index, source, bytes))
                    }
                })
                .buffer_unordered(CONCURRENT_META)
                .try_collect()
                .await
        })?;
        for (i, index, source, bytes) in fetched {
            known[i] = Known::Accelerated(index, source, bytes);
        }
    }
    decide(store, layers, known, max_share)
}

/// Where layers' accelerated forms (index and chunk table) are read from: LAN peers that keep them
/// (when peers are on), else the registry; what is read is kept in `keep_in` for peers.
pub struct Forms<'a> {
    pub registry: &'a Registry,
    pub peers: Option<Arc<dyn BlobSource>>,
    pub keep_in: Option<&'a Store>,
}

impl Forms<'_> {
    /// Reads and checks one layer's index and chunk table; also returns the bytes that came from
    /// the registry (none when peers had both).
    pub(crate) async fn fetch(
        &self,
        r: &hb_registry::ImageRef,
        a: &AccelLayer,
        repository: String,
    ) -> Result<(LayerIndex, LazySource, u64)> {
        // Both at once: one round trip per layer instead of two (the image's layers go in parallel).
        let ((index_raw, index_remote), (table_raw, table_remote)) =
            futures_util::future::try_join(self.blob(r, &a.index, a.index_size), self.blob(r, &a.table, a.table_size))
                .await?;
        // Decoding (~4 ms for a large layer's index, its checksum and structure checked) runs beside
        // the other layers' rather than on the thread that drives their fetches.
        let (a, data, digests) = (a.clone(), a.data, (a.index, a.table));
        let (index, table, index_raw, table_raw) = tokio::task::spawn_blocking(move || {
            let (index, table) = hb_registry::decode_layer_form(&index_raw, &table_raw)
                .map_err(|e| ImagesError::Invalid(format!("the accelerated form of layer {}: {e}", a.diff_id)))?;
            if index.diff_id != a.diff_id {
                return Err(ImagesError::Invalid(format!(
                    "the index of layer {} names layer {}",
                    a.diff_id, index.diff_id
                )));
            }
            if table.data_size() != a.data_size {
                return Err(ImagesError::Invalid(format!(
                    "the chunk table of layer {} does not describe its data blob ({} bytes, the blob has {})",
                    a.diff_id,
                    table.data_size(),
                    a.data_size
                )));
            }
            Ok((index, table, index_raw, table_raw))
        })
        .await
        .map_err(|e| ImagesError::Invalid(format!("decoding a layer's accelerated form did not finish: {e}")))??;
        self.keep(&index.diff_id, &[(digests.0, &index_raw), (digests.1, &table_raw)]);
        Ok((index, LazySource { repository, data, table }, index_remote + table_remote))
    }

    /// Blob `digest`: from a peer when one has it, else from the registry (its bytes counted).
    async fn blob(&self, r: &hb_registry::ImageRef, digest: &Digest, size: u64) -> Result<(Vec<u8>, u64)> {
        if let Some(peers) = self.peers.clone() {
            let d = *digest;
            if let Ok(Some(b)) = tokio::task::spawn_blocking(move || peers.blob(&d, size)).await {
                return Ok((b, 0));
            }
        }
        Ok((self.registry.fetch_bytes(r, digest, size).await?, size))
    }

    /// Keeps a layer's checked form blobs for peers (a failure costs only that: it is logged).
    fn keep(&self, diff_id: &Digest, blobs: &[(Digest, &Vec<u8>)]) {
        let Some(store) = self.keep_in.filter(|s| s.is_writable()) else { return };
        for (d, b) in blobs {
            if let Err(e) = store.keep_form_blob(d, diff_id, b) {
                tracing::warn!(layer = %diff_id, blob = %d, error = %e, "could not keep a layer's accelerated form for peers");
                return;
            }
        }
        if let Some(peers) = &self.peers {
            peers.kept(&blobs.iter().map(|(d, _)| *d).collect::<Vec<_>>());
        }
    }
}

/// The decisions, then the exact chunks each chunk layer fetches: none a whole layer brings, none
/// twice.
fn decide(store: &Store, layers: Vec<LayerDesc>, known: Vec<Known>, max_share: f64) -> Result<Vec<Layer>> {
    // Pass 1: each layer on its own: chunks or whole?
    struct Draft {
        desc: LayerDesc,
        via: Via,
        index_chunks: Vec<ChunkId>,
        table: HashMap<ChunkId, TableEntry>,
        new_lazy: Option<(LayerIndex, LazySource)>,
        meta: u64,
    }
    let mut drafts = Vec::with_capacity(layers.len());
    for (desc, k) in layers.into_iter().zip(known) {
        let (index, source, meta, new_lazy) = match k {
            Known::Present => {
                drafts.push(Draft {
                    desc,
                    via: Via::Present,
                    index_chunks: vec![],
                    table: HashMap::new(),
                    new_lazy: None,
                    meta: 0,
                });
                continue;
            }
            Known::NoForm => {
                let reason = "the image has no accelerated form (`hb convert` makes one)".to_string();
                drafts.push(Draft {
                    desc,
                    via: Via::Whole { reason },
                    index_chunks: vec![],
                    table: HashMap::new(),
                    new_lazy: None,
                    meta: 0,
                });
                continue;
            }
            Known::Lazy(source) => {
                let index = store.layer(&desc.diff_id)?.ok_or_else(|| {
                    ImagesError::Invalid(format!("lazy layer {} has no index in the store", desc.diff_id))
                })?;
                (index, source, 0, false)
            }
            Known::Accelerated(index, source, meta) => (index, source, meta, true),
        };
        let mut distinct = HashSet::new();
        let index_chunks: Vec<ChunkId> = index.chunks.iter().map(|c| c.id).filter(|id| distinct.insert(*id)).collect();
        let table: HashMap<ChunkId, TableEntry> = source.table.entries.iter().map(|e| (e.id, *e)).collect();
        let mut missing_bytes = 0u64;
        for id in &index_chunks {
            if !store.has_chunk(id)? {
                missing_bytes += table.get(id).map_or(0, |e| e.stored_len as u64);
            }
        }
        let cost = missing_bytes + meta;
        let via = if cost as f64 <= max_share * desc.size as f64 {
            Via::Chunks { chunks: 0, of: index_chunks.len(), chunk_bytes: 0, meta_bytes: meta }
        } else {
            Via::Whole {
                reason: format!(
                    "its new chunks ({} with index and table) cost more than {:.0} % of the blob",
                    indicatif::HumanBytes(cost),
                    max_share * 100.0
                ),
            }
        };
        drafts.push(Draft {
            desc,
            via,
            index_chunks,
            table,
            new_lazy: if new_lazy { Some((index, source)) } else { None },
            meta,
        });
    }
    // Pass 2: chunks a whole layer brings are not fetched; a chunk two layers share, once.
    let mut counted: HashSet<ChunkId> = drafts
        .iter()
        .filter(|d| matches!(d.via, Via::Whole { .. }))
        .flat_map(|d| d.index_chunks.iter().copied())
        .collect();
    let mut out = Vec::with_capacity(drafts.len());
    for d in drafts {
        let via = match d.via {
            Via::Chunks { of, .. } => {
                let (mut chunks, mut bytes) = (0, 0u64);
                for id in &d.index_chunks {
                    if !counted.contains(id) && !store.has_chunk(id)? {
                        counted.insert(*id);
                        chunks += 1;
                        bytes += d.table.get(id).map_or(0, |e| e.stored_len as u64);
                    }
                }
                Via::Chunks { chunks, of, chunk_bytes: bytes, meta_bytes: d.meta }
            }
            via => via,
        };
        let new_lazy = if matches!(via, Via::Chunks { .. }) { d.new_lazy } else { None };
        out.push(Layer { desc: d.desc, via, new_lazy });
    }
    Ok(out)
}

/// What the chunk path of a pull did.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Layers now complete from their chunks.
    pub layers: usize,
    pub chunks: u64,
    /// Uncompressed bytes of the chunks stored.
    pub raw_bytes: u64,
    /// Compressed chunk bytes received and Range requests made.
    pub wire_bytes: u64,
    pub requests: u64,
    /// Layers whose chunks could not all be fetched: to download whole, with why.
    pub fallback: Vec<(LayerDesc, String)>,
}

/// Where a pull's chunks come from: the hosts, and the client that resolved the image.
pub struct Origin<'a> {
    pub registries: &'a dyn Registries,
    pub plain_http: bool,
    pub registry: Arc<Registry>,
}

/// Fetches the chunks of every layer `layers` says comes by chunks, verified, into the store; a
/// layer becomes complete when its last chunk is in. A layer whose chunks fail (a corrupt chunk
/// from every source, a missing data blob) is returned for a whole download.
pub fn fetch_chunks(
    rt: &tokio::runtime::Runtime,
    store: &Arc<Store>,
    origin: &Origin<'_>,
    resolved: &ResolvedImage,
    layers: Vec<Layer>,
    reporter: &dyn Reporter,
) -> Result<Fetched> {
    let mut out = Fetched::default();
    let chunked: Vec<Layer> = layers.into_iter().filter(|l| matches!(l.via, Via::Chunks { .. })).collect();
    if chunked.is_empty() {
        return Ok(out);
    }
    for l in &chunked {
        if let Some((index, source)) = &l.new_lazy {
            store
                .import_lazy_layer(
                    index,
                    &l.desc.digest,
                    blob_compression(&l.desc.media_type),
                    l.desc.size,
                    source,
                    false,
                )
                .within(|| format!("recording layer {}", l.desc.digest))?;
        }
    }
    let diff_ids: Vec<Digest> = chunked.iter().map(|l| l.desc.diff_id).collect();
    let key = format!("{}/{}", resolved.reference.host(), resolved.reference.repository());
    let sources = crate::sources::sources(
        origin.registries,
        rt,
        store,
        &diff_ids,
        Some((key, origin.registry.clone())),
        origin.plain_http,
        None,
    )?;
    sources.ranges.iter().for_each(|r| r.exact());
    let planned: u64 =
        chunked.iter().map(|l| if let Via::Chunks { chunk_bytes, .. } = l.via { chunk_bytes } else { 0 }).sum();
    let bar = reporter.transfer("chunks", planned);
    // Every missing chunk once, under the first layer that needs it; batches in layer order.
    let mut distinct = HashSet::new();
    let mut batches: Vec<(usize, Vec<ChunkId>)> = Vec::new();
    let mut missing_refs: Vec<Vec<ChunkRef>> = Vec::new();
    for l in &chunked {
        let missing = store.missing_chunks(&l.desc.diff_id)?;
        missing_refs.push(missing.into_iter().filter(|c| distinct.insert(c.id)).collect::<Vec<ChunkRef>>());
    }
    let total: u64 = missing_refs.iter().flatten().map(|c| c.len as u64).sum();
    let batch_bytes = batch_bytes(total);
    for (i, refs) in missing_refs.iter().enumerate() {
        batches.extend(batches_of(refs, batch_bytes).into_iter().map(|b| (i, b)));
    }
    let mut wire_seen = 0;
    let fetch = |ids: &[ChunkId]| sources.chain.fetch_many(ids).map_err(|e| e.to_string());
    let mut keep = |layer: usize, got: Vec<(ChunkId, Vec<u8>)>| {
        let diff_id = chunked[layer].desc.diff_id;
        let filled = store.fill_chunks(&got).within(|| format!("storing chunks of layer {diff_id}"))?;
        out.chunks += filled.filled as u64;
        out.raw_bytes += got.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        let (wire, _) = crate::sources::wire(&sources.ranges);
        bar.advance(wire.saturating_sub(wire_seen));
        wire_seen = wire;
        Ok::<_, ImagesError>(())
    };
    let mut failures = fetch_pipelined(chunked.len(), &batches, &fetch, &mut keep)?;
    // A layer whose chunks were left to a layer whose fetch failed asks for them itself, once.
    let mut complete = vec![false; chunked.len()];
    let mut again: Vec<(usize, Vec<ChunkId>)> = Vec::new();
    for (i, l) in chunked.iter().enumerate() {
        if failures[i].is_some() {
            continue;
        }
        complete[i] = store.complete_lazy_layer(&l.desc.diff_id)?;
        if !complete[i] {
            again.extend(batches_of(&store.missing_chunks(&l.desc.diff_id)?, batch_bytes).into_iter().map(|b| (i, b)));
        }
    }
    if !again.is_empty() {
        let retried = fetch_pipelined(chunked.len(), &again, &fetch, &mut keep)?;
        for (i, f) in retried.into_iter().enumerate() {
            if f.is_some() {
                failures[i] = f;
            }
        }
    }
    for (i, (l, failure)) in chunked.into_iter().zip(failures).enumerate() {
        let failed = match failure {
            Some(why) => Some(why),
            None if complete[i] || store.complete_lazy_layer(&l.desc.diff_id)? => None,
            None => Some(format!("{} of its chunks were in no source", store.missing_chunks(&l.desc.diff_id)?.len())),
        };
        match failed {
            None => out.layers += 1,
            Some(why) => {
                tracing::warn!(layer = %l.desc.digest, reason = %why, "chunk fetch failed; downloading the layer blob instead");
                reporter.note(&format!(
                    "layer {}: fetching its chunks failed ({why}); downloading the whole layer instead",
                    l.desc.digest.short()
                ));
                out.fallback.push((l.desc, why));
            }
        }
    }
    let (wire, requests) = crate::sources::wire(&sources.ranges);
    out.wire_bytes = wire;
    out.requests = requests;
    Ok(out)
}

/// A batch fetch: the chunks it got, or why it failed.
type BatchFetch<'a> = dyn Fn(&[ChunkId]) -> std::result::Result<Vec<(ChunkId, Vec<u8>)>, String> + Sync + 'a;

/// The most bytes one batch of a pull of `total` bytes asks for: see [`MIN_BATCHES`].
fn batch_bytes(total: u64) -> u64 {
    (total / MIN_BATCHES).clamp(*BATCH_BYTES.start(), *BATCH_BYTES.end())
}

/// `chunks` cut into batches of at most [`BATCH`] chunks and `max_bytes` bytes (a larger chunk
/// makes a batch of its own).
fn batches_of(chunks: &[ChunkRef], max_bytes: u64) -> Vec<Vec<ChunkId>> {
    let mut out: Vec<Vec<ChunkId>> = Vec::new();
    let mut bytes = 0u64;
    for c in chunks {
        match out.last_mut() {
            Some(b) if b.len() < BATCH && bytes + c.len as u64 <= max_bytes => {
                b.push(c.id);
                bytes += c.len as u64;
            }
            _ => {
                out.push(vec![c.id]);
                bytes = c.len as u64;
            }
        }
    }
    out
}

/// Fetches `batches` (each the index of its layer, of `layers`, and chunk ids) through `fetch`,
/// [`BATCHES_IN_FLIGHT`] at once, and hands each batch's chunks to `keep` on this thread as they
/// come. A rendezvous: each fetcher holds at most one fetched batch while `keep` stores another,
/// so the network never waits for the store, nor a batch for the slowest range of the one before.
/// Returns each layer's first fetch failure (its later batches are not asked); an error of
/// `keep` stops the fetches and is returned.
fn fetch_pipelined<E>(
    layers: usize,
    batches: &[(usize, Vec<ChunkId>)],
    fetch: &BatchFetch<'_>,
    mut keep: impl FnMut(usize, Vec<(ChunkId, Vec<u8>)>) -> std::result::Result<(), E>,
) -> std::result::Result<Vec<Option<String>>, E> {
    let failures: Vec<std::sync::OnceLock<String>> = (0..layers).map(|_| std::sync::OnceLock::new()).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Set when `keep` failed: no batch is asked after that.
    let stopped = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> std::result::Result<(), E> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<(ChunkId, Vec<u8>)>)>(0);
        for _ in 0..BATCHES_IN_FLIGHT {
            let (tx, failures, next, stopped) = (tx.clone(), &failures, &next, &stopped);
            s.spawn(move || {
                while let Some((layer, ids)) = batches.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                    if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    if failures[*layer].get().is_some() {
                        continue;
                    }
                    match fetch(ids) {
                        // A failed send: `keep` failed, nothing more is kept.
                        Ok(got) => {
                            if tx.send((*layer, got)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = failures[*layer].set(e);
                        }
                    }
                }
            });
        }
        drop(tx);
        for (layer, got) in rx {
            if let Err(e) = keep(layer, got) {
                stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
        }
        Ok(())
    })?;
    Ok(failures.into_iter().map(std::sync::OnceLock::into_inner).collect())
}

/// How a layer blob of `media_type` is compressed.
pub(crate) fn blob_compression(media_type: &str) -> hb_store::BlobCompression {
    if media_type.contains("gzip") {
        hb_store::BlobCompression::Gzip
    } else if media_type.contains("zstd") {
        hb_store::BlobCompression::Zstd
    } else {
        hb_store::BlobCompression::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    fn batches(spec: &[(usize, &[u8])]) -> Vec<(usize, Vec<ChunkId>)> {
        spec.iter().map(|(l, ids)| (*l, ids.iter().map(|n| id(*n)).collect())).collect()
    }

    #[test]
    fn batches_end_at_their_count_or_their_bytes() {
        let refs = |lens: &[u32]| -> Vec<ChunkRef> {
            lens.iter().enumerate().map(|(i, len)| ChunkRef { id: ChunkId::of(&i.to_le_bytes()), len: *len }).collect()
        };
        let sizes = |chunks: &[ChunkRef]| batches_of(chunks, 2 << 20).iter().map(Vec::len).collect::<Vec<_>>();
        // Small chunks: by count.
        assert_eq!(sizes(&refs(&[4096; 300])), vec![BATCH, BATCH, 300 - 2 * BATCH]);
        // A binary's 64 KiB chunks: by bytes (2 MiB: 32 of them).
        assert_eq!(sizes(&refs(&[65536; 70])), vec![32, 32, 6]);
        // A chunk above the byte bound goes alone; order and every chunk are kept.
        let mixed = refs(&[100, (2 << 20) + 1, 100, 100]);
        assert_eq!(sizes(&mixed), vec![1, 1, 2]);
        let flat: Vec<ChunkId> = batches_of(&mixed, 2 << 20).concat();
        assert_eq!(flat, mixed.iter().map(|c| c.id).collect::<Vec<_>>());
        assert!(batches_of(&[], 2 << 20).is_empty());
        // Sized to the pull: a 48 MB binary in ~2 MB batches, a 190 MB image in full ones, a
        // small pull in 1 MiB ones.
        assert_eq!(batch_bytes(48 << 20), 2 << 20);
        assert_eq!(batch_bytes(400 << 20), 8 << 20);
        assert!(batch_bytes(190 << 20) > 7 << 20);
        assert_eq!(batch_bytes(3 << 20), 1 << 20);
    }

    #[test]
    fn every_batch_is_kept_and_a_failed_batch_skips_only_its_own_layers_rest() {
        let b = batches(&[(0, &[1, 2]), (0, &[3]), (1, &[4]), (0, &[5]), (1, &[6])]);
        let asked = Mutex::new(Vec::new());
        let fetch = |ids: &[ChunkId]| {
            asked.lock().unwrap().push(ids.to_vec());
            if ids.contains(&id(3)) {
                return Err("range 3 refused".to_string());
            }
            Ok(ids.iter().map(|i| (*i, i.as_bytes().to_vec())).collect())
        };
        let mut kept: Vec<(usize, ChunkId)> = Vec::new();
        let failures = fetch_pipelined(2, &b, &fetch, |layer, got| {
            kept.extend(got.into_iter().map(|(i, _)| (layer, i)));
            Ok::<_, String>(())
        })
        .unwrap();
        assert_eq!(failures, vec![Some("range 3 refused".to_string()), None]);
        kept.sort_by_key(|(l, i)| (*l, *i.as_bytes()));
        let mut want: Vec<(usize, ChunkId)> = vec![(1, id(4)), (1, id(6)), (0, id(1)), (0, id(2))];
        want.sort_by_key(|(l, i)| (*l, *i.as_bytes()));
        assert!(want.iter().all(|w| kept.contains(w)), "kept {kept:?}");
        assert!(kept.iter().all(|(_, i)| *i != id(3)), "a failed batch was kept");
        // Layer 1 was asked in full; chunk 5 only if a fetcher took its batch before the failure.
        let asked = asked.into_inner().unwrap();
        assert!(asked.iter().any(|a| a.contains(&id(4))) && asked.iter().any(|a| a.contains(&id(6))));
    }

    #[test]
    fn a_store_error_stops_the_fetches_and_is_returned() {
        let ids: Vec<u8> = (1..=4 * BATCHES_IN_FLIGHT as u8).collect();
        let pairs: Vec<(usize, &[u8])> = ids.iter().map(|i| (0, std::slice::from_ref(i))).collect();
        let b = batches(&pairs);
        let fetched = std::sync::atomic::AtomicUsize::new(0);
        let fetch = |ids: &[ChunkId]| {
            fetched.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(ids.iter().map(|i| (*i, Vec::new())).collect())
        };
        let err = fetch_pipelined(1, &b, &fetch, |_, _| Err("disk full")).unwrap_err();
        assert_eq!(err, "disk full");
        // One batch per fetcher, and one more after the batch handed to `keep`: not all of them.
        let fetched = fetched.into_inner();
        assert!(fetched <= BATCHES_IN_FLIGHT + 1, "{fetched} of {} batches fetched", b.len());
    }

    #[test]
    fn two_batches_are_fetched_at_once() {
        let b = batches(&[(0, &[1]), (0, &[2]), (0, &[3])]);
        // Each fetch waits (up to 10 s, a deadlock guard, not a timing) until another is under way
        // too: one at a time, the most ever in flight stays 1.
        let state = (Mutex::new((0usize, 0usize)), Condvar::new());
        let fetch = |ids: &[ChunkId]| {
            let (lock, cv) = &state;
            let mut g = lock.lock().unwrap();
            g.0 += 1;
            g.1 = g.1.max(g.0);
            cv.notify_all();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while g.1 < 2 && std::time::Instant::now() < deadline {
                g = cv.wait_timeout(g, std::time::Duration::from_millis(50)).unwrap().0;
            }
            g.0 -= 1;
            Ok(ids.iter().map(|i| (*i, Vec::new())).collect())
        };
        let mut kept = 0;
        fetch_pipelined(1, &b, &fetch, |_, got| {
            kept += got.len();
            Ok::<_, String>(())
        })
        .unwrap();
        assert_eq!(kept, 3);
        assert_eq!(state.0.into_inner().unwrap().1, 2, "the batches were fetched one at a time");
    }
}
