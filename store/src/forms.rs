//! Layer-form blobs: the index and chunk-table blobs of a layer's accelerated form, kept byte for
//! byte as a pull fetched them (their SHA-256 is what a manifest names), so LAN peers can be given
//! them instead of the registry. Two records per blob in the default column family: a small key
//! record (`formkey/<sha256>` -> the layer's diff_id), listed for the peers' summary, and the bytes
//! (`formblob/<sha256>`). A blob is given out only while its layer is stored (complete or lazy),
//! its SHA-256 checked on every read; `gc` drops the blobs of layers it removes; `fsck` checks
//! every one, and its repair forgets a damaged one (a later pull reads it again).

use std::collections::HashSet;

use hb_core::Digest;
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::error::{Result, StoreError};
use crate::maint::FsckReport;
use crate::meta::*;
use crate::Store;

impl Store {
    /// Keeps blob `digest` of layer `diff_id`'s accelerated form. The bytes must hash to `digest`
    /// (checked here too: nothing unverified is kept). Durable with the store's next synced write
    /// (a pull's image record); a blob already kept is left as it is.
    pub fn keep_form_blob(&self, digest: &Digest, diff_id: &Digest, bytes: &[u8]) -> Result<()> {
        self.writable()?;
        if Digest::of(bytes) != *digest {
            return Err(StoreError::DigestMismatch { expected: *digest, actual: Digest::of(bytes) });
        }
        if self.db.get_pinned(form_key(digest))?.is_some() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.put(form_blob_key(digest), bytes);
        batch.put(form_key(digest), diff_id.as_bytes());
        self.logged_write(batch)
    }

    /// Blob `digest` of a layer form, when it is kept and its layer is stored (complete or lazy):
    /// its SHA-256 checked (a blob that fails is reported and treated as absent).
    pub fn form_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(layer) = self.db.get_pinned(form_key(digest))? else { return Ok(None) };
        let diff_id = digest_from_key(&layer)?;
        if self.db.get_pinned_cf(self.cf(CF_LAYERS), diff_id.as_bytes())?.is_none() {
            return Ok(None);
        }
        let Some(bytes) = self.db.get(form_blob_key(digest))? else { return Ok(None) };
        if Digest::of(&bytes) != *digest {
            tracing::warn!(%digest, layer = %diff_id, "a kept layer-form blob does not match its digest; not given out");
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Every kept layer-form blob, with its layer.
    pub fn form_blobs(&self) -> Result<Vec<(Digest, Digest)>> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(FORM_KEY_PREFIX, Direction::Forward)) {
            let (k, v) = item?;
            let Some(d) = k.strip_prefix(FORM_KEY_PREFIX) else { break };
            out.push((digest_from_key(d)?, digest_from_key(&v)?));
        }
        Ok(out)
    }

    /// Adds to `batch` (gc's) the removal of every layer-form blob whose layer is in `dropped`
    /// or not stored (a pull that kept them and then failed).
    pub(crate) fn drop_form_blobs(&self, batch: &mut WriteBatch, dropped: &HashSet<Digest>) -> Result<usize> {
        let mut n = 0;
        for (digest, layer) in self.form_blobs()? {
            if dropped.contains(&layer) || self.db.get_pinned_cf(self.cf(CF_LAYERS), layer.as_bytes())?.is_none() {
                batch.delete(form_key(&digest));
                batch.delete(form_blob_key(&digest));
                n += 1;
            }
        }
        Ok(n)
    }

    /// fsck's check: every kept blob has its bytes and they hash to its name.
    pub(crate) fn check_form_blobs(&self, r: &mut FsckReport) -> Result<()> {
        for (digest, layer) in self.form_blobs()? {
            r.form_blobs += 1;
            match self.db.get(form_blob_key(&digest))? {
                None => r.issue("corrupt-form-blob", digest, format!("layer {layer}'s blob: its bytes are missing")),
                Some(b) if Digest::of(&b) != digest => r.issue(
                    "corrupt-form-blob",
                    digest,
                    format!("layer {layer}'s blob: its {} bytes hash to {}", b.len(), Digest::of(&b)),
                ),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Forgets kept blob `digest` (repair of a damaged one): synced, both records in one batch.
    pub(crate) fn forget_form_blob(&self, digest: &Digest) -> Result<()> {
        self.writable()?;
        let mut batch = WriteBatch::default();
        batch.delete(form_key(digest));
        batch.delete(form_blob_key(digest));
        self.sync_write(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsck_finds_a_damaged_form_blob_and_repair_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::StoreOptions::default()).unwrap();
        let (good, bad) = (b"an index blob".to_vec(), b"a table blob".to_vec());
        let (dg, db) = (Digest::of(&good), Digest::of(&bad));
        let layer = Digest::of(b"a layer");
        store.keep_form_blob(&dg, &layer, &good).unwrap();
        store.keep_form_blob(&db, &layer, &bad).unwrap();
        let r = store.fsck(&crate::NoProgress).unwrap();
        assert!(r.is_clean() && r.form_blobs == 2, "{r:?}");
        // One blob's bytes changed on disk (as a damaged record would read).
        store.db.put(form_blob_key(&db), b"something else").unwrap();
        let r = store.fsck(&crate::NoProgress).unwrap();
        assert_eq!(r.issues.len(), 1, "{r:?}");
        assert_eq!((r.issues[0].kind, r.issues[0].subject.as_str()), ("corrupt-form-blob", db.to_string().as_str()));
        assert_eq!(store.repair(&r).unwrap().form_blobs_removed, 1);
        let r = store.fsck(&crate::NoProgress).unwrap();
        assert!(r.is_clean() && r.form_blobs == 1, "{r:?}");
        assert_eq!(store.form_blobs().unwrap(), vec![(dg, layer)]);
    }
}
