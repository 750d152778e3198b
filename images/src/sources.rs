//! The chunk sources of a lazy layer, put in order in one place ([`sources`]): the hb daemon (for
//! a process reading a store the daemon owns), LAN peers (when on), each mirror hosts.toml
//! names, then the registries. Mounts read through it, and so do pulls that fetch only new
//! chunks (`delta.rs`). New tiers go in here.

use std::sync::Arc;

use hb_core::{ChunkId, ChunkSource, Digest};
use hb_registry::{ImageRef, RegistryOptions};
use hb_store::Store;

use crate::{Registries, Result};

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

/// The remote tiers of a mount, assembled in one place: the daemon (when this process reads a
/// store the daemon owns), LAN peers ([`Registries::peers`]), each mirror hosts.toml names for
/// the layers' registries, then the registries themselves.
pub struct Sources {
    pub chain: hb_core::SourceChain,
    /// The Range readers among the tiers (mirrors and registries), for wire figures.
    pub ranges: Vec<Arc<hb_registry::RangeSource>>,
    /// Layers with chunks to fetch.
    pub lazy_layers: usize,
}

/// Compressed bytes received and Range requests made by `ranges`.
pub fn wire(ranges: &[Arc<hb_registry::RangeSource>]) -> (u64, u64) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    ranges.iter().fold((0, 0), |(b, r), s| (b + load(&s.bytes), r + load(&s.requests)))
}

impl Sources {
    /// Every chunk the lazy layers name, blob by blob (for a full prefetch).
    pub fn all_chunks(&self) -> Vec<ChunkId> {
        // Every layer has its registry tier (mirrors may cover fewer): the union of them all.
        let mut seen = std::collections::HashSet::new();
        self.ranges.iter().flat_map(|r| r.all_chunks()).filter(|id| seen.insert(*id)).collect()
    }
}

/// A client already connected to `host/repository`, reused for that repository's reads.
pub type Known = Option<(String, Arc<hb_registry::Registry>)>;

/// Assembles the chunk sources of a mount of `layers` (see [`Sources`]).
pub fn sources(
    registries: &dyn Registries,
    rt: &tokio::runtime::Runtime,
    store: &Store,
    layers: &[Digest],
    known: Known,
    plain_http: bool,
    daemon: Option<Arc<dyn ChunkSource>>,
) -> Result<Sources> {
    let mut lazy = Vec::new();
    for l in layers {
        if let Some(s) = store.lazy_source(l)? {
            lazy.push(s);
        }
    }
    let mut chain = hb_core::SourceChain::new();
    if let Some(daemon) = daemon {
        chain.push("hb daemon", daemon);
    }
    let mut ranges = Vec::new();
    if !lazy.is_empty() {
        if let Some(peers) = registries.peers() {
            chain.push("peers", peers);
        }
        // Each layer's endpoints: its registry's mirrors, then the registry.
        let mut tiers: Vec<(String, Vec<hb_core::LazySource>)> = Vec::new();
        let mut endpoints: std::collections::HashMap<String, Endpoint> = Default::default();
        for l in &lazy {
            let r = hb_registry::ImageRef::parse(&l.repository)?;
            let creds = registries.credentials(r.registry()).unwrap_or(None);
            for ep in registries.endpoints(&r, plain_http, creds, hb_registry::Platform::default())? {
                match tiers.iter_mut().find(|(n, _)| *n == ep.name) {
                    Some((_, ls)) => ls.push(l.clone()),
                    None => tiers.push((ep.name.clone(), vec![l.clone()])),
                }
                endpoints.entry(format!("{}|{}", ep.name, l.repository)).or_insert(ep);
            }
        }
        // Mirrors above registries, each in the order first named.
        tiers.sort_by_key(|(n, _)| !n.starts_with("mirror "));
        for (name, ls) in tiers {
            let src = hb_registry::RangeSource::new(rt.handle().clone(), &ls, |r| {
                let repo = format!("{}/{}", r.registry(), r.repository());
                let ep = endpoints.remove(&format!("{name}|{repo}")).expect("an endpoint per tier and repository");
                let reference = ep.reference;
                if let Some((known_repo, reg)) = &known {
                    if *known_repo == format!("{}/{}", reference.host(), r.repository()) {
                        return Ok((reg.clone(), reference));
                    }
                }
                hb_registry::Registry::new(&reference, ep.opts).map(|reg| (Arc::new(reg), reference))
            })?;
            let src = Arc::new(src);
            if store.is_writable() || chain.keeps() {
                // What it fetches is stored as it came, here or by the daemon (see
                // `Store::fill_chunks_framed`).
                src.keep_frames();
            }
            chain.push(name, src.clone());
            ranges.push(src);
        }
    }
    Ok(Sources { chain, ranges, lazy_layers: lazy.len() })
}

