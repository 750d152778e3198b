//! Records kept in the metadata database (RocksDB) and their byte encodings.
//!
//! Column families (documented in docs/formats/store.md):
//! - `default`: `config` (JSON store config), `pack/<u32 BE>` -> [`PackRecord`], `lazy/<diff_id>`
//!   -> encoded [`hb_core::LazySource`] of a layer whose chunks are fetched on demand,
//!   `formkey/<sha256>` -> diff_id and `formblob/<sha256>` -> bytes of a kept layer-form blob
//! - `chunks`: chunk id (32 bytes) -> [`ChunkRecord`]
//! - `layers`: diff_id (32 bytes) -> encoded layer index
//! - `blobs`: blob digest (32 bytes) -> [`BlobRecord`]
//! - `images`: manifest digest (32 bytes) -> [`ImageRecord`] (JSON)
//! - `refs`: UTF-8 name -> target digest (32 bytes); `layer/<digest>` pins an imported layer (the
//!   target is its diff_id), `image/<name>` names an image (the target is its manifest digest)

use hb_core::{ChunkId, ChunkerParams, Digest};

use crate::error::{Result, StoreError};
use crate::pack::{Compression, Location};

pub const CF_CHUNKS: &str = "chunks";
pub const CF_LAYERS: &str = "layers";
pub const CF_BLOBS: &str = "blobs";
pub const CF_REFS: &str = "refs";
pub const CF_IMAGES: &str = "images";
pub const COLUMN_FAMILIES: [&str; 5] = [CF_CHUNKS, CF_LAYERS, CF_BLOBS, CF_REFS, CF_IMAGES];
pub const KEY_CONFIG: &[u8] = b"config";

/// Version of the store layout; bumped when records change incompatibly.
pub const STORE_FORMAT: u32 = 1;

/// `items` in the order of their chunk ids. A batch puts its chunk records in this order:
/// RocksDB's memtable (a skip list) inserts a sorted run from where the previous insert ended
/// instead of searching from its head, on the write and again in every read-only view that
/// replays the log (a mount server's start: py-app's lazy pull replayed in ~15 ms, not ~20).
pub(crate) fn in_id_order<T>(items: impl IntoIterator<Item = T>, id: impl Fn(&T) -> ChunkId) -> Vec<T> {
    let mut v: Vec<T> = items.into_iter().collect();
    v.sort_unstable_by_key(|t| id(t));
    v
}

fn corrupt(what: &str) -> StoreError {
    StoreError::CorruptMeta(what.to_string())
}

/// What the store was created with. Kept forever: the chunker must never change under a store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreConfigRecord {
    pub format: u32,
    pub chunker_algorithm: String,
    pub chunk_min: u32,
    pub chunk_avg: u32,
    pub chunk_max: u32,
    /// Seed of the Bloom filter's hash functions (hex), fixed per store.
    pub bloom_seed: String,
}

impl StoreConfigRecord {
    pub fn chunker(&self) -> ChunkerParams {
        ChunkerParams {
            algorithm: hb_core::ChunkAlgorithm::FastCdc2020,
            min_size: self.chunk_min,
            avg_size: self.chunk_avg,
            max_size: self.chunk_max,
        }
    }
}

/// Where a chunk is and how many layers use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    pub loc: Location,
    /// Number of layer indexes that reference the chunk (each counts once).
    pub refcount: u32,
}

pub const CHUNK_RECORD_LEN: usize = 4 + 8 + 4 + 4 + 1 + 4;

