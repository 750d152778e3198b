//! `hb pull`: registry -> verified blob streams -> concurrent ingests -> image record.
//! The only place that wires the registry client to the store.

use std::io::{self, Read};
use std::sync::Arc;

use futures_util::{stream, StreamExt, TryStreamExt};
use hb_core::Digest;
use hb_registry::{ImageRef, LayerDesc, Registry, RegistryOptions, ResolvedImage};
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
}

/// What a pull would fetch, without fetching.
#[derive(Debug, serde::Serialize)]
pub struct PullPlan {
    pub name: String,
    pub digest: Digest,
    pub fetch: Vec<PlannedLayer>,
    pub present: Vec<PlannedLayer>,
    pub fetch_bytes: u64,
    pub present_bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct PlannedLayer {
    pub digest: Digest,
    pub size: u64,
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

/// Resolves `r` and compares with the store: which layer blobs a pull would download.
pub fn plan(store: &Store, resolved: &ResolvedImage) -> Result<PullPlan> {
    let mut p = PullPlan {
        name: image_name(&resolved.reference),
        digest: resolved.manifest_digest,
        fetch: vec![],
        present: vec![],
        fetch_bytes: 0,
        present_bytes: 0,
    };
    for l in &resolved.layers {
        let entry = PlannedLayer { digest: l.digest, size: l.size };
        if store.has_layer(&l.diff_id)? {
            p.present_bytes += l.size;
            p.present.push(entry);
        } else if !p.fetch.iter().any(|f| f.digest == l.digest) {
            // A blob an image lists twice is downloaded once.
            p.fetch_bytes += l.size;
            p.fetch.push(entry);
        }
    }
    Ok(p)
}

/// One place an image can be resolved and read from: a mirror from hosts.toml, or the registry.
pub struct Endpoint {
    /// `mirror <host>` or `registry <host>`, for logs and stats.
    pub name: String,
    /// The reference as asked of this endpoint ([`ImageRef::via_mirror`] for a mirror).
    pub reference: ImageRef,
    pub opts: RegistryOptions,
    /// Tags may be resolved here (hosts.toml `resolve` capability).
    pub resolve: bool,
}

/// Resolves the reference at the first endpoint that answers, in order (mirrors first, as
/// containerd does; a mirror that fails or lacks the image is passed over with a log line).
/// Returns the client of the endpoint that answered: the blobs are read there too.
pub fn resolve(rt: &tokio::runtime::Runtime, endpoints: Vec<Endpoint>) -> Result<(Registry, ResolvedImage)> {
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

/// Downloads what the store lacks, layers concurrently, each streamed into its own ingest, then
/// records the image under its canonical name.
pub fn pull(
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    registry: Registry,
    resolved: ResolvedImage,
    reporter: &dyn Reporter,
) -> Result<PullReport> {
    let name = image_name(&resolved.reference);
    let planned = plan(&store, &resolved)?;
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
    };
    let missing: Vec<LayerDesc> =
        planned.fetch.iter().filter_map(|f| resolved.layers.iter().find(|l| l.digest == f.digest).cloned()).collect();
    let registry = Arc::new(registry);
    let reference = resolved.reference.clone();
    let results: Vec<(u64, hb_store::ImportReport)> = rt.block_on(async {
        stream::iter(missing.iter().cloned())
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
    })?;
    for (bytes, r) in &results {
        report.bytes_downloaded += bytes;
        report.new_chunk_bytes += r.new_bytes;
        report.deduplicated_bytes += r.deduplicated_bytes;
    }
    store.put_image(&name, &resolved.manifest_digest, &image_record(&resolved)?)?;
    Ok(report)
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
        "{}: {} layers ({} already present, {}), downloaded {}; stored {} of new chunks, {} deduplicated",
        r.name,
        r.layers,
        r.layers_present,
        HumanBytes(r.bytes_present),
        HumanBytes(r.bytes_downloaded),
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
}

fn blob_compression(media_type: &str) -> hb_store::BlobCompression {
    if media_type.contains("gzip") {
        hb_store::BlobCompression::Gzip
    } else if media_type.contains("zstd") {
        hb_store::BlobCompression::Zstd
    } else {
        hb_store::BlobCompression::None
    }
}

/// Pulls an image's indexes from its accelerated form: every layer becomes a lazy layer (unless
/// already stored) whose chunks `hb mount` reads by range on first use.
pub fn pull_lazy(
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    registry: Arc<Registry>,
    resolved: ResolvedImage,
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
    };
    let todo: Vec<(hb_core::AccelLayer, LayerDesc)> = cfg
        .layers
        .iter()
        .cloned()
        .zip(resolved.layers.iter().cloned())
        .filter(|(a, _)| !store.has_layer(&a.diff_id).unwrap_or(false))
        .collect();
    report.layers_local = cfg.layers.len() - todo.len();
    let results: Vec<(u64, hb_store::LazyImport)> = rt.block_on(async {
        stream::iter(todo)
            .map(|(a, l)| {
                let (store, registry, r, repository) = (store.clone(), registry.clone(), r.clone(), repository.clone());
                async move {
                    let index_raw = registry.fetch_bytes(&r, &a.index, a.index_size).await?;
                    let table_raw = registry.fetch_bytes(&r, &a.table, a.table_size).await?;
                    let index =
                        hb_core::LayerIndex::decode(&index_raw).within(|| format!("index of layer {}", a.diff_id))?;
                    if index.diff_id != a.diff_id {
                        return Err(ImagesError::Invalid(format!(
                            "the index of layer {} names layer {}",
                            a.diff_id, index.diff_id
                        )));
                    }
                    let table = hb_core::ChunkTable::decode(&table_raw)
                        .within(|| format!("chunk table of layer {}", a.diff_id))?;
                    if table.data_size() != a.data_size {
                        return Err(ImagesError::Invalid(format!(
                            "the chunk table of layer {} does not describe its data blob",
                            a.diff_id
                        )));
                    }
                    let source = hb_core::LazySource { repository, data: a.data, table };
                    let imported = tokio::task::spawn_blocking(move || {
                        store.import_lazy_layer(
                            &index,
                            &l.digest,
                            blob_compression(&l.media_type),
                            l.size,
                            &source,
                            false,
                        )
                    })
                    .await
                    .map_err(|e| ImagesError::Invalid(format!("the lazy import task panicked: {e}")))??;
                    Ok::<_, ImagesError>((index_raw.len() as u64 + table_raw.len() as u64, imported))
                }
            })
            .buffer_unordered(4)
            .try_collect()
            .await
    })?;
    for (bytes, li) in &results {
        report.bytes_downloaded += bytes;
        report.remote_bytes += li.remote_bytes;
        if li.remote_chunks > 0 {
            report.layers_lazy += 1;
        }
    }
    if let Some((d, size)) = cfg.startup {
        let raw = rt.block_on(registry.fetch_bytes(r, &d, size))?;
        let order = hb_core::StartupOrder::decode(&raw).within(|| "the start-up order".to_string())?;
        report.startup_chunks = order.chunks.len();
        report.bytes_downloaded += raw.len() as u64;
        store.put_aux(&startup_key(&resolved.manifest_digest), &raw)?;
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
