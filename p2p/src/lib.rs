//! LAN peers: a team-wide chunk cache over libp2p. One node per host runs in the daemon; mounts,
//! pulls and the snapshotter's lazy layers reach it as the `peers` tier of their source chain
//! (store -> peers -> mirrors -> registry).
//!
//! Trust model: the members of one pre-shared-key network trust each other with content (a
//! member serves any chunk it holds to any other member; a node without the key cannot connect),
//! never with correctness (every chunk is hashed against its id before use; one wrong chunk bans
//! the peer that sent it).

mod codec;
mod fetch;
mod node;
mod state;
mod summary;
mod swarm;

use std::time::Duration;

pub use codec::{Request, Response, SummaryBody, PROTOCOL};
pub use libp2p::{Multiaddr, PeerId};
pub use state::Node;

/// The store, as a node sees it.
pub trait LocalChunks: Send + Sync + 'static {
    /// The chunk's bytes when the store holds it (verified on read), else None.
    fn chunk(&self, id: &hb_core::ChunkId) -> Option<Vec<u8>>;
    /// Every chunk id the store holds (for the node's summary; called at start and now and then).
    fn held(&self) -> Vec<hb_core::ChunkId>;

    /// Layer-form blob `digest` (an accelerated form's index or chunk table, listed in [`held`]
    /// under [`hb_core::blob_key`]) when the store keeps it for a layer it holds, else None.
    ///
    /// [`held`]: LocalChunks::held
    fn blob(&self, digest: &hb_core::Digest) -> Option<Vec<u8>> {
        let _ = digest;
        None
    }

    /// Fetches what it can of `ids` (chunks the store lacks) from this host's own sources (the registries of the images
    /// it is reading), keeps it, and returns it, each chunk verified. Called when this host owns
    /// chunks nobody holds yet (see docs/p2p.md): the team fetches each such chunk once. A host
    /// that does not know a chunk returns without it.
    fn fetch_through(&self, ids: &[hb_core::ChunkId]) -> Vec<(hb_core::ChunkId, Vec<u8>)> {
        let _ = ids;
        Vec::new()
    }
}

/// A node's settings (the engine reads them from `[p2p]`).
#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/7946`).
    pub listen: Vec<Multiaddr>,
    /// The network's pre-shared key: only nodes with it connect.
    pub psk: [u8; 32],
    /// This node's identity (a libp2p keypair, protobuf encoding): [`new_identity`].
    pub identity: Vec<u8>,
    /// Peers dialled at start and redialled when the connection drops.
    pub static_peers: Vec<Multiaddr>,
    /// Discover peers by mDNS on the host's interfaces.
    pub mdns: bool,
    /// Bandwidth cap for serving peers, bytes per second.
    pub serve_rate: Option<u64>,
    /// How long a peer that sent a wrong chunk is refused.
    pub ban_for: Duration,
    /// Fault injection for tests: flip a byte of every chunk served (a malicious peer).
    pub fault_corrupt_serving: bool,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("the p2p identity is unusable: {0}")]
    Identity(String),
    #[error("the pre-shared key is unusable: {0} (expected a go-libp2p swarm.key: `/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits)")]
    Psk(String),
    #[error("p2p address {0:?} is not a multiaddr or host:port: {1}")]
    Address(String, String),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, String),
    #[error("the p2p node did not start: {0}")]
    Start(String),
}

/// A new identity for [`Config::identity`].
pub fn new_identity() -> Vec<u8> {
    libp2p::identity::Keypair::generate_ed25519().to_protobuf_encoding().expect("ed25519 keys encode")
}

/// The peer id of an identity.
pub fn peer_id_of(identity: &[u8]) -> Result<PeerId, P2pError> {
    libp2p::identity::Keypair::from_protobuf_encoding(identity)
        .map(|k| k.public().to_peer_id())
        .map_err(|e| P2pError::Identity(e.to_string()))
}

/// Reads a pre-shared key file's text (go-libp2p's `swarm.key` format, as IPFS uses).
pub fn parse_psk(text: &str) -> Result<[u8; 32], P2pError> {
    let key: libp2p::pnet::PreSharedKey =
        text.parse().map_err(|e: libp2p::pnet::KeyParseError| P2pError::Psk(e.to_string()))?;
    // The key's bytes are not exposed; its text form is 64 hex digits on the third line.
    let hex = key.to_string().lines().nth(2).unwrap_or_default().to_string();
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).map_err(|e| P2pError::Psk(e.to_string()))?;
    Ok(out)
}

