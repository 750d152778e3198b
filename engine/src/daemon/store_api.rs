//! What the API does with the store: pulls, chunks for mount servers (get and fill), image
//! removal, health.

use super::*;

impl Daemon {
    pub(super) fn pull(&self, req: &PullRequest) -> anyhow::Result<PullResponse> {
        self.note_plain(&req.reference, req.plain_http);
        let one = self.prepare();
        let r = hb_registry::ImageRef::parse(&req.reference)?;
        let creds = match &req.credentials {
            Some(c) => Some(c.clone()),
            None => crate::config::docker_credentials(r.registry())?,
        };
        let platform = match &req.platform {
            Some(p) => p.parse().map_err(anyhow::Error::msg)?,
            None => hb_registry::Platform::default(),
        };
        let eps = self.hosts().endpoints(&r, req.plain_http, creds, platform)?;
        let (registry, resolved) = crate::pull::resolve(&self.work, eps)?;
        if resolved.accelerated.is_none() {
            // Whole layer blobs: no lazy layer is recorded.
            one.nothing_to_learn();
        }
        self.metrics.pulls.fetch_add(1, Ordering::Relaxed);
        self.dirty.store(true, Ordering::SeqCst);
        if req.lazy && resolved.accelerated.is_some() {
            let report = self.pull_lazy(registry, resolved)?;
            Ok(PullResponse {
                digest: report.digest.to_string(),
                summary: crate::pull::lazy_summary(&report),
                report: serde_json::to_value(&report)?,
            })
        } else {
            let hosts = self.hosts();
            let origin = hb_images::delta::Origin {
                registries: &hosts,
                plain_http: req.plain_http,
                registry: Arc::new(registry),
            };
            let report = crate::pull::pull(&self.work, self.store.clone(), origin, resolved, &Silent)?;
            self.metrics.pulled_bytes.fetch_add(report.bytes_downloaded, Ordering::Relaxed);
            // Peers learn of the new chunks at their next refresh, not at the next rescan.
            if let Some(node) = self.peers.get() {
                node.rescan();
            }
            Ok(PullResponse {
                digest: report.digest.to_string(),
                summary: crate::pull::summary(&report),
                report: serde_json::to_value(&report)?,
            })
        }
    }

    /// A lazy pull by the daemon: its indexes from peers (when on) before the registry, its bytes
    /// counted.
    pub(super) fn pull_lazy(
        &self,
        registry: hb_registry::Registry,
        resolved: hb_registry::ResolvedImage,
    ) -> anyhow::Result<crate::pull::LazyPullReport> {
        let peers = self.hosts().blob_peers();
        let report = crate::pull::pull_lazy(&self.work, self.store.clone(), Arc::new(registry), resolved, peers)?;
        self.metrics.pulled_bytes.fetch_add(report.bytes_downloaded, Ordering::Relaxed);
        Ok(report)
    }

    /// Keeps a start-up order a mount server learned for image `manifest`, unless the image has one
    /// already (the first cold start's wins; `hb optimize`'s is never replaced). Refused when it
    /// names a chunk none of the image's layers has.
    pub(super) fn keep_startup(&self, manifest: &str, body: &[u8]) -> anyhow::Result<serde_json::Value> {
        let manifest: hb_core::Digest =
            manifest.parse().map_err(|e| BadRequest(format!("?manifest= names no digest: {e}")))?;
        let order = hb_core::StartupOrder::decode(body)?;
        let rec = self.store.image(&manifest)?.ok_or_else(|| NotFound(format!("no image {manifest}")))?;
        let indexes = hb_images::layer_indexes(&self.store, &rec.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>())?;
        order.check_within(&indexes).with_context(|| format!("image {manifest}"))?;
        let kept = crate::pull::keep_first_order(&self.store, &manifest, body)?;
        if kept {
            tracing::info!(image = %manifest, chunks = order.chunks.len(), "keeping a learned start-up order");
        }
        Ok(serde_json::json!({ "kept": kept }))
    }