/// Source chains, and the lazy layers they cover.
type ChainsFor = (Vec<Digest>, Vec<Arc<hb_core::SourceChain>>);

/// Source chains (mirrors and registries, no peers) over a store's lazy layers, for chunks this
/// host fetches for its LAN peers as their owner (docs/p2p.md): remade when the lazy layers or
/// the registries reached by plain HTTP change.
#[derive(Default)]
pub struct LazyFetch {
    /// The chains and the lazy layers they were made for.
    chains: std::sync::Mutex<Option<ChainsFor>>,
    /// Registries reached by plain HTTP (as mounts and pulls asked).
    plain: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl LazyFetch {
    /// Registry host `registry` is reached by plain HTTP.
    pub fn plain_registry(&self, registry: &str) {
        if self.plain.lock().expect("plain lock").insert(registry.to_string()) {
            // The chains were made with that registry over TLS: make them again.
            *self.chains.lock().expect("chains lock") = None;
        }
    }

    /// One chain for the layers of plain-HTTP registries, one for the others; each fetches
    /// exactly the chunks asked (an owner's chunks lie among the other owners': filling the gaps
    /// between them would fetch theirs too).
    fn chains(
        &self,
        registries: &dyn Registries,
        rt: &tokio::runtime::Runtime,
        store: &Store,
    ) -> Result<Vec<Arc<hb_core::SourceChain>>> {
        let layers = store.lazy_layers()?;
        let mut cached = self.chains.lock().expect("chains lock");
        if let Some((l, c)) = cached.as_ref() {
            if *l == layers {
                return Ok(c.clone());
            }
        }
        let plain = self.plain.lock().expect("plain lock").clone();
        let (mut over_http, mut over_tls) = (Vec::new(), Vec::new());
        for l in &layers {
            let Some(src) = store.lazy_source(l)? else { continue };
            let host = ImageRef::parse(&src.repository).map(|r| r.registry().to_string()).unwrap_or_default();
            if plain.contains(&host) {
                over_http.push(*l);
            } else {
                over_tls.push(*l);
            }
        }
        let mut chains = Vec::new();
        for (group, plain_http) in [(over_http, true), (over_tls, false)] {
            if !group.is_empty() {
                let s = sources(registries, rt, store, &group, None, plain_http, None)?;
                s.ranges.iter().for_each(|r| r.exact());
                chains.push(Arc::new(s.chain));
            }
        }
        *cached = Some((layers, chains.clone()));
        Ok(chains)
    }

    /// Fetches `ids` (which the store lacks) from the registries of its lazy layers, keeps them
    /// in the store and returns them; those no lazy layer names are left out. `registries` must
    /// not lead back to peers.
    pub fn fetch(
        &self,
        registries: &dyn Registries,
        rt: &tokio::runtime::Runtime,
        store: &Store,
        ids: &[ChunkId],
    ) -> Vec<(ChunkId, Vec<u8>)> {
        let chains = match self.chains(registries, rt, store) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no sources to fetch for peers from");
                return Vec::new();
            }
        };
        let mut got: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        for chain in chains {
            let have: std::collections::HashSet<ChunkId> = got.iter().map(|(i, _)| *i).collect();
            let rest: Vec<ChunkId> = ids.iter().filter(|id| !have.contains(id)).copied().collect();
            if rest.is_empty() {
                break;
            }
            match chain.fetch_many(&rest) {
                Ok(g) => got.extend(g),
                Err(e) => tracing::debug!(error = %e, "fetching for peers failed"),
            }
        }
        if !got.is_empty() {
            if let Err(e) = store.fill_chunks(&got) {
                tracing::warn!(error = %e, "keeping chunks fetched for peers failed");
            }
        }
        got
    }
}
