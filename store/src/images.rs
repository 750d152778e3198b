//! Images: a manifest, a config and an ordered list of layers, named by `image/<name>` refs.
//! Names are whatever the caller canonicalised (the registry client normalises references).

use hb_core::Digest;
use rocksdb::{IteratorMode, WriteBatch};

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

    /// Every stored image record with its digest.
    pub fn images(&self) -> Result<Vec<(Digest, ImageRecord)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_IMAGES), IteratorMode::Start) {
            let (k, v) = item?;
            out.push((digest_from_key(&k)?, ImageRecord::decode(&v)?));
        }
        Ok(out)
    }
}
