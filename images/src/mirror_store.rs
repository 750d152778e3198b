//! The mirror's store: `hb proxy` keeps what it serves as the store's raw objects (chunked and
//! deduplicated with every image), its notes as aux records, and makes accelerated forms of the
//! layers it keeps.

use std::io::{self, Read};
use std::sync::Arc;

use hb_core::lazy::AccelLayer;
use hb_core::{ChunkId, ChunkRef, Digest};
use hb_mirror::MirrorStore;
use hb_store::{NoProgress, Store};

/// The mirror's objects are the store's raw objects; its notes are aux records.
pub struct StoreMirror(pub Arc<Store>);

fn io_err(e: hb_store::StoreError) -> io::Error {
    io::Error::other(e)
}

impl MirrorStore for StoreMirror {
    fn lookup(&self, digest: &Digest) -> io::Result<Option<Vec<ChunkRef>>> {
        Ok(self.0.raw(digest).map_err(io_err)?.map(|r| r.chunks))
    }
    fn chunk(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        self.0.read_chunk(id).map_err(io_err)
    }
    fn insert(&self, digest: &Digest, input: &mut dyn Read) -> io::Result<()> {
        self.0.put_raw(input, digest, &NoProgress).map(|_| ()).map_err(io_err)
    }
    fn remove(&self, digest: &Digest) -> io::Result<()> {
        self.0.remove_raw(digest).map(|_| ()).map_err(io_err)
    }
    fn objects(&self) -> io::Result<Vec<(Digest, u64)>> {
        Ok(self.0.raw_objects().map_err(io_err)?.into_iter().map(|(d, r)| (d, r.size)).collect())
    }
    fn reclaim(&self) -> io::Result<()> {
        self.0.gc(&NoProgress).map(|_| ()).map_err(io_err)
    }
    fn accelerate(&self, blob: &Digest, diff_id: &Digest) -> io::Result<AccelLayer> {
        let store = &self.0;
        let chunks =
            store.raw(blob).map_err(io_err)?.ok_or_else(|| io::Error::other(format!("blob {blob} is not kept")))?;
        let reader = RawReader { store, chunks: chunks.chunks.into_iter(), buf: Vec::new(), at: 0 };
        let opts = hb_store::ImportOptions { expect_digest: Some(*blob), pin: true };
        let report = store.import_blob(reader, &opts, &NoProgress).map_err(io_err)?;
        if report.diff_id != *diff_id {
            store.unpin_layer(&report.diff_id).map_err(io_err)?;
            return Err(io::Error::other(format!(
                "layer {blob} unpacks to {}, but the image's config says {diff_id}",
                report.diff_id
            )));
        }
        let mut hasher = hb_core::DigestHasher::new();
        let mut size = 0u64;
        let (index, table) = store
            .layer_data(diff_id, 0, |b| {
                hasher.update(b);
                size += b.len() as u64;
            })
            .map_err(io_err)?;
        let (index_raw, table_raw) = hb_registry::encode_layer_form(&index, &table).map_err(io::Error::other)?;
        let (index_digest, table_digest) = (Digest::of(&index_raw), Digest::of(&table_raw));
        store.put_raw(&index_raw[..], &index_digest, &NoProgress).map_err(io_err)?;
        store.put_raw(&table_raw[..], &table_digest, &NoProgress).map_err(io_err)?;
        Ok(AccelLayer {
            diff_id: *diff_id,
            blob: *blob,
            index: index_digest,
            index_size: index_raw.len() as u64,
            table: table_digest,
            table_size: table_raw.len() as u64,
            data: hasher.finish(),
            data_size: size,
        })
    }
    fn stored_chunk(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        Ok(self.0.read_chunk_stored_checked(id).map_err(io_err)?.0.bytes)
    }
    fn release_layer(&self, diff_id: &Digest) -> io::Result<()> {
        self.0.unpin_layer(diff_id).map(|_| ()).map_err(io_err)
    }
    fn meta(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        self.0.aux(key).map_err(io_err)
    }
    fn put_meta(&self, key: &str, value: &[u8]) -> io::Result<()> {
        self.0.put_aux(key, value).map_err(io_err)
    }
}

/// A raw object's bytes as a stream, chunk by chunk (each verified by the store).
struct RawReader<'a> {
    store: &'a Store,
    chunks: std::vec::IntoIter<ChunkRef>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for RawReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            match self.chunks.next() {
                None => return Ok(0),
                Some(c) => {
                    self.buf = self.store.read_chunk(&c.id).map_err(io_err)?;
                    self.at = 0;
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
