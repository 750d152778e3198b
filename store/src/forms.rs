//! Layer-form blobs: the index and chunk-table blobs of a layer's accelerated form, kept byte for
//! byte as a pull fetched them (their SHA-256 is what a manifest names), so LAN peers can be given
//! them instead of the registry. Two records per blob in the default column family: a small key
//! record (`formkey/<sha256>` -> the layer's diff_id), listed for the peers' summary, and the bytes
//! (`formblob/<sha256>`). A blob is given out only while its layer is stored (complete or lazy),
//! its SHA-256 checked on every read; `gc` drops the blobs of layers it removes.

use hb_core::Digest;
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::error::{Result, StoreError};
use crate::meta::*;
use crate::Store;

const KEY_PREFIX: &[u8] = b"formkey/";
const BLOB_PREFIX: &[u8] = b"formblob/";

fn key_of(prefix: &[u8], digest: &Digest) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(digest.as_bytes());
    k
}

impl Store {
    /// Keeps blob `digest` of layer `diff_id`'s accelerated form. The bytes must hash to `digest`
    /// (checked here too: nothing unverified is kept). Durable with the store's next synced write
    /// (a pull's image record); a blob already kept is left as it is.
    pub fn keep_form_blob(&self, digest: &Digest, diff_id: &Digest, bytes: &[u8]) -> Result<()> {
        self.writable()?;
        if Digest::of(bytes) != *digest {
            return Err(StoreError::DigestMismatch { expected: *digest, actual: Digest::of(bytes) });
        }
        if self.db.get_pinned(key_of(KEY_PREFIX, digest))?.is_some() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.put(key_of(BLOB_PREFIX, digest), bytes);
        batch.put(key_of(KEY_PREFIX, digest), diff_id.as_bytes());
        self.logged_write(batch)
    }

    /// Blob `digest` of a layer form, when it is kept and its layer is stored (complete or lazy):
    /// its SHA-256 checked (a blob that fails is reported and treated as absent).
    pub fn form_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(layer) = self.db.get_pinned(key_of(KEY_PREFIX, digest))? else { return Ok(None) };
        let diff_id = digest_from_key(&layer)?;
        if self.db.get_pinned_cf(self.cf(CF_LAYERS), diff_id.as_bytes())?.is_none() {
            return Ok(None);
        }
        let Some(bytes) = self.db.get(key_of(BLOB_PREFIX, digest))? else { return Ok(None) };
        if Digest::of(&bytes) != *digest {
            tracing::warn!(%digest, layer = %diff_id, "a kept layer-form blob does not match its digest; not given out");
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Every kept layer-form blob, with its layer.
    pub fn form_blobs(&self) -> Result<Vec<(Digest, Digest)>> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(KEY_PREFIX, Direction::Forward)) {
            let (k, v) = item?;
            let Some(d) = k.strip_prefix(KEY_PREFIX) else { break };
            out.push((digest_from_key(d)?, digest_from_key(&v)?));
        }
        Ok(out)
    }

    /// Adds to `batch` the removal of every layer-form blob whose layer is not in `kept` (gc).
    pub(crate) fn drop_form_blobs(
        &self,
        batch: &mut WriteBatch,
        kept: &dyn Fn(&Digest) -> Result<bool>,
    ) -> Result<usize> {
        let mut n = 0;
        for (digest, layer) in self.form_blobs()? {
            if !kept(&layer)? {
                batch.delete(key_of(KEY_PREFIX, &digest));
                batch.delete(key_of(BLOB_PREFIX, &digest));
                n += 1;
            }
        }
        Ok(n)
    }
}