impl ChunkRecord {
    pub fn encode(&self) -> [u8; CHUNK_RECORD_LEN] {
        let mut b = [0u8; CHUNK_RECORD_LEN];
        b[0..4].copy_from_slice(&self.loc.pack.to_le_bytes());
        b[4..12].copy_from_slice(&self.loc.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.loc.raw_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.loc.stored_len.to_le_bytes());
        b[20] = self.loc.compression as u8;
        b[21..25].copy_from_slice(&self.refcount.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != CHUNK_RECORD_LEN {
            return Err(corrupt("chunk record has the wrong length"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Ok(ChunkRecord {
            loc: Location {
                pack: u32_at(0),
                offset: u64::from_le_bytes(b[4..12].try_into().expect("8 bytes")),
                raw_len: u32_at(12),
                stored_len: u32_at(16),
                compression: Compression::from_u8(b[20]).ok_or_else(|| corrupt("unknown chunk compression"))?,
            },
            refcount: u32_at(21),
        })
    }
}

/// Bookkeeping of one pack file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PackRecord {
    /// Bytes of the file that committed records cover; anything after is an aborted write.
    pub committed_len: u64,
    /// Bytes of records still referenced by a chunk record.
    pub live_bytes: u64,
    pub live_chunks: u64,
}

impl PackRecord {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.committed_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.live_bytes.to_le_bytes());
        b[16..24].copy_from_slice(&self.live_chunks.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 24 {
            return Err(corrupt("pack record has the wrong length"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(PackRecord { committed_len: u64_at(0), live_bytes: u64_at(8), live_chunks: u64_at(16) })
    }
}

pub fn pack_key(id: u32) -> Vec<u8> {
    let mut k = b"pack/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn parse_pack_key(k: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(k.strip_prefix(b"pack/")?.try_into().ok()?))
}

/// How a layer blob was compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobCompression {
    None = 0,
    Gzip = 1,
    Zstd = 2,
}

impl BlobCompression {
    pub fn label(self) -> &'static str {
        match self {
            BlobCompression::None => "tar",
            BlobCompression::Gzip => "tar+gzip",
            BlobCompression::Zstd => "tar+zstd",
        }
    }
}

/// A layer blob as it came in: which layer it decompresses to, how, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    pub diff_id: Digest,
    pub compression: BlobCompression,
    pub size: u64,
}

impl BlobRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.diff_id.as_bytes().to_vec();
        b.push(self.compression as u8);
        b.extend_from_slice(&self.size.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 41 {
            return Err(corrupt("blob record has the wrong length"));
        }
        let compression = match b[32] {
            0 => BlobCompression::None,
            1 => BlobCompression::Gzip,
            2 => BlobCompression::Zstd,
            _ => return Err(corrupt("unknown blob compression")),
        };
        Ok(BlobRecord {
            diff_id: Digest(b[..32].try_into().expect("32 bytes")),
            compression,
            size: u64::from_le_bytes(b[33..41].try_into().expect("8 bytes")),
        })
    }
}

pub fn digest_from_key(k: &[u8]) -> Result<Digest> {
    Ok(Digest(k.try_into().map_err(|_| corrupt("digest key is not 32 bytes"))?))
}

/// Prefix of refs that name images.
pub const IMAGE_REF_PREFIX: &str = "image/";
/// Prefix of refs that pin layers.
pub const LAYER_REF_PREFIX: &str = "layer/";

/// One layer of an image: the blob as the registry serves it and the layer it decompresses to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageLayer {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
}

/// A stored image: its manifest and config exactly as pulled, and its layers bottom first.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    pub manifest_media_type: String,
    /// The manifest's bytes (its SHA-256 is the record's key).
    pub manifest: String,
    pub config_digest: Digest,
    /// The config's bytes.
    pub config: String,
    pub layers: Vec<ImageLayer>,
    /// `os/arch[/variant]` the image was selected for.
    pub platform: String,
}

impl ImageRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialisable")
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        serde_json::from_slice(b).map_err(|e| corrupt(&format!("image record: {e}")))
    }
}

/// The ref that pins an imported layer.
pub fn layer_ref(diff_id: &Digest) -> String {
    format!("{LAYER_REF_PREFIX}{diff_id}")
}

/// `prefix` then the digest's 32 bytes: a key of the default column family.
fn digest_key(prefix: &[u8], digest: &Digest) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(digest.as_bytes());
    k
}

/// Key of a lazy layer's source record in the default column family.
pub fn lazy_key(diff_id: &Digest) -> Vec<u8> {
    digest_key(b"lazy/", diff_id)
}

/// Where the key records of kept layer-form blobs start (`formkey/<sha256>` -> the layer's diff_id).
pub const FORM_KEY_PREFIX: &[u8] = b"formkey/";

/// Key of a kept layer-form blob's key record.
pub fn form_key(digest: &Digest) -> Vec<u8> {
    digest_key(FORM_KEY_PREFIX, digest)
}

/// Key of a kept layer-form blob's bytes (`formblob/<sha256>`).
pub fn form_blob_key(digest: &Digest) -> Vec<u8> {
    digest_key(b"formblob/", digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_put_chunk_records_in_id_order_keeping_duplicates() {
        let ids: Vec<ChunkId> = [9u8, 3, 200, 3, 0].iter().map(|b| ChunkId([*b; 32])).collect();
        let sorted = in_id_order(ids.iter().enumerate(), |(_, id)| **id);
        let firsts: Vec<u8> = sorted.iter().map(|(_, id)| id.0[0]).collect();
        assert_eq!(firsts, vec![0, 3, 3, 9, 200]);
        assert_eq!(sorted.len(), ids.len(), "nothing dropped");
    }

    #[test]
    fn records_round_trip() {
        let c = ChunkRecord {
            loc: Location {
                pack: 7,
                offset: 1 << 40,
                raw_len: 65536,
                stored_len: 1234,
                compression: Compression::Zstd,
            },
            refcount: 3,
        };
        assert_eq!(ChunkRecord::decode(&c.encode()).unwrap(), c);
        let p = PackRecord { committed_len: 99, live_bytes: 50, live_chunks: 2 };
        assert_eq!(PackRecord::decode(&p.encode()).unwrap(), p);
        let b = BlobRecord { diff_id: Digest::of(b"x"), compression: BlobCompression::Zstd, size: 42 };
        assert_eq!(BlobRecord::decode(&b.encode()).unwrap(), b);
        assert_eq!(parse_pack_key(&pack_key(513)), Some(513));
        assert!(ChunkRecord::decode(&[0; 3]).is_err());
    }
}