/// The text of a key file for `key` (write it with mode 0600 and share it with the team).
pub fn psk_file(key: [u8; 32]) -> String {
    libp2p::pnet::PreSharedKey::new(key).to_string()
}

/// An address as written in the config: a multiaddr, or `host:port` (IPv4/IPv6 literal).
pub fn parse_addr(s: &str) -> Result<Multiaddr, P2pError> {
    if s.starts_with('/') {
        return s.parse().map_err(|e: libp2p::multiaddr::Error| P2pError::Address(s.into(), e.to_string()));
    }
    let sa: std::net::SocketAddr =
        s.parse().map_err(|e: std::net::AddrParseError| P2pError::Address(s.into(), e.to_string()))?;
    let ip = match sa.ip() {
        std::net::IpAddr::V4(ip) => format!("/ip4/{ip}"),
        std::net::IpAddr::V6(ip) => format!("/ip6/{ip}"),
    };
    format!("{ip}/tcp/{}", sa.port())
        .parse()
        .map_err(|e: libp2p::multiaddr::Error| P2pError::Address(s.into(), e.to_string()))
}

/// One peer, as `hb peers` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerInfo {
    pub id: String,
    pub addresses: Vec<String>,
    pub connected: bool,
    pub agent: Option<String>,
    /// About how many chunks its summary says it holds.
    pub chunks_held_estimate: Option<u64>,
    pub summary_generation: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub chunks_received: u64,
    pub chunks_sent: u64,
    pub banned_for_seconds: Option<u64>,
    pub ban_reason: Option<String>,
    /// Set aside after it did not answer (not banned: tried again after this).
    pub set_aside_for_seconds: Option<u64>,
}

/// Counters of a node since it started.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeStats {
    /// Chunk ids looked up in peers' summaries, and those some peer seemed to hold.
    pub lookups: u64,
    pub lookups_with_holder: u64,
    pub chunks_asked: u64,
    pub chunks_received: u64,
    pub bytes_received: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    /// Layer-form blobs (accelerated forms' indexes and chunk tables) received from peers and
    /// sent to them; their bytes count in `bytes_received` and `bytes_sent`.
    #[serde(default)]
    pub blobs_received: u64,
    #[serde(default)]
    pub blobs_sent: u64,
    pub hedges: u64,
    /// Chunks nobody held that this node fetched from its own sources as their owner (for
    /// itself or for a peer).
    #[serde(default)]
    pub fetched_through: u64,
    pub bans: u64,
    pub corrupt_chunks: u64,
    pub timeouts: u64,
    /// Time to decide whom to ask (summaries only, no network), over the last 2048 fetches.
    pub lookup_p99_us: u64,
    pub lookup_max_us: u64,
    /// The same lookups' time on their thread's CPU: the wall time less waits (for the peers'
    /// table) and time descheduled.
    #[serde(default)]
    pub lookup_cpu_p99_us: u64,
}

/// A node's state, as `hb peers` (and `GET /v1/peers`) shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeReport {
    pub peer_id: String,
    pub enabled: bool,
    pub listening: Vec<String>,
    pub chunks_held: u64,
    pub summary_generation: u64,
    pub peers: Vec<PeerInfo>,
    pub stats: NodeStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_parse_or_say_what_is_wrong() {
        assert_eq!(parse_addr("10.0.0.5:7946").unwrap().to_string(), "/ip4/10.0.0.5/tcp/7946");
        assert_eq!(parse_addr("[::1]:7946").unwrap().to_string(), "/ip6/::1/tcp/7946");
        assert_eq!(parse_addr("/ip4/1.2.3.4/tcp/1").unwrap().to_string(), "/ip4/1.2.3.4/tcp/1");
        assert!(parse_addr("peer.example:7946").unwrap_err().to_string().contains("peer.example:7946"));
        let key = [7u8; 32];
        assert_eq!(parse_psk(&psk_file(key)).unwrap(), key);
        assert!(parse_psk("hello").unwrap_err().to_string().contains("swarm.key"));
        let id = new_identity();
        assert!(peer_id_of(&id).is_ok());
        assert!(peer_id_of(b"junk").is_err());
    }
}
