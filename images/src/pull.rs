//! `hb pull`: registry -> verified blob streams -> concurrent ingests -> image record.
//! The only place that wires the registry client to the store.

use std::collections::HashSet;
use std::io::{self, Read};
use std::sync::Arc;

use futures_util::{stream, StreamExt, TryStreamExt};
use hb_core::{ChunkId, Digest};
use hb_registry::{ImageRef, LayerDesc, Registry, ResolvedImage};
use hb_store::{ImageLayer, ImageRecord, ImportOptions, Store};
use indicatif::HumanBytes;
use tokio::sync::mpsc;

use crate::{image_name, ImagesError, Reporter, Result, Within};

/// Layers downloaded at once.
pub const CONCURRENT_LAYERS: usize = 3;

/// What a pull did, for people and for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct PullReport {
    pub name: String,
    pub digest: Digest,
    pub platform: String,
    pub layers: usize,
    /// Layers whose content (diff_id) the store already had, from any blob.
    pub layers_present: usize,
    pub bytes_present: u64,
    pub bytes_downloaded: u64,
    /// Uncompressed bytes of chunks the store did not have.
    pub new_chunk_bytes: u64,
    pub deduplicated_bytes: u64,
    /// Layers that came as only their missing chunks ([`crate::delta`]), the chunks, their
    /// compressed bytes (in `bytes_downloaded`, with the indexes and tables) and Range requests.
    pub layers_by_chunks: usize,
    /// The image has an accelerated form (without one, every layer the store lacks comes whole).
    pub accelerated: bool,
    pub chunks_fetched: u64,
    pub chunk_bytes: u64,
    pub range_requests: u64,
}

/// What a pull would fetch, without fetching (but for the indexes and chunk tables of an
/// accelerated form, which say which chunks are new).
#[derive(Debug, serde::Serialize)]
pub struct PullPlan {
    pub name: String,
    pub digest: Digest,
    pub fetch: Vec<PlannedLayer>,
    pub present: Vec<PlannedLayer>,
    /// Bytes the pull will download: whole blobs, and new chunks with indexes and tables.
    pub fetch_bytes: u64,
    pub present_bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct PlannedLayer {
    pub digest: Digest,
    /// The layer blob's size.
    pub size: u64,
    /// What fetching it downloads.
    pub bytes: u64,
    #[serde(flatten)]
    pub via: crate::delta::Via,
}

/// A blocking reader over the chunks a download task sends.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    pos: usize,
    bar: Box<dyn hb_store::Progress + Send + Sync>,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.bar.advance(b.len() as u64);
                    self.buf = b;
                    self.pos = 0;
                }
                Some(Err(msg)) => return Err(io::Error::other(msg)),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Key of an image's recorded start-up order in the store's auxiliary records.
pub fn startup_key(manifest: &Digest) -> String {
    format!("startup/{manifest}")
}

/// Keeps `order` as image `manifest`'s start-up order unless it has one (the first wins; a
/// published one is never replaced). True when it was kept.
pub fn keep_first_order(store: &Store, manifest: &Digest, order: &[u8]) -> Result<bool> {
    let key = startup_key(manifest);
    if store.aux(&key)?.is_some() {
        return Ok(false);
    }
    store.put_aux(&key, order)?;
    Ok(true)
}

/// Compares a resolved image with the store: per layer, whether it is present, comes as its new
/// chunks, or comes whole ([`crate::delta::prepare`]).
pub fn plan(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    registry: &Registry,
    resolved: &ResolvedImage,
) -> Result<PullPlan> {
    // A dry run: nothing kept, the registry's bytes counted.
    let forms = crate::delta::Forms { registry, peers: None, keep_in: None };
    let layers = crate::delta::prepare(rt, store, &forms, resolved, crate::delta::MAX_SHARE)?;
    Ok(plan_of(resolved, &layers))
}

