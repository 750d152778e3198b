//! What the API does with the store: pulls, chunks for mount servers (get and fill), image
//! removal, health.

use super::*;

impl Daemon {
    pub(super) fn pull(&self, req: &PullRequest) -> anyhow::Result<PullResponse> {
        self.note_plain(&req.reference, req.plain_http);
        let _one = self.preparing.lock().expect("preparing lock");
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
        self.metrics.pulls.fetch_add(1, Ordering::Relaxed);
        self.dirty.store(true, Ordering::SeqCst);
        if req.lazy && resolved.accelerated.is_some() {
            let report = crate::pull::pull_lazy(&self.work, self.store.clone(), Arc::new(registry), resolved)?;
            self.metrics.pulled_bytes.fetch_add(report.bytes_downloaded, Ordering::Relaxed);
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
        let r = self.store.fill_chunks(&chunks)?;
        self.dirty.store(true, Ordering::SeqCst);
        if let Some(node) = self.peers.get() {
            node.announce(&chunks.iter().map(|(id, _)| *id).collect::<Vec<_>>());
        }
        Ok(api::FillResponse { filled: r.filled, skipped: r.skipped })
    }

    pub(super) fn remove_images(&self, req: &RemoveRequest) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        for q in &req.images {
            let (name, digest, _) = crate::require_image(&self.store, q)?;
            self.store.remove_image_name(&name)?;
            self.dirty.store(true, Ordering::SeqCst);
            lines.push(format!("untagged {name} ({}); run `hb gc` to free its space", digest.short()));
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

/// Source chains, and the lazy layers they cover.
type ChainsFor = (Vec<hb_core::Digest>, Vec<Arc<hb_core::SourceChain>>);

/// What the daemon fetches for peers as the owner of chunks nobody holds (docs/p2p.md),
/// through source chains over the store's lazy layers.
#[derive(Default)]
pub(super) struct Through {
    /// The chains over the lazy layers they were made for (remade when those change).
    chains: Mutex<Option<ChainsFor>>,
    /// Registries reached by plain HTTP (as asked by mounts and pulls).
    pub(super) plain_hosts: Mutex<std::collections::HashSet<String>>,
}

impl Daemon {
    /// Records that `image`'s registry is reached by plain HTTP, for fetches made for peers.
    pub(super) fn note_plain(&self, image: &str, plain_http: bool) {
        if let (true, Ok(r)) = (plain_http, hb_registry::ImageRef::parse(image)) {
            if self.through.plain_hosts.lock().expect("plain lock").insert(r.registry().to_string()) {
                // The chains were made with that registry over TLS: make them again.
                *self.through.chains.lock().expect("chains lock") = None;
            }
        }
    }

    /// The source chains (registries and mirrors, no peers) over the store's lazy layers: one
    /// for the layers of plain-HTTP registries, one for the others.
    fn through_chains(&self) -> anyhow::Result<Vec<Arc<hb_core::SourceChain>>> {
        let layers = self.store.lazy_layers()?;
        let mut cached = self.through.chains.lock().expect("chains lock");
        if let Some((l, c)) = cached.as_ref() {
            if *l == layers {
                return Ok(c.clone());
            }
        }
        let plain = self.through.plain_hosts.lock().expect("plain lock").clone();
        let (mut over_http, mut over_tls) = (Vec::new(), Vec::new());
        for l in &layers {
            let Some(src) = self.store.lazy_source(l)? else { continue };
            let host =
                hb_registry::ImageRef::parse(&src.repository).map(|r| r.registry().to_string()).unwrap_or_default();
            if plain.contains(&host) {
                over_http.push(*l);
            } else {
                over_tls.push(*l);
            }
        }
        let hosts = Hosts::with_node(&self.g, None);
        let mut chains = Vec::new();
        for (group, plain_http) in [(over_http, true), (over_tls, false)] {
            if !group.is_empty() {
                let s = hb_images::sources::sources(&hosts, &self.work, &self.store, &group, None, plain_http, None)?;
                // Exactly what was asked: an owner's chunks are spread over the blob among the
                // other owners' (filling the gaps between them would fetch theirs too).
                s.ranges.iter().for_each(|r| r.exact());
                chains.push(Arc::new(s.chain));
            }
        }
        *cached = Some((layers, chains.clone()));
        Ok(chains)
    }

    /// Fetches `ids` from the registries of the store's lazy layers (what the store holds is
    /// read), keeps them, returns them. (The node makes concurrent asks for one chunk one call.)
    pub(super) fn fetch_through(&self, ids: &[hb_core::ChunkId]) -> Vec<(hb_core::ChunkId, Vec<u8>)> {
        use hb_core::ChunkSource;
        let mut out = Vec::new();
        let mut want = Vec::new();
        for id in ids {
            match self.store.read_chunk(id) {
                Ok(b) => out.push((*id, b)),
                Err(_) => want.push(*id),
            }
        }
        if want.is_empty() {
            return out;
        }
        let chains = match self.through_chains() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "no sources to fetch for peers from");
                return out;
            }
        };
        let mut got: Vec<(hb_core::ChunkId, Vec<u8>)> = Vec::new();
        for chain in chains {
            let have: std::collections::HashSet<hb_core::ChunkId> = got.iter().map(|(i, _)| *i).collect();
            let rest: Vec<hb_core::ChunkId> = want.iter().filter(|id| !have.contains(id)).copied().collect();
            if rest.is_empty() {
                break;
            }
            match chain.fetch_many(&rest) {
                Ok(g) => got.extend(g),
                Err(e) => tracing::debug!(error = %e, "fetching for peers failed"),
            }
        }
        if !got.is_empty() {
            match self.store.fill_chunks(&got) {
                Ok(_) => self.dirty.store(true, Ordering::SeqCst),
                Err(e) => tracing::warn!(error = %e, "keeping chunks fetched for peers failed"),
            }
        }
        out.extend(got);
        out
    }
}
