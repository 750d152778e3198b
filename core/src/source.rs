//! Where chunk bytes come from.

use crate::digest::ChunkId;

/// Why a source could not answer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source could not be asked (I/O failure, unreachable peer, ...).
    #[error("chunk source {source_name} is unavailable: {reason}")]
    Unavailable { source_name: String, reason: String },
    /// The source answered with bytes that are not the chunk asked for.
    #[error("chunk {id} from {source_name} is corrupt: {reason}")]
    Corrupt { id: ChunkId, source_name: String, reason: String },
}

/// A place chunk bytes can be read from by id: the local store, a peer, a proxy, a registry.
///
/// Contract: `Ok(Some(bytes))` only with bytes whose BLAKE3 is `id`; `Ok(None)` is a clean miss
/// (ask the next source); an error says why the source failed.
pub trait ChunkSource: Send + Sync {
    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, SourceError>;
}