fn plan_of(resolved: &ResolvedImage, layers: &[crate::delta::Layer]) -> PullPlan {
    let mut p = PullPlan {
        name: image_name(&resolved.reference),
        digest: resolved.manifest_digest,
        fetch: vec![],
        present: vec![],
        fetch_bytes: 0,
        present_bytes: 0,
    };
    for l in layers {
        let bytes = l.via.bytes(l.desc.size);
        let entry = PlannedLayer { digest: l.desc.digest, size: l.desc.size, bytes, via: l.via.clone() };
        if l.via == crate::delta::Via::Present {
            p.present_bytes += l.desc.size;
            p.present.push(entry);
        } else {
            p.fetch_bytes += bytes;
            p.fetch.push(entry);
        }
    }
    p
}

/// Resolves the reference at the first endpoint that answers, in order (mirrors first, as
/// containerd does; a mirror that fails or lacks the image is passed over with a log line).
/// Returns the client of the endpoint that answered: the blobs are read there too.
pub fn resolve(
    rt: &tokio::runtime::Runtime,
    endpoints: Vec<crate::sources::Endpoint>,
) -> Result<(Registry, ResolvedImage)> {
    let count = endpoints.len();
    let mut last = None;
    for (i, ep) in endpoints.into_iter().enumerate() {
        if !ep.resolve && ep.reference.digest().is_none() && i + 1 < count {
            continue;
        }
        let attempt = Registry::new(&ep.reference, ep.opts)
            .and_then(|registry| Ok((rt.block_on(registry.resolve(&ep.reference))?, registry)));
        match attempt {
            Ok((resolved, registry)) => {
                if ep.reference.mirror().is_some() {
                    tracing::info!(endpoint = %ep.name, reference = %ep.reference, "resolved through a mirror");
                }
                return Ok((registry, resolved));
            }
            Err(e) if i + 1 < count => {
                tracing::warn!(endpoint = %ep.name, error = %e, "a mirror failed; trying the next host");
                last = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(|| ImagesError::Invalid("no registry to resolve from".into()), ImagesError::from))
}

/// Downloads what the store lacks and records the image under its canonical name. Layers of an
/// image with an accelerated form come as only their new chunks where that is cheaper
/// ([`crate::delta`]); the rest stream whole, concurrently, each into its own ingest.
pub fn pull(
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    origin: crate::delta::Origin<'_>,
    resolved: ResolvedImage,
    reporter: &dyn Reporter,
) -> Result<PullReport> {
    let name = image_name(&resolved.reference);
    let share = if origin.registries.peers_connected() { crate::delta::PEER_SHARE } else { crate::delta::MAX_SHARE };
    let forms = crate::delta::Forms {
        registry: &origin.registry,
        peers: origin.registries.blob_peers(),
        keep_in: Some(&store),
    };
    let layers = crate::delta::prepare(rt, &store, &forms, &resolved, share)?;
    let planned = plan_of(&resolved, &layers);
    let mut report = PullReport {
        name: name.clone(),
        digest: resolved.manifest_digest,
        platform: resolved.platform.clone(),
        layers: resolved.layers.len(),
        layers_present: planned.present.len(),
        bytes_present: planned.present_bytes,
        bytes_downloaded: 0,
        new_chunk_bytes: 0,
        deduplicated_bytes: 0,
        layers_by_chunks: 0,
        accelerated: resolved.accelerated.is_some(),
        chunks_fetched: 0,
        chunk_bytes: 0,
        range_requests: 0,
    };
    let mut whole: Vec<LayerDesc> = Vec::new();
    for l in &layers {
        match &l.via {
            crate::delta::Via::Whole { reason } => {
                tracing::debug!(layer = %l.desc.digest, %reason, "downloading the layer whole");
                whole.push(l.desc.clone());
            }
            crate::delta::Via::Chunks { meta_bytes, .. } => report.bytes_downloaded += meta_bytes,
            crate::delta::Via::Present => {}
        }
    }
    // Whole layers first: chunks they bring are not fetched again by range.
    for (bytes, r) in fetch_whole(rt, &store, &origin.registry, &resolved.reference, whole, reporter)? {
        report.bytes_downloaded += bytes;
        report.new_chunk_bytes += r.new_bytes;
        report.deduplicated_bytes += r.deduplicated_bytes;
    }
    let fetched = crate::delta::fetch_chunks(rt, &store, &origin, &resolved, layers, reporter)?;
    report.layers_by_chunks = fetched.layers;
    report.chunks_fetched = fetched.chunks;
    report.chunk_bytes = fetched.wire_bytes;
    report.range_requests = fetched.requests;
    report.bytes_downloaded += fetched.wire_bytes;
    report.new_chunk_bytes += fetched.raw_bytes;
    let fallback: Vec<LayerDesc> = fetched.fallback.into_iter().map(|(l, _)| l).collect();
    for (bytes, r) in fetch_whole(rt, &store, &origin.registry, &resolved.reference, fallback, reporter)? {
        report.bytes_downloaded += bytes;
        report.new_chunk_bytes += r.new_bytes;
        report.deduplicated_bytes += r.deduplicated_bytes;
    }
    store.put_image(&name, &resolved.manifest_digest, &image_record(&resolved)?)?;
    Ok(report)
}

/// Streams `layers`' blobs, a few at once, each into its own ingest (which completes a lazy
/// layer of the same content); returns the bytes downloaded and the import of each.
fn fetch_whole(
    rt: &tokio::runtime::Runtime,
    store: &Arc<Store>,
    registry: &Arc<Registry>,
    reference: &ImageRef,
    layers: Vec<LayerDesc>,
    reporter: &dyn Reporter,
) -> Result<Vec<(u64, hb_store::ImportReport)>> {
    if layers.is_empty() {
        return Ok(vec![]);
    }
    rt.block_on(async {
        stream::iter(layers)
            .map(|layer| {
                let store = store.clone();
                let registry = registry.clone();
                let reference = reference.clone();
                let bar = reporter.transfer(&layer.digest.short(), layer.size);
                async move {
                    let (tx, rx) = mpsc::channel(16);
                    let reader = ChannelReader { rx, buf: Vec::new(), pos: 0, bar };
                    let expect = layer.digest;
                    let ingest = tokio::task::spawn_blocking(move || {
                        let opts = ImportOptions { expect_digest: Some(expect), pin: false };
                        store.import_blob(reader, &opts, &hb_store::NoProgress)
                    });
                    let fetched = registry.fetch_blob(&reference, &layer, tx).await;
                    let imported =
                        ingest.await.map_err(|e| ImagesError::Invalid(format!("the ingest task panicked: {e}")))?;
                    // When the store stopped reading (bad layer), its error is the cause to report.
                    let imported = match (&fetched, imported) {
                        (Err(hb_registry::RegistryError::ReceiverGone { .. }), Err(e)) => {
                            return Err(e).within(|| format!("storing layer {}", layer.digest));
                        }
                        (_, i) => i,
                    };
                    let bytes = fetched.within(|| format!("downloading layer {}", layer.digest))?;
                    let r = imported.within(|| format!("storing layer {}", layer.digest))?;
                    if r.diff_id != layer.diff_id {
                        return Err(ImagesError::Invalid(format!(
                            "layer {} decompresses to {}, but the image config says {}",
                            layer.digest, r.diff_id, layer.diff_id
                        )));
                    }
                    Ok::<_, ImagesError>((bytes, r))
                }
            })
            .buffer_unordered(CONCURRENT_LAYERS)
            .try_collect()
            .await
    })
}

/// The store's record of a resolved image.
pub fn image_record(resolved: &ResolvedImage) -> Result<ImageRecord> {
    Ok(ImageRecord {
        manifest_media_type: resolved.manifest_media_type.clone(),
        manifest: String::from_utf8(resolved.manifest.clone())
            .map_err(|_| ImagesError::Invalid("the manifest is not UTF-8".into()))?,
        config_digest: resolved.config_digest,
        config: String::from_utf8(resolved.config.clone())
            .map_err(|_| ImagesError::Invalid("the config is not UTF-8".into()))?,
        layers: resolved
            .layers
            .iter()
            .map(|l| ImageLayer {
                digest: l.digest,
                diff_id: l.diff_id,
                size: l.size,
                media_type: l.media_type.clone(),
            })
            .collect(),
        platform: resolved.platform.clone(),
    })
}

/// One line for people about a pull.
pub fn summary(r: &PullReport) -> String {
    format!(
        "{}: {} layers ({} already present, {}), downloaded {}{}; stored {} of new chunks, {} deduplicated",
        r.name,
        r.layers,
        r.layers_present,
        HumanBytes(r.bytes_present),
        HumanBytes(r.bytes_downloaded),
        if r.layers_by_chunks > 0 {
            format!(
                " ({} layers as their {} new chunks, {} in {} requests)",
                r.layers_by_chunks,
                r.chunks_fetched,
                HumanBytes(r.chunk_bytes),
                r.range_requests
            )
        } else if !r.accelerated && r.bytes_downloaded > 0 {
            " (whole layers: the image has no accelerated form; `hb convert` makes one)".to_string()
        } else {
            String::new()
        },
        HumanBytes(r.new_chunk_bytes),
        HumanBytes(r.deduplicated_bytes),
    )
}

/// What a lazy pull did.
#[derive(Debug, serde::Serialize)]
pub struct LazyPullReport {
    pub name: String,
    pub digest: Digest,
    pub platform: String,
    pub layers: usize,
    /// Layers already complete in the store.
    pub layers_local: usize,
    pub layers_lazy: usize,
    /// Bytes of indexes, tables and start-up order downloaded.
    pub bytes_downloaded: u64,
    /// Uncompressed bytes the lazy layers will fetch on first read (less what other layers share).
    pub remote_bytes: u64,
    pub startup_chunks: usize,
    /// The indexes this pull imported (decoded and verified), for a mount in this process to
    /// take instead of reading them back from the store.
    #[serde(skip)]
    pub indexes: Vec<hb_core::LayerIndex>,
}

/// Pulls an image's indexes from its accelerated form (from LAN `peers` that keep them, when
/// given, else the registry; kept in the store for peers): every layer becomes a lazy layer
/// (unless already stored) whose chunks `hb mount` reads by range on first use.
pub fn pull_lazy(
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    registry: Arc<Registry>,
    resolved: ResolvedImage,
    peers: Option<Arc<dyn hb_core::BlobSource>>,
) -> Result<LazyPullReport> {
    let accel = resolved.accelerated.ok_or_else(|| ImagesError::Invalid("the image has no accelerated form".into()))?;
    let r = &resolved.reference;
    let name = image_name(r);
    let cfg = rt.block_on(registry.fetch_accel_config(r, &accel, &resolved.manifest_digest))?;
    if cfg.layers.len() != resolved.layers.len()
        || cfg.layers.iter().zip(&resolved.layers).any(|(a, l)| a.blob != l.digest || a.diff_id != l.diff_id)
    {
        return Err(ImagesError::Invalid(format!("{name}: the accelerated form's layers do not match the image's")));
    }
    let repository = format!("{}/{}", r.registry(), r.repository());
    let mut report = LazyPullReport {
        name: name.clone(),
        digest: resolved.manifest_digest,
        platform: resolved.platform.clone(),
        layers: cfg.layers.len(),
        layers_local: 0,
        layers_lazy: 0,
        bytes_downloaded: 0,
        remote_bytes: 0,
        startup_chunks: 0,
        indexes: Vec::new(),
    };
    let todo: Vec<(hb_core::AccelLayer, LayerDesc)> = cfg
        .layers
        .iter()
        .cloned()
        .zip(resolved.layers.iter().cloned())
        .filter(|(a, _)| !store.has_layer(&a.diff_id).unwrap_or(false))
        .collect();
    report.layers_local = cfg.layers.len() - todo.len();
    let mut local: Vec<Digest> =
        cfg.layers.iter().map(|l| l.diff_id).filter(|d| !todo.iter().any(|(a, _)| a.diff_id == *d)).collect();
    let forms = crate::delta::Forms { registry: &registry, peers, keep_in: Some(&store) };
    let forms = &forms;
    let layers = stream::iter(todo)
        .map(|(a, l)| {
            let (store, r, repository) = (store.clone(), r.clone(), repository.clone());
            async move {
                let (index, source, bytes) = forms.fetch(&r, &a, repository).await?;
                let imported = tokio::task::spawn_blocking(move || {
                    store
                        .import_lazy_layer(
                            &index,
                            &l.digest,
                            crate::delta::blob_compression(&l.media_type),
                            l.size,
                            &source,
                            false,
                        )
                        // The index back, to check a published order against.
                        .map(|li| (li, index))
                })
                .await
                .map_err(|e| ImagesError::Invalid(format!("the lazy import task panicked: {e}")))??;
                Ok::<_, ImagesError>((bytes, imported))
            }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<_>>();
    // The published order (if any) comes beside the layers' indexes, not after them.
    let order = async {
        match cfg.startup {
            Some((d, size)) => Some(registry.fetch_bytes(r, &d, size).await),
            None => None,
        }
    };
    let (results, order) = rt.block_on(futures_util::future::join(layers, order));
    let results = results?;
    let mut known: HashSet<ChunkId> = HashSet::new();
    for (bytes, (li, index)) in results {
        report.bytes_downloaded += bytes;
        report.remote_bytes += li.remote_bytes;
        if li.remote_chunks > 0 {
            report.layers_lazy += 1;
        }
        // A layer the store knew already keeps its own index: that one counts.
        match li.already_present {
            true => local.push(index.diff_id),
            false => {
                if order.is_some() {
                    known.extend(index.chunks.iter().map(|c| c.id));
                }
                report.indexes.push(index);
            }
        }
    }
    if let Some(fetched) = order {
        // An order is advice: one that cannot be fetched, does not decode or names chunks the image
        // lacks is logged and left out, and the image starts without it.
        let fetched = fetched.map_err(ImagesError::from).and_then(|raw| {
            let order = hb_core::StartupOrder::decode(&raw).within(|| "the start-up order".to_string())?;
            for l in crate::layer_indexes(&store, &local)? {
                known.extend(l.chunks.iter().map(|c| c.id));
            }
            order.check_known(&known).within(|| "the start-up order".to_string())?;
            Ok((raw, order))
        });
        match fetched {
            Ok((raw, order)) => {
                report.startup_chunks = order.chunks.len();
                report.bytes_downloaded += raw.len() as u64;
                // Durable with the image record below.
                if let Err(e) = store.stage_aux(&startup_key(&resolved.manifest_digest), &raw) {
                    tracing::warn!(image = %name, error = %e, "could not keep the published start-up order");
                }
            }
            Err(e) => {
                tracing::warn!(image = %name, error = %e, "the published start-up order is not usable; pulling without it")
            }
        }
    }
    store.put_image(&name, &resolved.manifest_digest, &image_record(&resolved)?)?;
    Ok(report)
}

/// One line for people about a lazy pull.
pub fn lazy_summary(r: &LazyPullReport) -> String {
    format!(
        "{}: {} layers ({} already local, {} lazy), downloaded {} of indexes; {} of file data will come on first read{}",
        r.name,
        r.layers,
        r.layers_local,
        r.layers_lazy,
        HumanBytes(r.bytes_downloaded),
        HumanBytes(r.remote_bytes),
        if r.startup_chunks > 0 { format!("; start-up order of {} chunks", r.startup_chunks) } else { String::new() }
    )
}
