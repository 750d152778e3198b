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

    /// Fetches several chunks at once, as the source sees fit (a remote source coalesces
    /// neighbours into one request). Returns the chunks it has, each verified; may return chunks
    /// it was not asked for when they came for free. The default asks one by one.
    fn fetch_many(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, SourceError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(b) = self.fetch(id)? {
                out.push((*id, b));
            }
        }
        Ok(out)
    }
}
