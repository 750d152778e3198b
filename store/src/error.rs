use std::io;
use std::path::PathBuf;

use hb_core::{BuildError, ChunkId, Digest, IndexError};

/// Everything the store can fail with. Messages name the store path, layer, entry or chunk.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}{}", full_hint(source))]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("metadata database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("store {0} is in use by another hb process (an `hb mount` holds its store until `hb umount`)")]
    Locked(PathBuf),
    #[error("store {0} is open read-only (another hb process holds it); this needs write access")]
    ReadOnly(PathBuf),
    #[error("store {root} cannot be opened for writing: its filesystem has {free} bytes free (the store's metadata needs room to open); free space (e.g. remove other files, or `hb rmi` and `hb gc` once there is a little room) and try again")]
    Full { root: PathBuf, free: u64 },
    #[error("no store at {0}")]
    NoStore(PathBuf),
    #[error("store {root} was created with chunker {stored}, which this build cannot use: {why}")]
    Incompatible { root: PathBuf, stored: String, why: String },
    #[error("bad layer: {0}")]
    Entry(#[from] BuildError),
    #[error("bad layer: entry {path:?}: {reason}")]
    BadEntry { path: String, reason: String },
    #[error("bad layer: {0}")]
    BadStream(String),
    #[error("bad layer: uncompressed size exceeds the limit of {limit} bytes (decompression bomb?); raise [store] max_layer_bytes if the layer is genuine")]
    TooLarge { limit: u64 },
    #[error("bad layer: expands more than {limit}:1 ({uncompressed} bytes from {compressed}) (decompression bomb?); raise [store] max_ratio if the layer is genuine")]
    RatioExceeded { limit: u64, uncompressed: u64, compressed: u64 },
    #[error("blob digest mismatch: expected {expected}, got {actual}; nothing was stored")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("chunk {id} is corrupt: {reason}")]
    CorruptChunk { id: ChunkId, reason: String },
    #[error("chunk {0} is not in the store")]
    MissingChunk(ChunkId),
    #[error("no layer matches {0:?}")]
    UnknownLayer(String),
    #[error("{query:?} matches more than one layer: {candidates}")]
    AmbiguousLayer { query: String, candidates: String },
    #[error("layer {diff_id}: {source}")]
    Index {
        diff_id: Digest,
        #[source]
        source: IndexError,
    },
    #[error("store metadata is corrupt: {0}")]
    CorruptMeta(String),
    #[error("export target {0} exists and is not an empty directory")]
    TargetNotEmpty(PathBuf),
}

/// What to do about a full filesystem, after the error that said so.
fn full_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(28) => " (the filesystem holding the store is full; nothing was committed: free space, e.g. `hb rmi` and `hb gc`, or move the store with --root, and try again)",
        Some(122) => " (disk quota exceeded; nothing was committed)",
        _ => "",
    }
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