    /// The chunks of `ids` the store has (verified on read), framed.
    pub(super) fn chunks_get(&self, ids: &[u8]) -> anyhow::Result<Vec<u8>> {
        let ids = api::decode_ids(ids)?;
        let mut found = Vec::new();
        let mut size = 0;
        for id in ids {
            match self.store.read_chunk(&id) {
                Ok(b) => {
                    size += b.len() + 36;
                    if size > api::MAX_CHUNK_BODY {
                        break;
                    }
                    found.push((id, b));
                }
                Err(hb_store::StoreError::MissingChunk(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(api::encode_chunks(found.iter().map(|(i, b)| (i, b.as_slice()))))
    }

    /// What LAN peers hold of `ids` (each checked against its id), framed; nothing when peers
    /// are off.
    pub(super) fn peers_get(&self, ids: &[u8]) -> anyhow::Result<Vec<u8>> {
        let ids = api::decode_ids(ids)?;
        let Some(node) = self.peers.get() else { return Ok(api::encode_chunks(std::iter::empty())) };
        let mut found = node.fetch_blocking(&ids);
        let mut size = 0;
        found.retain(|(_, b)| {
            size += b.len() + 36;
            size <= api::MAX_CHUNK_BODY
        });
        Ok(api::encode_chunks(found.iter().map(|(i, b)| (i, b.as_slice()))))
    }

    /// The node, for `GET /v1/peers` and switching: a clear error when peers are off.
    pub(super) fn node(&self) -> anyhow::Result<&hb_p2p::Node> {
        self.peers.get().ok_or_else(|| {
            anyhow::Error::new(NotFound(
                "LAN peers are off on this daemon: set [p2p] enabled = true and psk_file in hb.toml, then restart it"
                    .into(),
            ))
        })
    }

    /// Keeps chunks a mount server fetched (the store verifies each against its id).
    pub(super) fn chunks_fill(&self, body: &[u8]) -> anyhow::Result<api::FillResponse> {
        let chunks = api::decode_chunks(body)?;
        let ids: Vec<hb_core::ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
        // A mount server hands over what it fetched while its container starts: keep it at
        // the lowest priority (as a mount that owns its store does).
        self.filled(&ids, hb_store::in_background(|| self.store.fill_chunks(&chunks))?)
    }

    /// [`Daemon::chunks_fill`] for chunks handed over as the zstd frames they came in (kept as
    /// they are, not compressed again).
    pub(super) fn chunks_fill_frames(&self, body: &[u8]) -> anyhow::Result<api::FillResponse> {
        let frames = api::decode_frames(body)?;
        let ids: Vec<hb_core::ChunkId> = frames.iter().map(|(id, _, _)| *id).collect();
        self.filled(&ids, hb_store::in_background(|| self.store.fill_frames(frames))?)
    }

    fn filled(&self, ids: &[hb_core::ChunkId], r: hb_store::FillReport) -> anyhow::Result<api::FillResponse> {
        self.dirty.store(true, Ordering::SeqCst);
        if let Some(node) = self.peers.get() {
            node.announce(ids);
        }
        Ok(api::FillResponse { filled: r.filled, skipped: r.skipped })
    }

    pub(super) fn remove_images(&self, req: &RemoveRequest) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        for q in &req.images {
            lines.push(hb_images::untag(&self.store, q)?);
            self.dirty.store(true, Ordering::SeqCst);
        }
        Ok(lines)
    }

    pub(super) fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            root: self.root.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            image_mounts: self.mounts.lock().expect("mounts lock").len(),
            peers: self.peers.get().is_some(),
        }
    }
}

impl Daemon {
    /// Records that `image`'s registry is reached by plain HTTP, for fetches made for peers.
    pub(super) fn note_plain(&self, image: &str, plain_http: bool) {
        if let (true, Ok(r)) = (plain_http, hb_registry::ImageRef::parse(image)) {
            self.through.plain_registry(r.registry());
        }
    }

    /// `registry` (itself, not a mirror of it) answered over plain HTTP where HTTPS came first
    /// (loopback) or was not asked for (hosts.toml): its later mount servers go straight to HTTP.
    /// Never from a request's flag: one client's `--plain-http` must not downgrade everyone's.
    pub(super) fn learned_plain(&self, registry: &str) {
        self.plain.lock().expect("plain lock").insert(registry.to_string());
    }

    /// Whether `image`'s registry was reached over plain HTTP by the daemon itself
    /// ([`Daemon::learned_plain`]). A mount server told so skips the HTTPS try.
    pub(super) fn known_plain(&self, image: &str) -> bool {
        hb_registry::ImageRef::parse(image).is_ok_and(|r| self.plain.lock().expect("plain lock").contains(r.registry()))
    }

