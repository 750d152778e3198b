//! Images, end to end: pulls (whole and lazy), `hb convert` and `hb optimize`, image mounts and
//! the process that serves one, the mirror's store, and the one place where a mount's chunk
//! sources are put in order ([`sources::sources`]: the daemon, hosts.toml mirrors, registries).
//!
//! The binary brings what this crate must not know: where settings come from ([`Registries`]:
//! hosts.toml, credentials), how people see progress ([`Reporter`]), and the daemon client (a
//! [`hb_core::ChunkSource`]). Errors are typed ([`ImagesError`]); nothing here prints.

pub mod convert;
pub mod delta;
pub mod guess;
pub mod memory;
pub mod mirror_store;
pub mod mount;
pub mod pull;
pub mod shutdown;
pub mod sources;

use hb_core::{Digest, LayerIndex};
use hb_registry::{ImageRef, Platform, RegistryOptions};
use hb_store::{ImageRecord, Store};

pub use sources::Endpoint;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error(transparent)]
    Store(#[from] hb_store::StoreError),
    #[error(transparent)]
    Registry(#[from] hb_registry::RegistryError),
    #[error(transparent)]
    Mount(#[from] hb_fuse::MountError),
    #[error("no image {0:?} in the store (see `hb images`; `hb pull {0}` fetches it)")]
    NoSuchImage(String),
    /// The image, its accelerated form or the request does not hold together.
    #[error("{0}")]
    Invalid(String),
    /// A setting (hosts.toml, credentials) could not be read.
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// What was being done when `source` happened.
    #[error("{what}: {source}")]
    In {
        what: String,
        #[source]
        source: Box<ImagesError>,
    },
}

impl From<hb_core::LazyFormatError> for ImagesError {
    fn from(e: hb_core::LazyFormatError) -> Self {
        ImagesError::Invalid(e.to_string())
    }
}

impl From<hb_core::IndexError> for ImagesError {
    fn from(e: hb_core::IndexError) -> Self {
        ImagesError::Invalid(e.to_string())
    }
}

impl ImagesError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImagesError {
        let what = what.into();
        move |source| ImagesError::Io { what, source }
    }
}

/// Says what was being done when an error happened (`anyhow`'s `context`, typed).
pub trait Within<T> {
    fn within(self, what: impl FnOnce() -> String) -> Result<T, ImagesError>;
}

impl<T, E: Into<ImagesError>> Within<T> for Result<T, E> {
    fn within(self, what: impl FnOnce() -> String) -> Result<T, ImagesError> {
        self.map_err(|e| ImagesError::In { what: what(), source: Box::new(e.into()) })
    }
}

pub type Result<T, E = ImagesError> = std::result::Result<T, E>;

/// Where registries are reached: the binary reads hosts.toml and credentials.
pub trait Registries: Send + Sync {
    /// How to reach `r`'s registry itself.
    fn options(
        &self,
        r: &ImageRef,
        plain_http: bool,
        credentials: Option<(String, String)>,
        platform: Platform,
    ) -> Result<RegistryOptions>;

    /// Where `r` is read from, in order: its mirrors, then its registry.
    fn endpoints(
        &self,
        r: &ImageRef,
        plain_http: bool,
        credentials: Option<(String, String)>,
        platform: Platform,
    ) -> Result<Vec<Endpoint>>;

    /// Stored credentials for `registry` (docker's config.json), if any.
    fn credentials(&self, registry: &str) -> Result<Option<(String, String)>>;

    /// LAN peers as a chunk tier (below the daemon, above mirrors), when they are on.
    fn peers(&self) -> Option<std::sync::Arc<dyn hb_core::ChunkSource>> {
        None
    }

    /// LAN peers as a tier for accelerated forms' index and table blobs (before the registry),
    /// when this process runs the node.
    fn blob_peers(&self) -> Option<std::sync::Arc<dyn hb_core::BlobSource>> {
        None
    }

    /// Some LAN peer is connected now (pulls then prefer chunks: `delta::PEER_SHARE`).
    fn peers_connected(&self) -> bool {
        false
    }
}

/// How long work is shown to people (the binary draws bars; a daemon has no one to show).
pub trait Reporter: Send + Sync {
    /// One line for people.
    fn note(&self, line: &str);
    /// Progress of `size` bytes named `label` (a layer download); finished when dropped.
    fn transfer(&self, label: &str, size: u64) -> Box<dyn hb_store::Progress + Send + Sync>;
}

/// Shows nothing.
pub struct Silent;

impl Reporter for Silent {
    fn note(&self, _: &str) {}
    fn transfer(&self, _: &str, _: u64) -> Box<dyn hb_store::Progress + Send + Sync> {
        Box::new(hb_store::NoProgress)
    }
}

/// The store's name for an image: the canonical reference.
pub fn image_name(r: &ImageRef) -> String {
    r.canonical()
}

/// An image in the store by name (normalised as docker does) or manifest digest (prefix).
pub fn find_image(store: &Store, q: &str) -> Result<Option<(String, Digest)>> {
    if let Ok(r) = ImageRef::parse(q) {
        let name = image_name(&r);
        if let Some(d) = store.image_by_name(&name)? {
            return Ok(Some((name, d)));
        }
    }
    let hex = q.strip_prefix("sha256:").unwrap_or(q);
    if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let found: Vec<_> = store.image_names()?.into_iter().filter(|n| n.digest.hex().starts_with(hex)).collect();
        if let Some(n) = found.first() {
            return Ok(Some((n.name.clone(), n.digest)));
        }
    }
    Ok(None)
}

