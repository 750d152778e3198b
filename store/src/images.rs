//! Images: a manifest, a config and an ordered list of layers, named by `image/<name>` refs.
//! Names are whatever the caller canonicalised (the registry client normalises references).

use hb_core::Digest;
use rocksdb::WriteBatch;

use crate::error::{Result, StoreError};
use crate::meta::*;
use crate::Store;

/// A named image.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NamedImage {
    pub name: String,
    pub digest: Digest,
}

impl Store {
    /// Records an image whose layers are all stored, and names it `name` (replacing what the
    /// name pointed to before, as a tag moves). Visible atomically.
    pub fn put_image(&self, name: &str, digest: &Digest, rec: &ImageRecord) -> Result<()> {
        self.writable()?;
        let _w = self.writer.lock().expect("writer lock");
        for l in &rec.layers {
            if self.db.get_pinned_cf(self.cf(CF_LAYERS), l.diff_id.as_bytes())?.is_none() {
                return Err(StoreError::UnknownLayer(l.diff_id.to_string()));
            }
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_IMAGES), digest.as_bytes(), rec.encode());
        batch.put_cf(self.cf(CF_REFS), format!("{IMAGE_REF_PREFIX}{name}"), digest.as_bytes());
        self.sync_write(batch)
    }

    /// The image stored under manifest digest `digest`.
    pub fn image(&self, digest: &Digest) -> Result<Option<ImageRecord>> {
        match self.db.get_pinned_cf(self.cf(CF_IMAGES), digest.as_bytes())? {
            Some(v) => Ok(Some(ImageRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Every image name and the manifest digest it points to, sorted by name.
    pub fn image_names(&self) -> Result<Vec<NamedImage>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(CF_REFS), IMAGE_REF_PREFIX.as_bytes()) {
            let (k, v) = item?;
            let Some(name) = k.strip_prefix(IMAGE_REF_PREFIX.as_bytes()) else { break };
            out.push(NamedImage { name: String::from_utf8_lossy(name).into_owned(), digest: digest_from_key(&v)? });
        }
        Ok(out)
    }

    /// The manifest digest `name` points to.
    pub fn image_by_name(&self, name: &str) -> Result<Option<Digest>> {
        match self.db.get_pinned_cf(self.cf(CF_REFS), format!("{IMAGE_REF_PREFIX}{name}"))? {
            Some(v) => Ok(Some(digest_from_key(&v)?)),
            None => Ok(None),
        }
    }

    /// Removes the name; `gc` then frees the image and what only it used. False when unknown.
    pub fn remove_image_name(&self, name: &str) -> Result<bool> {
        self.writable()?;
        let _w = self.writer.lock().expect("writer lock");
        let key = format!("{IMAGE_REF_PREFIX}{name}");
        if self.db.get_pinned_cf(self.cf(CF_REFS), &key)?.is_none() {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_REFS), key);
        self.sync_write(batch)?;
        Ok(true)
    }
}

/// Sizes of one named image, by chunks: what removing it would free vs what others also use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageSize {
    pub name: String,
    pub digest: Digest,
    /// Sum of the layer blobs as the registry serves them.
    pub blob_bytes: u64,
    /// Uncompressed bytes of the image's distinct chunks.
    pub content_bytes: u64,
    /// Of those, bytes no other named image uses.
    pub unique_bytes: u64,
    pub shared_bytes: u64,
}

impl Store {
    /// True when the layer with uncompressed digest `diff_id` is stored complete (whatever blob
    /// it came from: the same content gzip'ed or zstd'ed needs no second download). A lazy layer
    /// still waiting for chunks is not complete.
    pub fn has_layer(&self, diff_id: &Digest) -> Result<bool> {
        Ok(self.db.get_pinned_cf(self.cf(CF_LAYERS), diff_id.as_bytes())?.is_some()
            && self.db.get_pinned(lazy_key(diff_id))?.is_none())
    }

    /// Unique and shared sizes of every named image.
    pub fn image_sizes(&self) -> Result<Vec<ImageSize>> {
        use std::collections::{HashMap, HashSet};
        let names = self.image_names()?;
        let mut chunk_sets: Vec<HashMap<hb_core::ChunkId, u32>> = Vec::new();
        let mut users: HashMap<hb_core::ChunkId, HashSet<Digest>> = HashMap::new();
        let mut out = Vec::new();
        for n in &names {
            let rec = self
                .image(&n.digest)?
                .ok_or_else(|| StoreError::CorruptMeta(format!("image {} is missing", n.digest)))?;
            let mut chunks = HashMap::new();
            for l in &rec.layers {
                let idx = self.layer(&l.diff_id)?.ok_or_else(|| StoreError::UnknownLayer(l.diff_id.to_string()))?;
                for c in &idx.chunks {
                    chunks.insert(c.id, c.len);
                    users.entry(c.id).or_default().insert(n.digest);
                }
            }
            out.push(ImageSize {
                name: n.name.clone(),
                digest: n.digest,
                blob_bytes: rec.layers.iter().map(|l| l.size).sum(),
                content_bytes: 0,
                unique_bytes: 0,
                shared_bytes: 0,
            });
            chunk_sets.push(chunks);
        }
        for (size, chunks) in out.iter_mut().zip(&chunk_sets) {
            for (id, len) in chunks {
                size.content_bytes += *len as u64;
                if users[id].len() == 1 {
                    size.unique_bytes += *len as u64;
                } else {
                    size.shared_bytes += *len as u64;
                }
            }
        }
        Ok(out)
    }
}
