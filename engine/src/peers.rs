//! LAN peers, the engine's side: `[p2p]` read into the node's settings, the store as the node
//! sees it, the daemon's node as a chunk tier for processes reading the daemon's store (mount
//! servers), and `hb peers`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hb_core::{ChunkId, ChunkSource, SourceError};
use hb_store::Store;

use crate::output::Out;
use crate::Global;

/// The port `[p2p]` listens on when `listen` is not set.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7946";

/// How the daemon fetches chunks it owns for peers (`Daemon::fetch_through`).
pub type Through = Box<dyn Fn(&[ChunkId]) -> Vec<(ChunkId, Vec<u8>)> + Send + Sync>;

/// The store, as the node sees it.
pub struct StoreChunks {
    pub store: Arc<Store>,
    pub through: Option<Through>,
}

impl hb_p2p::LocalChunks for StoreChunks {
    fn fetch_through(&self, ids: &[ChunkId]) -> Vec<(ChunkId, Vec<u8>)> {
        self.through.as_ref().map(|f| f(ids)).unwrap_or_default()
    }

    fn chunk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        match self.store.read_chunk(id) {
            Ok(b) => Some(b),
            Err(hb_store::StoreError::MissingChunk(_)) => None,
            Err(e) => {
                tracing::warn!(chunk = %id, error = %e, "a chunk a peer asked for could not be read");
                None
            }
        }
    }

    fn held(&self) -> Vec<ChunkId> {
        let mut held = self.store.held_chunks().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "listing the store's chunks for peers failed");
            Vec::new()
        });
        match self.store.form_blobs() {
            Ok(forms) => held.extend(forms.iter().map(|(d, _)| hb_core::blob_key(d))),
            Err(e) => tracing::warn!(error = %e, "listing the store's layer-form blobs for peers failed"),
        }
        held
    }

    fn blob(&self, digest: &hb_core::Digest) -> Option<Vec<u8>> {
        self.store.form_blob(digest).unwrap_or_else(|e| {
            tracing::warn!(blob = %digest, error = %e, "a layer-form blob a peer asked for could not be read");
            None
        })
    }
}

/// The node's settings from `[p2p]`, or None when peers are off. The node's identity is kept
/// at `<root>/p2p/identity` (made on first use), so peers know it across restarts.
pub fn settings(g: &Global, root: &Path) -> anyhow::Result<Option<hb_p2p::Config>> {
    let file = hb_cli::file_config(g)?;
    let p = &file.p2p;
    if !p.enabled {
        return Ok(None);
    }
    let Some(psk_file) = &p.psk_file else {
        bail!("[p2p] enabled needs psk_file, the team's pre-shared key (make one with `hb peers keygen FILE`)")
    };
    let text =
        std::fs::read_to_string(psk_file).with_context(|| format!("[p2p] psk_file: reading {}", psk_file.display()))?;
    let psk = hb_p2p::parse_psk(&text).with_context(|| format!("[p2p] psk_file {}", psk_file.display()))?;
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(psk_file).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        tracing::warn!(file = %psk_file.display(), "the pre-shared key is readable by other users: chmod 600 it");
    }
    let listen = if p.listen.is_empty() { vec![DEFAULT_LISTEN.to_string()] } else { p.listen.clone() };
    let parse = |what: &str, list: &[String]| -> anyhow::Result<Vec<hb_p2p::Multiaddr>> {
        list.iter().map(|a| hb_p2p::parse_addr(a).with_context(|| format!("[p2p] {what}"))).collect()
    };
    Ok(Some(hb_p2p::Config {
        listen: parse("listen", &listen)?,
        psk,
        identity: identity(root)?,
        static_peers: parse("peers", &p.peers)?,
        mdns: p.mdns,
        serve_rate: p.serve_rate.as_deref().map(crate::parse_rate).transpose().context("[p2p] serve_rate")?,
        ban_for: Duration::from_secs(p.ban_seconds.unwrap_or(3600)),
        fault_corrupt_serving: std::env::var("HB_P2P_FAULT").is_ok_and(|v| v == "corrupt-serving"),
    }))
}

/// This host's node identity, made on first use (mode 0600).
fn identity(root: &Path) -> anyhow::Result<Vec<u8>> {
    let path = root.join("p2p").join("identity");
    if let Ok(b) = std::fs::read(&path) {
        hb_p2p::peer_id_of(&b).with_context(|| format!("{} (remove it to make a new identity)", path.display()))?;
        return Ok(b);
    }
    let key = hb_p2p::new_identity();
    std::fs::create_dir_all(path.parent().expect("a parent"))?;
    hb_cli::config::write_private(&path, &key)?;
    Ok(key)
}