/// [`find_image`], and the image's record; an error when there is none.
/// Removes the name `q` resolves to (`hb rmi`); the line that tells people so, with what `hb gc`
/// will then free (the bytes no other named image uses).
pub fn untag(store: &Store, q: &str) -> Result<String> {
    let (name, digest, _) = require_image(store, q)?;
    let unique = store.image_sizes()?.into_iter().find(|s| s.name == name).map_or(0, |s| s.unique_bytes);
    store.remove_image_name(&name)?;
    let still_named = store.image_names()?.iter().any(|n| n.digest == digest);
    Ok(if still_named {
        format!("untagged {name} ({}); its data stays: other names point at it", digest.short())
    } else {
        format!(
            "untagged {name} ({}); `hb gc` frees up to {} that no other image uses",
            digest.short(),
            indicatif::HumanBytes(unique)
        )
    })
}

pub fn require_image(store: &Store, q: &str) -> Result<(String, Digest, ImageRecord)> {
    let Some((name, d)) = find_image(store, q)? else {
        return Err(ImagesError::NoSuchImage(q.to_string()));
    };
    let rec = store.image(&d)?.ok_or_else(|| ImagesError::Invalid(format!("image {d} named {name} is missing")))?;
    Ok((name, d, rec))
}

/// The stored index of each of `layers`.
pub fn layer_indexes(store: &Store, layers: &[Digest]) -> Result<Vec<LayerIndex>> {
    let read = |d: &Digest| store.layer(d)?.ok_or_else(|| ImagesError::Invalid(format!("layer {d} is missing")));
    if layers.len() < 2 {
        return layers.iter().map(read).collect();
    }
    // Each decode checks a checksum and the whole structure (~4 ms for a large layer), on the path
    // of every mount's start: side by side, a share of the layers for each core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = layers.len().div_ceil(cores);
    std::thread::scope(|s| {
        let handles: Vec<_> =
            layers.chunks(per).map(|part| s.spawn(move || part.iter().map(read).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().expect("reading an index does not panic")).collect()
    })
}

/// The tree `q` names: an image's merged rootfs, or one layer.
pub fn tree_of(store: &Store, q: &str) -> Result<(String, LayerIndex)> {
    if let Some((name, digest)) = find_image(store, q)? {
        let rec = store
            .image(&digest)?
            .ok_or_else(|| ImagesError::Invalid(format!("image {digest} named {name} is missing")))?;
        let diff_ids: Vec<Digest> = rec.layers.iter().map(|l| l.diff_id).collect();
        let layers = layer_indexes(store, &diff_ids)?;
        return Ok((name, hb_core::merge_layers(store.chunker(), layers.iter())));
    }
    let d = store.resolve_layer(q)?;
    let index = store.layer(&d)?.ok_or_else(|| ImagesError::Invalid(format!("layer {d} vanished")))?;
    Ok((d.to_string(), index))
}
