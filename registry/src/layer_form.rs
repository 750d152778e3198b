//! How an accelerated layer's index and chunk table travel in a registry (`docs/formats/
//! lazy-image.md`): the index as one zstd frame of its encoding, the table in its compact form
//! (lengths only; ids and raw lengths are the index's). A cold start fetches both before its
//! first read, so their bytes are on its path: on a Debian layer of 7,000 chunks the pair went
//! from 768 KB (bare index + 41-byte table entries) to 364 KB (`hb convert` of bench/py-app).
//!
//! Readers also take what older builds wrote: a bare index and a self-contained table.

use hb_core::{ChunkTable, IndexError, LayerIndex, LazyFormatError};

/// zstd level for index blobs: ~3x faster than 19 for 3 % more bytes (a mirror makes them on a
/// client's first request).
const INDEX_LEVEL: i32 = 9;
/// A zstd frame's first four bytes.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest expansion an index blob may claim: its chunk ids and directory hashes do not compress,
/// so real indexes shrink 1.2-2x; more than this is a bomb, not an index.
const MAX_EXPANSION: u64 = 32;

/// Why an accelerated layer's index or table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LayerFormError {
    #[error("layer index: {0}")]
    Index(#[from] IndexError),
    #[error("{0}")]
    Table(#[from] LazyFormatError),
    #[error("layer index: not a zstd frame: {0}")]
    Zstd(String),
    #[error("layer index: its zstd frame of {compressed} bytes expands beyond {limit} bytes")]
    TooLarge { compressed: u64, limit: u64 },
    #[error("the chunk table was made for a different layer ({0})")]
    Mismatch(String),
}

/// The index and table blobs of one layer, as `hb convert` and `hb proxy` publish them. The table
/// must be in the index's chunk order (the store's `layer_data` makes it so).
pub fn encode_layer_form(index: &LayerIndex, table: &ChunkTable) -> Result<(Vec<u8>, Vec<u8>), LayerFormError> {
    let table_blob = table.encode_compact(index)?;
    let index_blob =
        zstd::bulk::compress(&index.encode(), INDEX_LEVEL).map_err(|e| LayerFormError::Zstd(e.to_string()))?;
    Ok((index_blob, table_blob))
}

/// Reads an index blob: a zstd frame of an index (bounded), or a bare one (older builds).
pub fn decode_index_blob(blob: &[u8]) -> Result<LayerIndex, LayerFormError> {
    if !blob.starts_with(&ZSTD_MAGIC) {
        return Ok(LayerIndex::decode(blob)?);
    }
    use std::io::Read;
    let compressed = blob.len() as u64;
    let limit = (compressed * MAX_EXPANSION).clamp(1 << 20, crate::MAX_META_BLOB);
    let mut raw = Vec::new();
    let mut decoder = zstd::stream::read::Decoder::new(blob).map_err(|e| LayerFormError::Zstd(e.to_string()))?;
    // The writer's frames use at most a 4 MiB window: a frame asking for more than 16 MiB is not
    // ours, and would make the decoder allocate it.
    decoder.window_log_max(24).map_err(|e| LayerFormError::Zstd(e.to_string()))?;
    decoder.take(limit + 1).read_to_end(&mut raw).map_err(|e| LayerFormError::Zstd(e.to_string()))?;
    if raw.len() as u64 > limit {
        return Err(LayerFormError::TooLarge { compressed, limit });
    }
    Ok(LayerIndex::decode(&raw)?)
}

/// Reads a layer's index and table blobs, checked to describe the same chunks.
pub fn decode_layer_form(index_blob: &[u8], table_blob: &[u8]) -> Result<(LayerIndex, ChunkTable), LayerFormError> {
    let index = decode_index_blob(index_blob)?;
    let table = ChunkTable::decode_for(table_blob, &index)?;
    table.check_covers(&index).map_err(|e| LayerFormError::Mismatch(e.to_string()))?;
    Ok((index, table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hb_core::{ChunkId, ChunkRef, Digest, Meta, NewEntry, TreeBuilder};

    fn layer(files: usize) -> (LayerIndex, ChunkTable) {
        let mut b = TreeBuilder::new(hb_core::ChunkerParams::default());
        let mut table = ChunkTable::default();
        let mut chunks_of = Vec::new();
        for i in 0..files {
            let id = ChunkId::of(format!("chunk {i}").as_bytes());
            chunks_of.push(vec![ChunkRef { id, len: 1000 + i as u32 }]);
        }
        for (i, chunks) in chunks_of.into_iter().enumerate() {
            let name = format!("usr/lib/python3/dist-packages/module_{i:05}.py");
            b.add(name.as_bytes(), Meta { mode: 0o644, ..Meta::default() }, NewEntry::File { chunks }).unwrap();
        }
        let index = b.finish(Digest([3; 32]));
        for c in &index.chunks {
            table.push(c.id, c.len / 3, c.len, true);
        }
        (index, table)
    }

    #[test]
    fn a_layer_form_reads_back_smaller_than_the_bare_encodings() {
        let (index, table) = layer(2000);
        let (ib, tb) = encode_layer_form(&index, &table).unwrap();
        let bare = index.encode().len() + table.encode().len();
        assert!(ib.len() + tb.len() < bare * 2 / 3, "{} + {} vs {bare}", ib.len(), tb.len());
        let (i2, t2) = decode_layer_form(&ib, &tb).unwrap();
        assert_eq!((i2, t2), (index.clone(), table.clone()));
        // What older builds wrote still reads.
        let (i3, t3) = decode_layer_form(&index.encode(), &table.encode()).unwrap();
        assert_eq!((i3, t3), (index, table));
    }

    #[test]
    fn a_bad_index_blob_is_refused_naming_why() {
        let (index, table) = layer(10);
        let (ib, tb) = encode_layer_form(&index, &table).unwrap();
        // A zstd bomb: a frame that expands far beyond what an index of its size can be.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        let e = decode_index_blob(&bomb).unwrap_err().to_string();
        assert!(e.contains("expands beyond"), "{e}");
        // A truncated frame.
        let e = decode_index_blob(&ib[..ib.len() / 2]).unwrap_err().to_string();
        assert!(e.starts_with("layer index:"), "{e}");
        // A frame of something that is not an index.
        let e = decode_index_blob(&zstd::bulk::compress(b"hello", 3).unwrap()).unwrap_err().to_string();
        assert!(e.contains("layer index"), "{e}");
        // The table of another layer.
        let (other, other_table) = layer(11);
        let (_, other_tb) = encode_layer_form(&other, &other_table).unwrap();
        assert!(decode_layer_form(&ib, &other_tb).is_err());
        // A self-contained table that lacks one of the index's chunks.
        let mut short = table.clone();
        short.entries.pop();
        let e = decode_layer_form(&ib, &short.encode()).unwrap_err().to_string();
        assert!(e.contains("different layer"), "{e}");
        assert!(decode_layer_form(&ib, &tb).is_ok());
    }
}