/// `hb peers keygen FILE`: a new pre-shared key, for every member of the team's network.
pub fn keygen(file: &Path, force: bool, out: &Out) -> anyhow::Result<()> {
    if file.exists() && !force {
        bail!("{} exists; pass --force to replace it (every peer then needs the new key)", file.display());
    }
    let mut key = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key).context("reading /dev/urandom")?;
    hb_cli::config::write_private(file, hb_p2p::psk_file(key).as_bytes())?;
    out.note(format!(
        "wrote a pre-shared key to {} (mode 0600); copy it to each peer and set [p2p] psk_file",
        file.display()
    ));
    Ok(())
}

/// The daemon's node as a chunk tier, for a process reading the store the daemon owns.
pub struct DaemonPeers {
    client: crate::api::Client,
}

impl DaemonPeers {
    /// The tier, when a daemon serves this process's store and has peers on.
    pub fn find(g: &Global) -> Option<Arc<dyn ChunkSource>> {
        let client = crate::daemon_client(g)?;
        let health: crate::api::Health = client.call("GET", "/v1/health", None::<&()>).ok()?;
        health.peers.then(|| Arc::new(DaemonPeers { client }) as Arc<dyn ChunkSource>)
    }
}

impl ChunkSource for DaemonPeers {
    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(self.fetch_many(std::slice::from_ref(id))?.into_iter().find(|(i, _)| i == id).map(|(_, b)| b))
    }

    fn fetch_many(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, SourceError> {
        let unavailable =
            |e: anyhow::Error| SourceError::Unavailable { source_name: "peers".into(), reason: crate::error_chain(&e) };
        let mut out = Vec::new();
        // Bodies under the daemon's limit, answers too (it stops at the limit; the rest is asked again).
        let mut rest = ids;
        while !rest.is_empty() {
            let (now, later) = rest.split_at(rest.len().min(256));
            let body: Vec<u8> = now.iter().flat_map(|i| i.as_bytes().iter().copied()).collect();
            let b = self.client.call_raw("POST", "/v1/peers/chunks", &body).map_err(unavailable)?;
            out.extend(crate::api::decode_chunks(&b).map_err(unavailable)?);
            rest = later;
        }
        Ok(out)
    }
}

/// `hb peers`: the daemon's node, its peers and its counters.
pub fn show(report: &hb_p2p::NodeReport, out: &Out) {
    if out.json {
        println!("{}", serde_json::to_string(report).unwrap_or_default());
        return;
    }
    println!(
        "node {} ({}), listening on {}; holding {} chunks",
        report.peer_id,
        if report.enabled { "on" } else { "switched off" },
        if report.listening.is_empty() { "nothing".to_string() } else { report.listening.join(", ") },
        report.chunks_held
    );
    let s = &report.stats;
    println!(
        "received {} chunks and {} index blobs ({}), sent {} and {} ({}); {} hedges, {} timeouts, {} bans, {} corrupt chunks; lookup p99 {} us ({} us on CPU)",
        s.chunks_received,
        s.blobs_received,
        indicatif::HumanBytes(s.bytes_received),
        s.chunks_sent,
        s.blobs_sent,
        indicatif::HumanBytes(s.bytes_sent),
        s.hedges,
        s.timeouts,
        s.bans,
        s.corrupt_chunks,
        s.lookup_p99_us,
        s.lookup_cpu_p99_us
    );
    println!(
        "{:<54} {:<10} {:>10} {:>10} {:>10} {:>8}  ADDRESS / NOTE",
        "PEER", "STATE", "HOLDS", "RECEIVED", "SENT", "RTT"
    );
    for p in &report.peers {
        let state = match (p.banned_for_seconds, p.set_aside_for_seconds, p.connected) {
            (Some(_), _, _) => "banned",
            (_, Some(_), _) => "set aside",
            (_, _, true) => "connected",
            _ => "gone",
        };
        let note = match (&p.ban_reason, p.banned_for_seconds) {
            (Some(r), Some(s)) => format!("{r} ({s}s left)"),
            _ => p.addresses.first().cloned().unwrap_or_default(),
        };
        println!(
            "{:<54} {:<10} {:>10} {:>10} {:>10} {:>8}  {}",
            p.id,
            state,
            p.chunks_held_estimate.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            indicatif::HumanBytes(p.bytes_received).to_string(),
            indicatif::HumanBytes(p.bytes_sent).to_string(),
            p.rtt_ms.map(|r| format!("{r:.1}ms")).unwrap_or_else(|| "-".into()),
            note
        );
    }
}
