//! The mirror's configuration and the store it keeps objects in.

use super::*;

/// Where a mirror keeps what it serves; every method may block (the mirror calls them off the
/// async threads). Objects are named by the SHA-256 of their bytes.
pub trait MirrorStore: Send + Sync + 'static {
    /// The chunks of a stored object, in order.
    fn lookup(&self, digest: &Digest) -> io::Result<Option<Vec<ChunkRef>>>;
    /// One chunk's bytes, verified against its id.
    fn chunk(&self, id: &ChunkId) -> io::Result<Vec<u8>>;
    /// Stores `input` as object `digest`, checking the digest before it becomes visible.
    fn insert(&self, digest: &Digest, input: &mut dyn Read) -> io::Result<()>;
    fn remove(&self, digest: &Digest) -> io::Result<()>;
    /// Every stored object and its size.
    fn objects(&self) -> io::Result<Vec<(Digest, u64)>>;
    /// Frees the space of removed objects.
    fn reclaim(&self) -> io::Result<()>;
    /// Makes kept layer blob `blob` (whose config names `diff_id`) an hb layer: imports it (kept
    /// until [`MirrorStore::release_layer`]), keeps its index and chunk table as objects, and
    /// describes its accelerated form; the data blob is served with [`MirrorStore::stored_chunk`].
    fn accelerate(&self, blob: &Digest, diff_id: &Digest) -> io::Result<hb_core::lazy::AccelLayer>;
    /// A chunk's stored bytes (a zstd frame or raw, as the table says), checked against its id.
    fn stored_chunk(&self, id: &ChunkId) -> io::Result<Vec<u8>>;
    fn release_layer(&self, diff_id: &Digest) -> io::Result<()>;
    fn meta(&self, key: &str) -> io::Result<Option<Vec<u8>>>;
    fn put_meta(&self, key: &str, value: &[u8]) -> io::Result<()>;
}

/// One upstream registry.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The registry's name as clients write it (`docker.io`, `127.0.0.1:5000`, `ghcr.io`).
    pub host: String,
    /// A name for path-style addressing (`mirror:5000/<alias>/repo`), for hosts with a port.
    pub alias: Option<String>,
    /// Its base URL (`https://registry-1.docker.io`).
    pub url: String,
    pub credentials: Option<(String, String)>,
    pub ca_pem: Vec<Vec<u8>>,
    pub skip_verify: bool,
    /// How long a tag's answer is served before it is revalidated, by `repo:tag` glob (`*`),
    /// first match wins; `default_tag_ttl` otherwise.
    pub tag_ttls: Vec<(String, Duration)>,
    pub default_tag_ttl: Duration,
}

impl UpstreamConfig {
    pub fn tag_ttl(&self, repo: &str, tag: &str) -> Duration {
        let name = format!("{repo}:{tag}");
        self.tag_ttls.iter().find(|(p, _)| glob(p, &name)).map(|(_, t)| *t).unwrap_or(self.default_tag_ttl)
    }
}

/// `*` matches any run of characters; everything else itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(s) = s.strip_prefix(head) else { return false };
            (0..=s.len()).filter(|&i| s.is_char_boundary(i)).any(|i| glob(rest, &s[i..]))
        }
    }
}

#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub upstreams: Vec<UpstreamConfig>,
    /// The upstream for names without a registry (Docker's `registry-mirrors`).
    pub default_upstream: Option<usize>,
    /// Size cap of the kept objects (sum of their sizes): above it, least recently used ones go
    /// until the total is under 90 % of it.
    pub max_bytes: Option<u64>,
    /// Where downloads in progress are spooled.
    pub spool_dir: PathBuf,
    /// Decoded chunks kept in memory for hot blobs.
    pub cache_bytes: usize,
    /// How long an upstream's answer to "may this client read this repository" is remembered.
    pub auth_ttl: Duration,
    /// Tries per upstream blob download (resuming with Range).
    pub attempts: u32,
    /// When not empty, clients must authenticate to the mirror itself (Basic, name and
    /// password); their credentials are then the mirror's, not passed upstream.
    pub users: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror configuration: {0}")]
    Config(String),
    #[error("upstream {host}: {reason}")]
    Upstream { host: String, reason: String },
    #[error("store: {0}")]
    Store(#[from] io::Error),
}