    /// Fetches `ids` (chunks this host owns for its peers) from the registries of the store's
    /// lazy layers and keeps them (`hb_images::sources::LazyFetch`). Chunks no layer names yet
    /// are asked again once a preparation under way has recorded its layers: hosts that start or
    /// pull one image at once ask each other as soon as their own index is in, and an owner
    /// whose index is still on its way would otherwise answer without them (and every asker
    /// would fetch them itself).
    pub(super) fn fetch_through(&self, ids: &[hb_core::ChunkId]) -> Vec<(hb_core::ChunkId, Vec<u8>)> {
        let hosts = Hosts::with_node(&self.g, None);
        let before = self.store.lazy_imports();
        let mut got = self.through.fetch(&hosts, &self.work, &self.store, ids);
        if got.len() < ids.len() && self.look_again(before) {
            let have: std::collections::HashSet<hb_core::ChunkId> = got.iter().map(|(id, _)| *id).collect();
            let rest: Vec<hb_core::ChunkId> = ids.iter().filter(|id| !have.contains(id)).copied().collect();
            got.extend(self.through.fetch(&hosts, &self.work, &self.store, &rest));
        }
        if !got.is_empty() {
            self.dirty.store(true, Ordering::SeqCst);
        }
        got
    }
}

/// How long after its start a preparation that has recorded no layer is waited for by fetches
/// made for peers (its index on the way: a few hundred ms over a slow shared link).
const LEARN_WAIT: Duration = Duration::from_secs(1);
/// Fetches for peers waiting at once; others do not wait. Each holds one of the node's serving
/// turns while it waits: the rest stay for Gets of chunks this host holds.
pub(super) const LEARN_WAITERS: usize = 8;
/// How long the recorded layers must stay unchanged before they are read again (a pull records
/// its layers one after another).
const LEARN_SETTLE: Duration = Duration::from_millis(20);

/// A preparation under way: since when, and how many lazy layers the store had recorded then.
#[derive(Clone, Copy, PartialEq)]
pub(super) struct Learning {
    since: Instant,
    imports: u64,
}

/// The one preparation at a time (a pull, an image mount, a remote layer); clears
/// `Daemon::learning` when it ends.
pub(super) struct Preparing<'a> {
    _one: std::sync::MutexGuard<'a, ()>,
    learning: &'a Mutex<Option<Learning>>,
}

impl Preparing<'_> {
    /// This preparation records no layer (its image is present, or comes without an accelerated
    /// form): fetches for peers need not wait for it.
    pub(super) fn nothing_to_learn(&self) {
        *self.learning.lock().expect("learning lock") = None;
    }
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        self.nothing_to_learn();
    }
}

impl Daemon {
    /// Waits for the preparations before it, then marks this one under way.
    pub(super) fn prepare(&self) -> Preparing<'_> {
        let one = self.preparing.lock().expect("preparing lock");
        *self.learning.lock().expect("learning lock") =
            Some(Learning { since: Instant::now(), imports: self.store.lazy_imports() });
        Preparing { _one: one, learning: &self.learning }
    }

    /// Whether a fetch for peers that began when the store had recorded `before` lazy layers,
    /// and missed chunks, should look again: layers were recorded while it ran (its sources were
    /// those known when it began), or by the preparation it then waited for.
    pub(super) fn look_again(&self, before: u64) -> bool {
        self.store.lazy_imports() != before || self.await_learning()
    }

    /// When a preparation under way has recorded no layer yet: waits (up to [`LEARN_WAIT`] from
    /// its start) until it records some, then until they stay unchanged for [`LEARN_SETTLE`].
    /// True when it recorded layers meanwhile (what it knows may have grown).
    pub(super) fn await_learning(&self) -> bool {
        let Some(l) = *self.learning.lock().expect("learning lock") else { return false };
        if self.store.lazy_imports() != l.imports {
            // It recorded its layers before this ask: it knows what it will know.
            return false;
        }
        if self.learn_waiters.fetch_add(1, Ordering::SeqCst) >= LEARN_WAITERS {
            self.learn_waiters.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        let learned = self.wait_for(l);
        self.learn_waiters.fetch_sub(1, Ordering::SeqCst);
        learned
    }

    /// [`Daemon::await_learning`]'s wait for preparation `l`.
    fn wait_for(&self, l: Learning) -> bool {
        let deadline = l.since + LEARN_WAIT;
        while self.store.lazy_imports() == l.imports {
            let current = *self.learning.lock().expect("learning lock");
            if current != Some(l) || Instant::now() >= deadline {
                return self.store.lazy_imports() != l.imports;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut seen = self.store.lazy_imports();
        loop {
            std::thread::sleep(LEARN_SETTLE);
            let now = self.store.lazy_imports();
            if now == seen || Instant::now() >= deadline {
                return true;
            }
            seen = now;
        }
    }
}
